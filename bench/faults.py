"""The fault matrix on real processes: segments sent, predicted, lost, duplicated, recovery.

Each case starts its own Mosquitto (the deployment's persistence and queue settings, on a
free port), the cloud service (``csi cloud``, its default settings: SQLite, or PostgreSQL on
127.0.0.1:5432 behind a cuttable TCP proxy for the database outage) and two edge processes
replaying the committed Fition samples in real time (half the APs each), lets every AP get
predictions, applies one fault, and stops everything whatever happens. Cases:

- ``broker_kill``: the cloud frozen (SIGSTOP) so the edges reconnect first; Mosquitto SIGKILLed
  more than one autosave after the cloud subscribed, down ``outage_s``, restarted; the edges
  flush their spools; the cloud resumes (the fault clears);
- ``cloud_kill``: the cloud SIGKILLed and restarted (the fault clears when it is ready again;
  its start-up time is reported apart);
- ``edge_kill``: one edge process SIGKILLed, restarted on the same spool 3 s later;
- ``db_outage``: PostgreSQL unreachable (every connection cut, new ones refused) ``db_outage_s``;
- ``disk_full_spool``: one edge's spool on a small tmpfs filled to the brim, its link to the
  broker (a TCP proxy) cut ``outage_s`` so the spool must grow; segments the edge drops and
  counts are *accounted*;
- ``disk_full_recordings``: the cloud's recordings folder on a small tmpfs, filled;
- ``read_flood``: N unauthenticated API reads at concurrency 50 during ingest;
- ``upload_bombs``: an HDF5 recording claiming 40 million frames and a ``.mat`` zlib bomb
  (1.6 GB of zeros) posted to ``/api/v1/predict`` during ingest; the cloud runs under an
  address-space limit so a bomb cannot take the host down;
- ``status_bomb``: a retained 2 KB ``[[[[...`` status of a made-up AP, then a cloud restart;
- ``ctl_bomb``: a retained 2 KB ``[[[[...`` ctl message to a real AP;
- ``fuzz``: N random and mutated payloads on seg topics of made-up APs; the cloud's RSS
  before and after.

Counts: *sent* is what the edges' statuses report encoding (the highest ``next_seq`` per AP and
epoch; segments encoded after an edge's last status before a SIGKILL are not seen); *predicted*
the distinct (AP, epoch, seq) that the prediction rows in the cloud's database stand for (a row
of an idle run stands for each of its segments); *lost* sent without a prediction; *duplicated*
rows beyond the first per (AP, epoch, seq) they stand for; *recovery* the seconds from the
moment the fault clears to the first live prediction the cloud publishes for an affected AP.
Targets (issue 16): 0 lost (for a full spool: every loss counted by the edge), 0 duplicated,
recovery <= 10 s, cloud RSS after fuzz within 20 % of before.

    python bench/faults.py              # every case; bench/results/faults.json and faults.md
    python bench/faults.py --quick      # shorter outages, fewer APs, requests and payloads
    python bench/faults.py --only cloud_kill --only fuzz
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

__all__ = ["CASES", "CaseResult", "main", "parse_args", "render_markdown"]

RESULTS = ROOT / "bench" / "results"
POSTGRES = ("127.0.0.1", 5432)
RECOVERY_TARGET_S = 10.0
RSS_GROWTH_TARGET = 0.20
# The bench's own guard: each cloud process (the upload parser worker too) may map this much,
# so a bomb fails inside it instead of taking the host's memory.
UPLOAD_ADDRESS_SPACE_GIB = 6.0
UPLOAD_GROWTH_TARGET_MIB = 1024  # the cloud's processes while parsing the bombs


@dataclass(frozen=True)
class Scale:
    aps: int
    outage_s: float
    db_outage_s: float
    flood_requests: int
    flood_concurrency: int
    fuzz_payloads: int
    hold_s: float  # live ingest after a fault before the edges stop


FULL = Scale(aps=8, outage_s=30.0, db_outage_s=30.0, flood_requests=5000,
             flood_concurrency=50, fuzz_payloads=100_000, hold_s=10.0)
QUICK = Scale(aps=4, outage_s=10.0, db_outage_s=10.0, flood_requests=1000,
              flood_concurrency=50, fuzz_payloads=5000, hold_s=5.0)


@dataclass
class CaseResult:
    name: str
    sent: int = 0
    predicted: int = 0
    lost: int = 0
    duplicated: int = 0
    lost_accounted: int = 0  # segments the edges report dropping (a full spool)
    recovery_s: float | None = None
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    error: str | None = None
    wall_s: float = 0.0
    cloud_alive_at_end: bool | None = None
    lost_by_ap: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Bench:
    """The processes of one case and the counting."""

    def __init__(self, folder: Path, scale: Scale, *, db: str = "sqlite",
                 cloud_env: dict[str, str] | None = None, spool_mount: bool = False,
                 recordings_mount: bool = False, address_space_gib: float | None = None) -> None:
        from _procs import SAMPLES, Cloud, Edge, Monitor, Mosquitto, TcpProxy, tmpfs

        self.folder = folder
        self.scale = scale
        self.stack = contextlib.ExitStack()
        self.pg_name: str | None = None
        self.proxy: TcpProxy | None = None
        self.how_limited: list[str] = []
        try:
            self.broker = Mosquitto(folder / "broker")
            self.broker.start()
            self.stack.callback(self.broker.kill)
            self.monitor = Monitor(self.broker.port)
            self.stack.callback(self.monitor.close)
            if db == "postgresql":
                self.db_url = self._postgres()
            else:
                self.db_url = f"sqlite:///{folder / 'cloud.db'}"
            recordings = None
            if recordings_mount:
                recordings = folder / "recordings-fs"
                self.how_limited.append(
                    self.stack.enter_context(tmpfs(recordings, 4096)) + " for the recordings")
            self.cloud = Cloud(self.broker, self.db_url, folder, "csi-cloud-1", env=cloud_env,
                               recordings=recordings, address_space_gib=address_space_gib)
            self.cloud.log = folder / "cloud.log"
            self.stack.callback(self.cloud.stop)
            self.startup_s = self.cloud.start()
            files = sorted(SAMPLES.rglob("*.pcap"))
            self.names = [f"f{i % 2}/ap{i}" for i in range(scale.aps)]
            half = (scale.aps + 1) // 2
            self.edges = []
            self.edge_link: TcpProxy | None = None
            for e, chunk in enumerate((self.names[:half], self.names[half:])):
                spool = url = None
                if spool_mount and e == 0:
                    spool = folder / "spool-fs"
                    self.how_limited.append(
                        self.stack.enter_context(tmpfs(spool, 16384)) + " for edge0's spool")
                    # edge0 reaches the broker through a link the bench can cut.
                    self.edge_link = TcpProxy(("127.0.0.1", self.broker.port))
                    self.stack.callback(self.edge_link.close)
                    url = f"mqtt://127.0.0.1:{self.edge_link.port}"
                edge = Edge(self.broker, folder,
                            [(n, files[self.names.index(n) % len(files)]) for n in chunk],
                            spool=spool, name=f"edge{e}", broker_url=url)
                self.edges.append(edge)
                self.stack.callback(edge.kill)
                edge.start()
        except BaseException:
            self.stack.close()
            raise

    def warm(self) -> None:
        """Wait for a prediction for every AP."""
        from _procs import wait_until

        self.t_warm = wait_until(lambda: self.monitor.has_pred(self.names), 180,
                               "a prediction for every AP", self.check)

    def _postgres(self) -> str:
        import psycopg
        from _procs import TcpProxy

        name = f"csi_faults_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(f"postgresql://postgres@{POSTGRES[0]}:{POSTGRES[1]}/test",
                             autocommit=True, connect_timeout=5) as con:
            con.execute(f"CREATE DATABASE {name}")
        self.pg_name = name

        def drop() -> None:
            with psycopg.connect(f"postgresql://postgres@{POSTGRES[0]}:{POSTGRES[1]}/test",
                                 autocommit=True, connect_timeout=5) as con:
                con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

        self.stack.callback(drop)
        self.proxy = TcpProxy(POSTGRES)
        self.stack.callback(self.proxy.close)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.proxy.port}/{name}"

    def direct_db_url(self) -> str:
        """The database URL without the proxy (counting must not depend on the fault)."""
        if self.pg_name is None:
            return self.db_url
        return f"postgresql+psycopg://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{self.pg_name}"

    def check(self) -> None:
        self.cloud.check()
        for edge in self.edges:
            if edge.proc is not None and edge.proc.poll() is not None:
                raise AssertionError(f"{edge.log.name} exited with {edge.proc.returncode}: "
                                     f"{edge.log.read_text(errors='replace')[-1500:]}")

    def rows(self) -> list[tuple[str, int, int]]:
        """(AP, epoch, seq) per segment the stored predictions stand for: a row of an idle
        run stands for each of its segments, so a resent run counts as duplicates too."""
        import sqlalchemy as sa

        from csi_cloud.db import covered

        engine = sa.create_engine(self.direct_db_url())
        try:
            with engine.connect() as con:
                return [(f"{site}/{ap}", int(epoch), q) for site, ap, epoch, seq, n in
                        con.execute(sa.text("SELECT site, ap, epoch, seq, segments "
                                            "FROM predictions"))
                        for q in covered(int(seq), n)]
        finally:
            engine.dispose()

    def finish(self, result: CaseResult, catch_up_s: float) -> None:
        """Stop the edges (they drain), wait for the cloud to catch up, count."""
        for edge in self.edges:
            code = edge.stop()
            if code not in (0, None):
                result.notes.append(f"{edge.log.name[:-4]} exited with {code} on SIGTERM")
        time.sleep(1.5)  # the final (offline) statuses
        expected = self.monitor.encoded(self.names)
        result.sent = sum(expected.values())
        want = {(n, ep, s) for (n, ep), k in expected.items() for s in range(k)}
        have: set[tuple[str, int, int]] = set()
        rows: list[tuple[str, int, int]] = []
        last_progress, last_n = time.monotonic(), -1
        deadline = time.monotonic() + catch_up_s * 4
        while time.monotonic() < deadline:
            try:
                rows = self.rows()
            except Exception as exc:
                result.notes.append(f"counting: {type(exc).__name__}: {str(exc)[:200]}")
                rows = []
            have = {r for r in rows if r[0] in set(self.names)}
            if want <= have:
                break
            if len(have) != last_n:
                last_n, last_progress = len(have), time.monotonic()
            elif time.monotonic() - last_progress > catch_up_s:
                result.notes.append(f"the cloud stopped catching up ({len(want - have)} "
                                    f"segments missing after {catch_up_s:.0f} s without progress)")
                break
            time.sleep(1.0)
        counts = Counter(r for r in rows if r[0] in set(self.names))
        result.predicted = len(want & set(counts))
        missing = want - set(counts)
        result.lost = len(missing)
        result.lost_by_ap = {n: c for n, c in Counter(m[0] for m in missing).items()}
        result.duplicated = sum(c - 1 for c in counts.values())
        result.details["predictions_beyond_sent"] = len(set(counts) - want)
        for n in self.names:
            status = self.monitor.last(n) or {}
            counters = status.get("counters", {})
            result.lost_accounted += int(counters.get("segments_dropped_disk_full", 0)) + int(
                counters.get("segments_dropped_spool_full", 0))
        result.cloud_alive_at_end = self.cloud.alive()

    def close(self) -> None:
        self.stack.close()


# -- the faults ---------------------------------------------------------------------------


def _recovery(b: Bench, result: CaseResult, cleared: float, names: list[str] | None = None,
              wait_s: float = 60.0) -> None:
    """Seconds from ``cleared`` to the first live prediction for ``names`` (None: none came
    within ``wait_s``)."""
    from _procs import WaitTimeoutError, wait_until

    names = names or b.names
    try:
        wait_until(lambda: b.monitor.first_pred_after(cleared, names) is not None, wait_s,
                 "a prediction after the fault cleared", every_s=0.1)
    except WaitTimeoutError as exc:
        result.notes.append(str(exc))
    first = b.monitor.first_pred_after(cleared, names)
    result.recovery_s = None if first is None else round(first - cleared, 2)


def case_broker_kill(b: Bench, r: CaseResult) -> None:
    from _procs import rss_kb, wait_until

    # The cloud's session must be in the broker's autosave before the crash.
    autosave = float(b.broker.settings.get("autosave_interval", 30))
    time.sleep(max(0.0, b.t_warm + 2 - time.monotonic()))
    since_cloud = time.monotonic() - b.t_warm
    if since_cloud < autosave + 5:
        time.sleep(autosave + 5 - since_cloud)
    b.cloud.freeze()
    r.details["broker_rss_kb_before"] = rss_kb(b.broker.pid)
    b.broker.kill()
    time.sleep(b.scale.outage_s)
    b.broker.start()
    up = time.monotonic()

    def flushed() -> bool:
        return all(any(s["online"] and s["counters"]["reconnects"] >= 1
                       and s["counters"]["segments_buffered"] <= 4
                       for s in b.monitor.statuses_since(n, up)) for n in b.names)

    wait_until(flushed, 120, "the edges to reconnect and flush their spools")
    r.details["edges_flushed_s"] = round(time.monotonic() - up, 1)
    time.sleep(2)
    cleared = time.monotonic()
    b.cloud.thaw()
    _recovery(b, r, cleared)
    time.sleep(b.scale.hold_s)
    r.notes.append("the cloud was frozen across the outage so every edge reconnected before it; "
                   "the fault clears when it resumes")


def case_cloud_kill(b: Bench, r: CaseResult) -> None:
    time.sleep(3)
    left = b.cloud.kill()
    r.details["workers_left_by_the_killed_cloud"] = len(left)
    time.sleep(2)
    r.details["restart_to_ready_s"] = round(b.cloud.start(), 1)
    _recovery(b, r, time.monotonic())
    time.sleep(b.scale.hold_s)
    r.notes.append("recovery counted from the restarted cloud's /readyz 200; its start-up "
                   "time is restart_to_ready_s")


def case_edge_kill(b: Bench, r: CaseResult) -> None:
    time.sleep(3)
    edge = b.edges[0]
    edge.kill()
    time.sleep(3)
    edge.start()
    _recovery(b, r, time.monotonic(), edge.names)
    time.sleep(b.scale.hold_s)
    r.notes.append("segments encoded after the killed edge's last status (1 s interval) are "
                   "not seen by the count")


def case_db_outage(b: Bench, r: CaseResult) -> None:
    assert b.proxy is not None
    time.sleep(3)
    b.proxy.cut()
    t0 = time.monotonic()
    readyz = []
    while time.monotonic() - t0 < b.scale.db_outage_s:
        try:
            import httpx

            readyz.append(httpx.get(f"{b.cloud.url}/readyz", timeout=2).status_code)
        except Exception:
            readyz.append(None)
        time.sleep(1)
    b.proxy.restore()
    cleared = time.monotonic()
    r.details["readyz_during_outage"] = dict(Counter(str(x) for x in readyz))
    _recovery(b, r, cleared)
    time.sleep(b.scale.hold_s)


def case_disk_full_spool(b: Bench, r: CaseResult) -> None:
    from _procs import fill, wait_until

    edge = b.edges[0]
    time.sleep(3)
    assert b.edge_link is not None
    filler = fill(edge.spool, leave_kb=16)
    r.details["limit"] = b.how_limited
    b.edge_link.cut()
    time.sleep(b.scale.outage_s)
    b.edge_link.restore()
    restored = time.monotonic()
    # After a network outage an edge retries on its reconnect backoff (full jitter up to
    # reconnect_max_s, 30 s by default, on purpose): that wait is the policy for any outage,
    # the same in every case, and not what this one probes (broker_kill also counts from
    # after the edges are back). The fault here is the full disk: recovery counts from the
    # first of edge0's connections back to its first prediction, the disk still full; the
    # wait for the connection and the time from the link's return are reported apart.
    wait_until(lambda: b.monitor.first_status_after(restored, edge.names) is not None, 60,
               "one of edge0's connections back", every_s=0.1)
    cleared = b.monitor.first_status_after(restored, edge.names) or restored
    r.details["link_restored_to_reconnect_s"] = round(cleared - restored, 2)
    _recovery(b, r, cleared, edge.names)
    if r.recovery_s is not None:
        r.details["recovery_from_link_restored_s"] = round(r.recovery_s + cleared - restored, 2)
    # Every AP of edge0 back, then the hold with the disk full: the stream goes on, nothing
    # drops the connection.
    wait_until(lambda: b.monitor.has_pred(edge.names, after=cleared), 60,
               "a prediction for every AP of edge0")
    reconnects = {n: (b.monitor.last(n) or {}).get("counters", {}).get("reconnects")
                  for n in edge.names}
    t_hold = time.monotonic()
    time.sleep(b.scale.hold_s)
    r.details["edge0_predictions_during_hold_disk_full"] = b.monitor.preds_between(
        t_hold, time.monotonic(), edge.names)
    statuses = [b.monitor.last(n) or {} for n in edge.names]
    dropped = sum(1 for n, s in zip(edge.names, statuses, strict=True)
                  if s.get("counters", {}).get("reconnects") != reconnects[n])
    r.details["edge0_connections_dropped_during_hold"] = dropped
    if dropped:
        r.failures.append(f"{dropped} of edge0's connections dropped on the full disk")
    r.details["edge0_errors"] = sorted({str(s.get("error"))[:200] for s in statuses
                                        if s.get("error")})
    r.details["edge0_alive_with_full_disk"] = edge.alive()
    filler.unlink()
    r.notes.append("edge0's spool filesystem filled to 16 KiB free, then its link to the "
                   "broker cut for the outage: the spool must grow on a full disk; recovery "
                   "counts from the first of edge0's connections back (the reconnect backoff "
                   "after the link's return is link_restored_to_reconnect_s) to its first "
                   "prediction, the disk still full until the hold ends")


def case_disk_full_recordings(b: Bench, r: CaseResult) -> None:
    from _procs import fill

    time.sleep(3)
    folder = b.cloud.command[b.cloud.command.index("--recordings") + 1]
    filler = fill(Path(folder), leave_kb=0)
    r.details["limit"] = b.how_limited
    t0 = time.monotonic()
    time.sleep(b.scale.outage_s)
    r.details["predictions_published_while_full"] = b.monitor.preds_between(
        t0 + 2, time.monotonic(), b.names)
    filler.unlink()
    cleared = time.monotonic()
    _recovery(b, r, cleared)
    time.sleep(b.scale.hold_s)


def case_read_flood(b: Bench, r: CaseResult) -> None:
    import httpx

    n, concurrency = b.scale.flood_requests, b.scale.flood_concurrency
    paths = ["/api/v1/predictions?limit=1000", "/api/v1/aps", "/api/v1/predictions?limit=100",
             f"/api/v1/aps/{b.names[0]}/prediction"]
    codes: Counter[str] = Counter()
    latencies: list[float] = []

    async def flood() -> None:
        queue = iter(range(n))
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=b.cloud.url, timeout=60, limits=limits) as client:
            async def worker() -> None:
                for i in queue:
                    t = time.monotonic()
                    try:
                        resp = await client.get(paths[i % len(paths)])
                        codes[str(resp.status_code)] += 1
                    except httpx.HTTPError as exc:
                        codes[type(exc).__name__] += 1
                    latencies.append(time.monotonic() - t)

            await asyncio.gather(*[worker() for _ in range(concurrency)])

    time.sleep(3)
    t0 = time.monotonic()
    asyncio.run(flood())
    cleared = time.monotonic()
    latencies.sort()
    r.details.update({
        "requests": n, "concurrency": concurrency, "codes": dict(codes),
        "flood_s": round(cleared - t0, 1),
        "p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "p99_s": round(latencies[int(len(latencies) * 0.99)], 3) if latencies else None,
        "predictions_published_during_flood": b.monitor.preds_between(t0, cleared, b.names)})
    _recovery(b, r, cleared)
    time.sleep(b.scale.hold_s)
    r.notes.append("the fault clears when the flood ends")


def hdf5_bomb(path: Path, frames: int = 40_000_000) -> Path:
    """A valid project recording whose datasets and ``committed`` claim ``frames`` frames
    (the chunks past the real ones are never written: a small file)."""
    import h5py
    from _procs import SAMPLES

    from csi_edge.convert import convert

    convert(sorted(SAMPLES.rglob("*.pcap"))[0], path, overwrite=True)
    with h5py.File(path, "r+") as f:
        for name, obj in f.items():
            if isinstance(obj, h5py.Dataset) and name not in ("labels", "committed"):
                obj.resize(frames, axis=0)
        f["committed"][0] = frames
    return path


def mat_zlib_bomb(path: Path, columns: int = 600_000) -> Path:
    """A MAT v5 file whose compressed ``CSIamp`` (342 x ``columns`` float64 zeros, 1.6 GB for
    600,000) is ~1.6 MB on disk; written in a stream, never held in memory."""
    rows = 342
    data_bytes = rows * columns * 8
    name = b"CSIamp"

    def tag(kind: int, nbytes: int) -> bytes:
        return struct.pack("<II", kind, nbytes)

    flags = tag(6, 8) + struct.pack("<II", 6, 0)  # miUINT32: mxDOUBLE_CLASS
    dims = tag(5, 8) + struct.pack("<ii", rows, columns)  # miINT32
    aname = tag(1, len(name)) + name.ljust(8, b"\0")  # miINT8
    body_len = len(flags) + len(dims) + len(aname) + 8 + data_bytes
    comp = zlib.compressobj(9)
    out = [comp.compress(tag(14, body_len) + flags + dims + aname + tag(9, data_bytes))]
    block = bytes(2**20)
    left = data_bytes
    while left:
        n = min(left, len(block))
        out.append(comp.compress(block[:n]))
        left -= n
    out.append(comp.flush())
    compressed = b"".join(out)
    header = b"MATLAB 5.0 MAT-file, fault bench".ljust(116, b" ") + bytes(8) + \
        struct.pack("<H", 0x0100) + b"IM"
    path.write_bytes(header + tag(15, len(compressed)) + compressed)
    return path


def case_upload_bombs(b: Bench, r: CaseResult) -> None:
    import httpx
    from _procs import tree_rss_kb

    bombs = [hdf5_bomb(b.folder / "bomb.h5"), mat_zlib_bomb(b.folder / "bomb.mat")]
    before = tree_rss_kb(b.cloud.pid) or 0
    peak = {"kb": before}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["kb"] = max(peak["kb"], tree_rss_kb(b.cloud.pid) or 0)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    uploads = []
    try:
        for bomb in bombs:
            t = time.monotonic()
            try:
                resp = httpx.post(f"{b.cloud.url}/api/v1/predict", timeout=180,
                                  files={"file": (bomb.name, bomb.read_bytes())})
                outcome: Any = {"code": resp.status_code, "answer": resp.text[:300]}
            except httpx.HTTPError as exc:
                outcome = {"code": None, "answer": f"{type(exc).__name__}: {exc}"[:300]}
            uploads.append({"file": bomb.name, "bytes": bomb.stat().st_size,
                            "seconds": round(time.monotonic() - t, 1), **outcome})
    finally:
        stop.set()
        sampler.join(5)
    cleared = time.monotonic()
    for upload in uploads:
        if upload["code"] is None or upload["code"] >= 500:
            r.failures.append(f"{upload['file']}: answered {upload['code']}")
    growth_mib = (peak["kb"] - before) / 1024
    if growth_mib > UPLOAD_GROWTH_TARGET_MIB:
        r.failures.append(f"the cloud's processes grew by {growth_mib:.0f} MiB > "
                          f"{UPLOAD_GROWTH_TARGET_MIB} MiB (capped at "
                          f"{UPLOAD_ADDRESS_SPACE_GIB:g} GiB of address space each)")
    r.details.update({"uploads": uploads, "cloud_tree_rss_before_kb": before,
                      "cloud_tree_rss_peak_kb": peak["kb"],
                      "predictions_published_during_uploads":
                          b.monitor.preds_between(t0, cleared, b.names)})
    _recovery(b, r, cleared)
    time.sleep(b.scale.hold_s)
    r.notes.append("the fault clears when both uploads are answered")


def _publish(port: int, topic: str, payload: bytes, retain: bool = True) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"faults-pub-{uuid.uuid4()}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


BOMB = b"[" * 2000


def case_status_bomb(b: Bench, r: CaseResult) -> None:
    import httpx
    from _procs import PREFIX

    time.sleep(3)
    topic = f"{PREFIX}/bomb/ap0/status"
    _publish(b.broker.port, topic, BOMB)
    t_bomb = time.monotonic()
    try:
        _recovery(b, r, t_bomb + 1.0, wait_s=20)
        after_bomb = r.recovery_s
        time.sleep(5)
        r.details["readyz_after_bomb"] = httpx.get(f"{b.cloud.url}/readyz", timeout=5).status_code
        r.details["predictions_in_5_s_after_bomb"] = b.monitor.preds_between(
            t_bomb + 1, time.monotonic(), b.names)
        b.cloud.stop()
        try:
            r.details["restart_to_ready_s"] = round(b.cloud.start(timeout_s=90), 1)
        except AssertionError as exc:
            r.notes.append(f"restart with the retained bomb: {str(exc)[:300]}")
        _recovery(b, r, time.monotonic(), wait_s=30)
        after_restart = r.recovery_s
        r.details["recovery_after_bomb_s"] = after_bomb
        r.details["recovery_after_restart_s"] = after_restart
        r.recovery_s = (None if after_bomb is None or after_restart is None
                        else max(after_bomb, after_restart))
        time.sleep(b.scale.hold_s)
    finally:
        _publish(b.broker.port, topic, b"")  # clear the retained copy
    r.notes.append("recovery: the worse of (bomb published -> next prediction) and (cloud "
                   "restarted with the bomb retained -> next prediction)")


def case_ctl_bomb(b: Bench, r: CaseResult) -> None:
    from _procs import PREFIX

    target = b.names[0]
    time.sleep(3)
    topic = f"{PREFIX}/{target}/ctl"
    _publish(b.broker.port, topic, BOMB)
    t_bomb = time.monotonic()
    try:
        _recovery(b, r, t_bomb + 1.0, [target], wait_s=20)
        time.sleep(b.scale.hold_s)
        r.details["target"] = target
        r.details["target_predictions_after_bomb"] = b.monitor.preds_between(
            t_bomb + 1, time.monotonic(), [target])
        status = b.monitor.last(target) or {}
        r.details["target_status"] = {"state": status.get("state"),
                                      "error": str(status.get("error"))[:300]}
    finally:
        _publish(b.broker.port, topic, b"")
    r.notes.append("recovery: bomb published -> the target AP's next prediction")


def fuzz_payloads(seeds: list[bytes], n: int, rng: random.Random) -> list[bytes]:
    """Random bytes, and real payloads with bit flips, overwritten header bytes, truncation,
    extension and splices."""
    out = []
    for _ in range(n):
        kind = rng.randrange(6)
        seed = bytearray(rng.choice(seeds)) if seeds else bytearray(rng.randbytes(64))
        if kind == 0 or not seeds:
            p = bytearray(rng.randbytes(rng.randrange(0, 2048)))
        elif kind == 1:
            for _ in range(rng.randrange(1, 8)):
                i = rng.randrange(len(seed))
                seed[i] ^= 1 << rng.randrange(8)
            p = seed
        elif kind == 2:  # the header: epoch, sequence number, count, level, model id
            for _ in range(rng.randrange(1, 6)):
                seed[rng.randrange(min(20, len(seed)))] = rng.randrange(256)
            p = seed
        elif kind == 3:
            p = seed[: rng.randrange(len(seed))]
        elif kind == 4:
            p = seed + rng.randbytes(rng.randrange(1, 512))
        else:
            other = rng.choice(seeds)
            p = seed[: rng.randrange(len(seed))] + other[rng.randrange(len(other)):]
        out.append(bytes(p))
    return out


def case_fuzz(b: Bench, r: CaseResult) -> None:
    import paho.mqtt.client as mqtt
    from _procs import PREFIX, rss_kb

    time.sleep(5)
    before = rss_kb(b.cloud.pid)
    payloads = fuzz_payloads(b.monitor.payloads, b.scale.fuzz_payloads, random.Random(16))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="faults-fuzzer",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", b.broker.port)
    client.loop_start()
    t0 = time.monotonic()
    try:
        for start in range(0, len(payloads), 1000):
            infos = [client.publish(f"{PREFIX}/fuzz/ap{i % 16}/seg", payloads[i], qos=1)
                     for i in range(start, min(len(payloads), start + 1000))]
            for info in infos:
                info.wait_for_publish(60)
    finally:
        client.loop_stop()
        client.disconnect()
    cleared = time.monotonic()
    _recovery(b, r, cleared)
    time.sleep(max(b.scale.hold_s, 10))
    after = rss_kb(b.cloud.pid)
    growth = None if not before or after is None else round(after / before - 1, 3)
    r.details.update({"payloads": len(payloads), "publish_s": round(cleared - t0, 1),
                      "seed_payloads": len(b.monitor.payloads), "rss_before_kb": before,
                      "rss_after_kb": after, "rss_growth": growth})
    if growth is None or growth > RSS_GROWTH_TARGET:
        r.failures.append(f"RSS growth {growth} > {RSS_GROWTH_TARGET}")


@dataclass(frozen=True)
class Case:
    run: Callable[[Bench, CaseResult], None]
    options: dict[str, Any] = field(default_factory=dict)
    accounted_loss_ok: bool = False  # a full spool may drop segments it counts


CASES: dict[str, Case] = {
    "broker_kill": Case(case_broker_kill),
    "cloud_kill": Case(case_cloud_kill),
    "edge_kill": Case(case_edge_kill),
    "db_outage": Case(case_db_outage, {"db": "postgresql"}),
    "disk_full_spool": Case(case_disk_full_spool, {"spool_mount": True}, accounted_loss_ok=True),
    "disk_full_recordings": Case(case_disk_full_recordings, {"recordings_mount": True}),
    "read_flood": Case(case_read_flood),
    "upload_bombs": Case(case_upload_bombs, {"address_space_gib": UPLOAD_ADDRESS_SPACE_GIB}),
    "status_bomb": Case(case_status_bomb),
    "ctl_bomb": Case(case_ctl_bomb),
    "fuzz": Case(case_fuzz),
}


def judge(result: CaseResult, case: Case) -> None:
    fails = result.failures
    if result.error:
        fails.append(f"error: {result.error.splitlines()[-1][:200]}")
    if result.sent == 0:
        fails.append("no segment counted as sent")
    unaccounted = result.lost - (result.lost_accounted if case.accounted_loss_ok else 0)
    if unaccounted > 0:
        fails.append(f"{unaccounted} lost" + (" (not counted by the edge)"
                                              if case.accounted_loss_ok else ""))
    if result.duplicated:
        fails.append(f"{result.duplicated} duplicated")
    if result.recovery_s is None:
        fails.append("no prediction after the fault cleared")
    elif result.recovery_s > RECOVERY_TARGET_S:
        fails.append(f"recovery {result.recovery_s} s > {RECOVERY_TARGET_S:g} s")
    if result.cloud_alive_at_end is False:
        fails.append("the cloud process died")
    result.passed = not fails


def run_case(name: str, scale: Scale, keep: Path | None = None) -> CaseResult:
    case = CASES[name]
    result = CaseResult(name)
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix=f"faults-{name}-"))
    bench: Bench | None = None
    try:  # whatever happens (Ctrl-C, SIGTERM too), the finally stops every process
        try:
            bench = Bench(folder, scale, **case.options)
            result.details["cloud_startup_s"] = round(bench.startup_s, 1)
            bench.warm()
            case.run(bench, result)
        except Exception as exc:
            result.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()[
                -2000:]
            result.details["traceback"] = traceback.format_exc()[-3000:]
        try:
            if bench is not None:
                with contextlib.suppress(Exception):
                    if bench.broker.proc is None:
                        bench.broker.start()  # the edges drain through it
                for link in (bench.proxy, getattr(bench, "edge_link", None)):
                    if link is not None and link.cut_now:
                        with contextlib.suppress(OSError):
                            link.restore()
                bench.cloud.thaw()
                bench.finish(result, catch_up_s=30 if scale is QUICK else 60)
        except Exception as exc:
            result.notes.append(f"counting failed: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        if bench is not None:
            for log in ("cloud.log", "edge0.log", "edge1.log"):
                path = folder / log
                if path.exists():
                    tail = path.read_text(errors="replace")[-4000:]
                    result.details.setdefault("log_tails", {})[log] = [
                        line for line in tail.splitlines()
                        if any(w in line for w in ("ERROR", "Traceback", "Error", "CRITICAL",
                                                   "WARNING"))
                        and "csi_edge.sources" not in line][-8:]
            with contextlib.suppress(Exception):
                bench.close()
        if keep is not None:
            shutil.copytree(folder, keep / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.h5", "*.mat", "*.db*", "filler.bin"))
        shutil.rmtree(folder, ignore_errors=True)
    result.wall_s = round(time.monotonic() - started, 1)
    judge(result, case)
    return result


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Fault matrix ({report['mode']} run, commit {report['commit']})", "",
             f"`{report['command']}` on {report['host']['machine']}, "
             f"{report['aps']} APs; {report['wall_s']:.0f} s in all. Targets: 0 lost (a full "
             "spool: every loss counted by the edge), 0 duplicated, recovery ≤ "
             f"{RECOVERY_TARGET_S:g} s, cloud RSS after fuzz within "
             f"{RSS_GROWTH_TARGET:.0%} of before; upload bombs answered below 500 with the "
             f"cloud's processes growing by at most {UPLOAD_GROWTH_TARGET_MIB} MiB (this "
             "bench's bound; each process is capped at "
             f"{UPLOAD_ADDRESS_SPACE_GIB:g} GiB of address space so a bomb cannot exhaust "
             "the host).", "",
             "| fault | sent | predicted | lost | dup | recovery (s) | result | why |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for name, c in report["cases"].items():
        lost = str(c["lost"]) + (f" ({c['lost_accounted']} counted)"
                                 if c.get("lost_accounted") else "")
        why = "; ".join(c["failures"]).replace("|", "/")
        lines.append(f"| {name} | {c['sent']} | {c['predicted']} | {lost} | {c['duplicated']} "
                     f"| {_fmt(c['recovery_s'])} | {'pass' if c['passed'] else 'FAIL'} | "
                     f"{why} |")
    lines += ["", "The cloud runs with its default settings (SQLite; "
              "PostgreSQL behind a cuttable proxy for db_outage); two edge processes replay the "
              "committed Fition samples in real time, idle markers off. Details (HTTP codes, "
              "RSS, upload answers, notes, log lines) are in `faults.json`.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="shorter outages, fewer APs, requests and fuzz payloads")
    parser.add_argument("--only", action="append", choices=sorted(CASES),
                        help="run only this case (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy each case's logs and spools here")
    return parser.parse_args(argv)


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "csi_cloud", "csi_edge"],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+dirty" if dirty else "")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = QUICK if args.quick else FULL
    names = args.only or list(CASES)
    # SIGTERM on the bench: unwind (every case's finally stops its processes).
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    commit = _commit()  # the code under test, before any case runs
    cases: dict[str, Any] = {}
    for name in names:
        print(f"{name}: running", flush=True)
        result = run_case(name, scale, args.keep)
        cases[name] = result.as_dict()
        print(f"{name}: sent {result.sent}, predicted {result.predicted}, lost {result.lost}, "
              f"dup {result.duplicated}, recovery {result.recovery_s} s -> "
              f"{'pass' if result.passed else 'FAIL ' + '; '.join(result.failures)} "
              f"({result.wall_s} s)", flush=True)
    report = {
        "benchmark": "fault matrix on real processes (issue 16)",
        "command": "python bench/faults.py" + (" --quick" if args.quick else "")
                   + "".join(f" --only {n}" for n in args.only or []),
        "mode": "quick" if args.quick else "full",
        "commit": commit,
        "host": {"python": platform.python_version(), "machine": platform.machine(),
                 "cpus": __import__("os").cpu_count()},
        "aps": scale.aps, "scale": asdict(scale),
        "targets": {"lost": 0, "duplicated": 0, "recovery_s": RECOVERY_TARGET_S,
                    "fuzz_rss_growth": RSS_GROWTH_TARGET,
                    "upload_bombs_growth_mib": UPLOAD_GROWTH_TARGET_MIB},
        "wall_s": round(time.monotonic() - started, 1),
        "passed": sum(c["passed"] for c in cases.values()), "cases_run": len(cases),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(render_markdown(report))
    print(f"{report['passed']}/{len(cases)} passed; results in {args.out} and "
          f"{args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

