"""The real processes that tests and benches start, and the offline reference they compare to.

One launcher per deployable: the broker (tests/_broker.py's :class:`Mosquitto`), ``csi cloud``
(:class:`Cloud`), ``csi edge`` (:func:`run_edge` for one replay, :class:`Edge` for APs streaming
in real time), a throwaway PostgreSQL database (:func:`postgres_database`), and
:func:`offline_predictions`, what the service says for a recording, computed offline. Waiting
is on conditions (:func:`wait_until`), never on fixed sleeps. Every process is started in its own
session, so stopping it also stops what it started (the cloud's recorder and parser workers).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np
from _broker import Mosquitto, free_port

from csi_edge.lifetime import preexec_die_with

__all__ = ["FOLDER", "IN_CI", "MODEL", "POSTGRES", "PREFIX", "ROOT", "SAMPLE", "TOKEN", "Cloud",
           "Edge", "Mosquitto", "Segments", "WaitTimeoutError", "free_port", "offline_predictions",
           "postgres_database", "recorded", "run_edge", "stop_group", "stored_seqs", "wait_until"]

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fition"
FOLDER = ROOT / "datasets" / "samples" / "fition"
SAMPLE = FOLDER / "walking_user1_rm1" / "walking_user1_rm1_10.pcap"
PREFIX = "csi/v1"
TOKEN = "test-token-0123456789abcdef"
POSTGRES = os.environ.get("CSI_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class WaitTimeoutError(AssertionError):
    """A condition waited for did not come in time."""


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str,
               check: Callable[[], None] | None = None, every_s: float = 0.2) -> float:
    """Wait until ``predicate()`` is true; the monotonic time it held. ``check`` may raise
    (a process died); a predicate failing on HTTP or a socket counts as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        try:
            if predicate():
                return time.monotonic()
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise WaitTimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def stop_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
               wait_s: float = 30.0) -> int | None:
    """Stop ``proc`` with ``sig`` (SIGKILL after ``wait_s``), then whatever is left of its
    process group (workers it started). Its exit code."""
    if proc is None:
        return None
    code = proc.poll()
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
            proc.send_signal(sig)
        try:
            code = proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return code


def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database's URL, dropped afterwards (a generator for fixtures);
    skips the test where PostgreSQL is not reachable, fails it under CI."""
    import psycopg
    import pytest

    name = f"csi_test_{uuid.uuid4().hex[:10]}"
    admin = POSTGRES.replace("postgresql+psycopg", "postgresql") + "/test"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as con:
            con.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"CI=true but PostgreSQL is not reachable at {POSTGRES}: {exc}")
        pytest.skip(f"needs PostgreSQL at {POSTGRES}: {exc}")
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Cloud:
    """``csi cloud`` as a subprocess in its own session; ``env`` adds settings, ``extra``
    command-line options; ``address_space_gib`` caps its memory (RLIMIT_AS)."""

    def __init__(self, broker: Mosquitto | str, db: str, folder: Path,
                 client_id: str = "csi-cloud-test", extra: Sequence[str] = (), *,
                 env: dict[str, str] | None = None, recordings: Path | None = None,
                 log_level: str = "INFO", address_space_gib: float | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "csi_cloud.cli", "cloud", "--models",
                        str(ROOT / "models"), "--broker",
                        broker if isinstance(broker, str) else broker.url, "--http",
                        f"127.0.0.1:{self.port}", "--db", db, "--recordings",
                        str(recordings or folder / "recordings"), "--client-id", client_id,
                        "--log-level", log_level, *extra]
        self.env = dict(os.environ, CSI_CLOUD_TOKEN=TOKEN, CSI_CLOUD_JOBS_DIR=str(folder / "jobs"),
                        PYTHONUNBUFFERED="1")
        self.env.update(env or {})
        self.address_space_gib = address_space_gib
        self.log = folder / f"cloud-{client_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # The service stops with the test run, however the run ends (a run killed outright
        # leaves no fixture teardown to stop it).
        self._die_with_run = preexec_die_with(os.getpid())

    def _limits(self) -> None:
        self._die_with_run()
        if self.address_space_gib:
            limit = int(self.address_space_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def start(self, timeout_s: float = 120.0, wait: bool = True) -> float:
        """Start and (``wait``) wait for ``/readyz``; the seconds it took."""
        t0 = time.monotonic()
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=ROOT, start_new_session=True,
                                         preexec_fn=self._limits)
        if wait:
            self.wait_ready(timeout_s)
        return time.monotonic() - t0

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        wait_until(self.ready, timeout_s, f"{self.log.stem}'s /readyz", self.check)

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.log.stem} exited with {self.proc.returncode}: "
                                 f"{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def get(self, path: str, **params: object) -> object:
        response = httpx.get(f"{self.url}/api/v1{path}", params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    def finished_job(self, job_id: object, timeout_s: float = 180) -> dict:
        """The training job's state once it has succeeded or failed."""
        state: dict = {}

        def finished() -> bool:
            state.update(self.get(f"/training-jobs/{job_id}"))
            return state["state"] in ("succeeded", "failed")

        wait_until(finished, timeout_s, f"training job {job_id} to finish", every_s=0.5)
        return state

    def freeze(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> list[int]:
        """SIGKILL the service process only, as a crash does; the pids of workers it left
        (then killed)."""
        if self.proc is None:
            return []
        import psutil

        pid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        left = []
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(OSError):
                if p.pid != pid and os.getpgid(p.pid) == pid:
                    left.append(p.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self.proc = None
        return left

    def stop(self, sig: int = signal.SIGTERM, wait_s: float = 30.0) -> int | None:
        """Stop with ``sig`` (SIGKILL: no goodbye), then the workers it left; its exit code."""
        code = stop_group(self.proc, sig, wait_s)
        self.proc = None
        return code


def _edge_command(broker_url: str, spool: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(MODEL), "--broker",
            broker_url, "--spool-dir", str(spool), *args]


def _edge_env(fetched: Path, idle: bool, **extra: str) -> dict[str, str]:
    env = dict(os.environ, CSI_EDGE_MODELS_DIR=str(fetched), CSI_EDGE_IDLE=str(idle).lower(),
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_edge(broker: Mosquitto, spool: Path, *args: str, idle: bool = True,
             env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """One ``csi edge`` run, its output piped (text); ``idle``: idle markers on; ``env``
    more settings."""
    return subprocess.Popen(_edge_command(broker.url, spool, "--status-interval", "1", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=_edge_env(spool.parent / "fetched", idle, **(env or {})),
                            preexec_fn=preexec_die_with(os.getpid()))


class Edge:
    """One ``csi edge`` process replaying recordings for some APs in real time, looping, in its
    own session; ``streams`` are (``site/ap``, recording) pairs. Idle markers off by default:
    every segment is coded and gets its own prediction row."""

    def __init__(self, broker: Mosquitto, folder: Path, streams: Sequence[tuple[str, Path]],
                 *, spool: Path | None = None, name: str = "edge", broker_url: str | None = None,
                 level: int = 1, status_interval_s: float = 1, idle: bool = False) -> None:
        self.names = [n for n, _ in streams]
        self.spool = spool or folder / f"{name}-spool"
        self.command = _edge_command(
            broker_url or broker.url, self.spool, "--status-interval", f"{status_interval_s:g}",
            "--speed", "real", "--loop", "--level", str(level), "--log-level", "WARNING",
            *[a for n, path in streams for a in ("--stream", f"{n}=file://{path}")])
        self.env = _edge_env(folder / f"{name}-fetched", idle, CSI_EDGE_DRAIN_TIMEOUT_S="30")
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int | None] = []

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=ROOT, start_new_session=True,
                                         preexec_fn=preexec_die_with(os.getpid()))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"edge exited with {self.proc.returncode}: "
                                 f"{self.log.read_text(errors='replace')[-3000:]}")

    def kill(self) -> None:
        self.exit_codes.append(stop_group(self.proc, signal.SIGKILL, 10))
        self.proc = None

    def stop(self, wait_s: float = 60.0) -> int | None:
        """SIGTERM: the edge drains its spool (up to CSI_EDGE_DRAIN_TIMEOUT_S)."""
        code = stop_group(self.proc, signal.SIGTERM, wait_s)
        if self.proc is not None:
            self.exit_codes.append(code)
        self.proc = None
        return code


def recorded(folder: Path) -> tuple[int, int]:
    """(segments, labels) committed in the recording files under ``folder``, read beside
    their writer (a file it cannot read yet counts as empty)."""
    from csi_cloud.storage.reader import store_counts
    from csi_edge import recording as layout

    segments = labels = 0
    for path in folder.rglob("*.h5"):
        with contextlib.suppress(OSError, layout.FormatError), \
                layout.open_recording(path) as f:
            _, n_labels, n = store_counts(f, path)
            segments, labels = segments + n, labels + n_labels
    return segments, labels


class Segments:
    """Valid payloads of the default bundle (all-zero CSI) with any epoch and sequence
    number, ``n`` segments each; ``idle``: an IDLE message (the cloud stores its segments as
    runs, :func:`stored_seqs`), ``motion``: each segment's motion score (flag MOTION)."""

    def __init__(self) -> None:
        from csi_edge.bundle import EdgeEncoder

        encoder = EdgeEncoder(MODEL)
        self.model_id = encoder.model_id
        self.segment_ms = round(encoder.spec.segment_s * 1000)
        symbols, profile = encoder.encode(np.zeros((1, 50, 1, 56), np.float32))
        self.codes = encoder.codes(symbols[0], profile[0], 1)
        self.manifest, self.tables = encoder.manifest, encoder.tables
        self.base_ms = int(time.time() * 1000)

    def payload(self, seq: int, epoch: int = 7, n: int = 1, idle: bool = False,
                motion: Sequence[float | None] | None = None,
                quality: Sequence[float] | None = None) -> bytes:
        from csi_edge.bundle import encode_message_codes
        from csi_edge.codec import Payload, SegmentRecord, encode_payload

        stream = b"" if idle else encode_message_codes([self.codes] * n, self.manifest,
                                                       self.tables)
        return encode_payload(Payload(
            1, self.model_id, epoch, seq, self.base_ms + (seq % 1_000_000) * self.segment_ms,
            tuple(SegmentRecord(1.0 if quality is None else quality[i],
                                motion=None if motion is None else motion[i])
                  for i in range(n)),
            idle=idle, motion=motion is not None, codes=stream))


def stored_seqs(rows: Iterable[tuple[int, int | None]]) -> list[int]:
    """The sequence numbers that stored prediction rows ``(seq, segments)`` stand for, one
    per segment (a row of an idle run stands for several), in order."""
    from csi_cloud.db import covered

    return [q for seq, n in rows for q in covered(seq, n)]


def offline_predictions(path: Path, level: int) -> list[tuple[str, str | None]]:
    """Activity and identity per segment as the service gives them, computed offline: the int8
    edge encoder, the real payloads, decompress, and the window of the last N segment slots
    read at the bundle's live context lengths."""
    from csi_cloud.model.compression import CloudModel
    from csi_cloud.model.openset import UNKNOWN
    from csi_cloud.model.window import Windows, slot_rows
    from csi_edge import read_recording
    from csi_edge.bundle import EdgeEncoder
    from csi_edge.preprocess import Preprocessor

    edge = EdgeEncoder(MODEL)
    cloud = CloudModel.load(MODEL)
    batch = Preprocessor(edge.spec).process(read_recording(path))
    decoded = [cloud.decompress(edge.compress(batch.data[i : i + 1], level=level, first_seq=i,
                                              epoch=1, timestamp_ms=0))[0]
               for i in range(len(batch))]
    n = cloud.net.cfg.context_segments
    slots = (batch.index - batch.index[0]).tolist()
    by_slot = {int(k): i for i, k in enumerate(slots)}
    rows = np.stack([slot_rows(by_slot, int(k), n) for k in slots])
    # The live output, as the service gives it (the bundle's calibrated context lengths).
    pred = cloud.classify_live(Windows.gather(rows, np.stack([d.z_q for d in decoded]),
                                              np.stack([d.profile for d in decoded]), level))
    labels = cloud.manifest.labels
    out = []
    for w in range(len(rows)):
        identity = None
        if pred.identity is not None:  # past the bundle's open-set threshold: "unknown"
            identity = (UNKNOWN if pred.unknown[w]
                        else labels["identity"][int(pred.identity[w].argmax())])
        out.append((labels["activity"][int(pred.activity[w].argmax())], identity))
    return out
