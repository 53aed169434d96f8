"""One store file being written: the recording layout plus the received segment codes, in
SWMR mode, with its writer lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

import h5py
import numpy as np

from csi_edge import recording as layout
from csi_edge.frames import RadioInfo

from ..model.compression import CloudModel
from ..records import DecodedRecord
from .reader import RecordingFile

__all__ = ["SEGMENT_DTYPE", "STORE_LAYOUT", "Inverse", "OpenFile", "lock_path"]

STORE_LAYOUT = "csi-cloud-segments/1"
_CODES_DTYPE = h5py.vlen_dtype(np.dtype(np.uint8))
SEGMENT_DTYPE = np.dtype([
    ("epoch", "<i8"), ("seq", "<i8"), ("timestamp_ms", "<i8"), ("level", "u1"),
    ("quality", "<f4"), ("received", "<f8"), ("model", "S64"),
])


def lock_path(path: Path) -> Path:
    """The hidden lock file held (``flock``) while ``path`` is written."""
    return path.with_name(f".{path.name}.lock")


class Inverse:
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


class OpenFile:
    """One file being written (SWMR), with its commit counters."""

    def __init__(self, path: Path, site: str, ap: str, model: CloudModel,
                 inverse: Inverse | None, start_ms: int, fsync_s: float) -> None:
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
        self.pending_labels: list[layout.Label] = []
        self.full = False
        self.fsync_s = fsync_s
        self.last_write = time.monotonic()  # last segment queued
        self.last_commit = time.monotonic()
        self.last_fsync = time.monotonic()
        self.lock_path = lock_path(path)
        self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self.f = h5py.File(path, "w-", libver=layout.LIBVER)
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
        info = RadioInfo(device=str(spec.source_kind), subcarriers=tuple(spec.subcarriers),
                         extra={"site": self.site, "ap": self.ap, "model": model.id,
                                "model_name": model.manifest.name, "band": spec.band,
                                "nominal_rate_hz": self.rate, "segment_ms": self.segment_ms,
                                "reconstruction": self.inverse is not None,
                                "layout": STORE_LAYOUT})
        layout.write_header(f, info, source=f"csi-cloud://{self.site}/{self.ap}",
                            source_format="csi-cloud-reconstruction" if self.inverse is not None
                            else "csi-cloud-segments")
        a = f.attrs
        a["store_layout"] = STORE_LAYOUT
        a["site"], a["ap"], a["model"] = self.site, self.ap, model.id
        a["segment_ms"] = np.int64(self.segment_ms)
        a["nominal_rate_hz"] = self.rate
        if self.inverse is not None:
            shape = (spec.antennas, len(spec.subcarriers))
            # One segment per chunk: a batch adds whole segments, so every chunk is written
            # (and compressed) once, never re-compressed half full at the next flush.
            layout.frames_dataset(f, "timestamp", (), "<f8")
            layout.frames_dataset(f, "amplitude", shape, "<f4",
                                  layout.chunk_rows(*shape, most=spec.segment_frames))
        g = f.create_group("segments")
        # One compound row per segment: one dataset to extend per batch, not seven.
        layout.frames_dataset(g, "meta", (), SEGMENT_DTYPE)
        g.create_dataset("codes", shape=(0,), maxshape=(None,), dtype=_CODES_DTYPE,
                         chunks=(layout.CHUNK_FRAMES,))
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
        layout.put_rows(self.ds["meta"], n, meta)
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
                layout.put_rows(self.ds["/timestamp"], self.frames, np.concatenate(ts))
                self.frames = layout.put_rows(self.ds["/amplitude"], self.frames,
                                              np.concatenate(amp))

    def add_label(self, label: layout.Label) -> None:
        self.pending_labels.append(label)

    def commit(self, *, force_fsync: bool = False) -> None:
        """Write what is queued, flush, then count it in ``committed`` (flushed again)."""
        if self.pending:
            self._write()
        if self.pending_labels:
            self.labels = layout.put_rows(self.ds["/labels"], self.labels,
                                          layout.label_rows(self.pending_labels))
            self.pending_labels = []
        now = time.monotonic()
        fsync = force_fsync or now - self.last_fsync >= self.fsync_s
        layout.commit(self.f, [(self.ds["/committed"], (self.frames, self.labels)),
                               (self.ds["committed"], (self.segments,))], fsync=fsync)
        if fsync:
            self.last_fsync = now
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


