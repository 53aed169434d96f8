"""Project recordings: one HDF5 file per recording, appendable while streaming, crash-safe.

Format name ``csi-pipeline-recording``, layout version 1. Written by :class:`RecordingWriter`,
read by :func:`read_recording_file` (what ``csi_edge.readers.read_recording`` calls for HDF5).

Layout
------
Root attributes (an attribute whose value is ``None`` is left out, never stored as a marker):

==================  ===========  ===================================================
``format``          str          ``"csi-pipeline-recording"``
``version``         int64        layout version, ``1``
``device``          str          ``RadioInfo.device`` of the source ("nexmon", ...)
``chip``            str          ``RadioInfo.chip``
``channel``         int64        ``RadioInfo.channel``
``bandwidth_mhz``   int64        ``RadioInfo.bandwidth_mhz``
``chanspec``        int64        ``RadioInfo.chanspec``
``core``            int64        ``RadioInfo.core``
``transmitter``     str          ``RadioInfo.transmitter``, "aa:bb:cc:dd:ee:ff"
``rssi_is_real``    bool         ``RadioInfo.rssi_is_real``
``subcarriers``     int64 (S,)   ``RadioInfo.subcarriers``: subcarrier number of each column
``source``          str          original file path or endpoint
``source_format``   str          format the frames were read in ("nexmon-pcap", ...)
``created``         str          ISO 8601 UTC time the file was created
``extra``           str          JSON object, ``RadioInfo.extra``
``dropped``         str          JSON object, drops by reason (the reader's counts for a
                                 conversion, the writer's ``dropped`` at close when streaming)
==================  ===========  ===================================================

Datasets. Frame datasets are resizable along axis 0 (``maxshape`` ``None`` there), chunked by
256 frames (fewer when a chunk would pass 1 MiB), gzip level 4 with the shuffle filter:

=============  =======================  ===========  ==========================================
``timestamp``  (N,)                     float64      seconds (epoch where the source gives it)
``amplitude``  (N, A, S)                float32      ``|CSI|``; columns follow ``subcarriers``
``phase``      (N, A, S)                float32      ``angle(CSI)`` in radians; only when the
                                                     writer keeps phase and the CSI is complex
``rssi``       (N,)                     float32      dBm; only when ``rssi_is_real`` (NaN for
                                                     appended frames that carried none)
``seq``        (N,)                     int64        sequence numbers; only when the first
                                                     frames had them (-1 for frames without)
``labels``     (L,) compound            see below    resizable, chunks of 64, uncompressed
``committed``  (2,)                     int64        [frames, labels] known complete on disk
=============  =======================  ===========  ==========================================

``labels`` fields: ``start`` float64, ``end`` float64 (seconds, same clock as ``timestamp``,
the range is ``start <= t < end``), ``activity`` and ``identity`` variable-length UTF-8 str
(``""`` = no label). It is created, empty, with the file so labels can be appended while
streaming. The frame datasets are created at the first :meth:`RecordingWriter.append`; a file
whose writer never got a frame has none and reads as :class:`EmptyRecordingError`.

Crash safety
------------
All attributes and datasets are created first; the file is then switched to SWMR write mode
(``libver=("v110", "latest")``, ``swmr_mode = True``) and only ever extended. HDF5 then orders
its metadata writes so the file on disk is always structurally valid. Appended frames and
labels are buffered in memory and written only by :meth:`RecordingWriter.flush` (every
``flush_every_frames`` frames or ``flush_every_s`` seconds, and at close), which extends every
dataset, flushes the file (and, by default, ``fsync``s it), then stores the new counts in
``committed`` and flushes again. A writer killed mid-flush can leave datasets of different
lengths on disk; ``committed`` never counts more than was complete, so the reader takes exactly
``committed`` frames and labels: everything up to the last completed flush. A killed writer
leaves the superblock's "open for write" flags set; the reader then opens with ``swmr=True``
(the same open works while a writer is still running). Tools that do not open SWMR-read
need ``h5clear -s`` first, and should read ``committed`` rather than the dataset lengths. A file
without ``committed`` (written by a tool that keeps no commit record) counts its dataset
lengths as complete.

The layout's shared parts (constants, :func:`write_header`, :func:`frames_dataset`,
:func:`put_rows`, :func:`commit`, :func:`open_recording`, :func:`committed`) are public: the
cloud's recording store writes this same layout with extra datasets of its own.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from ._errors import EmptyRecordingError, FormatError, SpecMismatchError
from .frames import CSIFrames, DropCounter, RadioInfo
from .limits import check_declared

__all__ = ["CHUNK_FRAMES", "COMPRESSION", "FORMAT_NAME", "LABEL_DTYPE", "LAYOUT_VERSION", "LIBVER",
           "Label", "RecordingMeta", "RecordingWriter", "check_label", "chunk_rows", "commit",
           "committed", "frame_labels", "frames_dataset", "label_at", "label_rows",
           "open_recording", "put_rows", "read_labels", "read_recording_file",
           "read_recording_meta", "write_header"]

FORMAT_NAME = "csi-pipeline-recording"
LAYOUT_VERSION = 1
CHUNK_FRAMES = 256
_CHUNK_BYTES = 1 << 20  # HDF5's default per-dataset chunk cache is 1 MiB: stay within it
_LABEL_CHUNK = 64
COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
# v110 as the low bound: the oldest format SWMR works with, so HDF5 1.10+ can read the files.
LIBVER = ("v110", "latest")
_INFO_ATTRS = ("device", "chip", "channel", "bandwidth_mhz", "chanspec", "core", "transmitter")
_INT_ATTRS = ("channel", "bandwidth_mhz", "chanspec", "core")
_STR = h5py.string_dtype("utf-8")
LABEL_DTYPE = np.dtype(
    [("start", "<f8"), ("end", "<f8"), ("activity", _STR), ("identity", _STR)]
)


@dataclass(frozen=True, slots=True)
class Label:
    """A labelled time range ``start <= t < end`` (seconds, the recording's clock)."""

    start: float
    end: float
    activity: str | None = None
    identity: str | None = None

    def covers(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True, slots=True)
class RecordingMeta:
    """What a recording says about itself, beyond the frames."""

    path: str
    version: int
    source: str
    source_format: str
    created: str
    frames: int  # committed frames (the readable ones)
    labels: int
    dropped: dict[str, int]


def check_label(start: float, end: float, activity: str | None, identity: str | None) -> Label:
    start, end = float(start), float(end)
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"label bounds must be finite, got start={start!r} end={end!r}")
    if not start < end:
        raise ValueError(f"label start must be before end, got start={start!r} end={end!r}")
    if not activity and not identity:
        raise ValueError(f"label [{start}, {end}) has neither an activity nor an identity")
    return Label(start, end, activity or None, identity or None)


def label_rows(labels: Sequence[Label]) -> np.ndarray:
    """Labels as rows of the ``labels`` dataset."""
    return np.array([(lab.start, lab.end, lab.activity or "", lab.identity or "")
                     for lab in labels], dtype=LABEL_DTYPE)


def chunk_rows(antennas: int, subcarriers: int, most: int = CHUNK_FRAMES) -> int:
    """Frames per chunk of an (antennas, subcarriers) float32 dataset: at most ``most``."""
    return max(1, min(most, _CHUNK_BYTES // max(1, 4 * antennas * subcarriers)))


# -- the layout's writing protocol (shared with the cloud's recording store) --


def write_header(f: h5py.File, info: RadioInfo, *, source: str, source_format: str,
                 dropped: Mapping[str, int] | None = None) -> None:
    """Root attributes, an empty ``labels`` and a zero ``committed``: what every recording
    holds from its creation (before SWMR mode, after which nothing may be created)."""
    extra = _extra_json(info)
    attrs = f.attrs
    attrs["format"] = FORMAT_NAME
    attrs["version"] = np.int64(LAYOUT_VERSION)
    for name in _INFO_ATTRS:
        value = getattr(info, name)
        if value is not None:
            attrs[name] = np.int64(value) if name in _INT_ATTRS else str(value)
    attrs["rssi_is_real"] = bool(info.rssi_is_real)
    attrs["subcarriers"] = np.asarray(info.subcarriers, dtype=np.int64)
    attrs["source"] = str(source)
    attrs["source_format"] = str(source_format)
    attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    attrs["extra"] = extra
    attrs["dropped"] = json.dumps(dict(dropped or {}), sort_keys=True)
    f.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=LABEL_DTYPE,
                     chunks=(_LABEL_CHUNK,))
    f.create_dataset("committed", data=np.zeros(2, dtype=np.int64))


def _extra_json(info: RadioInfo) -> str:
    try:
        return json.dumps(info.extra, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"RadioInfo.extra is not JSON-serialisable: {exc}") from exc


def frames_dataset(f: h5py.Group, name: str, shape: tuple[int, ...], dtype: npt.DTypeLike,
                   chunk: int = CHUNK_FRAMES) -> h5py.Dataset:
    """An empty per-frame dataset, resizable along axis 0, compressed."""
    ds: h5py.Dataset = f.create_dataset(
        name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(chunk, *shape),
        **COMPRESSION)
    return ds


def put_rows(ds: h5py.Dataset, at: int, values: np.ndarray) -> int:
    """Write ``values`` as rows ``at...`` of a resizable dataset; returns the new row count."""
    end = at + len(values)
    ds.resize(end, axis=0)
    ds[at:end] = values
    return end


def commit(f: h5py.File, counts: Sequence[tuple[h5py.Dataset, Sequence[int]]], *,
           fsync: bool = True) -> None:
    """The commit protocol: what was written reaches the disk, and only then the counts that
    say it is there (``committed``, and a writer's own count datasets)."""
    _sync(f, fsync)
    for ds, values in counts:
        ds[...] = np.asarray(values, dtype=np.int64)
    _sync(f, fsync)


def _sync(f: h5py.File, fsync: bool) -> None:
    f.flush()
    if fsync:
        # H5Fflush hands the data to the OS (enough for a killed process); fsync also orders
        # it before ``committed`` against a power cut.
        os.fsync(f.id.get_vfd_handle())


class RecordingWriter:
    """Append CSI frames and labels to a new recording file; use as a context manager.

    Nothing reaches the file between flushes: frames and labels wait in memory until
    ``flush_every_frames`` frames are pending or ``flush_every_s`` has passed since the last
    flush (checked on each :meth:`append`), or :meth:`flush` / :meth:`close` is called. A crash
    loses at most what was appended since the last flush. ``dropped`` is a counter the caller
    may update while streaming; it is written at close.
    """

    def __init__(
        self,
        path: str | Path,
        info: RadioInfo,
        *,
        source: str = "",
        source_format: str = "",
        keep_phase: bool = False,
        flush_every_frames: int = 1024,
        flush_every_s: float = 1.0,
        dropped: Mapping[str, int] | None = None,
        fsync: bool = True,
        overwrite: bool = False,
    ) -> None:
        if flush_every_frames < 1:
            raise ValueError(f"flush_every_frames must be >= 1, got {flush_every_frames}")
        if not flush_every_s > 0:
            raise ValueError(f"flush_every_s must be > 0, got {flush_every_s}")
        self.path = Path(path)
        self.info = info
        self.keep_phase = keep_phase
        self.flush_every_frames = int(flush_every_frames)
        self.flush_every_s = float(flush_every_s)
        self.fsync = fsync
        self.dropped = DropCounter(dropped or {})
        _extra_json(info)  # a bad RadioInfo fails before any file is created
        self._dropped_written = self.dropped.as_dict()
        self._pending: list[CSIFrames] = []
        self._pending_frames = 0
        self._pending_labels: list[Label] = []
        self._frames = 0  # frames written to the datasets
        self._labels = 0
        self._has_phase = self._has_rssi = self._has_seq = False
        self._last_flush = time.monotonic()
        self._closed = False
        self._file = h5py.File(self.path, "w" if overwrite else "w-", libver=LIBVER)
        try:
            write_header(self._file, info, source=source, source_format=source_format,
                         dropped=self._dropped_written)
            self._file.flush()
        except BaseException:
            self._file.close()
            raise

    # -- set-up (before SWMR mode; no object or attribute may be created after it) --

    def _create_frame_datasets(self, first: CSIFrames) -> None:
        a, s = first.antennas, len(self.info.subcarriers)
        rows = chunk_rows(a, s)
        f = self._file
        frames_dataset(f, "timestamp", (), "<f8")
        frames_dataset(f, "amplitude", (a, s), "<f4", rows)
        self._has_phase = self.keep_phase and first.is_complex
        if self._has_phase:
            frames_dataset(f, "phase", (a, s), "<f4", rows)
        self._has_rssi = bool(self.info.rssi_is_real)
        if self._has_rssi:
            frames_dataset(f, "rssi", (), "<f4")
        self._has_seq = first.seq is not None
        if self._has_seq:
            frames_dataset(f, "seq", (), "<i8")
        # From here on the file is only extended, which is what SWMR allows and makes safe.
        f.swmr_mode = True

    # -- streaming --

    @property
    def frames_committed(self) -> int:
        """Frames on disk and counted in ``committed`` (what a reader gets after a crash)."""
        return self._frames

    @property
    def frames_appended(self) -> int:
        return self._frames + self._pending_frames

    def append(self, frames: CSIFrames) -> None:
        """Queue frames; flush when the frame or time threshold is reached."""
        self._check_open()
        self._check_spec(frames)
        if len(frames):
            self._pending.append(frames)
            self._pending_frames += len(frames)
        if (
            self._pending_frames >= self.flush_every_frames
            or time.monotonic() - self._last_flush >= self.flush_every_s
        ):
            self.flush()

    def add_label(
        self,
        start: float,
        end: float,
        activity: str | None = None,
        identity: str | None = None,
    ) -> None:
        """Queue a labelled time range; written with the next flush."""
        self._check_open()
        self._pending_labels.append(check_label(start, end, activity, identity))

    def flush(self) -> None:
        """Write what is pending, make it durable, then count it in ``committed``."""
        self._check_open()
        if not self._pending and not self._pending_labels:
            self._last_flush = time.monotonic()
            return
        if self._pending and "amplitude" not in self._file:
            self._create_frame_datasets(self._pending[0])
        if self._pending:
            self._write_frames()
        if self._pending_labels:
            self._labels = put_rows(self._file["labels"], self._labels,
                                    label_rows(self._pending_labels))
            self._pending_labels = []
        commit(self._file, [(self._file["committed"], (self._frames, self._labels))],
               fsync=self.fsync)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, close, and write the final drop counts. Safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._file.close()
        dropped = self.dropped.as_dict()
        if dropped != self._dropped_written:
            # Attributes cannot be rewritten safely in SWMR mode, so reopen the closed file.
            with h5py.File(self.path, "r+", libver=LIBVER) as f:
                f.attrs["dropped"] = json.dumps(dropped, sort_keys=True)
            self._dropped_written = dropped

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: recording writer is closed")

    def _check_spec(self, frames: CSIFrames) -> None:
        expected_s = len(self.info.subcarriers)
        if "amplitude" in self._file:
            expected_a = int(self._file["amplitude"].shape[1])
        elif self._pending:
            expected_a = self._pending[0].antennas
        else:
            expected_a = frames.antennas
        got = (frames.antennas, frames.csi.shape[2])
        if got != (expected_a, expected_s):
            raise SpecMismatchError(
                f"{self.path}: frames of (antennas, subcarriers) {got} do not match the "
                f"recording's {(expected_a, expected_s)}"
            )
        if tuple(frames.info.subcarriers) != tuple(self.info.subcarriers):
            raise SpecMismatchError(
                f"{self.path}: frames' subcarrier numbers differ from the recording's "
                f"(same count {expected_s}, first {frames.info.subcarriers[:4]} vs "
                f"{self.info.subcarriers[:4]})"
            )
        phase_expected = self._has_phase if "amplitude" in self._file else (
            self.keep_phase and bool(self._pending) and self._pending[0].is_complex
        )
        if phase_expected and not frames.is_complex:
            raise SpecMismatchError(
                f"{self.path}: the recording keeps phase but these frames are amplitude only "
                f"({frames.csi.dtype})"
            )

    def _write_frames(self) -> None:
        batch = self._pending
        n, k = self._frames, self._pending_frames
        f = self._file
        columns: dict[str, np.ndarray] = {
            "timestamp": np.concatenate([b.timestamp for b in batch]).astype("<f8", copy=False),
            "amplitude": np.concatenate([b.amplitude() for b in batch]),
        }
        if self._has_phase:
            columns["phase"] = np.concatenate(
                [np.angle(b.csi).astype(np.float32, copy=False) for b in batch]
            )
        if self._has_rssi:
            columns["rssi"] = np.concatenate([
                b.rssi.astype(np.float32, copy=False) if b.rssi is not None
                else np.full(len(b), np.nan, dtype=np.float32)
                for b in batch
            ])
        if self._has_seq:
            columns["seq"] = np.concatenate([
                b.seq.astype(np.int64, copy=False) if b.seq is not None
                else np.full(len(b), -1, dtype=np.int64)
                for b in batch
            ])
        for name, values in columns.items():
            put_rows(f[name], n, values)
        self._frames = n + k
        self._pending, self._pending_frames = [], 0


# -- reading --


def open_recording(path: str | Path) -> h5py.File:
    """Open read-only; a file whose writer died (or still runs) needs ``swmr=True``."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file" if not path.exists() else "not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise FormatError(path, "empty file (0 bytes)")
    if not h5py.is_hdf5(str(path)):
        with path.open("rb") as fh:
            head = fh.read(8)
        raise FormatError(path, f"not an HDF5 file ({size} bytes, starts with {head.hex()})")
    try:
        return h5py.File(path, "r")
    except (OSError, RuntimeError):
        pass  # superblock flags say "open for write": a writer crashed or is running
    try:
        return h5py.File(path, "r", swmr=True)
    except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError for a broken header
        raise FormatError(path, f"HDF5 file cannot be opened: {exc}") from exc


def _attr(f: h5py.File, name: str, path: Path, *, required: bool = False) -> Any:
    if name not in f.attrs:
        if required:
            raise FormatError(path, f"missing root attribute {name!r}")
        return None
    value = f.attrs[name]
    return value.decode() if isinstance(value, bytes) else value


def _check_format(f: h5py.File, path: Path) -> int:
    fmt = _attr(f, "format", path)
    if fmt is None:
        raise FormatError(
            path, f"HDF5 file without a 'format' attribute; not a {FORMAT_NAME} file"
        )
    if fmt != FORMAT_NAME:
        raise FormatError(path, f"format attribute is {fmt!r}, expected {FORMAT_NAME!r}")
    version = int(_attr(f, "version", path, required=True))
    if version > LAYOUT_VERSION:
        raise FormatError(
            path, f"layout version {version} is newer than this reader ({LAYOUT_VERSION})"
        )
    return version


def _json_attr(f: h5py.File, name: str, path: Path) -> dict[str, Any]:
    raw = _attr(f, name, path)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"attribute {name!r} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise FormatError(path, f"attribute {name!r} is not a JSON object: {raw!r}")
    return value


def committed(f: h5py.File, path: str | Path) -> tuple[int, int]:
    """(frames, labels) complete on disk; without ``committed``, the dataset lengths."""
    if "committed" not in f:
        frames = int(f["timestamp"].shape[0]) if "timestamp" in f else 0
        labels = int(f["labels"].shape[0]) if "labels" in f else 0
        return frames, labels
    ds = f["committed"]
    if not isinstance(ds, h5py.Dataset) or ds.shape != (2,):  # checked before it is read
        shape = ds.shape if isinstance(ds, h5py.Dataset) else "a group"
        raise FormatError(path, f"dataset 'committed' has shape {shape}, expected (2,)")
    counts = np.asarray(ds[()])
    return int(counts[0]), int(counts[1])


# Columns read for every frame, and the dtype each becomes: (stored + converted) bytes each.
_FRAME_COLUMNS = {"timestamp": 8, "amplitude": 4, "phase": 4 + 8, "rssi": 4, "seq": 8}


def _check_frames_size(f: h5py.File, n: int, path: Path) -> None:
    """The bytes reading ``n`` frames allocates (each column as stored, then converted; phase
    also as complex64), from the declared shapes and dtypes, against the decoded-byte limit.
    A chunked dataset may declare millions of frames it never stored: nothing is read before
    this passes."""
    per_frame = 0
    parts = []
    for name, converted in _FRAME_COLUMNS.items():
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset) or not ds.shape:
            continue
        values = math.prod(int(d) for d in ds.shape[1:])
        per_frame += values * (ds.dtype.itemsize + converted)
        parts.append(f"{name} {tuple(ds.shape)} {ds.dtype}")
    check_declared(path, f"{n:,} frames ({', '.join(parts)})", (n, per_frame), 1)


def _read_info(f: h5py.File, path: Path) -> RadioInfo:
    kwargs: dict[str, Any] = {}
    for name in _INFO_ATTRS:
        value = _attr(f, name, path, required=name == "device")
        if value is not None:
            kwargs[name] = int(value) if name in _INT_ATTRS else str(value)
    subcarriers = _attr(f, "subcarriers", path, required=True)
    return RadioInfo(
        subcarriers=tuple(int(s) for s in np.atleast_1d(subcarriers)),
        rssi_is_real=bool(_attr(f, "rssi_is_real", path)),
        extra=_json_attr(f, "extra", path),
        **kwargs,
    )


def _column(f: h5py.File, name: str, n: int, path: Path) -> np.ndarray:
    if name not in f:
        raise FormatError(path, f"missing dataset {name!r}")
    ds = f[name]
    if ds.shape[0] < n:
        raise FormatError(
            path, f"dataset {name!r} has {ds.shape[0]} frames but the recording has {n}"
        )
    try:
        rows: np.ndarray = ds[:n]
        return rows
    except (OSError, ValueError) as exc:
        raise FormatError(path, f"cannot read dataset {name!r}: {exc}") from exc


def read_recording_file(path: str | Path) -> CSIFrames:
    """Frames of a recording: amplitude (float32), or complex64 where phase was kept."""
    path = Path(path)
    with open_recording(path) as f:
        _check_format(f, path)
        info = _read_info(f, path)
        n, _ = committed(f, path)
        dropped = DropCounter({k: int(v) for k, v in _json_attr(f, "dropped", path).items()})
        if n == 0:
            raise EmptyRecordingError(path, "no frame was written (or none flushed)")
        _check_frames_size(f, n, path)
        # Lengths beyond ``committed`` are an unfinished flush of a killed writer: ignored.
        timestamp = _column(f, "timestamp", n, path).astype(np.float64, copy=False)
        amplitude = _column(f, "amplitude", n, path)
        if amplitude.ndim != 3 or amplitude.shape[2] != len(info.subcarriers):
            raise FormatError(
                path, f"amplitude has shape {amplitude.shape}; expected (frames, antennas, "
                f"{len(info.subcarriers)}) for the {len(info.subcarriers)} subcarriers"
            )
        csi: np.ndarray = amplitude.astype(np.float32, copy=False)
        if "phase" in f:
            phase = _column(f, "phase", n, path)
            if phase.shape != amplitude.shape:
                raise FormatError(
                    path, f"phase shape {phase.shape} differs from amplitude {amplitude.shape}"
                )
            csi = (csi * np.exp(1j * phase.astype(np.float32))).astype(np.complex64)
        rssi = _column(f, "rssi", n, path).astype(np.float32) if "rssi" in f else None
        seq = _column(f, "seq", n, path).astype(np.int64) if "seq" in f else None
    try:
        return CSIFrames(
            timestamp=timestamp, csi=csi, info=info, format="hdf5", source=str(path),
            rssi=rssi, seq=seq, dropped=dropped,
        )
    except ValueError as exc:
        raise FormatError(path, str(exc)) from exc


def read_labels(path: str | Path) -> list[Label]:
    """The committed labels of a recording, in the order they were added."""
    path = Path(path)
    with open_recording(path) as f:
        _check_format(f, path)
        _, m = committed(f, path)
        if m == 0:
            return []
        if "labels" not in f:
            raise FormatError(path, "missing dataset 'labels'")
        ds = f["labels"]
        if ds.shape[0] < m:
            raise FormatError(path, f"dataset 'labels' has {ds.shape[0]} rows, expected {m}")
        check_declared(path, f"{m:,} labels", (m, ds.dtype.itemsize), 2)
        rows = ds[:m]

    def text(value: object) -> str | None:
        s = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return s or None

    return [
        Label(float(r["start"]), float(r["end"]), text(r["activity"]), text(r["identity"]))
        for r in rows
    ]


def read_recording_meta(path: str | Path) -> RecordingMeta:
    """Provenance and counts of a recording, without reading the frames."""
    path = Path(path)
    with open_recording(path) as f:
        version = _check_format(f, path)
        frames, labels = committed(f, path)
        return RecordingMeta(
            path=str(path),
            version=version,
            source=str(_attr(f, "source", path) or ""),
            source_format=str(_attr(f, "source_format", path) or ""),
            created=str(_attr(f, "created", path) or ""),
            frames=frames,
            labels=labels,
            dropped={k: int(v) for k, v in _json_attr(f, "dropped", path).items()},
        )


# -- labels over time --


def label_at(labels: Sequence[Label], t: float) -> Label | None:
    """The label covering time ``t``; where several do, the one added last."""
    for lab in reversed(labels):
        if lab.covers(t):
            return lab
    return None


def frame_labels(
    labels: Sequence[Label], timestamp: np.ndarray, field: str = "activity"
) -> np.ndarray:
    """Per-frame ``field`` ("activity" or "identity") as an object array, ``""`` where none.

    Later labels override earlier ones where they overlap (as :func:`label_at`); labels
    without that field leave the frames they cover unchanged.
    """
    if field not in ("activity", "identity"):
        raise ValueError(f"field must be 'activity' or 'identity', got {field!r}")
    t = np.asarray(timestamp, dtype=np.float64)
    out = np.full(t.shape, "", dtype=object)
    for lab in labels:
        value = getattr(lab, field)
        if value:
            out[(t >= lab.start) & (t < lab.end)] = value
    return out
