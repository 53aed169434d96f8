"""Idle rooms cost less: the motion statistic, the idle gate, grouping, spool, the cloud's idle
decode, and one end-to-end run with a real Mosquitto, edge and cloud."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from _broker import Mosquitto, free_port
from _harness import Segments, postgres_database, stored_seqs
from pydantic import ValidationError
from sqlalchemy import select, text

from csi_cloud.api.routes.predictions import list_predictions
from csi_cloud.db import Database, Prediction
from csi_cloud.events import LiveTrust
from csi_cloud.ingest import Ingestor
from csi_cloud.model.compression import CloudModel
from csi_cloud.persistence import Persistence, codes_of, rows_of
from csi_cloud.registry import ModelRegistry
from csi_edge import read_recording
from csi_edge.agent import group_messages
from csi_edge.bundle import BundleManifest, EdgeEncoder, bundle_id
from csi_edge.codec import Payload, SegmentRecord, encode_payload
from csi_edge.motion import IdleConfig, IdleGate, motion_statistic
from csi_edge.preprocess import Preprocessor
from csi_edge.settings import EdgeSettings
from csi_edge.spool import QueuedSegment, SegmentSpool

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fition"
FITION = ROOT / "datasets" / "samples" / "fition"
NM = FITION / "nm_user4_rm4" / "nm_user4_rm4_11.pcap"  # statistic 0.039..0.057 per segment
MOVING = FITION / "sitdown_user3_rm3" / "sitdown_user3_rm3_20.pcap"  # 0.074..0.133
WALKING = FITION / "walking_user2_rm2" / "walking_user2_rm2_11.pcap"
# Between the two samples above: the nm one goes idle, the sitdown one never does.
TEST_IDLE = {"statistic": "log_amplitude_std_median", "threshold": 0.065, "enter_after": 1}


def idle_bundle(folder: Path, idle: dict[str, object] = TEST_IDLE) -> BundleManifest:
    """A copy of the default bundle whose calibration carries ``idle`` (a new bundle id)."""
    shutil.copytree(MODEL, folder)
    data = json.loads((folder / "bundle.json").read_text())
    data["calibration"] = {**data.get("calibration", {}), "idle": idle}
    manifest = BundleManifest.model_validate(data)
    manifest.id = bundle_id(manifest)
    (folder / "bundle.json").write_text(json.dumps(manifest.model_dump(mode="json")))
    return manifest


def segments(path: Path) -> np.ndarray:
    spec = EdgeEncoder(MODEL).spec
    batch = Preprocessor(spec).process(read_recording(path))
    return batch.data[batch.ok]


# -- the statistic and the gate -------------------------------------------------------------


def test_motion_statistic_still_vs_moving_synthetic() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(5, 7, size=(1, 1, 56))  # a per-subcarrier level
    still = base + rng.normal(0, 0.01, size=(50, 1, 56))
    t = np.arange(50)[:, None, None] / 50
    moving = still + 0.3 * np.sin(2 * np.pi * 2 * t + rng.uniform(0, 6, size=(1, 1, 56)))
    assert motion_statistic(still) < 0.015 < 0.15 < motion_statistic(moving)
    # Scale-free: a gain (an offset of the log amplitude) changes nothing.
    assert motion_statistic(still + 3.0) == pytest.approx(motion_statistic(still))
    # A few flickering subcarriers do not make a still segment move (median).
    flicker = still.copy()
    flicker[:, :, :5] += rng.normal(0, 1.0, size=(50, 1, 5))
    assert motion_statistic(flicker) < 0.02
    with pytest.raises(ValueError, match="unknown motion statistic 'energy'"):
        motion_statistic(still, "energy")
    with pytest.raises(ValueError, match=r"got shape \(50, 56\)"):
        motion_statistic(still[:, 0])


def test_motion_statistic_on_real_nm_and_walking_samples() -> None:
    nm = [motion_statistic(x) for f in ("nm_user2_rm2", "nm_user4_rm4")
          for x in segments(next((FITION / f).glob("*.pcap")))]
    moving = [motion_statistic(x) for f in ("walking_user2_rm2", "sitdown_user3_rm3",
                                            "getintobed_user4_rm4")
              for x in segments(next((FITION / f).glob("*.pcap")))]
    assert np.median(nm) < 0.05 < 0.09 < np.median(moving)


def test_idle_gate_hysteresis() -> None:
    gate = IdleGate(IdleConfig("log_amplitude_std_median", 0.05, enter_after=2))
    # still, still (coded: entering), still (idle), still (idle), moving, still, still, still
    stats = [0.01, 0.02, 0.03, 0.01, 0.2, 0.01, 0.01, 0.01, float("nan")]
    assert [gate.update(s) for s in stats] == [False, False, True, True, False, False, False,
                                               True, False]
    gate.reset()
    assert not gate.update(0.0)


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf", "high"])
def test_idle_threshold_setting_names_the_bad_value(value: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CSI_EDGE_IDLE_THRESHOLD", value)
    with pytest.raises(ValidationError, match="idle_threshold") as info:
        EdgeSettings()
    assert value in str(info.value)


@pytest.mark.parametrize(("idle", "match"), [
    ({"statistic": "x", "threshold": 0.1, "enter_after": 1}, "statistic 'x'"),
    ({"statistic": "log_amplitude_std_median", "threshold": -1, "enter_after": 1},
     "threshold -1"),
    ({"statistic": "log_amplitude_std_median", "threshold": 0.1, "enter_after": 0},
     "enter_after 0"),
    ("on", "must be an object"),
])
def test_idle_config_rejects_malformed_calibration(idle: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IdleConfig.from_calibration({"idle": idle})
    assert IdleConfig.from_calibration({}) is None  # old bundles: never idle


# -- edge grouping and spool ------------------------------------------------------------------


def _row(seq: int, idle: bool, level: int = 1) -> QueuedSegment:
    return QueuedSegment(epoch=1, seq=seq, level=level, model_id=b"abc", timestamp_ms=seq * 1000,
                         quality=1.0, codes=b"" if idle else b"\x01", id=seq + 1, idle=idle)


def test_group_messages_keeps_idle_apart_and_groups_it() -> None:
    kinds = [False, False, False, True, True, True, True, True, False, True]
    rows = [_row(i, k) for i, k in enumerate(kinds)]
    groups = group_messages(rows, per_message=lambda m, lv: 2, segment_ms=lambda m: 1000,
                            limit=1, idle_per_message=3)
    assert [[r.seq for r in g] for g in groups] == [[0, 1], [2], [3, 4, 5], [6, 7], [8], [9]]
    assert all(len({r.idle for r in g}) == 1 for g in groups)


def test_spool_keeps_idle_rows_and_upgrades_an_old_file(tmp_path: Path) -> None:
    old = tmp_path / "old.sqlite"
    db = sqlite3.connect(old)
    db.executescript("""CREATE TABLE segment (id INTEGER PRIMARY KEY AUTOINCREMENT,
        epoch INTEGER NOT NULL, seq INTEGER NOT NULL, level INTEGER NOT NULL,
        model BLOB NOT NULL, timestamp_ms INTEGER NOT NULL, quality REAL NOT NULL,
        codes BLOB NOT NULL, queued_ms INTEGER NOT NULL);
        INSERT INTO segment VALUES (1, 1, 0, 1, x'616263', 0, 1.0, x'01', 0);""")
    db.commit()
    db.close()
    spool = SegmentSpool(old)
    spool.put([_row(1, True), _row(2, False)])
    rows = spool.peek(10)
    assert [(r.seq, r.idle, r.codes) for r in rows] == [(0, False, b"\x01"), (1, True, b""),
                                                        (2, False, b"\x01")]
    spool.close()


# -- cloud ---------------------------------------------------------------------------------------


def test_idle_codes_repeat_the_last_segment() -> None:
    model = CloudModel.load(MODEL)
    edge = EdgeEncoder(MODEL)
    sym, prof = edge.encode(segments(NM)[:1])
    last = edge.codes(sym[0], prof[0], 3)
    same = model.idle_codes(3, last)
    assert np.array_equal(same.latent, last.latent) and np.array_equal(same.profile,
                                                                       last.profile)
    g0, k0 = model.manifest.level(0).groups, model.manifest.level(0).profile_components
    g1 = model.manifest.level(1).groups
    # Level 0 sends fewer latent channels than level 3 (none) and as many or fewer profile
    # coefficients (all 16 on the shipped bundles).
    assert g0 < model.manifest.level(3).groups and k0 <= model.manifest.level(3).profile_components
    lower = model.idle_codes(0, last)  # cut to the level
    assert lower.latent.shape == (g0, 7) and np.array_equal(lower.latent, last.latent[:g0])
    assert np.array_equal(lower.profile, last.profile[:k0])
    up = model.idle_codes(3, edge.codes(sym[0], prof[0], 0))  # padded: still symbols, 0
    assert np.array_equal(up.latent[g0:], model.still_symbols()[g0:])
    assert not up.profile[k0:].any()
    fresh = model.idle_codes(1, None)
    assert np.array_equal(fresh.latent, model.still_symbols()[:g1]) and not fresh.profile.any()


def test_ingestor_predicts_every_idle_segment(tmp_path: Path) -> None:
    idle_bundle(tmp_path / "models" / "idle")
    registry = ModelRegistry(tmp_path / "models")
    ingestor = Ingestor(registry)
    edge = EdgeEncoder(tmp_path / "models" / "idle")
    x = segments(NM)
    coded = edge.compress(x[:2], level=1, first_seq=0, epoch=3, timestamp_ms=1_000_000)
    idle = encode_payload(Payload(1, edge.model_id, 3, 2, 1_002_000,
                                  tuple(SegmentRecord(1.0, b"") for _ in range(4)), idle=True))
    result = ingestor.process([("lab", "ap", coded, 1.0), ("lab", "ap", idle, 2.0)])
    assert [p.seq for p in result.predictions] == [0, 1, 2, 3, 4, 5]
    assert [p.idle for p in result.predictions] == [False, False, True, True, True, True]
    assert all(p.as_dict()["idle"] == p.idle for p in result.predictions)
    held = result.segments[1]
    for record in result.segments[2:]:
        assert np.array_equal(record.codes.latent, held.codes.latent)
        assert np.array_equal(record.z_q, held.z_q) and record.code_bytes == held.code_bytes
    counters = ingestor.aps[("lab", "ap")].counters
    assert (counters["idle_segments"], counters["idle_messages"], counters["segments"]) == (4, 1,
                                                                                           6)
    # An idle message first (nothing to repeat) still predicts, from a still segment.
    fresh = ingestor.process([("lab", "other", idle, 3.0)])
    assert [p.idle for p in fresh.predictions] == [True] * 4
    assert ingestor.aps[("lab", "other")].counters["idle_without_reference"] == 4


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'idle.db'}"
    else:
        yield from postgres_database()


def test_idle_messages_are_stored_as_runs_with_exact_accounting(db_url: str) -> None:
    """N idle messages of K = 255 segments: about N prediction rows, not N * K, while every
    segment is still received, awaited, accepted late or refused as a duplicate one by one,
    across a restart too; the API lists the runs with their spans, each saying what the
    classifier said for every segment it stands for. The database is one created before
    runs were (the column is added on start)."""
    registry = ModelRegistry(ROOT / "models")
    seg = Segments()
    old = Database(db_url)
    with old.engine.begin() as con:
        con.execute(text('ALTER TABLE predictions DROP COLUMN "segments"'))
    old.close()
    db = Database(db_url)
    ingestor, trust, store = _worker(registry, db)
    live: dict[int, dict[str, Any]] = {}

    def send(*payloads: bytes) -> None:
        result = ingestor.process([("lab", "ap", p, time.time()) for p in payloads])
        events = [p.as_dict() for p in result.predictions]
        trust.observe(events)
        store.store(events, codes_of(events, result), {("lab", "ap")})
        live.update((e["seq"], e) for e in events)

    k, n = 255, 8
    motion = [2.0 if i % 2 else None for i in range(k)]  # per-segment bytes vary: one row
    quality = [0.5 + (i % 3) / 4 for i in range(k)]
    idle = [seg.payload(2 + k * i, n=k, idle=True, motion=motion if i == 5 else None,
                        quality=quality if i == 6 else None) for i in range(n)]
    send(seg.payload(0, n=2))
    send(*idle[:3])
    send(idle[4])  # idle[3] skipped: k segments awaited
    counters = ingestor.aps[("lab", "ap")].counters
    assert (counters["gaps"], counters["missing_segments"]) == (1, k)
    send(idle[3])  # late, accepted
    assert (counters["late"], counters["missing_segments"]) == (k, 0)
    send(idle[1], idle[4])  # resent: each segment a duplicate, no row
    assert counters["duplicates"] == 2 * k
    send(*idle[5:])
    total = 2 + n * k
    assert counters["segments"] == len(live) == total
    assert counters["idle_segments"] == (n + 2) * k  # as received, the duplicates too

    def rows() -> list[tuple[int, int | None]]:
        with db.session() as s:
            return [(r.seq, r.segments) for r in s.execute(
                select(Prediction.seq, Prediction.segments).order_by(Prediction.seq))]

    stored = rows()
    assert sorted(stored_seqs(stored)) == list(range(total))  # each segment once
    context = live[0]["context_size"]
    # A row per coded segment and per idle message; the first idle messages after coded
    # segments (and after the late one) split where the context still held coded segments.
    assert len(stored) <= 2 + n + 2 * context, stored
    assert len(stored) < total / 50
    with db.api_session() as s:
        page = list_predictions(s, site="lab", ap="ap", limit=10_000)
        assert len(list_predictions(s, site="lab", ap="ap", limit=3).data) == 3
    assert page.count == len(stored)
    assert sorted(stored_seqs((p.seq, p.segments) for p in page.data)) == list(range(total))
    for p in page.data:  # each run says what was said live for each of its segments
        for seq in range(p.seq, p.seq + p.segments):
            said = live[seq]
            assert (p.activity, p.identity, p.smoothed_activity, p.uncertain) == (
                said["activity"], said["identity"], said["smoothed_activity"],
                said["uncertain"])
            assert p.quality <= said["quality"]
            if said["motion_score"] is not None:
                assert p.motion_score is not None and p.motion_score >= said["motion_score"]
    assert min(p.quality for p in page.data) == min(e["quality"] for e in live.values()) < 0.6
    # A restarted worker: what the runs stand for is seen, resends are duplicates.
    ingestor, trust, store = _worker(registry, db)
    store.restore()
    live.clear()
    send(idle[n - 1], idle[2], seg.payload(2 + n * k))
    counters = ingestor.aps[("lab", "ap")].counters
    assert counters["duplicates"] == 2 * k + 2 * k and list(live) == [total]
    assert len(rows()) == len(stored) + 1
    db.close()


def test_idle_runs_split_where_a_row_would_say_something_else() -> None:
    """A run is consecutive idle segments with one arrival, the same codes and the same
    classifier output; it never wraps at 2**32; a coded segment is always its own row."""
    def event(seq: int, idle: bool = True, **changes: Any) -> dict[str, Any]:
        return {"site": "lab", "ap": "ap", "epoch": 1, "seq": seq, "timestamp": seq * 2.0,
                "received": 5.0, "model": "m", "rate_level": 1, "quality": 1.0,
                "activity": "nm", "activity_confidence": 0.9, "motion_score": None,
                "motion": None, "presence": None, "idle": idle, **changes}

    events = [event(2**32 - 2), event(2**32 - 1, quality=0.25, motion_score=1.0, motion=True),
              event(0), event(1), event(2, activity="walk"), event(3, activity="walk"),
              event(4, idle=False, activity="walk"), event(5, activity="walk"),
              event(6, activity="walk", received=6.0), event(7, activity="walk")]
    codes = [b"x"] * 9 + [b"y"]
    rows = rows_of(events, codes)
    assert [(r["seq"], r["segments"]) for r in rows] == [
        (2**32 - 2, 2), (0, 2), (2, 2), (4, None), (5, None), (6, None), (7, None)]
    assert (rows[0]["quality"], rows[0]["motion_score"], rows[0]["motion"]) == (0.25, 1.0,
                                                                                True)
    assert "idle" not in rows[0] and rows[0]["codes"] == b"x"


def _worker(registry: ModelRegistry, db: Database) -> tuple[Ingestor, LiveTrust, Persistence]:
    ingestor = Ingestor(registry)
    return ingestor, LiveTrust(registry, db, "csi/v1"), Persistence(db, ingestor, registry)


# -- end to end --------------------------------------------------------------------------------


def _cloud(broker: Mosquitto, tmp_path: Path, models: Path) -> tuple[subprocess.Popen[bytes],
                                                                      str, Path]:
    port = free_port()
    log = tmp_path / "cloud.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi_cloud.cli", "cloud", "--models", str(models), "--broker",
             broker.url, "--http", f"127.0.0.1:{port}", "--db",
             f"sqlite:///{tmp_path / 'cloud.db'}", "--recordings", str(tmp_path / "rec"),
             "--client-id", "csi-cloud-idle-test"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env=dict(os.environ, CSI_CLOUD_TOKEN="test-token-0123456789abcdef",
                     CSI_CLOUD_JOBS_DIR=str(tmp_path / "jobs"), PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"cloud not ready: {log.read_text()[-3000:]}")


def _edge(broker: Mosquitto, tmp_path: Path, model: Path, spool: str, *streams: str,
          idle: bool = True, **env: str) -> str:
    args = [a for s in streams for a in ("--stream", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(model), "--broker",
         broker.url, "--spool-dir", str(tmp_path / spool), "--status-interval", "1", "--speed",
         "max", "--level", "1", *args], capture_output=True, text=True, timeout=90, cwd=ROOT,
        env=dict(os.environ, CSI_EDGE_IDLE=str(idle).lower(),
                 CSI_EDGE_MODELS_DIR=str(tmp_path / "fetched"), **env))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.e2e
def test_end_to_end_idle_saves_bytes_and_loses_no_prediction(broker: Mosquitto,
                                                             tmp_path: Path) -> None:
    models = tmp_path / "models"
    idle_bundle(models / "idle")
    still_then_moving = tmp_path / "replay"
    still_then_moving.mkdir()
    shutil.copy(NM, still_then_moving / "a_nm.pcap")
    shutil.copy(MOVING, still_then_moving / "b_sitdown.pcap")
    n_nm, n_total = len(segments(NM)), len(segments(NM)) + len(segments(MOVING))
    cloud, url, _ = _cloud(broker, tmp_path, models)
    try:
        _edge(broker, tmp_path, models / "idle", "spool-on", f"lab/on=file://{NM}",
              f"lab/mixed=file://{still_then_moving}")
        _edge(broker, tmp_path, models / "idle", "spool-off", f"lab/off=file://{NM}",
              idle=False)
        # The operator's threshold instead of the bundle's: above every sitdown segment.
        _edge(broker, tmp_path, models / "idle", "spool-high", f"lab/high=file://{MOVING}",
              CSI_EDGE_IDLE_THRESHOLD="0.2")

        def predictions(ap: str, expected: int) -> list[int]:
            """The segments the AP's stored predictions stand for (an idle run: several)."""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                page = httpx.get(f"{url}/api/v1/predictions", params={
                    "site": "lab", "ap": ap, "limit": 1000}, timeout=10).json()
                seqs = sorted(stored_seqs((p["seq"], p["segments"]) for p in page["data"]))
                if len(seqs) >= expected:
                    break
                time.sleep(0.2)
            rows[ap] = page["count"]
            return seqs

        rows: dict[str, int] = {}
        on, off = predictions("on", n_nm), predictions("off", n_nm)
        mixed = predictions("mixed", n_total)
        # No lost prediction: every segment, idle or not, was predicted once; the idle ones
        # in fewer rows than segments (one per idle message once the context holds idle only).
        assert on == off == list(range(n_nm)) and mixed == list(range(n_total))
        assert rows["off"] == n_nm and rows["on"] < n_nm
        n_moving = len(segments(MOVING))
        assert predictions("high", n_moving) == list(range(n_moving))

        def final_aps() -> dict[str, dict[str, Any]]:  # once every edge's last status is in
            deadline = time.monotonic() + 30
            while True:
                aps = {a["ap"]: a for a in
                       httpx.get(f"{url}/api/v1/aps", timeout=10).json()["data"]}
                if all((aps.get(ap, {}).get("status") or {}).get("online") is False
                       for ap in ("on", "off", "mixed", "high")):
                    return aps
                assert time.monotonic() < deadline, aps
                time.sleep(0.2)

        aps = final_aps()
        c_on, c_off = aps["on"]["counters"], aps["off"]["counters"]
        assert c_on["idle_segments"] == n_nm - 1 and c_off.get("idle_segments", 0) == 0
        # (--speed max: idle off sends its backlog in one message, the cheapest case for it)
        assert c_on["payload_bytes"] * 2 < c_off["payload_bytes"], (c_on, c_off)
        edge_counters = aps["on"]["status"]["counters"]
        assert edge_counters["segments_idle"] == edge_counters["idle_segments_sent"] == n_nm - 1
        assert aps["on"]["status"]["idle"]["threshold"] == TEST_IDLE["threshold"]
        # Still, then moving: the moving recording goes out coded at the configured level.
        c_mixed = aps["mixed"]["counters"]
        assert c_mixed["idle_segments"] == n_nm - 1
        assert aps["mixed"]["rate_level"] == 1
        assert aps["mixed"]["prediction"]["idle"] is False
        assert aps["mixed"]["prediction"]["seq"] == n_total - 1
        assert aps["high"]["status"]["idle"]["threshold"] == 0.2
        assert aps["high"]["status"]["counters"]["segments_idle"] == n_moving - 1
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        idle_total = next(float(line.split()[1]) for line in metrics.splitlines()
                          if line.startswith("csi_idle_segments_total "))
        assert idle_total == 2 * (n_nm - 1) + n_moving - 1  # "on", "mixed" and "high"
    finally:
        cloud.terminate()
        try:
            cloud.wait(20)
        except subprocess.TimeoutExpired:
            cloud.kill()


def test_an_idle_run_stores_the_mean_of_confidences_that_still_move() -> None:
    """The filter approaches its fixed point geometrically: confidences and probabilities
    still moving do not split a run; its row holds their mean, the labels stay exact."""
    def event(seq: int, confidence: float, activity: str = "nm") -> dict[str, Any]:
        return {"site": "lab", "ap": "ap", "epoch": 1, "seq": seq, "timestamp": seq * 1.0,
                "received": 5.0, "model": "m", "rate_level": 1, "quality": 1.0,
                "activity": activity, "activity_confidence": confidence,
                "smoothed_confidence": confidence, "identity_confidence": None,
                "probabilities": {"activity": {activity: confidence, "x": 1 - confidence}},
                "motion_score": None, "motion": None, "presence": None, "idle": True}

    events = [event(0, 0.5), event(1, 0.7), event(2, 0.75), event(3, 0.9, "walk")]
    rows = rows_of(events, [b"x"] * 4)
    assert [(r["seq"], r["segments"], r["activity"]) for r in rows] == [
        (0, 3, "nm"), (3, None, "walk")]
    assert rows[0]["activity_confidence"] == pytest.approx(0.65)
    assert rows[0]["smoothed_confidence"] == pytest.approx(0.65)
    assert rows[0]["identity_confidence"] is None
    assert rows[0]["probabilities"] == {"activity": {"nm": pytest.approx(0.65),
                                                     "x": pytest.approx(0.35)}}
    assert events[0]["probabilities"]["activity"]["nm"] == 0.5  # what was said live is kept
