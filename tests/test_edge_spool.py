"""The edge's send path without a broker: the on-disk spool, message grouping, MQTT sizes and
reconnect backoff. Everything here is real: SQLite files, a killed process, paho's own bytes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_edge._mqtt import PUBACK_BYTES, Backoff, publish_packet_bytes
from csi_edge.agent import group_messages
from csi_edge.names import InvalidNameError
from csi_edge.spool import QueuedSegment, SegmentSpool, SpoolError
from csi_edge.spool import spool_path as layout_path

ROOT = Path(__file__).resolve().parents[1]
MODEL_A = bytes.fromhex("c63edcdbdb48a129")
MODEL_B = bytes.fromhex("0123456789abcdef")
U32 = 1 << 32


def seg(seq: int, *, epoch: int = 7, level: int = 1, model: bytes = MODEL_A,
        timestamp_ms: int | None = None, segment_ms: int = 1000, quality: float = 0.5,
        codes: bytes | None = None) -> QueuedSegment:
    return QueuedSegment(
        epoch=epoch, seq=seq, level=level, model_id=model,
        timestamp_ms=1_700_000_000_000 + seq * segment_ms if timestamp_ms is None
        else timestamp_ms,
        quality=quality, codes=codes if codes is not None else f"codes-{seq}".encode())


def content(s: QueuedSegment) -> tuple[object, ...]:
    """What was queued (the spool adds id and queued_ms)."""
    return (s.epoch, s.seq, s.level, s.model_id, s.timestamp_ms, s.quality, s.codes)


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "lab__ap1.sqlite"


# -- SegmentSpool ---------------------------------------------------------------------------


def test_new_spool_is_empty_and_creates_its_folder(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path)
    try:
        assert len(spool) == 0
        assert spool.peek(10) == []
        assert spool.put([]) == 0
        assert spool_path.is_file()
        mode = spool._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode.lower() == "wal"
    finally:
        spool.close()


def test_fifo_order_ids_increase_and_content_round_trips(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path)
    try:
        first = [seg(i, codes=bytes(range(i % 256)) * 3) for i in range(5)]
        second = [seg(i, level=2, quality=1.0) for i in range(5, 9)]
        before = int(time.time() * 1000)
        assert spool.put(first) == 0
        assert spool.put(second) == 0
        after = int(time.time() * 1000)
        assert len(spool) == 9
        rows = spool.peek(100)
        assert [content(r) for r in rows] == [content(s) for s in first + second]
        ids = [r.id for r in rows]
        assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] > 0
        assert all(before <= r.queued_ms <= after for r in rows)
        assert all(isinstance(r.model_id, bytes) and isinstance(r.codes, bytes) for r in rows)
        # peek is a window: limit and after_id page through the queue without removing.
        assert [r.seq for r in spool.peek(3)] == [0, 1, 2]
        assert [r.seq for r in spool.peek(3, after_id=ids[2])] == [3, 4, 5]
        assert spool.peek(3, after_id=ids[-1]) == []
        assert len(spool) == 9
    finally:
        spool.close()


def test_remove_forgets_only_acknowledged_ids(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path)
    try:
        spool.put([seg(i) for i in range(6)])
        rows = spool.peek(10)
        acked = [rows[1].id, rows[3].id, rows[4].id]
        spool.remove(acked)
        assert len(spool) == 3
        assert [r.seq for r in spool.peek(10)] == [0, 2, 5]
        # Ids that are gone already (acked twice, dropped, never existed) change nothing.
        spool.remove([*acked, 10_000])
        spool.remove([])
        assert len(spool) == 3
        assert [r.seq for r in spool.peek(10)] == [0, 2, 5]
        # New rows get ids above every earlier one, even above removed ones (AUTOINCREMENT).
        spool.remove([rows[5].id])
        spool.put([seg(6)])
        assert spool.peek(10)[-1].id > rows[5].id
    finally:
        spool.close()


def test_bound_drops_the_oldest_and_counts_them(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path, max_segments=5)
    try:
        assert spool.put([seg(i) for i in range(4)]) == 0
        assert spool.put([seg(i) for i in range(4, 7)]) == 2
        assert len(spool) == 5
        assert spool.dropped == 2
        assert [r.seq for r in spool.peek(10)] == [2, 3, 4, 5, 6]
        # One put larger than the bound keeps only its newest rows.
        assert spool.put([seg(i) for i in range(7, 15)]) == 8
        assert len(spool) == 5
        assert spool.dropped == 10
        assert [r.seq for r in spool.peek(10)] == [10, 11, 12, 13, 14]
        # Acknowledging makes room again: nothing dropped while under the bound.
        spool.remove([r.id for r in spool.peek(3)])
        assert spool.put([seg(15), seg(16)]) == 0
        assert spool.dropped == 10
        assert [r.seq for r in spool.peek(10)] == [13, 14, 15, 16]
        assert len(spool) == len(spool.peek(100)) == 4
    finally:
        spool.close()


def test_rows_being_sent_are_never_dropped_to_make_room(spool_path: Path) -> None:
    """A row in flight may still be delivered: dropping it would count as lost a segment the
    cloud gets. Making room skips held rows; a failed send releases them."""
    spool = SegmentSpool(spool_path, max_segments=3)
    try:
        spool.put([seg(i) for i in range(3)])
        first = spool.peek(1)[0].id
        spool.hold([first])
        assert spool.put([seg(3)]) == 1
        assert [r.seq for r in spool.peek(10)] == [0, 2, 3]  # seq 1 went, not the held 0
        spool.release([first])
        assert spool.put([seg(4)]) == 1
        assert [r.seq for r in spool.peek(10)] == [2, 3, 4]
        held = [r.id for r in spool.peek(10)]
        spool.hold(held)
        spool.remove(held[:2])  # acknowledged: no longer held; seq 4 still is
        assert spool.put([seg(5), seg(6)]) == 0
        assert spool.put([seg(7)]) == 1
        assert [r.seq for r in spool.peek(10)] == [4, 6, 7]
    finally:
        spool.close()


def test_len_and_rows_survive_reopen(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path)
    spool.put([seg(i) for i in range(10)])
    spool.remove([r.id for r in spool.peek(4)])
    kept = spool.peek(100)
    spool.close()

    again = SegmentSpool(spool_path)
    try:
        assert len(again) == 6
        assert again.peek(100) == kept
        assert again.dropped == 0  # counted per process
        again.put([seg(10)])
        assert len(again) == 7
        assert again.peek(100)[-1].id > kept[-1].id
    finally:
        again.close()


def test_smaller_bound_on_reopen_drops_the_surplus_on_the_next_put(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path, max_segments=100)
    spool.put([seg(i) for i in range(10)])
    spool.close()
    small = SegmentSpool(spool_path, max_segments=4)
    try:
        assert len(small) == 10  # nothing is deleted just by opening
        assert small.put([seg(10)]) == 7
        assert len(small) == 4
        assert [r.seq for r in small.peek(10)] == [7, 8, 9, 10]
    finally:
        small.close()


def test_epoch_changes_on_every_call_and_open_and_survives_reopen(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path)
    first = spool.next_epoch()
    second = spool.next_epoch()
    spool.close()
    assert 0 <= first < 65536 and 0 <= second < 65536
    assert second == (first + 1) % 65536
    epochs = [first, second]
    for _ in range(3):  # every restart gets the next one
        reopened = SegmentSpool(spool_path)
        epochs.append(reopened.next_epoch())
        reopened.close()
    assert epochs == [(first + i) % 65536 for i in range(5)]
    # A fresh spool starts from the clock, so a deleted spool does not repeat an epoch.
    other = SegmentSpool(spool_path.with_name("other.sqlite"))
    try:
        before = int(time.time())
        epoch = other.next_epoch()
        assert epoch in {t % 65536 for t in range(before, int(time.time()) + 1)}
    finally:
        other.close()


def test_epoch_wraps_at_u16(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path)
    try:
        spool._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('epoch', 65535)")
        assert spool.next_epoch() == 0
        assert spool.next_epoch() == 1
    finally:
        spool.close()


def test_a_setting_survives_reopen_and_leaves_the_epoch_alone(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path)
    epoch = spool.next_epoch()
    assert spool.setting("presence_reference") is None
    spool.set_setting("presence_reference", -5.8125)
    spool.set_setting("presence_reference", -6.25)  # replaced, not added
    with pytest.raises(ValueError, match="epoch"):
        spool.set_setting("epoch", 3.0)
    spool.close()
    reopened = SegmentSpool(spool_path)
    try:
        assert reopened.setting("presence_reference") == -6.25
        assert reopened.next_epoch() == (epoch + 1) % 65536
        reopened.set_setting("presence_reference", None)
        assert reopened.setting("presence_reference") is None
        reopened.set_setting("presence_reference", None)  # forgetting twice is fine
    finally:
        reopened.close()


def test_synchronous_full_is_applied(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path, synchronous="full")
    try:
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        spool.put([seg(0)])
        assert len(spool) == 1
    finally:
        spool.close()
    normal = SegmentSpool(spool_path)
    try:
        assert normal._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        normal.close()


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from csi_edge.spool import QueuedSegment, SegmentSpool
    spool = SegmentSpool(sys.argv[1])
    spool.next_epoch()
    for batch in range(3):
        spool.put([QueuedSegment(epoch=1, seq=batch * 4 + i, level=1, model_id=b"m" * 8,
                                 timestamp_ms=1000 * (batch * 4 + i), quality=1.0,
                                 codes=bytes([batch * 4 + i]) * 50) for i in range(4)])
    # A transaction in progress when the process dies must leave no trace.
    spool._db.execute("BEGIN IMMEDIATE")
    spool._db.execute("INSERT INTO segment(epoch, seq, level, model, timestamp_ms, quality, "
                      "codes, queued_ms) VALUES (1, 99, 1, x'00', 0, 1.0, x'00', 0)")
    print("committed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_writer_leaves_committed_rows_readable(spool_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(spool_path), str(ROOT)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout.strip() == "committed"
    spool = SegmentSpool(spool_path)
    try:
        assert len(spool) == 12
        rows = spool.peek(100)
        assert [r.seq for r in rows] == list(range(12))
        assert all(r.codes == bytes([r.seq]) * 50 for r in rows)
        assert spool.next_epoch() >= 0  # the meta table is usable too
        spool.remove([rows[0].id])
        assert len(spool) == 11
    finally:
        spool.close()


def test_unopenable_paths_raise_spool_error_naming_the_path(tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    bad = a_file / "spool.sqlite"  # its parent is a regular file
    with pytest.raises(SpoolError) as info:
        SegmentSpool(bad)
    assert repr(str(bad)) in str(info.value)

    folder = tmp_path / "a-folder.sqlite"  # the path itself is a folder
    folder.mkdir()
    with pytest.raises(SpoolError) as info:
        SegmentSpool(folder)
    assert repr(str(folder)) in str(info.value)

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolError) as info:
        SegmentSpool(garbage)
    assert repr(str(garbage)) in str(info.value)


# -- file names -------------------------------------------------------------------------------


def test_one_folder_per_site_so_names_never_collide(tmp_path: Path) -> None:
    # The flat layout {site}__{ap} mapped both of these to a__b__c.sqlite.
    first, second = layout_path(tmp_path, "a__b", "c"), layout_path(tmp_path, "a", "b__c")
    assert first == tmp_path / "a__b" / "c.sqlite"
    assert second == tmp_path / "a" / "b__c.sqlite"
    one, two = SegmentSpool(first), SegmentSpool(second)
    try:
        one.put([seg(1)])
        two.put([seg(2), seg(3)])
        assert (len(one), len(two)) == (1, 2)
    finally:
        one.close()
        two.close()
    for site, ap in (("..", "ap"), ("lab", "."), ("lab", "a/b"), ("$SYS", "ap"), ("", "ap")):
        with pytest.raises(InvalidNameError):
            layout_path(tmp_path, site, ap)


def test_a_spool_of_the_flat_layout_moves_into_place_with_its_wal(tmp_path: Path) -> None:
    legacy = tmp_path / "lab__ap1.sqlite"
    old = SegmentSpool(legacy)
    old.put([seg(i) for i in range(5)])
    epoch = old.next_epoch()
    # Left as a killed process leaves it: the rows may sit in the WAL, not yet checkpointed.
    wal = legacy.with_name(legacy.name + "-wal")
    assert wal.stat().st_size > 0
    copies = {suffix: legacy.with_name(legacy.name + suffix).read_bytes()
              for suffix in ("", "-wal")}
    old.close()
    for suffix, data in copies.items():
        legacy.with_name(legacy.name + suffix).write_bytes(data)

    path = layout_path(tmp_path, "lab", "ap1")
    assert path == tmp_path / "lab" / "ap1.sqlite" and path.is_file()
    assert not legacy.exists() and not wal.exists()
    moved = SegmentSpool(path)
    try:
        assert [r.seq for r in moved.peek(10)] == [0, 1, 2, 3, 4]
        assert moved.next_epoch() == (epoch + 1) % 65536
    finally:
        moved.close()
    # Once the new file exists an old one is left alone.
    SegmentSpool(legacy).close()
    assert layout_path(tmp_path, "lab", "ap1") == path and legacy.exists()


# -- a full disk --------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(tmp_path: Path, size_kib: int) -> Iterator[Path]:
    """A real file system of ``size_kib`` (tmpfs; mounting needs root and CAP_SYS_ADMIN).

    Where it cannot be mounted the test is skipped with the reason: the SQLITE_FULL path is
    still covered by test_sqlite_full_drops_the_oldest_and_keeps_going (max_page_count).
    """
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or not mount or not umount:
        pytest.skip("mounting a small tmpfs needs root and mount(8); the SQLITE_FULL path is "
                    "covered by test_sqlite_full_drops_the_oldest_and_keeps_going")
    folder = tmp_path / "small-fs"
    folder.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                           str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the SQLITE_FULL "
                    "path is covered by test_sqlite_full_drops_the_oldest_and_keeps_going")
    try:
        yield folder
    finally:
        subprocess.run([umount, "-l", str(folder)], check=False)


def _fill(folder: Path) -> Path:
    """Take every byte left on the file system."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_drops_the_oldest_and_keeps_going(tmp_path: Path) -> None:
    """On a real 3 MiB file system: the queue fills it down to the reserve, then drops its
    oldest segment for each new one; with the disk taken to the last byte by someone else,
    deleting acknowledged rows and appending still never raise."""
    with small_filesystem(tmp_path, 3 * 1024) as fs:
        spool = SegmentSpool(fs / "lab" / "ap1.sqlite", max_segments=10**6,
                             wal_limit_bytes=256 << 10, min_free_bytes=512 << 10)
        try:
            spool.next_epoch()
            n = 20_000
            for i in range(n):
                spool.put([seg(i, codes=random.randbytes(300))])
            assert spool.dropped == 0
            assert spool.dropped_disk_full > 0
            assert len(spool) + spool.dropped_disk_full == n
            # The oldest went first: what is left is the newest, in order.
            rows = spool.peek(10**6)
            assert [r.seq for r in rows] == list(range(spool.dropped_disk_full, n))
            assert shutil.disk_usage(fs).free > 0
            wal = fs / "lab" / "ap1.sqlite-wal"
            assert wal.stat().st_size <= (256 << 10) + (64 << 10)

            # Someone else takes the rest of the disk: nothing raises, nothing is resent.
            filler = _fill(fs)
            assert shutil.disk_usage(fs).free < 8192
            queued = len(spool)
            acked = [r.id for r in spool.peek(50)]
            spool.remove(acked)
            assert len(spool) == queued - 50
            assert acked[-1] < spool.peek(1)[0].id
            before = spool.dropped_disk_full
            for i in range(n, n + 200):
                spool.put([seg(i, codes=random.randbytes(300))])
            assert spool.dropped_disk_full > before
            assert spool.peek(10**6)[-1].seq == n + 199  # the newest is kept

            # Space back: the queue drains and gives its space back.
            filler.unlink()
            while len(spool):
                spool.remove([r.id for r in spool.peek(2000)])
            assert spool.acknowledged_pending == 0
        finally:
            spool.close()
        again = SegmentSpool(fs / "lab" / "ap1.sqlite")
        try:
            assert len(again) == 0
            again.put([seg(0)])
            assert len(again) == 1
        finally:
            again.close()


def test_a_full_disk_never_stops_a_healthy_link(tmp_path: Path) -> None:
    """The disk full to the last byte, the link up: each live message (2 segments) is queued,
    sent and acknowledged and nothing is dropped, whatever the queue held before. A queue that
    dropped the oldest row for every new one would never complete a message: the stream
    would stop, with nothing to say so but the drop counter."""
    with small_filesystem(tmp_path, 3 * 1024) as fs:
        spool = SegmentSpool(fs / "lab" / "ap1.sqlite")
        try:
            spool.next_epoch()
            seq = 0

            def live(messages: int) -> int:
                nonlocal seq
                sent = 0
                for _ in range(messages):
                    for _ in range(2):
                        spool.put([seg(seq, codes=random.randbytes(40))])
                        seq += 1
                    rows = spool.peek(10)
                    spool.remove([r.id for r in rows])
                    sent += len(rows)
                return sent

            live(20)
            filler = _fill(fs)
            assert shutil.disk_usage(fs).free < 8192
            assert live(200) == 400
            # A link outage on the full disk: the queue keeps what fits, drops the oldest.
            for _ in range(300):
                spool.put([seg(seq, codes=random.randbytes(40))])
                seq += 1
            assert len(spool) > 0 and spool.dropped_disk_full == 300 - len(spool)
            backlog = len(spool)
            before = spool.dropped_disk_full
            # The link back, the disk still full: the backlog goes, the stream goes on.
            assert live(200) == 400 + backlog
            assert spool.dropped_disk_full == before and len(spool) == 0
            filler.unlink()
        finally:
            spool.close()


def test_sqlite_full_drops_the_oldest_and_keeps_going(spool_path: Path) -> None:
    """SQLITE_FULL without a small file system: the database may not grow past
    max_page_count, as on a disk that is full to the last byte."""
    spool = SegmentSpool(spool_path, max_segments=10**6, min_free_bytes=0)
    try:
        pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
        spool._db.execute(f"PRAGMA max_page_count = {pages + 40}")
        n = 1200
        for i in range(n):
            spool.put([seg(i, codes=random.randbytes(200))])
        assert spool.dropped == 0 and 0 < spool.dropped_disk_full < n
        assert len(spool) + spool.dropped_disk_full == n
        assert [r.seq for r in spool.peek(n)] == list(range(spool.dropped_disk_full, n))
        # A batch of 500 at once: older rows make room for all of it.
        spool.put([seg(i, codes=random.randbytes(200)) for i in range(n, n + 500)])
        rows = spool.peek(10**6)
        assert rows[-500:] == [r for r in rows if r.seq >= n] and rows[-1].seq == n + 499
        assert len(spool) + spool.dropped_disk_full == n + 500
        # Acknowledged rows are deleted (freeing pages needs no new ones).
        spool.remove([r.id for r in rows])
        assert len(spool) == 0 and spool.acknowledged_pending == 0
    finally:
        spool.close()


def test_a_refused_delete_of_acknowledged_rows_never_raises(spool_path: Path) -> None:
    """The delete fails (another writer holds the lock): the rows count as sent, are not
    offered again, and go at the next write that succeeds."""
    spool = SegmentSpool(spool_path)
    blocker = sqlite3.connect(spool_path, isolation_level=None)
    try:
        spool.put([seg(i) for i in range(6)])
        spool._db.execute("PRAGMA busy_timeout = 0")
        blocker.execute("BEGIN IMMEDIATE")
        acked = [r.id for r in spool.peek(4)]
        spool.remove(acked)  # "database is locked": kept, not raised
        assert spool.acknowledged_pending == 4
        assert len(spool) == 2
        assert [r.seq for r in spool.peek(10)] == [4, 5]
        blocker.execute("ROLLBACK")
        spool.put([seg(6)])
        assert spool.acknowledged_pending == 0
        assert [r.seq for r in spool.peek(10)] == [4, 5, 6]
        assert spool._db.execute("SELECT count(*) FROM segment").fetchone()[0] == 3
    finally:
        blocker.close()
        spool.close()


def _max_wal(path: Path, cycles: int, open_db: object) -> int:
    """Largest WAL size over ``cycles`` of one segment queued and acknowledged (a healthy
    link), with the queue ``open_db(path)`` returns (put/remove/peek/close)."""
    queue = open_db(path)  # type: ignore[operator]
    wal = path.with_name(path.name + "-wal")
    largest = 0
    try:
        for i in range(cycles):
            queue.put([seg(i, codes=random.randbytes(1000))])
            queue.remove([r.id for r in queue.peek(10)])
            if i % 50 == 0 and wal.exists():
                largest = max(largest, wal.stat().st_size)
    finally:
        queue.close()
    return largest


class _PlainSQLiteQueue:
    """The same table with SQLite's own WAL defaults (what the spool had before)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE s (id INTEGER PRIMARY KEY AUTOINCREMENT, codes BLOB)")

    def put(self, rows: list[QueuedSegment]) -> None:
        self.db.executemany("INSERT INTO s(codes) VALUES (?)", [(r.codes,) for r in rows])

    def peek(self, n: int) -> list[QueuedSegment]:
        return [QueuedSegment(0, 0, 0, b"", 0, 0.0, b"", id=r[0])
                for r in self.db.execute("SELECT id FROM s ORDER BY id LIMIT ?", (n,))]

    def remove(self, ids: list[int]) -> None:
        self.db.executemany("DELETE FROM s WHERE id = ?", [(i,) for i in ids])

    def close(self) -> None:
        self.db.close()


def test_wal_stays_bounded_on_a_healthy_link(tmp_path: Path) -> None:
    limit = 256 << 10
    bounded = _max_wal(tmp_path / "spool.sqlite", 3000,
                       lambda p: SegmentSpool(p, wal_limit_bytes=limit))
    plain = _max_wal(tmp_path / "plain.sqlite", 3000, _PlainSQLiteQueue)
    assert bounded <= limit + (64 << 10), bounded
    # Without the limits the same traffic grows the WAL to SQLite's 1000-page checkpoint.
    assert plain > 4 * limit, plain


# -- group_messages ---------------------------------------------------------------------------


def group(rows: list[QueuedSegment], *, per_message: int = 4, limit: int = 1,
          segment_ms: int = 1000) -> list[list[int]]:
    groups = group_messages(rows, per_message=lambda model, level: per_message,
                            segment_ms=lambda model: segment_ms, limit=limit)
    assert [r for g in groups for r in g] == list(rows)  # nothing lost, order kept
    return [[r.seq for r in g] for g in groups]


def test_group_consecutive_segments_up_to_per_message() -> None:
    assert group([]) == []
    assert group([seg(0)]) == [[0]]
    rows = [seg(i) for i in range(10)]
    assert group(rows, per_message=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert group(rows, per_message=1) == [[i] for i in range(10)]


def test_group_cap_is_the_larger_of_per_message_and_limit() -> None:
    rows = [seg(i) for i in range(10)]
    assert group(rows, per_message=2, limit=5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert group(rows, per_message=3, limit=1) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert group(rows, per_message=1, limit=32) == [list(range(10))]


def test_group_cap_asks_per_model_and_level() -> None:
    asked: list[tuple[bytes, int]] = []

    def per_message(model: bytes, level: int) -> int:
        asked.append((model, level))
        return {0: 4, 1: 2}[level]

    rows = [seg(i, level=0) for i in range(5)] + [seg(i, level=1) for i in range(5, 10)]
    groups = group_messages(rows, per_message=per_message, segment_ms=lambda m: 1000, limit=1)
    assert [[r.seq for r in g] for g in groups] == [[0, 1, 2, 3], [4], [5, 6], [7, 8], [9]]
    assert set(asked) <= {(MODEL_A, 0), (MODEL_A, 1)}


@pytest.mark.parametrize("change", ["epoch", "level", "model"])
def test_group_splits_where_epoch_level_or_model_change(change: str) -> None:
    other = {"epoch": {"epoch": 8}, "level": {"level": 2}, "model": {"model": MODEL_B}}[change]
    rows = [seg(0), seg(1), seg(2, **other), seg(3, **other), seg(4)]
    assert group(rows, per_message=10) == [[0, 1], [2, 3], [4]]


def test_group_splits_at_a_sequence_gap() -> None:
    rows = [seg(0), seg(1), seg(3, timestamp_ms=seg(2).timestamp_ms), seg(4)]
    # seq 3 carries the start time seq 2 would have had: only the seq gap splits it.
    assert group(rows, per_message=10) == [[0, 1], [3], [4]]
    rows = [seg(5), seg(4), seg(5)]  # a repeat or a step back is no continuation either
    assert group(rows, per_message=10) == [[5], [4, 5]]


def test_group_splits_at_a_timestamp_jump() -> None:
    rows = [seg(0), seg(1), seg(2, timestamp_ms=seg(2).timestamp_ms + 7000), seg(3)]
    # seq 3 keeps its unjumped start time: a step back from seq 2, so it is split off too.
    assert group(rows, per_message=10) == [[0, 1], [2], [3]]
    jumped = [seg(0), seg(1), *(seg(i, timestamp_ms=seg(i).timestamp_ms + 7000)
                                for i in range(2, 5))]
    assert group(jumped, per_message=10) == [[0, 1], [2, 3, 4]]


def test_group_uses_the_model_segment_length() -> None:
    rows = [seg(i, segment_ms=500) for i in range(4)]
    assert group(rows, per_message=10, segment_ms=500) == [[0, 1, 2, 3]]
    assert group(rows, per_message=10, segment_ms=1000) == [[0], [1], [2], [3]]


def test_group_sequence_wraps_at_2_32() -> None:
    base = 1_700_000_000_000
    seqs = [U32 - 3, U32 - 2, U32 - 1, 0, 1, 2]
    rows = [seg(s, timestamp_ms=base + i * 1000) for i, s in enumerate(seqs)]
    assert group(rows, per_message=10) == [seqs]
    assert group(rows, per_message=4) == [seqs[:4], seqs[4:]]
    # 2**32 itself is not what follows 2**32 - 1 on the wire.
    rows = [seg(U32 - 1, timestamp_ms=base), seg(U32, timestamp_ms=base + 1000)]
    assert group(rows, per_message=10) == [[U32 - 1], [U32]]


def test_group_of_a_real_spool_backlog(spool_path: Path) -> None:
    spool = SegmentSpool(spool_path)
    try:
        spool.put([seg(i) for i in range(6)])
        spool.put([seg(i, epoch=8) for i in range(3)])  # after a restart
        rows = spool.peek(100)
        assert group(rows, per_message=2, limit=4) == [[0, 1, 2, 3], [4, 5], [0, 1, 2]]
    finally:
        spool.close()


# -- Backoff -----------------------------------------------------------------------------------


def test_backoff_delays_grow_within_bounds_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 30.0, rng=random.Random(1))
    ceilings = [min(30.0, 0.5 * 2**n) for n in range(12)]
    for n, ceiling in enumerate(ceilings):
        delay = backoff.next_delay()
        assert 0.5 <= delay <= ceiling, (n, delay)
        assert backoff.attempt == n + 1
    assert backoff.next_delay() <= 30.0
    # The first attempt waits exactly the base (the interval is empty).
    assert Backoff(0.5, 30.0, rng=random.Random(2)).next_delay() == 0.5


def test_backoff_spreads_over_the_whole_interval() -> None:
    rng = random.Random(3)
    fifth = []
    for _ in range(200):
        backoff = Backoff(1.0, 100.0, rng=rng)
        delays = [backoff.next_delay() for _ in range(5)]  # ceilings 1, 2, 4, 8, 16
        fifth.append(delays[4])
    assert max(fifth) > 14.0 and min(fifth) < 3.0
    assert all(1.0 <= d <= 16.0 for d in fifth)


def test_backoff_jitter_comes_from_the_given_rng() -> None:
    a = Backoff(0.5, 30.0, rng=random.Random(42))
    b = Backoff(0.5, 30.0, rng=random.Random(42))
    seq_a = [a.next_delay() for _ in range(20)]
    assert seq_a == [b.next_delay() for _ in range(20)]
    reference = random.Random(42)
    expected = [reference.uniform(0.5, min(30.0, 0.5 * 2**n)) for n in range(20)]
    assert seq_a == expected
    c = Backoff(0.5, 30.0, rng=random.Random(43))
    assert [c.next_delay() for _ in range(20)] != seq_a


def test_backoff_cap_and_huge_attempt_counts() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(0))
    delays = [backoff.next_delay() for _ in range(1000)]  # no overflow past 2**30
    assert max(delays) <= 4.0 and min(delays) >= 0.5
    assert max(delays[10:]) > 3.5
    # A cap below the base means "always the base".
    fixed = Backoff(2.0, 1.0, rng=random.Random(0))
    assert fixed.cap_s == 2.0
    assert {fixed.next_delay() for _ in range(10)} == {2.0}


def test_backoff_reset_starts_over() -> None:
    backoff = Backoff(1.0, 60.0, rng=random.Random(5))
    for _ in range(8):
        backoff.next_delay()
    assert backoff.attempt == 8
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() == 1.0
    assert 1.0 <= backoff.next_delay() <= 2.0


def test_backoff_without_rng_still_jitters() -> None:
    backoff = Backoff(1.0, 1000.0)
    for _ in range(6):
        backoff.next_delay()
    assert len({backoff.next_delay() for _ in range(5)}) > 1


# -- publish_packet_bytes against paho's real packets -------------------------------------------


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _read_packet(conn: socket.socket) -> bytes:
    """One MQTT control packet, exactly as it came over the wire."""
    head = _read_exact(conn, 1)
    remaining, shift = 0, 0
    while True:
        byte = _read_exact(conn, 1)
        head += byte
        remaining |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    return head + _read_exact(conn, remaining)


def _paho_publish_packets(messages: list[tuple[str, bytes, int]]) -> list[bytes]:
    """Have a real paho MQTT 5 client publish each message to a raw TCP socket; return the
    PUBLISH packets it wrote."""
    import paho.mqtt.client as mqtt

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="size-probe",
                         protocol=mqtt.MQTTv5)
    connected = threading.Event()
    acked: list[int] = []
    client.on_connect = lambda *args: connected.set()
    client.on_publish = lambda c, u, mid, *rest: acked.append(mid)
    packets: list[bytes] = []
    try:
        client.connect("127.0.0.1", port, keepalive=60)
        client.loop_start()
        conn, _ = server.accept()
        conn.settimeout(10)
        with conn:
            connect = _read_packet(conn)
            assert connect[0] == 0x10  # CONNECT
            conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK: v5, success, no properties
            assert connected.wait(10)
            for topic, payload, qos in messages:
                info = client.publish(topic, payload, qos=qos)
                packet = _read_packet(conn)
                assert packet[0] >> 4 == 3  # PUBLISH
                assert (packet[0] >> 1) & 3 == qos
                assert packet.endswith(payload)
                if qos:
                    # A PUBACK of PUBACK_BYTES bytes (reason success, no properties) is a
                    # complete acknowledgement for paho.
                    ack = bytes([0x40, 0x02]) + info.mid.to_bytes(2, "big")
                    assert len(ack) == PUBACK_BYTES
                    conn.sendall(ack)
                    info.wait_for_publish(10)
                    assert info.is_published()
                packets.append(packet)
    finally:
        client.loop_stop()
        client.disconnect()
        server.close()
    return packets


def test_publish_packet_bytes_matches_paho_on_the_wire() -> None:
    cases = [
        ("csi/v1/lab/ap1/seg", b"", 1),
        ("csi/v1/lab/ap1/seg", b"x" * 10, 1),
        ("csi/v1/lab/ap1/seg", b"x" * 100, 1),  # remaining length just under 128
        ("csi/v1/lab/ap1/seg", b"x" * 104, 1),  # ... and just over: a 2-byte varint
        ("csi/v1/lab/ap1/seg", b"x" * 127, 1),
        ("csi/v1/lab/ap1/seg", b"x" * 300, 1),
        ("csi/v1/lab/ap1/seg", b"x" * 16_360, 1),  # around 16383: 2 -> 3 byte varint
        ("csi/v1/lab/ap1/seg", b"x" * 16_383, 1),
        ("csi/v1/lab/ap1/seg", b"x" * 20_000, 1),
        ("csi/v1/läb/äp-1/status", os.urandom(200), 1),  # topic length in UTF-8 bytes
        ("t", b"y" * 5, 0),  # QoS 0 has no packet id
        ("csi/v1/lab/ap1/status", b"z" * 20_000, 0),
    ]
    packets = _paho_publish_packets(cases)
    varint_sizes = set()
    for (topic, payload, qos), packet in zip(cases, packets, strict=True):
        assert publish_packet_bytes(topic, len(payload), qos=qos) == len(packet), (
            topic, len(payload), qos)
        varint_sizes.add(_varint_size(packet))
    assert varint_sizes == {1, 2, 3}  # every remaining-length size the agent sends


def _varint_size(packet: bytes) -> int:
    """Bytes of the remaining-length varint after the first byte of a packet."""
    size = 1
    while packet[size] & 0x80:
        size += 1
    return size


def test_publish_packet_bytes_arithmetic() -> None:
    # 1 + varint + (2 + topic) + 2 (packet id) + 1 (no properties) + payload
    assert publish_packet_bytes("a", 0) == 1 + 1 + 2 + 1 + 2 + 1
    assert publish_packet_bytes("a", 0, qos=0) == 1 + 1 + 2 + 1 + 1
    assert publish_packet_bytes("a", 121) == 1 + 1 + 127  # remaining 127: one varint byte
    assert publish_packet_bytes("a", 122) == 1 + 2 + 128  # remaining 128: two
    assert publish_packet_bytes("a", 16_383 - 6) == 1 + 2 + 16_383
    assert publish_packet_bytes("a", 16_384 - 6) == 1 + 3 + 16_384
    assert publish_packet_bytes("a", 2_097_152 - 6) == 1 + 4 + 2_097_152
