"""The service's SQL database (SQLAlchemy 2): AP state, predictions, labels, training jobs.

SQLite by default (WAL, one file), PostgreSQL by URL. Writes happen in batches off the event
loop (one transaction per ingest batch).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

log = logging.getLogger(__name__)

__all__ = ["AP", "APPresence", "Base", "Database", "DeadLetter", "Event", "Label", "Prediction",
           "Setting", "TrainingJob", "covered"]


class Base(DeclarativeBase):
    pass


class AP(Base):
    """One access point as the cloud knows it."""

    __tablename__ = "aps"

    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    ap: Mapped[str] = mapped_column(String(64), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rate_level: Mapped[int | None] = mapped_column(Integer, nullable=True)
    source: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    first_seen: Mapped[float] = mapped_column(Float, default=time.time)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The wire's sequence numbers are u32: 64-bit columns on every database (SQLite's INTEGER
    # is 64-bit already; older PostgreSQL tables are widened on start, _widen_columns).
    last_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    counters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prediction: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True,
                                                              doc="the latest prediction")


class Prediction(Base):
    """One prediction: the context ending at one segment, or one row for a run of idle
    segments (``segments`` > 1, see csi_cloud.persistence.rows_of)."""

    __tablename__ = "predictions"
    # ux_predictions_ap_seq: a segment is stored once. It refuses a second row starting at the
    # same segment (a backstop: csi_cloud.persistence refuses any overlap, runs included, and
    # its check reads this index).
    __table_args__ = (Index("ix_predictions_ap_time", "site", "ap", "timestamp"),
                      Index("ux_predictions_ap_seq", "site", "ap", "epoch", "seq", unique=True))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site: Mapped[str] = mapped_column(String(64))
    ap: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger)
    timestamp: Mapped[float] = mapped_column(Float, doc="capture time of the segment's start")
    received: Mapped[float] = mapped_column(Float)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True,
                                              doc="null: presence only (no bundle)")
    rate_level: Mapped[int] = mapped_column(Integer)
    quality: Mapped[float] = mapped_column(Float)
    context_present: Mapped[int] = mapped_column(Integer)
    context_size: Mapped[int] = mapped_column(Integer)
    activity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    activity_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    identity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    identity_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    codes: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True,
                                                doc="the segment's entropy-coded codes, so a "
                                                    "restarted worker rebuilds the context")
    motion_score: Mapped[float | None] = mapped_column(Float, nullable=True,
                                                       doc="csi_edge.presence score (log2)")
    motion: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    presence: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # csi_cloud.smoothing: the temperature-free confidence, the filtered label, its belief
    # and the abstention; null where nothing was smoothed (presence only, late segments).
    activity_confidence_raw: Mapped[float | None] = mapped_column(Float, nullable=True)
    smoothed_activity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    smoothed_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertain: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # A run of consecutive idle segments of one message stored as one row: seq .. seq +
    # segments - 1, captured from timestamp on, one segment length apart. Null: one segment.
    segments: Mapped[int | None] = mapped_column(Integer, nullable=True)


def covered(seq: int, segments: int | None) -> range:
    """The sequence numbers one prediction row stands for (a run never wraps at 2**32)."""
    return range(seq, seq + (segments or 1))


class Event(Base):
    """One episode of an AP's activity or presence (csi_cloud.events): from ``start`` until
    ``end`` (null while it lasts)."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_ap_start", "site", "ap", "start"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site: Mapped[str] = mapped_column(String(64))
    ap: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), doc="activity or presence")
    value: Mapped[str] = mapped_column(String(64), doc="the activity, uncertain, "
                                                        "occupied or empty")
    start: Mapped[float] = mapped_column(Float, doc="capture time it began (Unix s)")
    end: Mapped[float | None] = mapped_column(Float, nullable=True, doc="when the next began")
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)


class DeadLetter(Base):
    """A segment message whose batch could not be stored (after retries): kept with its raw
    payload and the error, so it can be looked at and replayed, and acknowledged so it does
    not block the messages behind it."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Text, not VARCHAR(64): whatever name the message came with is kept as it was.
    site: Mapped[str] = mapped_column(Text)
    ap: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary, doc="at most max_payload_bytes")
    size: Mapped[int] = mapped_column(Integer, doc="payload bytes as received")
    error: Mapped[str] = mapped_column(Text)
    received: Mapped[float] = mapped_column(Float)
    created: Mapped[float] = mapped_column(Float, default=time.time)


class Label(Base):
    """Activity/identity over a time range of an AP's stream (for retraining)."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    site: Mapped[str] = mapped_column(String(64))
    ap: Mapped[str] = mapped_column(String(64))
    start: Mapped[float] = mapped_column(Float)
    end: Mapped[float] = mapped_column(Float)
    activity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    identity: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created: Mapped[float] = mapped_column(Float, default=time.time)


class APPresence(Base):
    """An AP's own motion threshold (csi_edge.presence), in place of the site's
    ``presence_threshold / presence_sensitivity``: set by hand or fitted on labelled seconds."""

    __tablename__ = "ap_presence"

    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    ap: Mapped[str] = mapped_column(String(64), primary_key=True)
    threshold: Mapped[float] = mapped_column(Float)
    how: Mapped[str] = mapped_column(String(16), doc="'set' or 'fitted'")
    fit: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, nullable=True, doc="what the fit saw (csi_edge.presence.MotionThresholdFit)")
    updated: Mapped[float] = mapped_column(Float, default=time.time)


class TrainingJob(Base):
    __tablename__ = "training_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    created: Mapped[float] = mapped_column(Float, default=time.time)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    log: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    bundle: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Setting(Base):
    """Small persistent key/values (the active model)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# 64-bit columns of tables created before they were: (table, column).
_WIDENED = (("aps", "last_seq"), ("predictions", "seq"))
# Where a database holds segments stored twice (before they were refused), the unique index
# cannot be built: the same columns are indexed without it, for the duplicate check's reads.
_UNIQUE_FALLBACK = {"ux_predictions_ap_seq": "ix_predictions_ap_seq"}


class Database:
    """Engines + session factories; creates (and migrates) the tables on first use.

    Two engines with their own connection pools: ``session`` (ingest, status, jobs) and
    ``api_session`` (the HTTP API's reads), so a flood of requests waits for the API's pool
    (``pool_timeout`` -> :class:`sqlalchemy.exc.TimeoutError`, answered 503) and never takes
    the connections ingest needs.
    """

    def __init__(self, url: str, *, api_pool_size: int = 5, api_max_overflow: int = 5,
                 api_pool_timeout_s: float = 2.0, busy_timeout_s: float = 5.0) -> None:
        self.url = url
        self.engine: Engine = self._engine(url, busy_timeout_s)
        Base.metadata.create_all(self.engine)
        self._add_missing_columns()
        self._widen_columns()
        self._add_missing_indexes()
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self.api_engine: Engine = self._engine(url, busy_timeout_s, pool_size=api_pool_size,
                                               max_overflow=api_max_overflow,
                                               pool_timeout=api_pool_timeout_s)
        self.api_session = sessionmaker(self.api_engine, expire_on_commit=False)

    @staticmethod
    def _engine(url: str, busy_timeout_s: float, **pool: Any) -> Engine:
        kwargs: dict[str, Any] = {"future": True}
        if ":memory:" not in url and url not in ("sqlite://", "sqlite:///"):
            kwargs.update(pool)  # (an in-memory SQLite database has one connection per thread)
        if url.startswith("sqlite"):
            # Bounded: a locked file is an error to retry, never a thread stuck for minutes.
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_s}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": max(1, round(busy_timeout_s))}
        engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _add_missing_columns(self) -> None:
        """Idempotent migration: nullable columns added to a table since the database was
        created (presence, smoothing, idle runs) are added to it; ``create_all`` only creates
        missing tables. A missing column that may not be null is an error naming it."""
        inspector = inspect(self.engine)
        existing = set(inspector.get_table_names())
        with self.engine.begin() as con:
            for table in Base.metadata.sorted_tables:
                if table.name not in existing:
                    continue
                have = {c["name"] for c in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name in have:
                        continue
                    if not column.nullable:
                        raise RuntimeError(f"database table {table.name!r} lacks column "
                                           f"{column.name!r}, which may not be null: migrate "
                                           "it by hand or start a new database")
                    kind = column.type.compile(dialect=self.engine.dialect)
                    con.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN '
                                     f'"{column.name}" {kind}'))

    def _widen_columns(self) -> None:
        """Idempotent migration: 32-bit sequence-number columns of an older PostgreSQL
        database become BIGINT (SQLite's INTEGER holds 64 bits already)."""
        if self.engine.dialect.name != "postgresql":
            return
        inspector = inspect(self.engine)
        with self.engine.begin() as con:
            for table, column in _WIDENED:
                kinds = {c["name"]: c["type"] for c in inspector.get_columns(table)}
                if not isinstance(kinds.get(column), BigInteger):
                    con.execute(text(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" '
                                     "TYPE BIGINT"))

    def _add_missing_indexes(self) -> None:
        """Idempotent migration: indexes added to a table since the database was created
        (``create_all`` only indexes the tables it creates). A unique index that the stored rows
        violate (segments stored twice before they were refused) does not stop the start: the
        same columns are indexed without uniqueness, a warning says how many keys are stored
        more than once, and the unique index is tried again on the next start."""
        inspector = inspect(self.engine)
        for table in Base.metadata.sorted_tables:
            have = {str(i["name"]) for i in inspector.get_indexes(table.name)}
            for index in table.indexes:
                fallback = _UNIQUE_FALLBACK.get(str(index.name))
                if index.name not in have:
                    try:
                        with self.engine.begin() as con:
                            index.create(con)
                    except IntegrityError:
                        self._unique_violated(table, index, fallback, have)
                        continue
                if fallback in have:  # the duplicates are gone: the unique index replaces it
                    with self.engine.begin() as con:
                        con.execute(text(f'DROP INDEX "{fallback}"'))

    def _unique_violated(self, table: Table, index: Index, fallback: str | None,
                         have: set[str]) -> None:
        keys = [table.c[c.name] for c in index.columns]
        with self.engine.connect() as con:
            twice = con.scalar(select(func.count()).select_from(
                select(*keys).group_by(*keys).having(func.count() > 1).subquery()))
        if fallback is None:
            raise RuntimeError(f"database table {table.name!r}: unique index {index.name!r} "
                               f"cannot be created, {twice} key(s) are stored more than once")
        log.warning("database table %r holds %d key(s) of %s stored more than once (stored "
                    "before duplicates were refused): unique index %r not created, %r instead; "
                    "delete the extra rows (docs/cloud.md, Storage) and restart to create it",
                    table.name, twice, ", ".join(c.name for c in index.columns), index.name,
                    fallback)
        if fallback not in have:  # (DDL text: an Index object would join the table's own)
            columns = ", ".join(f'"{c.name}"' for c in index.columns)
            with self.engine.begin() as con:
                con.execute(text(f'CREATE INDEX "{fallback}" ON "{table.name}" ({columns})'))

    def get_setting(self, key: str) -> str | None:
        with self.session() as s:
            row = s.get(Setting, key)
            return row.value if row else None

    def set_setting(self, key: str, value: str) -> None:
        with self.session.begin() as s:
            s.merge(Setting(key=key, value=value))

    def motion_thresholds(self) -> dict[tuple[str, str], float]:
        """Every AP's own motion threshold."""
        with self.session() as s:
            return {(r.site, r.ap): r.threshold for r in s.scalars(select(APPresence))}

    def ping(self) -> bool:
        with self.api_engine.connect() as con:
            con.execute(text("SELECT 1"))
        return True

    def close(self) -> None:
        self.engine.dispose()
        self.api_engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
