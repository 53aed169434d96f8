"""Each segment is stored once, whoever stores it: two workers holding the same AP's segments
(a bus partition moved while the first was behind) write overlapping batches, one after the
other and at the same time, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _harness import Segments, postgres_database, stored_seqs
from sqlalchemy import inspect, select, text

from csi_cloud import persistence
from csi_cloud.db import AP, Database, Prediction
from csi_cloud.ingest import Ingestor
from csi_cloud.persistence import Persistence, codes_of
from csi_cloud.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'once.db'}"
    else:
        yield from postgres_database()


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(ROOT / "models")


class Writer:
    """One worker's ingest and store over a shared database (its own engine and pool)."""

    def __init__(self, registry: ModelRegistry, url: str) -> None:
        self.db = Database(url)
        self.ingestor = Ingestor(registry, live_lengths=False)
        self.store = Persistence(self.db, self.ingestor, registry)
        self.refused: list[tuple[str, int]] = []

    def prepare(self, messages: list[tuple[str, bytes]]) -> tuple[list[dict[str, Any]],
                                                                  list[bytes | None]]:
        result = self.ingestor.process([("lab", ap, p, time.time()) for ap, p in messages])
        events = [p.as_dict() for p in result.predictions]
        return events, codes_of(events, result)

    def write(self, events: list[dict[str, Any]], codes: list[bytes | None]) -> None:
        refused = self.store.store(events, codes, {("lab", e["ap"]) for e in events})
        self.refused.extend((e["ap"], e["seq"]) for e in refused)

    def send(self, *messages: tuple[str, bytes]) -> None:
        self.write(*self.prepare(list(messages)))


def _rows(db: Database, ap: str) -> list[tuple[int, int | None]]:
    with db.session() as s:
        return [(r.seq, r.segments) for r in s.execute(
            select(Prediction.seq, Prediction.segments).where(Prediction.ap == ap)
            .order_by(Prediction.seq))]


def _ap_row(db: Database, ap: str) -> AP:
    with db.session() as s:
        row = s.get(AP, ("lab", ap))
        assert row is not None
        return row


def test_overlapping_batches_of_two_writers_store_each_segment_once(
        db_url: str, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle run over single-segment rows and single segments over a stored run: only the
    segments not stored yet are stored (a run is cut where another writer stored part of it),
    the others are refused and counted; the AP's state never moves back to the late writer's.
    (SQLite reads the spans one at a time here, as it would past its parameter limit.)"""
    monkeypatch.setattr(persistence, "_SQLITE_SPANS", 1)
    seg = Segments()
    a, b = Writer(registry, db_url), Writer(registry, db_url)
    # AP "run-late": single segments stored first, then a run over them.
    b.send(("run-late", seg.payload(0, n=4)), ("run-late", seg.payload(12)),
           ("run-late", seg.payload(13)), ("run-late", seg.payload(20)))
    a.send(("run-late", seg.payload(0, n=4)), ("run-late", seg.payload(4, n=20, idle=True)))
    assert stored_seqs(_rows(a.db, "run-late")) == list(range(24))
    assert sorted(a.refused) == [("run-late", q) for q in (0, 1, 2, 3, 12, 13, 20)]
    # AP "run-first": a run stored first, then single segments and a run overlapping it.
    a.send(("run-first", seg.payload(0, n=2)), ("run-first", seg.payload(2, n=30, idle=True)))
    runs = _rows(a.db, "run-first")
    assert stored_seqs(runs) == list(range(32))
    assert any(seq < 20 and seq + (n or 1) > 31 for seq, n in runs)  # one run over 20..31
    b.send(("run-first", seg.payload(0, n=2)), ("run-first", seg.payload(20)),
           ("run-first", seg.payload(31)), ("run-first", seg.payload(32, n=10, idle=True)))
    assert stored_seqs(_rows(a.db, "run-first")) == list(range(42))
    assert sorted(q for ap, q in b.refused if ap == "run-first") == [0, 1, 20, 31]
    assert b.ingestor.aps[("lab", "run-first")].counters["duplicates_refused"] == 4
    # The late writer's state is behind: the AP row keeps the newest.
    row = _ap_row(a.db, "run-late")
    assert (row.epoch, row.last_seq) == (7, 23)
    b.send(("run-late", seg.payload(21)))  # b's state: last_seq 21 < 23 stored
    row = _ap_row(a.db, "run-late")
    assert (row.epoch, row.last_seq) == (7, 23)
    assert b.refused[-1] == ("run-late", 21)
    a.send(("run-first", seg.payload(42)))
    b.send(("run-late", seg.payload(24)), ("run-first", seg.payload(42)),
           ("run-first", seg.payload(43)))  # (two spans)
    assert (_ap_row(a.db, "run-late").last_seq, stored_seqs(_rows(a.db, "run-late"))) == (
        24, list(range(25)))
    assert stored_seqs(_rows(a.db, "run-first")) == list(range(44))
    assert b.refused[-1] == ("run-first", 42)
    a.db.close()
    b.db.close()


def test_two_writers_at_the_same_time_store_each_segment_once(
        db_url: str, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both writers store overlapping idle runs of the same APs at the same moment, round after
    round: runs starting at different segments, so no unique key on a row's first segment sees
    the overlap, only the check under the lock does. Each segment is stored exactly once.
    (Each writer pauses between its check and its insert, so that without the lock both would
    check before either inserts.)"""
    seg = Segments()
    a, b = Writer(registry, db_url), Writer(registry, db_url)
    rounds = 4
    aps = [[f"r{r}-ap{i}" for i in range(4)] for r in range(rounds)]
    for w in (a, b):  # a coded reference, then idle until the context holds only idle copies
        w.send(*[(ap, seg.payload(0)) for group in aps for ap in group])
        w.send(*[(ap, seg.payload(1, n=19, idle=True)) for group in aps for ap in group])
    plans: dict[str, list[tuple[list[dict[str, Any]], list[bytes | None]]]] = {"a": [], "b": []}
    for name, w in (("a", a), ("b", b)):
        for group in aps:  # 20..31 and 26..37: one run each, overlapping on 26..31
            plans[name].append(w.prepare(
                [(ap, seg.payload(20 if (name == "a") == (i % 2 == 0) else 26, n=12, idle=True))
                 for i, ap in enumerate(group)]))
    check = Persistence._unstored

    def slow_check(self: Persistence, s: Any, events: list[dict[str, Any]]) -> list[bool]:
        new = check(self, s, events)
        time.sleep(0.05)
        return new

    monkeypatch.setattr(Persistence, "_unstored", slow_check)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def store(w: Writer, batches: list[tuple[list[dict[str, Any]], list[bytes | None]]]
              ) -> None:
        try:
            for events, codes in batches:
                barrier.wait(30)
                w.write(events, codes)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=store, args=(w, plans[name]))
               for name, w in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for ap in (ap for group in aps for ap in group):
        assert stored_seqs(_rows(a.db, ap)) == list(range(38)), ap
        assert _ap_row(a.db, ap).last_seq == 37
    # Each writer predicted 32 or 26 segments of each AP: 20 + 6 of them are refused.
    assert len(a.refused) + len(b.refused) == rounds * 4 * 26
    a.db.close()
    b.db.close()


def test_a_database_with_segments_stored_twice_still_starts(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A database from before duplicates were refused may hold a segment twice: the start goes
    on with the same columns indexed without uniqueness and a warning, and once the extra rows
    are deleted the next start creates the unique index."""
    db = Database(db_url)
    with db.engine.begin() as con:
        con.execute(text('DROP INDEX "ux_predictions_ap_seq"'))
    row = {"site": "lab", "ap": "ap", "epoch": 1, "timestamp": 1.0, "received": 1.0,
           "rate_level": 0, "quality": 1.0, "context_present": 1, "context_size": 8,
           "probabilities": {}}
    with db.session.begin() as s:
        s.add_all([Prediction(**row, seq=5), Prediction(**row, seq=5), Prediction(**row, seq=6)])
    db.close()

    def indexes() -> set[str]:
        probe = Database(db_url)
        try:
            return {i["name"] for i in inspect(probe.engine).get_indexes("predictions")}
        finally:
            probe.close()

    with caplog.at_level(logging.WARNING, logger="csi_cloud.db"):
        assert {"ix_predictions_ap_seq"} <= indexes() - {"ux_predictions_ap_seq"}
    assert "holds 1 key(s) of site, ap, epoch, seq stored more than once" in caplog.text
    db = Database(db_url)
    with db.session.begin() as s:
        extra = s.scalars(select(Prediction.id).where(Prediction.seq == 5)).all()[1]
        s.execute(Prediction.__table__.delete().where(Prediction.id == extra))
    db.close()
    have = indexes()
    assert "ux_predictions_ap_seq" in have and "ix_predictions_ap_seq" not in have


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from postgres_database()


def test_a_reload_reads_an_aps_context_and_its_stored_segments_in_one_snapshot(
        postgres_url: str, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker gaining a partition reads each AP's context, then the segments stored for it.
    Another worker that commits a batch of the AP between the two reads (it was behind when
    the partition moved) must not leave segments counted as seen but missing from the
    context: redelivered to this worker (the other one was past its ack wait), they would be
    dropped as duplicates, and the next predictions would read fewer segments. On PostgreSQL
    (the database workers share) both reads see one snapshot: the late batch is neither in
    the context nor seen, and is accepted when it comes."""
    seg = Segments()
    a, b = Writer(registry, postgres_url), Writer(registry, postgres_url)
    a.send(*[("snap", seg.payload(q)) for q in range(6)])
    read_context = Persistence._restore_context

    def racing(self: Persistence, s: Any, row: AP) -> None:
        read_context(self, s, row)
        if self is b.store:  # the other worker commits 6..8 between the two reads
            a.send(*[("snap", seg.payload(q)) for q in range(6, 9)])

    monkeypatch.setattr(Persistence, "_restore_context", racing)
    b.store.restore(lambda site, ap: ap == "snap")
    state = b.ingestor.aps[("lab", "snap")]
    assert sorted(r.seq for r in state.context.values()) == list(range(6))
    assert state.last_seq == 5  # not 8: 6..8 are not counted as seen
    # Redelivered to this worker (the other one was past its ack wait): accepted, predicted
    # and refused at the store (stored already), and in the context of what comes next.
    b.send(*[("snap", seg.payload(q)) for q in range(6, 10)])
    assert sorted(b.refused) == [("snap", q) for q in range(6, 9)]
    assert stored_seqs(_rows(a.db, "snap")) == list(range(10))
    with a.db.session() as s:
        present = s.scalar(select(Prediction.context_present).where(
            Prediction.ap == "snap", Prediction.seq == 9))
    assert present == 8
    a.db.close()
    b.db.close()

