"""The on-disk store-and-forward queue of one stream: encoded segments wait here for PUBACK.

SQLite in WAL mode, one file per access point. A segment is written (and committed) before
any attempt to publish it and deleted only after the broker acknowledged the message that
carried it, so a killed process or a broker outage loses nothing that was accepted: on
restart the rows are still there, oldest first. Past ``max_segments`` the oldest rows are
dropped and counted (the source is never blocked). ``synchronous=NORMAL`` survives a killed
process; ``FULL`` also a power cut, at an fsync per commit.

The spool also keeps the stream's epoch counter, so every restart gets a new epoch.

An idle segment (csi_edge.motion) is a row like any other, with empty ``codes`` and ``idle`` 1,
so it keeps its sequence number and is sent, acknowledged and replayed exactly like coded ones.
A spool file written before the column existed gets it on open (``ALTER TABLE``, default 0).
``motion`` holds the segment's motion byte (csi_edge.codec; 0 = no score), NULL for rows
queued before motion scores existed (added on open the same way); rows of a presence-only
stream carry the model id 00 00 00 and no codes.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._errors import CSIError

__all__ = ["QueuedSegment", "SegmentSpool", "SpoolError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS segment (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    level INTEGER NOT NULL,
    model BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    quality REAL NOT NULL,
    codes BLOB NOT NULL,
    queued_ms INTEGER NOT NULL,
    idle INTEGER NOT NULL DEFAULT 0,
    motion INTEGER
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SpoolError(CSIError):
    """The queue file cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class QueuedSegment:
    """One encoded segment waiting to be sent (``id`` orders the queue)."""

    epoch: int
    seq: int
    level: int
    model_id: bytes
    timestamp_ms: int
    quality: float
    codes: bytes
    id: int = 0
    queued_ms: int = 0
    idle: bool = False  # a still segment: sent in an IDLE message, codes empty
    motion: int | None = None  # motion byte (csi_edge.codec), None: the row predates them


class SegmentSpool:
    """Bounded FIFO of :class:`QueuedSegment` in one SQLite file."""

    def __init__(self, path: str | Path, max_segments: int = 86_400,
                 synchronous: Literal["normal", "full"] = "normal") -> None:
        self.path = Path(path)
        self.max_segments = max_segments
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(segment)")}
            if "idle" not in columns:  # a spool from before idle segments existed
                self._db.execute("ALTER TABLE segment ADD COLUMN idle INTEGER NOT NULL "
                                 "DEFAULT 0")
            if "motion" not in columns:  # a spool from before motion scores existed
                self._db.execute("ALTER TABLE segment ADD COLUMN motion INTEGER")
            self._count = int(self._db.execute("SELECT count(*) FROM segment").fetchone()[0])
        except (sqlite3.Error, OSError) as exc:  # OSError: the folder cannot be made
            raise SpoolError(f"spool {str(self.path)!r}: {exc}") from exc
        self.dropped = 0  # segments dropped at the bound by this process

    def __len__(self) -> int:
        return self._count

    def next_epoch(self) -> int:
        """A new stream epoch (u16), different from the previous run's."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        epoch = (int(row[0]) + 1) % 65536 if row else int(time.time()) % 65536
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('epoch', ?)", (epoch,))
        return epoch

    def put(self, segments: Sequence[QueuedSegment]) -> int:
        """Append segments in one transaction; return how many of the oldest were dropped."""
        if not segments:
            return 0
        now = int(time.time() * 1000)
        rows = [(s.epoch, s.seq, s.level, s.model_id, s.timestamp_ms, s.quality, s.codes, now,
                 int(s.idle), s.motion) for s in segments]
        try:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO segment(epoch, seq, level, model, timestamp_ms, quality, codes,"
                    " queued_ms, idle, motion) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._count += len(rows)
                excess = self._count - self.max_segments
                if excess > 0:
                    self._db.execute("DELETE FROM segment WHERE id IN "
                                     "(SELECT id FROM segment ORDER BY id LIMIT ?)", (excess,))
                    self._count -= excess
                    self.dropped += excess
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {str(self.path)!r}: cannot append: {exc}") from exc
        return max(0, excess)

    def peek(self, limit: int, after_id: int = 0) -> list[QueuedSegment]:
        """Up to ``limit`` oldest segments with an id above ``after_id``."""
        rows = self._db.execute(
            "SELECT id, epoch, seq, level, model, timestamp_ms, quality, codes, queued_ms, idle, "
            "motion FROM segment WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [QueuedSegment(epoch=r[1], seq=r[2], level=r[3], model_id=bytes(r[4]),
                              timestamp_ms=r[5], quality=r[6], codes=bytes(r[7]), id=r[0],
                              queued_ms=r[8], idle=bool(r[9]), motion=r[10]) for r in rows]

    def remove(self, ids: Iterable[int]) -> None:
        """Forget acknowledged segments (ids already dropped at the bound are ignored)."""
        ids = list(ids)
        if not ids:
            return
        try:
            with self._transaction():
                cursor = self._db.executemany("DELETE FROM segment WHERE id = ?",
                                              [(i,) for i in ids])
                self._count -= max(0, cursor.rowcount)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {str(self.path)!r}: cannot remove: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
