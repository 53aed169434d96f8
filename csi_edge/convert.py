"""Conversion: any supported recording (pcap, Intel 5300 ``.dat``, ESP32, ``.npz`` ...) read
through :mod:`csi_edge.readers` and written as a project HDF5 recording.

It sits above both the readers and the recording format: the reader dispatcher reads project
recordings through :mod:`csi_edge.recording`, so the format module cannot import the readers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .readers import read_recording
from .recording import Label, RecordingWriter

__all__ = ["convert"]


def _as_label(item: Label | Sequence[Any]) -> Label:
    if isinstance(item, Label):
        return item
    return Label(*item)


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    keep_phase: bool = False,
    labels: Iterable[Label | Sequence[Any]] = (),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Read any supported recording and write it as a project recording.

    ``labels`` are :class:`Label` or ``(start, end, activity, identity)`` tuples.
    Returns ``{"path", "frames", "labels", "phase", "dropped"}``.
    """
    frames = read_recording(src)
    with RecordingWriter(
        dst,
        frames.info,
        source=str(src),
        source_format=frames.format,
        keep_phase=keep_phase,
        dropped=frames.dropped,
        overwrite=overwrite,
    ) as writer:
        writer.append(frames)
        count = 0
        for item in labels:
            lab = _as_label(item)
            writer.add_label(lab.start, lab.end, lab.activity, lab.identity)
            count += 1
    return {
        "path": str(dst),
        "frames": len(frames),
        "labels": count,
        "phase": keep_phase and frames.is_complex,
        "dropped": frames.dropped.as_dict(),
    }
