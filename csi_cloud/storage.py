"""Recordings of what the APs streamed: one appendable HDF5 file per AP and rotation period.

:class:`RecordingStore` is the service's recorder. The ingest worker calls
:meth:`RecordingStore.append` with each batch's accepted segments (any APs mixed); the store
writes them to ``{folder}/{site}/{ap}/{site}_{ap}_{yyyymmddTHHMMSSZ}.h5`` (the UTC capture
time of the file's first segment; ``-1``, ``-2`` … on a clash). Site and AP names are
percent-encoded where they hold anything but letters, digits, ``.``, ``_``, ``-`` (and a
leading ``.``), so a topic level such as ``..`` can never leave the folder.

A file is a project recording (:mod:`csi_edge.recording`, format ``csi-pipeline-recording``
layout 1): ``csi_edge.recording.read_recording_file`` and ``read_labels`` read it, and so does
the ``recordings`` dataset used for training. On top of that layout each file keeps the
received segment codes, so the stream can be decoded again later with any copy of the bundle:

=======================  =================  ============================================
``segments/meta``        (K,) compound      one row per segment, fields: ``epoch`` int64
                                            (stream epoch), ``seq`` int64, ``timestamp_ms``
                                            int64 (capture time of the segment start, Unix
                                            ms), ``level`` uint8, ``quality`` float32
                                            (fraction backed by real frames), ``received``
                                            float64 (Unix s), ``model`` S64 (the full
                                            bundle id, 64 hex digits)
``segments/codes``       (K,) vlen uint8    the entropy-coded codes exactly as received
``segments/committed``   (1,) int64         segments known complete on disk
=======================  =================  ============================================

With ``reconstruction`` on, each segment's decoded CSI amplitude is stored as frames
(``timestamp``, ``amplitude`` (N, A, S)) on the segment grid: frame ``k`` of a segment is at
``timestamp_ms / 1000 + k / nominal_rate_hz``. The amplitude is the decoder's standardised
log-amplitude turned back (``expm1(x * scale + mean)`` per subcarrier, clipped at 0), so it is
only stored for bundles whose input spec is amplitude with ``log`` (or ``none``)
normalisation. Frames of a segment whose quality is below the bundle's ``min_quality`` are
left out (a gap on the time axis): the edge filled most of that segment, and a reader must
not mistake it for measured CSI. Device metadata (``device`` = the input spec's source kind,
``subcarriers``) comes from the bundle; ``extra`` names the site, AP and model.

A file holds one bundle's stream: a segment of another model, a capture time going back, a
file older than ``max_s`` (capture time of its first segment to the segment's end) or larger
than ``max_bytes`` (checked after each batch) starts a new file. A file that got nothing for
``max_s`` seconds of wall-clock time is closed.

Crash safety follows :class:`csi_edge.recording.RecordingWriter`: every dataset is created
with the file, which is then switched to SWMR write mode and only extended; each batch is
written, flushed, and only then counted in ``committed`` / ``segments/committed`` (flushed
again). A killed process loses at most the batch being written; readers take exactly the
committed counts. By default every :meth:`RecordingStore.append` commits the files it touched
(what was acknowledged to the broker is recorded); ``flush_s`` > 0 keeps segments in memory
and commits each file at most that often (much cheaper with many APs: one commit costs about
1-2 ms per file; a crash then loses up to ``flush_s`` of recordings). A commit hands the
data to the OS; ``fsync`` (against a power cut) runs at most every ``fsync_s`` seconds per
file and at close. While a file is open for writing, a
hidden ``.{name}.lock`` next to it is held with ``flock``; a file whose lock is free but whose
HDF5 superblock still says "open for write" was left by a dead writer and is recovered (its
committed content copied into a clean file) before a label is added to it.

Labels: :meth:`RecordingStore.label_range` adds the label to every file of the AP whose
time range overlaps it (in the file's ``labels`` dataset, as ``read_labels`` reads them);
a range reaching past the AP's newest data is also added to the files the AP opens later.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import h5py
import numpy as np

from csi_edge.bundle import SegmentCodes, decode_segment_codes
from csi_edge.recording import CHUNK_FRAMES, FORMAT_NAME, LABEL_DTYPE, LAYOUT_VERSION

from .ingest import DecodedRecord
from .model.compression import CloudModel

__all__ = [
    "SEGMENT_DTYPE",
    "STORE_LAYOUT",
    "LabelResult",
    "RecordingFile",
    "RecordingStore",
    "StoredSegments",
    "decode_stored",
    "read_segments",
]

log = logging.getLogger("csi_cloud.storage")

STORE_LAYOUT = "csi-cloud-segments/1"
_LIBVER = ("v110", "latest")
_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
_CHUNK_BYTES = 1 << 20
_LABEL_CHUNK = 64
_SEGMENT_CHUNK = 256
_CODES_DTYPE = h5py.vlen_dtype(np.dtype(np.uint8))
_FRAME_DATASETS = ("timestamp", "amplitude", "phase", "rssi", "seq")
SEGMENT_DTYPE = np.dtype([
    ("epoch", "<i8"), ("seq", "<i8"), ("timestamp_ms", "<i8"), ("level", "u1"),
    ("quality", "<f4"), ("received", "<f8"), ("model", "S64"),
])


def _safe(name: str) -> str:
    """A site or AP name as one safe path component."""
    text = quote(name, safe="")
    if text.startswith("."):
        text = "%2E" + text[1:]
    return text or "%00"


def _stamp(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True, slots=True)
class RecordingFile:
    """One recording file of an AP, as :meth:`RecordingStore.files` lists it."""

    path: Path
    start: float | None  # capture time of the first committed segment (Unix s)
    end: float | None  # end of the last committed segment
    segments: int
    frames: int
    labels: int
    bytes: int
    open: bool  # being written by this store

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "start": self.start, "end": self.end,
                "segments": self.segments, "frames": self.frames, "labels": self.labels,
                "bytes": self.bytes, "open": self.open}


@dataclass(slots=True)
class LabelResult:
    """What :meth:`RecordingStore.label_range` did: files labelled, and files it could not."""

    files: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pending: bool = False  # kept for files the AP opens later


@dataclass(frozen=True, slots=True)
class _Label:
    start: float
    end: float
    activity: str | None
    identity: str | None

    def row(self) -> np.ndarray:
        return np.array([(self.start, self.end, self.activity or "", self.identity or "")],
                        dtype=LABEL_DTYPE)


def _check_label(start: float, end: float, activity: str | None,
                 identity: str | None) -> _Label:
    start, end = float(start), float(end)
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"label bounds must be finite, got start={start!r} end={end!r}")
    if not start < end:
        raise ValueError(f"label start must be before end, got start={start!r} end={end!r}")
    if not activity and not identity:
        raise ValueError("a label needs an activity or an identity")
    return _Label(start, end, activity or None, identity or None)


class _Inverse:
    """Standardised log amplitude (L, A, S) -> amplitude, for one bundle; None if impossible."""

    def __init__(self, model: CloudModel) -> None:
        spec = model.manifest.input_spec
        enc = model.net.encoder
        self.mode = spec.normalisation
        self.ok = spec.features == "amplitude" and self.mode in ("log", "none")
        self.mean = enc.mean.detach().cpu().numpy().astype(np.float32)
        self.scale = enc.scale.detach().cpu().numpy().astype(np.float32)

    def __call__(self, recon: np.ndarray) -> np.ndarray:
        shape = recon.shape
        x = recon.reshape(shape[0], -1) * self.scale + self.mean
        if self.mode == "log":
            x = np.expm1(x)
        return np.maximum(x, 0).reshape(shape).astype(np.float32, copy=False)


class _OpenFile:
    """One file being written (SWMR), with its commit counters."""

    def __init__(self, path: Path, site: str, ap: str, model: CloudModel,
                 inverse: _Inverse | None, start_ms: int, fsync_s: float) -> None:
        spec = model.manifest.input_spec
        self.path = path
        self.site, self.ap = site, ap
        self.model_id = model.id
        self.segment_ms = model.segment_ms
        self.rate = float(spec.nominal_rate_hz)
        self.min_quality = float(spec.min_quality)
        self.inverse = inverse
        self.start_ms = start_ms
        self.end_ms = start_ms  # end of the newest segment queued
        self.count = 0  # segments queued or written
        self.segments = self.frames = self.labels = 0  # written and committed
        self.pending: list[tuple[DecodedRecord, np.ndarray | None]] = []
        self.pending_labels: list[_Label] = []
        self.full = False
        self.fsync_s = fsync_s
        self.last_write = time.monotonic()  # last segment queued
        self.last_commit = time.monotonic()
        self.last_fsync = time.monotonic()
        self.lock_path = path.with_name(f".{path.name}.lock")
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self.f = h5py.File(path, "w-", libver=_LIBVER)
            try:
                self._create(model)
            except BaseException:
                self.f.close()
                path.unlink(missing_ok=True)
                raise
        except BaseException:
            self._unlock()
            raise

    def _create(self, model: CloudModel) -> None:
        spec = model.manifest.input_spec
        f = self.f
        a = f.attrs
        a["format"] = FORMAT_NAME
        a["version"] = np.int64(LAYOUT_VERSION)
        a["device"] = str(spec.source_kind)
        a["rssi_is_real"] = False
        a["subcarriers"] = np.asarray(spec.subcarriers, dtype=np.int64)
        a["source"] = f"csi-cloud://{self.site}/{self.ap}"
        a["source_format"] = ("csi-cloud-reconstruction" if self.inverse is not None
                              else "csi-cloud-segments")
        a["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        a["extra"] = json.dumps({
            "site": self.site, "ap": self.ap, "model": model.id,
            "model_name": model.manifest.name, "band": spec.band,
            "nominal_rate_hz": self.rate, "segment_ms": self.segment_ms,
            "reconstruction": self.inverse is not None, "layout": STORE_LAYOUT,
        }, sort_keys=True)
        a["dropped"] = "{}"
        a["store_layout"] = STORE_LAYOUT
        a["site"], a["ap"], a["model"] = self.site, self.ap, model.id
        a["segment_ms"] = np.int64(self.segment_ms)
        a["nominal_rate_hz"] = self.rate
        f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=LABEL_DTYPE,
                         chunks=(_LABEL_CHUNK,))
        f.create_dataset("committed", data=np.zeros(2, dtype=np.int64))
        if self.inverse is not None:
            shape = (spec.antennas, len(spec.subcarriers))
            # One segment per chunk: a batch adds whole segments, so every chunk is written
            # (and compressed) once, never re-compressed half full at the next flush.
            rows = max(1, min(spec.segment_frames,
                              _CHUNK_BYTES // max(1, 4 * shape[0] * shape[1])))
            f.create_dataset("timestamp", shape=(0,), maxshape=(None,), dtype="<f8",
                             chunks=(CHUNK_FRAMES,), **_COMPRESSION)
            f.create_dataset("amplitude", shape=(0, *shape), maxshape=(None, *shape),
                             dtype="<f4", chunks=(rows, *shape), **_COMPRESSION)
        g = f.create_group("segments")
        # One compound row per segment: one dataset to extend per batch, not seven.
        g.create_dataset("meta", shape=(0,), maxshape=(None,), dtype=SEGMENT_DTYPE,
                         chunks=(_SEGMENT_CHUNK,), **_COMPRESSION)
        g.create_dataset("codes", shape=(0,), maxshape=(None,), dtype=_CODES_DTYPE,
                         chunks=(_SEGMENT_CHUNK,))
        g.create_dataset("committed", data=np.zeros(1, dtype=np.int64))
        f.flush()
        # From here on the file is only extended (SWMR orders the metadata writes).
        f.swmr_mode = True
        # Handles kept: an h5py lookup by name costs more than writing a small batch.
        self.ds: dict[str, h5py.Dataset] = {name: g[name] for name in g}
        for name in ("labels", "committed", "timestamp", "amplitude"):
            if name in f:
                self.ds["/" + name] = f[name]

    # -- writing --

    def queue(self, record: DecodedRecord, recon: np.ndarray | None) -> None:
        """Add a segment; it reaches the file at the next :meth:`commit`."""
        self.pending.append((record, recon))
        self.count += 1
        self.end_ms = max(self.end_ms, record.timestamp_ms + self.segment_ms)
        self.last_write = time.monotonic()

    def _write(self) -> None:
        records = [r for r, _ in self.pending]
        recon = [x for _, x in self.pending]
        self.pending = []
        n, k = self.segments, len(records)
        meta = np.zeros(k, dtype=SEGMENT_DTYPE)
        meta["epoch"] = [r.epoch for r in records]
        meta["seq"] = [r.seq for r in records]
        meta["timestamp_ms"] = [r.timestamp_ms for r in records]
        meta["level"] = [r.level for r in records]
        meta["quality"] = [r.quality for r in records]
        meta["received"] = [r.received for r in records]
        meta["model"] = [r.model.id.encode("ascii") for r in records]
        codes = np.empty(k, dtype=object)
        for i, r in enumerate(records):
            codes[i] = np.frombuffer(bytes(r.code_bytes), dtype=np.uint8)
        ds = self.ds["meta"]
        ds.resize(n + k, axis=0)
        ds[n : n + k] = meta
        ds = self.ds["codes"]
        ds.resize(n + k, axis=0)
        # write_direct: ``ds[...] = codes`` turns equal-length codes into a 2-D array.
        ds.write_direct(codes, dest_sel=np.s_[n : n + k])
        self.segments = n + k
        if self.inverse is not None:
            ts, amp = [], []
            for r, x in zip(records, recon, strict=True):
                if x is None or r.quality < self.min_quality:
                    continue
                ts.append(r.timestamp_ms / 1000 + np.arange(x.shape[0]) / self.rate)
                amp.append(self.inverse(x))
            if ts:
                m, j = self.frames, sum(len(t) for t in ts)
                for name, values in (("/timestamp", np.concatenate(ts)),
                                     ("/amplitude", np.concatenate(amp))):
                    ds = self.ds[name]
                    ds.resize(m + j, axis=0)
                    ds[m : m + j] = values
                self.frames = m + j

    def add_label(self, label: _Label) -> None:
        self.pending_labels.append(label)

    def commit(self, *, force_fsync: bool = False) -> None:
        """Write what is queued, flush, then count it in ``committed`` (flushed again)."""
        f = self.f
        if self.pending:
            self._write()
        if self.pending_labels:
            rows = np.concatenate([lab.row() for lab in self.pending_labels])
            ds = self.ds["/labels"]
            ds.resize(self.labels + len(rows), axis=0)
            ds[self.labels :] = rows
            self.labels += len(rows)
            self.pending_labels = []
        f.flush()
        now = time.monotonic()
        if force_fsync or now - self.last_fsync >= self.fsync_s:
            os.fsync(f.id.get_vfd_handle())
            self.last_fsync = now
        self.ds["/committed"][...] = np.array([self.frames, self.labels], dtype=np.int64)
        self.ds["committed"][...] = np.array([self.segments], dtype=np.int64)
        f.flush()
        self.last_commit = now

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def info(self) -> RecordingFile:
        return RecordingFile(self.path, self.start_ms / 1000 if self.segments else None,
                             self.end_ms / 1000 if self.segments else None, self.segments,
                             self.frames, self.labels, self.size(), True)

    def close(self) -> None:
        try:
            if self.f.id.valid:
                try:
                    self.commit(force_fsync=True)
                finally:
                    self.f.close()
        finally:
            self._unlock()

    def _unlock(self) -> None:
        with contextlib.suppress(OSError):
            self.lock_path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)


# -- reading ----------------------------------------------------------------------------------


def _open_read(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError):
        return h5py.File(path, "r", swmr=True)  # a writer is running or died


def _committed(f: h5py.File) -> tuple[int, int, int]:
    frames, labels = (int(v) for v in f["committed"][()]) if "committed" in f else (0, 0)
    segments = int(f["segments/committed"][0]) if "segments/committed" in f else 0
    return frames, labels, segments


@dataclass(frozen=True, slots=True)
class StoredSegments:
    """The committed segment codes of one file."""

    epoch: np.ndarray
    seq: np.ndarray
    timestamp_ms: np.ndarray
    level: np.ndarray
    quality: np.ndarray
    received: np.ndarray
    model: list[str]
    codes: list[bytes]

    def __len__(self) -> int:
        return len(self.codes)


def read_segments(path: str | Path) -> StoredSegments:
    """The committed segments of a store file (works on a file still written or left by a
    killed writer)."""
    with _open_read(Path(path)) as f:
        _, _, n = _committed(f)
        g = f["segments"]
        cols = g["meta"][:n]
        codes = [bytes(np.asarray(c, dtype=np.uint8)) for c in g["codes"][:n]]
    return StoredSegments(
        epoch=cols["epoch"], seq=cols["seq"], timestamp_ms=cols["timestamp_ms"],
        level=cols["level"], quality=cols["quality"], received=cols["received"],
        model=[m.decode("ascii") for m in cols["model"]], codes=codes)


def decode_stored(stored: StoredSegments, model: CloudModel) -> list[SegmentCodes]:
    """Entropy-decode the stored codes again with the bundle they were made with."""
    out = []
    for i, data in enumerate(stored.codes):
        if stored.model[i] != model.id:
            raise ValueError(f"segment {i} was coded by model {stored.model[i][:12]}…, "
                             f"not {model.id[:12]}…")
        out.append(decode_segment_codes(data, int(stored.level[i]), model.manifest,
                                        model.tables))
    return out


def _file_info(path: Path) -> RecordingFile:
    with _open_read(path) as f:
        frames, labels, n = _committed(f)
        start = end = None
        if n:
            ts = f["segments/meta"]["timestamp_ms"][:n]
            seg_ms = int(f.attrs.get("segment_ms", 0))
            start, end = float(ts.min()) / 1000, float(ts.max() + seg_ms) / 1000
    return RecordingFile(path, start, end, n, frames, labels, path.stat().st_size, False)


# -- the store --------------------------------------------------------------------------------


class RecordingStore:
    """The service's recorder: see the module docstring. Thread-safe."""

    def __init__(self, folder: str | Path, *, reconstruction: bool = True,
                 max_bytes: int = 256 * 2**20, max_s: float = 3600.0,
                 fsync_s: float = 1.0, flush_s: float = 0.0) -> None:
        if max_bytes <= 0 or not max_s > 0:
            raise ValueError(f"max_bytes ({max_bytes}) and max_s ({max_s}) must be positive")
        self.folder = Path(folder)
        self.reconstruction = reconstruction
        self.max_bytes = int(max_bytes)
        self.max_s = float(max_s)
        self.fsync_s = float(fsync_s)
        self.flush_s = float(flush_s)
        self._lock = threading.RLock()
        self._open: dict[tuple[str, str], _OpenFile] = {}
        self._inverse: dict[str, _Inverse | None] = {}
        self._pending: dict[tuple[str, str], list[_Label]] = {}
        self._info_cache: dict[Path, tuple[tuple[int, int], RecordingFile]] = {}
        self._closed_lock = threading.RLock()  # files no longer written: info cache, labels
        self._closed = False
        self.written = 0

    # -- paths --

    def ap_folder(self, site: str, ap: str) -> Path:
        return self.folder / _safe(site) / _safe(ap)

    def _new_path(self, site: str, ap: str, start_ms: int) -> Path:
        folder = self.ap_folder(site, ap)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{_safe(site)}_{_safe(ap)}_{_stamp(start_ms)}"
        path = folder / f"{stem}.h5"
        i = 0
        while path.exists():
            i += 1
            path = folder / f"{stem}-{i}.h5"
        return path

    # -- writing --

    def _inverse_for(self, model: CloudModel) -> _Inverse | None:
        if not self.reconstruction:
            return None
        if model.id not in self._inverse:
            inv = _Inverse(model)
            if not inv.ok:
                spec = model.manifest.input_spec
                log.warning("model %s (%s, %s normalisation): its reconstruction cannot be "
                            "turned back into amplitude; only the codes are recorded",
                            model.manifest.name, spec.features, spec.normalisation)
            self._inverse[model.id] = inv if inv.ok else None
        return self._inverse[model.id]

    def _needs_new(self, current: _OpenFile, record: DecodedRecord) -> bool:
        if current.full or current.model_id != record.model.id:
            return True
        if current.count and record.timestamp_ms < current.end_ms - current.segment_ms // 2:
            return True  # capture time went back (a new epoch with an earlier clock)
        span_ms = record.timestamp_ms + current.segment_ms - current.start_ms
        return span_ms > self.max_s * 1000

    def _open_file(self, site: str, ap: str, record: DecodedRecord) -> _OpenFile:
        path = self._new_path(site, ap, record.timestamp_ms)
        opened = _OpenFile(path, site, ap, record.model, self._inverse_for(record.model),
                           record.timestamp_ms, self.fsync_s)
        key = (site, ap)
        start = record.timestamp_ms / 1000
        pending = [lab for lab in self._pending.get(key, []) if lab.end > start]
        for lab in pending:
            opened.add_label(lab)
        if key in self._pending:
            self._pending[key] = pending
        log.info("recording %s/%s to %s", site, ap, path)
        return opened

    def _close_file(self, key: tuple[str, str]) -> None:
        current = self._open.pop(key, None)
        if current is not None:
            current.close()

    def append(self, segments: Iterable[DecodedRecord]) -> None:
        """Write a batch of decoded segments (any APs); each file is committed once per batch
        (with ``flush_s`` > 0: once per ``flush_s`` seconds)."""
        by_ap: dict[tuple[str, str], list[DecodedRecord]] = {}
        for record in segments:
            by_ap.setdefault((record.site, record.ap), []).append(record)
        if not by_ap:
            return
        errors: list[BaseException] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("recording store is closed")
            recon = self._reconstructions(by_ap)
            for key, records in by_ap.items():
                try:
                    self._append_ap(key, records, recon)
                except Exception as exc:  # one AP's broken file must not stop the others
                    log.exception("recording %s/%s failed; starting a new file", *key)
                    broken = self._open.pop(key, None)
                    if broken is not None:
                        with contextlib.suppress(Exception):
                            broken.close()
                    errors.append(exc)
            self._commit_due(errors)
            self._close_idle()
        if errors:
            raise errors[0]

    def _reconstructions(self, by_ap: dict[tuple[str, str], list[DecodedRecord]]
                         ) -> dict[int, np.ndarray | None]:
        """Reconstruction per record (by id); computed here where the record lacks one."""
        out: dict[int, np.ndarray | None] = {}
        missing: dict[str, list[DecodedRecord]] = {}
        for records in by_ap.values():
            for r in records:
                if self._inverse_for(r.model) is None:
                    out[id(r)] = None
                elif r.reconstruction is not None:
                    out[id(r)] = r.reconstruction
                else:
                    missing.setdefault(r.model.id, []).append(r)
        for group in missing.values():
            _, _, recon = group[0].model.reconstruct([r.codes for r in group])
            for r, x in zip(group, recon, strict=True):
                out[id(r)] = x
        return out

    def _append_ap(self, key: tuple[str, str], records: list[DecodedRecord],
                   recon: dict[int, np.ndarray | None]) -> None:
        current = self._open.get(key)
        for record in records:
            if current is None or self._needs_new(current, record):
                if current is not None:
                    self._close_file(key)  # commits what it still holds
                current = self._open[key] = self._open_file(*key, record)
            current.queue(record, recon[id(record)])
        self.written += len(records)

    def _commit_due(self, errors: list[BaseException]) -> None:
        """Commit every file whose queued segments are due (all of them with flush_s 0)."""
        now = time.monotonic()
        for key, f in list(self._open.items()):
            if not f.pending or now - f.last_commit < self.flush_s:
                continue
            try:
                f.commit()
            except Exception as exc:
                log.exception("recording %s/%s failed; starting a new file", *key)
                self._open.pop(key, None)
                with contextlib.suppress(Exception):
                    f.close()
                errors.append(exc)
                continue
            if f.size() >= self.max_bytes:
                f.full = True

    def _close_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, f in self._open.items() if now - f.last_write > self.max_s]:
            self._close_file(key)

    def flush(self) -> None:
        with self._lock:
            for f in self._open.values():
                f.commit(force_fsync=True)

    def close(self) -> None:
        """Close every open file (flushed and synced). Safe to call twice."""
        with self._lock:
            self._closed = True
            for key in list(self._open):
                try:
                    self._close_file(key)
                except Exception:
                    log.exception("closing the recording of %s/%s failed", *key)

    # -- listing --

    def files(self, site: str, ap: str) -> list[RecordingFile]:
        """Every recording file of an AP, oldest first (files that cannot be read are left
        out and logged)."""
        with self._lock:
            current = self._open.get((site, ap))
            if current is not None and current.pending:
                current.commit()
            open_info = current.info() if current is not None else None
        return self._files(site, ap, open_info)

    def _files(self, site: str, ap: str, open_info: RecordingFile | None) -> list[RecordingFile]:
        # Closed files are read under their own lock: the ingest never waits for this.
        folder = self.ap_folder(site, ap)
        with self._closed_lock:
            out = []
            seen = set()
            for path in sorted(folder.glob("*.h5")):
                seen.add(path)
                if open_info is not None and path == open_info.path:
                    out.append(open_info)
                    continue
                try:
                    out.append(self._cached_info(path))
                except (OSError, RuntimeError, KeyError, ValueError) as exc:
                    log.warning("recording %s cannot be read: %s", path, exc)
            for gone in [p for p in self._info_cache if p.parent == folder and p not in seen]:
                del self._info_cache[gone]
            return out

    def _cached_info(self, path: Path) -> RecordingFile:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._info_cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = _file_info(path)
        self._info_cache[path] = (stamp, info)
        return info

    # -- labels --

    def label_range(self, site: str, ap: str, start: float, end: float,
                    activity: str | None = None, identity: str | None = None) -> LabelResult:
        """Add a label to every file of the AP overlapping ``[start, end)``; a range reaching
        past the AP's newest data is also kept for the files it opens later."""
        label = _check_label(start, end, activity, identity)
        result = LabelResult()
        key = (site, ap)
        with self._lock:  # the file being written, and labels for files still to come
            current = self._open.get(key)
            open_info = None
            if current is not None:
                if current.pending:
                    current.commit()
                open_info = current.info()
                if label.end > current.start_ms / 1000:  # it is still growing
                    try:
                        current.add_label(label)
                        current.commit()
                        result.files.append(current.path)
                    except (OSError, RuntimeError, KeyError, ValueError) as exc:
                        log.warning("label not added to %s: %s", current.path, exc)
                        result.failed[str(current.path)] = str(exc)
            infos = self._files(site, ap, open_info)
            ends = [f.end for f in infos if f.end is not None]
            if not ends or label.end > max(ends):
                self._pending.setdefault(key, []).append(label)
                result.pending = True
        with self._closed_lock:
            for info in infos:
                if (info.open or info.start is None or info.end is None
                        or not (label.start < info.end and label.end > info.start)):
                    continue
                try:
                    self._label_closed(info.path, label)
                    result.files.append(info.path)
                except (OSError, RuntimeError, KeyError, ValueError) as exc:
                    log.warning("label not added to %s: %s", info.path, exc)
                    result.failed[str(info.path)] = str(exc)
        result.files.sort()
        return result

    def _label_closed(self, path: Path, label: _Label) -> None:
        try:
            f = h5py.File(path, "r+", libver=_LIBVER)
        except OSError as exc:
            if "already open" not in str(exc) or not self._writer_gone(path):
                raise
            recover(path)
            f = h5py.File(path, "r+", libver=_LIBVER)
        with f:
            f.swmr_mode = True
            frames, labels, _ = _committed(f)
            ds = f["labels"]
            ds.resize(labels + 1, axis=0)
            ds[labels:] = label.row()
            f.flush()
            os.fsync(f.id.get_vfd_handle())
            f["committed"][...] = np.array([frames, labels + 1], dtype=np.int64)
            f.flush()
        self._info_cache.pop(path, None)

    @staticmethod
    def _writer_gone(path: Path) -> bool:
        """True when no process holds the file's writer lock (its writer died)."""
        lock = path.with_name(f".{path.name}.lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # also releases the lock if we got it
        with contextlib.suppress(OSError):
            lock.unlink()
        return True


def recover(path: str | Path) -> None:
    """Rewrite a file left by a killed writer as a clean one holding exactly its committed
    content (atomically replaced), so it can be opened for writing again."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.recover")
    with _open_read(path) as src, h5py.File(tmp, "w", libver=_LIBVER) as dst:
        frames, labels, segments = _committed(src)
        for k, v in src.attrs.items():
            dst.attrs[k] = v

        def copy(ds: h5py.Dataset, parent: h5py.Group, name: str, n: int | None) -> None:
            data = ds[()] if n is None else ds[:n]
            kwargs: dict[str, Any] = {"maxshape": ds.maxshape, "chunks": ds.chunks,
                                      "dtype": ds.dtype}
            if ds.compression:
                kwargs.update(compression=ds.compression, compression_opts=ds.compression_opts,
                              shuffle=ds.shuffle)
            parent.create_dataset(name, data=data, **kwargs)

        for name, ds in src.items():
            if isinstance(ds, h5py.Dataset):
                n = (frames if name in _FRAME_DATASETS else labels if name == "labels"
                     else None)
                copy(ds, dst, name, n)
        if "segments" in src:
            g = dst.create_group("segments")
            for name, ds in src["segments"].items():
                copy(ds, g, name, None if name == "committed" else segments)
    os.replace(tmp, path)
    log.info("recovered %s (frames, labels, segments committed: %d, %d, %d)", path,
             frames, labels, segments)
