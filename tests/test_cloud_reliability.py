"""Reliability of the cloud's ingest: one bad message, AP, client or database outage never
stops it or loses a segment.

Fast tier: the ingestor's bounded bookkeeping, and an in-process :class:`CloudService` (real
SQLite, no broker) fed bad statuses, a locked database and a batch the database refuses.
End-to-end tier (``-m e2e``): real Mosquitto, the real ``csi cloud`` process, real PostgreSQL
(through a TCP proxy that is stopped for an outage).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from csi_cloud.ingest import Ingestor
from csi_cloud.registry import ModelRegistry
from csi_cloud.service import CloudService, is_transient
from csi_cloud.settings import CloudSettings
from csi_edge.bundle import EdgeEncoder
from csi_edge.codec import Payload, SegmentRecord, encode_payload

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MODEL = MODELS / "fition"
PREFIX = "csi/v1"
TOKEN = "test-token-0123456789abcdef"
POSTGRES = os.environ.get("CSI_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BOMB = b"[" * 2000
LONG_NAME = "a" * 70


class Segments:
    """Valid one-segment payloads of the default bundle with any sequence number."""

    def __init__(self) -> None:
        encoder = EdgeEncoder(MODEL)
        self.model_id = encoder.model_id
        self.segment_ms = round(encoder.spec.segment_s * 1000)
        self.codes = encoder.compress_codes(np.zeros((1, 50, 1, 56), np.float32), 1)[0]
        self.base_ms = int(time.time() * 1000)

    def payload(self, seq: int, epoch: int = 7) -> bytes:
        return encode_payload(Payload(1, self.model_id, epoch, seq,
                                      self.base_ms + (seq % 1_000_000) * self.segment_ms,
                                      (SegmentRecord(1.0, self.codes),)))


@pytest.fixture(scope="module")
def segments() -> Segments:
    return Segments()


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(MODELS)


# -- the ingestor's bookkeeping (fast) ------------------------------------------------------


def test_awaited_gaps_are_bounded_and_trimmed_oldest_first(registry: ModelRegistry,
                                                           segments: Segments) -> None:
    ingestor = Ingestor(registry)
    seq = 0
    batch = [("lab", "ap", segments.payload(seq), 1.0)]
    for _ in range(20):  # jumps of exactly the awaited window: each one enumerated
        seq += 4097
        batch.append(("lab", "ap", segments.payload(seq), 1.0))
    ingestor.process(batch)
    state = ingestor.aps[("lab", "ap")]
    assert len(state.missing) == 4096
    assert next(iter(state.missing)) == seq - 4096  # the oldest were dropped first
    assert state.counters["gaps"] == 20 and state.counters["seq_jumps"] == 0
    # A jump past the window is one jump, not 2**31 missing segments, and nothing is listed.
    ingestor.process([("lab", "ap", segments.payload(seq + 2**31 - 7), 1.0)])
    assert state.counters["seq_jumps"] == 1
    assert state.counters["missing_segments"] == 20 * 4096
    assert len(state.missing) == 4096
    # A late segment still awaited is accepted once.
    late = ingestor.process([("lab", "ap", segments.payload(seq - 1), 1.0)] * 2)
    assert [p.seq for p in late.predictions] == [seq - 1]


def test_bad_names_and_too_many_aps_are_rejected_before_any_state(registry: ModelRegistry,
                                                                  segments: Segments) -> None:
    ingestor = Ingestor(registry, max_aps=2)
    good = segments.payload(0)
    result = ingestor.process([(LONG_NAME, "ap", good, 1.0), ("lab", "$SYS", good, 1.0),
                               ("lab", "..", good, 1.0), ("lab", "a", good, 1.0),
                               ("lab", "b", good, 1.0), ("lab", "c", good, 1.0)])
    assert [(r[1], r[2]) for r in result.rejected] == [
        ("ap", "bad_name"), ("$SYS", "bad_name"), ("..", "bad_name"), ("c", "too_many_aps")]
    assert LONG_NAME in result.rejected[0][3][:200]
    assert set(ingestor.aps) == {("lab", "a"), ("lab", "b")}
    assert [p.ap for p in result.predictions] == ["a", "b"]


def test_unseen_segments_are_awaited_again(registry: ModelRegistry,
                                           segments: Segments) -> None:
    ingestor = Ingestor(registry)
    ingestor.process([("lab", "ap", segments.payload(s), 1.0) for s in range(5)])
    ingestor.unsee("lab", "ap", 7, [2, 3])  # they could not be stored
    again = ingestor.process([("lab", "ap", segments.payload(s), 1.0) for s in (2, 3, 4)])
    assert [p.seq for p in again.predictions] == [2, 3]


def test_transient_database_errors_are_told_apart_from_refusals() -> None:
    from sqlalchemy.exc import DataError, IntegrityError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    assert is_transient(OperationalError("x", {}, Exception("database is locked")))
    assert is_transient(PoolTimeout("pool"))
    assert not is_transient(DataError("x", {}, Exception("value out of range")))
    assert not is_transient(IntegrityError("x", {}, Exception("constraint")))
    assert not is_transient(TypeError("bug"))


# -- the service in process (fast: real SQLite, no broker) ---------------------------------


def _settings(tmp: Path, **overrides: Any) -> CloudSettings:
    values: dict[str, Any] = {
        "broker": None, "dev": True, "token": TOKEN, "db": f"sqlite:///{tmp}/db.sqlite",
        "models": MODELS, "recordings": tmp / "rec", "jobs_dir": tmp / "jobs", "record": False,
        "homeassistant": False, "db_timeout_s": 0.5, "store_retry_max_s": 0.5,
        "batch_max_wait_ms": 1.0}
    return CloudSettings(**{**values, **overrides})


async def _until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _stored(db: Path, ap: str) -> list[int]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT seq FROM predictions WHERE ap = ? ORDER BY seq",
                                          (ap,))]


def test_status_bombs_and_bad_names_are_counted_and_skipped(tmp_path: Path) -> None:
    async def main() -> None:
        service = CloudService(_settings(tmp_path, offline_after_s=0.5))
        await service.start()
        try:
            for site, ap, payload in (("lab", "evil", BOMB), ("lab", "evil", b"\xff\xfe"),
                                      ("lab", "evil", b"[1, 2]"), ("lab", LONG_NAME, b"{}"),
                                      ("lab", "evil", b"{" + b'"a":' * 20)):
                service._on_status(site, ap, payload)
            service._on_status("lab", "good", json.dumps(
                {"online": True, "error": "x" * 5000, "status_interval_s": 1}).encode())
            rejected = {m.labels["reason"]: m.value
                        for m in service.metrics.status_rejected.collect()[0].samples
                        if m.name.endswith("_total")}
            assert rejected == {"bad_json": 3, "not_an_object": 1, "bad_name": 1}
            assert len(service._ap_status[("lab", "good")]["error"]) == 300
            assert service.ready
            # No status within the interval it announced (+ offline_after_s): offline.
            def online() -> Any:
                with sqlite3.connect(tmp_path / "db.sqlite") as con:
                    return con.execute("SELECT online FROM aps WHERE ap = 'good'").fetchone()

            await _until(lambda: online() == (1,), 5, "online stored")
            await _until(lambda: not service._ap_status[("lab", "good")]["online"], 10,
                         "the silent AP marked offline")
            assert "no status for" in service._ap_status[("lab", "good")]["offline_reason"]
            await _until(lambda: online() == (0,), 10, "offline stored")
        finally:
            await service.stop()

    asyncio.run(main())


def test_a_locked_database_is_retried_and_a_refused_batch_dead_lettered(
        tmp_path: Path, segments: Segments) -> None:
    db = tmp_path / "db.sqlite"

    async def main() -> None:
        service = CloudService(_settings(tmp_path))
        await service.start()
        acked: list[str] = []
        try:
            def submit(ap: str, seq: int) -> None:
                service.submit("lab", ap, segments.payload(seq), time.time(),
                               lambda: acked.append(f"{ap}:{seq}"))

            submit("good", 0)
            await _until(lambda: len(acked) == 1, 30, "the first segment stored")
            # Lock the file: every store fails ("database is locked") until it is released.
            locker = sqlite3.connect(db, timeout=1, isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")
            for seq in (1, 2, 3):
                submit("good", seq)
            await _until(lambda: any("storing" in p for p in service.problems()), 15,
                         "the stuck store reported")
            assert len(acked) == 1  # nothing acknowledged that is not stored
            assert service.metrics.stuck._value.get() == 1
            locker.execute("ROLLBACK")
            locker.close()
            released = time.monotonic()
            await _until(lambda: len(acked) == 4, 10, "the batch stored once unlocked")
            assert time.monotonic() - released < 10
            assert not service.problems()
            assert _stored(db, "good") == [0, 1, 2, 3]
            # A statement the database refuses for one AP: that AP's messages are kept
            # aside, the others stored; nothing blocks.
            with sqlite3.connect(db) as con:
                con.execute("CREATE TRIGGER poison BEFORE INSERT ON predictions "
                            "WHEN NEW.ap = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
            for seq in (4, 5):
                submit("good", seq)
                submit("poison", seq)
            await _until(lambda: len(acked) == 8, 20, "the poisoned batch settled")
            assert _stored(db, "good") == [0, 1, 2, 3, 4, 5]
            assert _stored(db, "poison") == []
            with sqlite3.connect(db) as con:
                letters = con.execute("SELECT site, ap, payload, error FROM dead_letters "
                                      "ORDER BY id").fetchall()
            assert [(s, a, p) for s, a, p, _ in letters] == [
                ("lab", "poison", segments.payload(4)), ("lab", "poison", segments.payload(5))]
            assert "poisoned" in letters[0][3]
            assert service.metrics.dead_letters._value.get() == 2
            # Dead-lettered segments are awaited again: sent once more (the trigger gone),
            # they are stored.
            with sqlite3.connect(db) as con:
                con.execute("DROP TRIGGER poison")
            submit("poison", 4)
            await _until(lambda: len(acked) == 9, 20, "the resent segment stored")
            assert _stored(db, "poison") == [4]
        finally:
            await service.stop()

    asyncio.run(main())


def test_api_reads_have_their_own_pool_and_answer_503_when_it_is_exhausted(
        tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from csi_cloud.api.app import create_app

    app = create_app(_settings(tmp_path, api_db_pool_size=1, api_db_max_overflow=0,
                               api_db_pool_timeout_s=0.2))
    with TestClient(app) as client:
        service = app.state.service
        assert service.db.api_engine is not service.db.engine
        held = service.db.api_engine.connect()  # the API's one connection, taken
        try:
            response = client.get("/api/v1/aps")
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "1"
            assert "retry" in response.json()["detail"]
            # Ingest's pool is untouched.
            with service.db.session() as s:
                assert s.execute(__import__("sqlalchemy").text("SELECT 1")).scalar() == 1
        finally:
            held.close()
        assert client.get("/api/v1/aps").status_code == 200
        assert client.get("/api/v1/dead-letters").json() == {"data": [], "count": 0}


def test_live_hub_counts_what_a_slow_subscriber_loses() -> None:
    from csi_cloud.live import LiveHub
    from csi_cloud.metrics import Metrics

    metrics = Metrics()

    async def main() -> None:
        hub = LiveHub(queue_size=2, on_drop=metrics.live_dropped.inc)
        async with hub.subscribe() as sub:
            hub.publish([{"site": "lab", "ap": "a", "seq": i} for i in range(5)])
            assert sub.dropped == 3

    asyncio.run(main())
    assert metrics.live_dropped._value.get() == 3
