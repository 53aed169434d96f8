"""Reading store files: their committed segment codes, and what each file holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from csi_edge import CSIError
from csi_edge import recording as layout
from csi_edge.bundle import SegmentCodes, decode_segment_codes

from ..model.compression import CloudModel

__all__ = ["RecordingFile", "StoredSegments", "decode_stored", "file_info", "read_segments",
           "store_counts", "unlabelled_ranges"]


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


def store_counts(f: h5py.File, path: Path) -> tuple[int, int, int]:
    """Committed (frames, labels, segments): like the recording layout's counts, a file
    without a commit record counts its dataset lengths."""
    frames, labels = layout.committed(f, path)
    if "segments/committed" in f:
        return frames, labels, int(f["segments/committed"][0])
    return frames, labels, int(f["segments/meta"].shape[0]) if "segments/meta" in f else 0


def read_segments(path: str | Path) -> StoredSegments:
    """The committed segments of a store file (works on a file still written or left by a
    killed writer)."""
    with layout.open_recording(path) as f:
        _, _, n = store_counts(f, Path(path))
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


def file_info(path: Path) -> RecordingFile:
    """What a file no longer written holds."""
    with layout.open_recording(path) as f:
        frames, labels, n = store_counts(f, path)
        start = end = None
        if n:
            ts = f["segments/meta"]["timestamp_ms"][:n]
            seg_ms = int(f.attrs.get("segment_ms", 0))
            start, end = float(ts.min()) / 1000, float(ts.max() + seg_ms) / 1000
    return RecordingFile(path, start, end, n, frames, labels, path.stat().st_size, False)


def unlabelled_ranges(paths: Sequence[Path], chunk_s: float, limit: int
                      ) -> list[tuple[Path, float, float]]:
    """Stretches of stored stream outside every labelled range, cut into pieces of
    ``chunk_s`` seconds: (file, start, end) in Unix s, the newest ``limit`` of them, in time
    order (files are read newest first, until they give ``limit``). A piece runs over
    consecutive segments (a gap of more than two segments ends it) and is kept when it
    covers at least half of ``chunk_s``. Files that cannot be read are left out: what is
    unlabelled is optional, what is labelled is read elsewhere."""
    if chunk_s <= 0 or limit < 1:
        raise ValueError(f"chunk_s must be > 0 and limit >= 1, got {chunk_s} and {limit}")
    out: list[tuple[Path, float, float]] = []
    # Newest files first (the store names and rotates them by time), and no older file once
    # ``limit`` pieces are found in newer ones: a long-lived store is not read whole.
    def modified(path: Path) -> float:
        try:
            return Path(path).stat().st_mtime
        except OSError:
            return 0.0

    for path in sorted(paths, key=modified, reverse=True):
        if len(out) >= limit:
            break
        try:
            with layout.open_recording(path) as f:
                seg_ms = int(f.attrs.get("segment_ms", 0))
            stored = read_segments(path)
            labels = layout.read_labels(path)
        except (CSIError, OSError, KeyError, ValueError):
            continue
        if seg_ms <= 0 or not len(stored):
            continue
        t = np.unique(np.asarray(stored.timestamp_ms, dtype=np.int64)[
            np.array([bool(c) for c in stored.codes])]) / 1000
        for label in labels:
            t = t[(t < label.start) | (t >= label.end)]
        if not len(t):
            continue
        seg_s = seg_ms / 1000
        # Runs of consecutive segments, each cut into pieces of chunk_s.
        breaks = np.flatnonzero(np.diff(t) > 2 * seg_s) + 1
        for run in np.split(t, breaks):
            start = float(run[0])
            while start <= run[-1]:
                inside = run[(run >= start) & (run < start + chunk_s)]
                if len(inside) and inside[-1] + seg_s - inside[0] >= chunk_s / 2:
                    out.append((Path(path), float(inside[0]), float(inside[-1]) + seg_s))
                start += chunk_s
    out.sort(key=lambda r: (r[1], str(r[0])))
    return out[-limit:]
