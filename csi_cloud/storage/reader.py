"""Reading store files: their committed segment codes, and what each file holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from csi_edge import recording as layout
from csi_edge.bundle import SegmentCodes, decode_segment_codes

from ..model.compression import CloudModel

__all__ = ["RecordingFile", "StoredSegments", "decode_stored", "file_info", "read_segments",
           "store_counts"]


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
