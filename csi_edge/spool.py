"""The on-disk store-and-forward queue of one stream: encoded segments wait here for PUBACK.

SQLite in WAL mode, one file per access point at ``{spool_dir}/{site}/{ap}.sqlite`` (one folder
per site: names follow :mod:`csi_edge.names`, so no two streams share a file; a file of the
older flat layout ``{site}__{ap}.sqlite`` is moved into place on open, see :func:`spool_path`).
A segment is written (and committed) before any attempt to publish it and deleted only after
the broker acknowledged the message that carried it, so a killed process or a broker outage
loses nothing that was accepted: on restart the rows are still there, oldest first.

The source is never blocked, and the queue never stops the stream:

- past ``max_segments`` the oldest rows are dropped and counted (``dropped``);
- the disk is "full" once its free space falls under ``min_free_bytes`` (default 2 MiB): from
  then on the file stops growing. It keeps the pages it has and an append that would need
  more deletes the oldest unsent rows, in the same transaction, until the pages in use fit
  again (SQLite reuses the freed pages; on files created here, ``auto_vacuum = INCREMENTAL``,
  pages past the old size are handed back at once, so a checkpoint never has to grow the
  file); the free space left over is what SQLite needs for its WAL and checkpoints. Only an
  append that does not fit drops anything: on a healthy link the queue stays short, its
  acknowledged rows free their pages, and the stream goes on untouched. Drops are counted
  apart (``dropped_disk_full``). Should the disk fill up to the last byte (another writer),
  ``SQLITE_FULL`` is handled in steps: the WAL is checkpointed (so it starts over in the
  space it already has) and acknowledged rows are deleted, and the append is tried again;
  only then are the oldest unsent rows deleted, in growing batches; if even an empty queue
  has no room the new segments themselves are dropped and counted;
- deleting acknowledged rows never raises: a delete that fails (full disk, I/O error) keeps the
  ids in memory, hidden from :meth:`SegmentSpool.peek` and ``len``, and retries them at the
  next write.

The WAL is bounded on a healthy link: ``wal_autocheckpoint`` and ``journal_size_limit`` keep it
near ``wal_limit_bytes`` (default 1 MiB). Once the queue has emptied (at most every 30 s, and
not while the disk is full) the WAL is truncated and, on files created here (``auto_vacuum =
INCREMENTAL``), the database file hands its free pages back, so a drained backlog does not keep
its disk space.

``synchronous=NORMAL`` survives a killed process; ``FULL`` also a power cut, at an fsync per
commit. The spool also keeps the stream's epoch counter, so every restart gets a new epoch.

An idle segment (csi_edge.motion) is a row like any other, with empty ``codes`` and ``idle`` 1,
so it keeps its sequence number and is sent, acknowledged and replayed exactly like coded ones.
A spool file written before the column existed gets it on open (``ALTER TABLE``, default 0).
``motion`` holds the segment's motion byte (csi_edge.codec; 0 = no score), NULL for rows
queued before motion scores existed (added on open the same way); rows of a presence-only
stream carry the model id 00 00 00 and no codes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from ._errors import CSIError
from .names import check_name

__all__ = ["DEFAULT_MIN_FREE_BYTES", "DEFAULT_WAL_LIMIT_BYTES", "QueuedSegment", "SegmentSpool",
           "SpoolError", "spool_path"]

log = logging.getLogger("csi_edge.spool")

DEFAULT_WAL_LIMIT_BYTES = 1 << 20
DEFAULT_MIN_FREE_BYTES = 2 << 20

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
_FULL_ATTEMPTS = 24  # batches of oldest rows dropped (doubling) before the new rows are
_DELETE_CHUNK = 64  # acknowledged rows deleted per transaction
# An emptied queue checkpoints (TRUNCATE) and vacuums at most this often: each costs an fsync.
_COMPACT_EVERY_S = 30.0
_T = TypeVar("_T")
# epoch, seq, level, model, timestamp_ms, quality, codes, queued_ms, idle
_Row = tuple[int, int, int, bytes, int, float, bytes, int, int, int | None]


class SpoolError(CSIError):
    """The queue file cannot be opened or written."""


def spool_path(spool_dir: str | Path, site: str, ap: str) -> Path:
    """``{spool_dir}/{site}/{ap}.sqlite``; a file of the old flat layout is moved there.

    The old layout ``{site}__{ap}.sqlite`` mapped two streams to one file when a name held
    ``__`` (``a__b``/``c`` and ``a``/``b__c``); names cannot hold ``/``, so one folder per site
    cannot collide. A queue left in the old layout (with its ``-wal``, which may hold committed
    rows) moves to the new place on the first open, unless that already exists.
    """
    folder = Path(spool_dir)
    path = folder / check_name(site, "site") / f"{check_name(ap, 'ap')}.sqlite"
    legacy = folder / f"{site}__{ap}.sqlite"
    if legacy.is_file() and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("-wal", "-shm", ""):  # the main file last: it marks a finished move
            old = legacy.with_name(legacy.name + suffix)
            if old.exists():
                old.rename(path.with_name(path.name + suffix))
        log.info("moved spool %s to %s", legacy, path)
    return path


def _disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool((code & 0xFF) == sqlite3.SQLITE_FULL)
    return "full" in str(exc)


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
                 synchronous: Literal["normal", "full"] = "normal", *,
                 wal_limit_bytes: int = DEFAULT_WAL_LIMIT_BYTES,
                 min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> None:
        self.path = Path(path)
        self.max_segments = max_segments
        self.min_free_bytes = min_free_bytes
        self._full_reported = False
        self._page_ceiling: int | None = None  # pages the file may use while low on disk
        self.dropped = 0  # oldest segments dropped at the bound by this process
        self.dropped_disk_full = 0  # segments dropped because the disk was full
        self.acknowledged_pending = 0  # acknowledged rows whose delete must be retried
        self._acked: set[int] = set()
        self._held: set[int] = set()  # being sent: never deleted to make room
        self._compacted_at = -_COMPACT_EVERY_S
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            # Only takes effect on a new file (before the first table): lets an emptied
            # queue hand its pages back to the file system.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            page = self._page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            self._db.execute(f"PRAGMA journal_size_limit={int(wal_limit_bytes)}")
            self._db.execute(f"PRAGMA wal_autocheckpoint={max(16, wal_limit_bytes // page)}")
            self._with_room(lambda: self._db.executescript(_SCHEMA))
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(segment)")}
            if "idle" not in columns:  # a spool from before idle segments existed
                self._with_room(lambda: self._db.execute(
                    "ALTER TABLE segment ADD COLUMN idle INTEGER NOT NULL DEFAULT 0"))
            if "motion" not in columns:  # a spool from before motion scores existed
                self._with_room(lambda: self._db.execute(
                    "ALTER TABLE segment ADD COLUMN motion INTEGER"))
            self._count = int(self._db.execute("SELECT count(*) FROM segment").fetchone()[0])
        except (sqlite3.Error, OSError) as exc:  # OSError: the folder cannot be made
            raise SpoolError(f"spool {str(self.path)!r}: {exc}") from exc

    def __len__(self) -> int:
        """Segments still to send (acknowledged ones awaiting their delete excluded)."""
        return self._count - len(self._acked)

    def next_epoch(self) -> int:
        """A new stream epoch (u16), different from the previous run's."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        epoch = (int(row[0]) + 1) % 65536 if row else int(time.time()) % 65536
        try:
            self._with_room(lambda: self._db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('epoch', ?)", (epoch,)))
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {str(self.path)!r}: cannot store the epoch: {exc}") from exc
        return epoch

    def setting(self, key: str) -> float | None:
        """A number the stream keeps across restarts (``meta``), None where not set; raises
        SpoolError when the spool cannot be read."""
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else float(row[0])
        except (sqlite3.Error, TypeError, ValueError) as exc:
            raise SpoolError(f"spool {str(self.path)!r}: cannot read {key}: {exc}") from exc

    def set_setting(self, key: str, value: float | None) -> None:
        """Keep ``value`` under ``key`` (None: forget it); raises SpoolError when the spool
        cannot store it. Unlike segments, a setting never makes room by dropping queued
        segments: on a full disk it is refused."""
        if key == "epoch":
            raise ValueError("the epoch is kept by next_epoch()")
        try:  # one statement, autocommitted (the connection has no open transaction)
            if value is None:
                self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:  # a REAL in the INTEGER column (an integral one is stored as INTEGER)
                self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                 (key, float(value)))
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {str(self.path)!r}: cannot store {key}: {exc}") from exc

    def put(self, segments: Sequence[QueuedSegment]) -> int:
        """Append segments in one transaction; return how many were dropped to make room
        (oldest first: at the bound, or because the disk is full)."""
        if not segments:
            return 0
        now = int(time.time() * 1000)
        rows: list[_Row] = [(s.epoch, s.seq, s.level, s.model_id, s.timestamp_ms, s.quality,
                             s.codes, now, int(s.idle), s.motion) for s in segments]
        before = self.dropped + self.dropped_disk_full
        self._flush_acked()
        try:
            self._with_room(lambda: self._insert(rows), new_rows=len(rows))
        except _NoRoomError:
            self.dropped_disk_full += len(rows)
            self._report_full(f"no room even with an empty queue; {len(rows)} new segment(s) "
                              "dropped")
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {str(self.path)!r}: cannot append: {exc}") from exc
        dropped = self.dropped + self.dropped_disk_full - before
        if self._full_reported and not dropped and not self._low_on_disk():
            self._full_reported = False  # the episode is over: log the next one
        return dropped

    def peek(self, limit: int, after_id: int = 0) -> list[QueuedSegment]:
        """Up to ``limit`` oldest segments with an id above ``after_id`` (acknowledged rows
        whose delete is pending are skipped)."""
        rows = self._db.execute(
            "SELECT id, epoch, seq, level, model, timestamp_ms, quality, codes, queued_ms, idle, "
            "motion FROM segment WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit + len(self._acked))).fetchall()
        return [QueuedSegment(epoch=r[1], seq=r[2], level=r[3], model_id=bytes(r[4]),
                              timestamp_ms=r[5], quality=r[6], codes=bytes(r[7]), id=r[0],
                              queued_ms=r[8], idle=bool(r[9]), motion=r[10])
                for r in rows if r[0] not in self._acked][:limit]

    def remove(self, ids: Iterable[int]) -> None:
        """Forget acknowledged segments (ids already dropped are ignored). Never raises: a
        delete the disk refuses is kept and retried at the next write."""
        ids = list(ids)
        self._held.difference_update(ids)
        self._acked.update(ids)
        self._flush_acked()
        if self._count == 0 and time.monotonic() - self._compacted_at > _COMPACT_EVERY_S:
            self._compact()

    def close(self) -> None:
        self._flush_acked()
        self._db.close()

    # -- internals ------------------------------------------------------------------------

    def _insert(self, rows: list[_Row]) -> None:
        ceiling = self._low_disk_ceiling()
        with _Transaction(self._db):
            last = int(self._db.execute("SELECT coalesce(max(id), 0) FROM segment")
                       .fetchone()[0])
            self._db.executemany(
                "INSERT INTO segment(epoch, seq, level, model, timestamp_ms, quality, codes,"
                " queued_ms, idle, motion) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            # Low on disk: the rows must fit in the pages the file may use; older rows make
            # room (their pages are reused), never the ones just added.
            room = [] if ceiling is None else self._fit_pages(ceiling, last, len(rows))
            excess = self._count - len(room) + len(rows) - self.max_segments
            bound = self._delete_oldest(excess) if excess > 0 else []
        self._count += len(rows)
        if room:
            self.dropped_disk_full += self._forget(room)
            self._report_full(f"free space under {self.min_free_bytes} bytes; dropping the "
                              "oldest segments")
        self.dropped += self._forget(bound)

    def _low_disk_ceiling(self) -> int | None:
        """Pages the file may have while the disk is low (None: it is not): its size when
        the episode began."""
        if not self._low_on_disk():
            self._page_ceiling = None
        elif self._page_ceiling is None:
            self._page_ceiling = self._pages()[0]
        return self._page_ceiling

    def _fit_pages(self, ceiling: int, up_to_id: int, batch: int) -> list[int]:
        """Inside a transaction: delete the oldest rows with ids up to ``up_to_id``, in
        growing batches, until the pages in use fit under ``ceiling``, and give the pages
        past it back (a checkpoint must not have to grow the file on a full disk); the ids."""
        gone: list[int] = []
        pages, free = self._pages()
        while pages - free > ceiling:
            ids = self._delete_oldest(batch, up_to_id=up_to_id)
            if not ids:
                break
            gone += ids
            batch *= 2
            pages, free = self._pages()
        if pages > ceiling and free:
            self._db.execute(f"PRAGMA incremental_vacuum({pages - ceiling})").fetchall()
            pages, free = self._pages()
        # The new rows alone need more: they stay, and later appends must not pay for it.
        self._page_ceiling = max(ceiling, pages - free)
        return gone

    def _pages(self) -> tuple[int, int]:
        """(pages in the file, free pages), as this connection sees them."""
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        return pages, int(self._db.execute("PRAGMA freelist_count").fetchone()[0])

    def _low_on_disk(self) -> bool:
        try:
            return shutil.disk_usage(self.path.parent).free < self.min_free_bytes
        except OSError:
            return False

    def _report_full(self, what: str) -> None:
        if not self._full_reported:  # once per episode: the status counts every drop
            log.warning("spool %s: disk full: %s", self.path, what)
            self._full_reported = True

    def _delete_oldest(self, n: int, up_to_id: int | None = None) -> list[int]:
        """Delete the ``n`` oldest rows not being sent (and with ids up to ``up_to_id``)
        inside a transaction; their ids.

        Rows being sent (:meth:`hold`) stay: they may still be delivered, and a row counted
        as dropped must not arrive."""
        held = sorted(self._held)
        ids = [r[0] for r in self._db.execute(
            "SELECT id FROM segment WHERE id <= ? AND id NOT IN "
            f"({','.join('?' * len(held))}) ORDER BY id LIMIT ?",
            (up_to_id if up_to_id is not None else 2**63 - 1, *held, n))]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            self._db.execute(f"DELETE FROM segment WHERE id IN ({','.join('?' * len(chunk))})",
                             chunk)
        return ids

    def hold(self, ids: Iterable[int]) -> None:
        """Mark rows as being sent: making room never deletes them (until :meth:`release` or
        :meth:`remove`)."""
        self._held.update(ids)

    def release(self, ids: Iterable[int]) -> None:
        """The send of these rows failed: they are ordinary queued rows again."""
        self._held.difference_update(ids)

    def _forget(self, ids: list[int]) -> int:
        """Count deleted rows out (after the commit); how many of them were never sent."""
        acked = sum(1 for i in ids if i in self._acked)
        self._acked.difference_update(ids)
        self._count -= len(ids)
        return len(ids) - acked  # acknowledged rows deleted are not drops

    def _flush_acked(self) -> None:
        """Delete acknowledged rows, in small transactions: each fits in the WAL's existing
        space, so the deletes go through on a full disk, and one refused leaves the rest."""
        if not self._acked:
            return
        ids = sorted(self._acked)
        try:
            for start in range(0, len(ids), _DELETE_CHUNK):
                chunk = ids[start:start + _DELETE_CHUNK]
                with _Transaction(self._db):
                    deleted = self._db.execute(
                        f"DELETE FROM segment WHERE id IN ({','.join('?' * len(chunk))})",
                        chunk).rowcount
                self._count -= max(0, deleted)
                self._acked.difference_update(chunk)
        except sqlite3.Error as exc:
            with _suppress_sqlite():  # keep only the ids still queued (reads work when full)
                rest = sorted(self._acked)
                present: set[int] = set()
                for start in range(0, len(rest), 500):
                    chunk = rest[start:start + 500]
                    present.update(r[0] for r in self._db.execute(
                        f"SELECT id FROM segment WHERE id IN ({','.join('?' * len(chunk))})",
                        chunk))
                self._acked = present
            if self.acknowledged_pending != len(self._acked):
                log.warning("spool %s: cannot delete %d acknowledged segment(s) yet (%s); "
                            "they are not sent again and the delete is retried", self.path,
                            len(self._acked), exc)
            self.acknowledged_pending = len(self._acked)
            return
        self.acknowledged_pending = 0

    def _with_room(self, write: Callable[[], _T], new_rows: int = 1) -> _T:
        """Run ``write``; on a full disk make room (oldest rows first) and try again."""
        batch = max(1, new_rows)
        for attempt in range(_FULL_ATTEMPTS):
            try:
                return write()
            except sqlite3.Error as exc:
                if not _disk_full(exc):
                    raise
            self._checkpoint()
            self._flush_acked()
            if attempt == 0:
                continue  # the WAL starting over in its own space is often room enough
            if self._count == 0:
                try:
                    return write()
                except sqlite3.Error as exc:
                    if not _disk_full(exc):
                        raise
                raise _NoRoomError
            try:
                with _Transaction(self._db):
                    gone = self._delete_oldest(batch)
            except sqlite3.Error as exc:
                if not _disk_full(exc):
                    raise
                gone = []
            removed = self._forget(gone)
            self.dropped_disk_full += removed
            if removed:
                self._report_full("the file system refused a write; dropping the oldest "
                                  "segments")
            self._checkpoint()
            batch *= 2
        raise _NoRoomError

    def _checkpoint(self, mode: str = "RESTART") -> None:
        """Fold the WAL into the database; RESTART keeps the WAL file's size for reuse (the
        room the next writes need on a full disk), TRUNCATE gives it back."""
        try:
            self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.Error as exc:
            log.debug("spool %s: checkpoint failed: %s", self.path, exc)

    def _compact(self) -> None:
        """An empty queue: give the WAL and free pages back to the file system."""
        self._compacted_at = time.monotonic()
        try:
            self._db.execute("PRAGMA incremental_vacuum").fetchall()
        except sqlite3.Error as exc:
            log.debug("spool %s: incremental vacuum failed: %s", self.path, exc)
        self._checkpoint("TRUNCATE")


def _suppress_sqlite() -> contextlib.AbstractContextManager[None]:
    return contextlib.suppress(sqlite3.Error)


class _NoRoomError(Exception):
    """The disk is full even with the queue empty."""


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            # SQLite may already have rolled back after SQLITE_FULL.
            self._db.execute("ROLLBACK")
