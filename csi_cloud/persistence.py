"""The cloud worker's SQL: a batch's predictions and AP state, dead letters, AP status, and
the per-AP state read back at start (or when a bus partition moves to this worker).

Every method blocks: the service calls them on its own threads, never on the event loop.
Retries and dead-lettering are the service's (csi_cloud.service); :func:`is_transient` tells
it which errors are worth waiting out.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import (
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from csi_edge._errors import CSIError
from csi_edge.bundle import decode_segment_codes
from csi_edge.codec import MAX_SEGMENTS

from .db import AP, Database, DeadLetter, Prediction, covered
from .ingest import BatchResult, Ingestor
from .records import DecodedRecord
from .registry import ModelRegistry

__all__ = ["Persistence", "codes_of", "is_transient", "rows_of"]

_MAX_DEAD_LETTERS = 100_000  # rows kept in dead_letters (the oldest go first)
_COLUMNS = frozenset(c.name for c in Prediction.__table__.columns) - {"id"}
# What the classifier and the filter said: a run of idle segments is one row only while these
# are the same for each of its segments (the labels settle once the context holds idle copies).
_RUN_SAME = ("site", "ap", "epoch", "received", "model", "rate_level", "context_present",
             "context_size", "activity", "identity", "smoothed_activity", "uncertain")
# Averaged over a run: confidences and probabilities. Equal floats are not what to wait for:
# the filter approaches its fixed point geometrically, by its stay per segment, so at a stay of
# 0.9 they would differ for hundreds of segments and a run would again be a row per segment.
_RUN_MEAN = ("activity_confidence", "identity_confidence", "activity_confidence_raw",
             "smoothed_confidence", "probabilities")


# The stored rows overlapping a batch's (site, AP, epoch) sequence spans ``b``, one query per
# batch: those starting within a span, and the last one starting before it if it reaches into it
# (the rows stored do not overlap, so no earlier one can). Both are short reads of the unique
# index, however long the AP's history; ``b`` comes from _STORED_PG or _stored_sqlite.
_STORED = (
    " SELECT p.site, p.ap, p.epoch, p.seq, p.segments FROM b JOIN predictions p"
    " ON p.site = b.site AND p.ap = b.ap AND p.epoch = b.epoch AND p.seq BETWEEN b.lo AND b.hi"
    " UNION ALL"
    " SELECT p.site, p.ap, p.epoch, p.seq, p.segments FROM b JOIN predictions p"
    " ON p.id = (SELECT q.id FROM predictions q WHERE q.site = b.site AND q.ap = b.ap"
    " AND q.epoch = b.epoch AND q.seq < b.lo ORDER BY q.seq DESC LIMIT 1)"
    " WHERE p.seq + coalesce(p.segments, 1) > b.lo")
# PostgreSQL: the spans as one JSON parameter (one statement text, prepared once); SQLite: as
# VALUES (half the CPU of reading JSON there), built per batch.
_STORED_PG = text(
    "WITH b AS (SELECT * FROM jsonb_to_recordset(CAST(:spans AS jsonb))"
    " AS s(site text, ap text, epoch integer, lo bigint, hi bigint))" + _STORED)


_SQLITE_SPANS = 6000  # 5 parameters each: within SQLite's 32,766 per statement


def _stored_sqlite(spans: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    values = ", ".join(f"(:s{i}, :a{i}, :e{i}, :l{i}, :h{i})" for i in range(len(spans)))
    params = {f"{k[0]}{i}": span[k] for i, span in enumerate(spans)
              for k in ("site", "ap", "epoch", "lo", "hi")}
    return text(f"WITH b(site, ap, epoch, lo, hi) AS (VALUES {values})" + _STORED), params


# PostgreSQL: the transaction-scoped advisory locks of the APs a batch stores predictions of
# (namespace, crc32 of site and AP), taken in the array's (sorted) order, so two writers of
# the same APs wait for each other instead of deadlocking. And, for this transaction, plans
# made for each execution: a prepared statement's generic plan, made while the table was small,
# would keep scanning all of it for each span.
_LOCK_NAMESPACE = 0x63736900  # "csi\0"
_LOCK_SQL = text("SELECT set_config('plan_cache_mode', 'force_custom_plan', true), "
                 "count(pg_advisory_xact_lock(:namespace, k)) "
                 "FROM unnest(CAST(:keys AS integer[])) AS k")
_U32 = 2**32


_APS = cast(Table, AP.__table__)
# An AP row is written from a worker's state unless it is ahead of it: a later sequence number
# of the same epoch (modulo 2**32, as the wire counts), or another epoch seen later. So a worker
# that stores a batch late (its partition moved on meanwhile) never moves it backwards.
_NOT_AHEAD = or_(
    _APS.c.epoch.is_(None), _APS.c.last_seq.is_(None),
    and_(_APS.c.epoch == bindparam("k_epoch"),
         or_(_APS.c.last_seq == bindparam("k_last_seq"),
             (_APS.c.last_seq - bindparam("k_last_seq") + literal(_U32)) % literal(_U32)
             >= literal(_U32 // 2))),
    and_(_APS.c.epoch != bindparam("k_epoch"),
         func.coalesce(_APS.c.last_seen, 0.0) <= bindparam("k_last_seen")))
_UPDATE_AP = update(_APS).where(_APS.c.site == bindparam("k_site"),
                                _APS.c.ap == bindparam("k_ap"), _NOT_AHEAD)


def _lock_key(site: str, ap: str) -> int:
    """A stable 32-bit key of an AP (a signed int4; another AP sharing it only waits more)."""
    return zlib.crc32(f"{site}\x00{ap}".encode()) - 2**31


def _spans(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sequence spans of a batch's segments, per (site, AP, epoch): near ones (apart by
    less than a message's segments) share a span, so a wrap at 2**32 or a jump is not one span
    over the AP's whole history."""
    by_key: dict[tuple[str, str, int], list[int]] = {}
    for e in events:
        by_key.setdefault((e["site"], e["ap"], e["epoch"]), []).append(e["seq"])
    spans: list[dict[str, Any]] = []
    for (site, ap, epoch), seqs in by_key.items():
        seqs.sort()
        lo = hi = seqs[0]
        for seq in seqs[1:]:
            if seq - hi >= MAX_SEGMENTS:
                spans.append({"site": site, "ap": ap, "epoch": epoch, "lo": lo, "hi": hi})
                lo = seq
            hi = seq
        spans.append({"site": site, "ap": ap, "epoch": epoch, "lo": lo, "hi": hi})
    return spans


def _running_mean(mean: Any, value: Any, n: int) -> Any:
    """The mean of ``n`` values and one more: floats, or dicts of them (``probabilities``) key
    by key; anything else (None, a missing key) stays the mean's."""
    if isinstance(mean, float) and isinstance(value, float):
        return (mean * n + value) / (n + 1)
    if isinstance(mean, dict) and isinstance(value, dict):
        return {k: _running_mean(v, value.get(k), n) for k, v in mean.items()}
    return mean


def is_transient(exc: BaseException) -> bool:
    """The database could not be reached or was busy (retry until it can), as opposed to a
    statement it refused for its content (a bad value: retry a few times, then dead-letter)."""
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError |
                  PoolTimeoutError | TimeoutError | ConnectionError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def codes_of(events: list[dict[str, Any]], result: BatchResult) -> list[bytes | None]:
    """The code bytes of each prediction's segment (stored with it, for restoring context)."""
    by_key = {(r.site, r.ap, r.epoch, r.seq): r.code_bytes for r in result.segments}
    return [by_key.get((e["site"], e["ap"], e["epoch"], e["seq"])) for e in events]


def rows_of(events: list[dict[str, Any]], codes: list[bytes | None]) -> list[dict[str, Any]]:
    """The prediction rows of a batch's predictions (in order): one per segment, except that
    consecutive idle segments of one message (same arrival, consecutive sequence numbers, the
    same repeated codes) are one row while the classifier and the filter give the same labels
    for each (``_RUN_SAME``): ``segments`` counts them, ``seq`` and ``timestamp`` are the
    first's, confidences and probabilities their mean over the run (``_RUN_MEAN``). What
    the edge sends per segment is summarised over the run: ``quality`` its lowest,
    ``motion_score`` its highest, ``motion`` and ``presence`` true if true for any segment.
    So an idle message costs a row, not one per segment it stands for (up to 255), however
    its per-segment bytes vary."""
    rows: list[dict[str, Any]] = []
    run: dict[str, Any] | None = None  # the idle run being extended (the last row)
    for event, code in zip(events, codes, strict=True):
        if (run is not None and event.get("idle") and code == run["codes"]
                and event["seq"] == run["seq"] + run["segments"]
                and all(event.get(k) == run.get(k) for k in _RUN_SAME)):
            n = run["segments"]
            for key in _RUN_MEAN:
                run[key] = _running_mean(run.get(key), event.get(key), n)
            run["segments"] = n + 1
            run["quality"] = min(run["quality"], event["quality"])
            for key, pick in (("motion_score", max), ("motion", max), ("presence", max)):
                values = [v for v in (run.get(key), event.get(key)) if v is not None]
                run[key] = pick(values) if values else None
            continue
        row = {k: v for k, v in event.items() if k in _COLUMNS}
        row["codes"] = code
        row["segments"] = 1
        rows.append(row)
        run = row if event.get("idle") else None
    for row in rows:
        if row["segments"] == 1:
            row["segments"] = None  # one segment: null, as in rows stored before runs
    return rows


class Persistence:
    """The SQL of one worker, over its database, ingestor (the per-AP state written and
    restored) and registry (to decode stored codes back into context)."""

    def __init__(self, db: Database, ingestor: Ingestor, registry: ModelRegistry) -> None:
        self.db = db
        self.ingestor = ingestor
        self.registry = registry
        self._known: set[tuple[str, str]] = set()  # AP rows known to exist

    # -- restore ----------------------------------------------------------------------------

    def restore(self, keep: Callable[[str, str], bool] | None = None
                ) -> list[tuple[tuple[str, str], dict[str, Any] | None]]:
        """Epoch, last sequence numbers, counters and context per AP from the database, so
        segments the broker delivers again after a restart are recognised as duplicates and a
        restarted worker predicts as if it had never stopped. With ``keep(site, ap)``: only
        those APs, forgetting what this worker held for them first (their bus partition just
        moved here; another worker may have handled them meanwhile). Each AP and its stored
        status (None: none stored)."""
        out = []
        with self.db.session() as s:
            if s.get_bind().dialect.name == "postgresql":
                # Every read below in one snapshot. Another worker may commit a batch of these
                # APs while they are read (their partition was handed over while it was
                # behind). Read at READ COMMITTED, a segment it committed between an AP's
                # context read and its stored-segments read counted as seen but was missing
                # from the context, and never came back (that worker acknowledged it): the
                # next predictions read fewer segments (tests/test_stored_once.py).
                s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            for row in s.scalars(select(AP)).all():
                if keep is not None:
                    if not keep(row.site, row.ap):
                        continue
                    self.ingestor.forget(row.site, row.ap)
                out.append(((row.site, row.ap), self._restore_row(s, row)))
        return out

    def _restore_row(self, s: Any, row: AP) -> dict[str, Any] | None:
        self._restore_context(s, row)
        self._known.add((row.site, row.ap))
        state = self.ingestor.state(row.site, row.ap)
        state.epoch, state.last_seq = row.epoch, row.last_seq
        state.model, state.rate_level = row.model, row.rate_level
        counters = dict(row.counters or {})
        state.rejected.update(counters.pop("rejected", {}) or {})
        state.counters.update({k: v for k, v in counters.items() if isinstance(v, int)})
        if row.epoch is not None and row.last_seq is not None:
            # What is stored, not the row's last_seq (written from the state, which may hold
            # the next batch, not yet stored), is what was seen; and the gaps are awaited: a
            # resent or late segment is not taken for a duplicate.
            # (an idle run's row stands for several: each counts as seen)
            runs = s.execute(select(Prediction.seq, Prediction.segments).where(
                Prediction.site == row.site, Prediction.ap == row.ap,
                Prediction.epoch == row.epoch,
                Prediction.seq + func.coalesce(Prediction.segments, 1) > row.last_seq - 4096
            )).all()
            self.ingestor.restore_seen(row.site, row.ap,
                                       [q for seq, n in runs for q in covered(seq, n)])
        return row.status if isinstance(row.status, dict) else None

    def _restore_context(self, s: Any, row: AP) -> None:
        """The AP's last context from the codes stored with its predictions."""
        if row.epoch is None or row.model is None:
            return
        try:
            model = self.registry.get(row.model)
        except KeyError:
            return
        n = model.net.cfg.context_segments
        rows = s.execute(select(Prediction.seq, Prediction.timestamp, Prediction.rate_level,
                                Prediction.quality, Prediction.codes, Prediction.received,
                                Prediction.segments)
                         .where(Prediction.site == row.site, Prediction.ap == row.ap,
                                Prediction.epoch == row.epoch, Prediction.model == model.id)
                         .order_by(Prediction.id.desc()).limit(n)).all()
        records: list[DecodedRecord] = []
        for seq, timestamp, level, quality, codes, received, segments in reversed(rows):
            if codes is None:
                continue
            try:
                decoded = decode_segment_codes(codes, level, model.manifest, model.tables)
            except (CSIError, ValueError):
                continue
            # An idle run: each of its segments (the last n of them) repeats its codes.
            start_ms = round(timestamp * 1000)
            records.extend(DecodedRecord(row.site, row.ap, row.epoch, seq + i,
                                         start_ms + i * model.segment_ms, level, quality, model,
                                         decoded, codes, received)
                           for i in range(max(0, (segments or 1) - n), segments or 1))
        if records:
            self.ingestor.restore_context(records[-n:])

    def known_aps(self) -> list[tuple[str, str]]:
        with self.db.session() as s:
            return [(a.site, a.ap) for a in s.scalars(select(AP))]

    # -- writes -----------------------------------------------------------------------------

    def store(self, events: list[dict[str, Any]], codes: list[bytes | None],
              touched: set[tuple[str, str]]) -> list[dict[str, Any]]:
        """Predictions and AP state of one batch in one transaction, with bulk statements
        (ORM objects per row cost more than the model itself at a thousand APs). The events
        not stored because their segments are stored already: another worker stored them
        (a bus partition moved while this one was behind); each is counted in its AP's
        ``duplicates_refused``."""
        if not touched:
            return []
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for event in events:
            latest[(event["site"], event["ap"])] = event
        for attempt in (1, 2):
            try:
                with self.db.session.begin() as s:
                    created, refused = self._write_batch(s, events, codes, touched, latest)
                self._known |= created  # only once committed
                for event in refused:
                    state = self.ingestor.aps.get((event["site"], event["ap"]))
                    if state is not None:
                        state.counters["duplicates_refused"] += 1
                return refused
            except IntegrityError:
                # Another writer (the status thread, another worker) created one of the new
                # AP rows first: they exist now, so the second attempt updates them. (Or a
                # prediction row another writer stored without the lock: the second attempt
                # finds it and refuses ours.)
                self._known -= touched
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _unstored(self, s: Any, events: list[dict[str, Any]]) -> list[bool]:
        """Per event: whether its segment is not stored yet. Taken under a lock per AP held
        until the transaction ends (PostgreSQL: advisory locks; SQLite: the database's write
        lock, taken first), so a second writer of the same AP waits and then sees these rows."""
        dialect = s.get_bind().dialect.name
        spans = _spans(events)
        if dialect == "postgresql":
            keys = sorted({_lock_key(e["site"], e["ap"]) for e in events})
            s.execute(_LOCK_SQL, {"namespace": _LOCK_NAMESPACE, "keys": keys})
            queries = [(_STORED_PG, {"spans": json.dumps(spans)})]
        elif dialect == "sqlite":
            s.execute(text("BEGIN IMMEDIATE"))  # (the transaction's first statement)
            # (one query unless a batch holds more spans than SQLite takes parameters)
            queries = [_stored_sqlite(spans[i:i + _SQLITE_SPANS])
                       for i in range(0, len(spans), _SQLITE_SPANS)]
        else:
            raise RuntimeError(f"database dialect {dialect!r} is not supported: use sqlite or "
                               "postgresql")
        stored: set[tuple[str, str, int, int]] = set()
        for query, params in queries:
            for site, ap, epoch, seq, n in s.execute(query, params):
                stored.update((site, ap, epoch, q) for q in covered(seq, n))
        return [(e["site"], e["ap"], e["epoch"], e["seq"]) not in stored for e in events]

    def _write_batch(self, s: Any, events: list[dict[str, Any]], codes: list[bytes | None],
                     touched: set[tuple[str, str]], latest: dict[tuple[str, str], dict[str, Any]]
                     ) -> tuple[set[tuple[str, str]], list[dict[str, Any]]]:
        """Write; the AP rows known to exist once this commits, and the events refused."""
        refused: list[dict[str, Any]] = []
        if events:
            new = self._unstored(s, events)
            if not all(new):
                refused = [e for e, n in zip(events, new, strict=True) if not n]
                events = [e for e, n in zip(events, new, strict=True) if n]
                codes = [c for c, n in zip(codes, new, strict=True) if n]
            if events:
                s.execute(insert(Prediction), rows_of(events, codes))
        unknown = touched - self._known
        if unknown:
            existing = {tuple(r) for r in s.execute(
                select(AP.site, AP.ap).where(tuple_(AP.site, AP.ap).in_(sorted(unknown))))}
            new_aps = unknown - existing
            if new_aps:
                now = time.time()
                s.execute(insert(AP), [{"site": site, "ap": ap, "first_seen": now,
                                        "online": False, "counters": {}}
                                       for site, ap in sorted(new_aps)])
        updates = []
        for site, ap in sorted(touched):
            state = self.ingestor.aps[(site, ap)]
            row: dict[str, Any] = {
                "k_site": site, "k_ap": ap, "k_epoch": state.epoch,
                "k_last_seq": state.last_seq, "k_last_seen": state.last_seen,
                "last_seen": state.last_seen, "epoch": state.epoch, "last_seq": state.last_seq,
                "counters": {**dict(state.counters), "rejected": dict(state.rejected)}}
            if state.model:
                row["model"] = state.model
            if state.rate_level is not None:
                row["rate_level"] = state.rate_level
            if (site, ap) in latest:
                row["prediction"] = latest[(site, ap)]
            updates.append(row)
        # Bulk UPDATE by primary key, grouped by the set of columns each row sets; a row that
        # is ahead of this worker's state is left as it is (_NOT_AHEAD).
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in updates:
            by_keys.setdefault(tuple(sorted(row)), []).append(row)
        for rows in by_keys.values():
            s.execute(_UPDATE_AP, rows)
        return unknown, refused

    def write_dead_letters(self, rows: list[dict[str, Any]]) -> None:
        with self.db.session.begin() as s:
            s.execute(insert(DeadLetter), rows)
            newest = s.scalar(select(func.max(DeadLetter.id))) or 0
            if newest > _MAX_DEAD_LETTERS:
                s.execute(delete(DeadLetter).where(DeadLetter.id <= newest - _MAX_DEAD_LETTERS))

    def write_status(self, site: str, ap: str, status: dict[str, Any]) -> None:
        try:
            self._write_status(site, ap, status)
        except IntegrityError:  # the ingest batch created the row meanwhile
            self._write_status(site, ap, status)

    def _write_status(self, site: str, ap: str, status: dict[str, Any]) -> None:
        with self.db.session.begin() as s:
            row = s.get(AP, (site, ap)) or AP(site=site, ap=ap, first_seen=time.time())
            row.online = bool(status.get("online"))
            row.status = status
            row.source = status.get("source") if isinstance(status.get("source"), str) else None
            if isinstance(status.get("model"), str):
                row.model = status["model"]
            if isinstance(status.get("rate_level"), int):
                row.rate_level = status["rate_level"]
            s.merge(row)
