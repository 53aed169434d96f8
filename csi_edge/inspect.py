"""One-look summaries of recordings: what ``csi inspect`` prints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ._errors import CSIError, NoRecordingsError
from .band import frames_band
from .frames import CSIFrames
from .preprocess import measured_rate_hz
from .readers import SUFFIXES, read_recording

__all__ = ["find_recordings", "summarize", "summarize_frames"]

GAP_THRESHOLD_S = 0.5


def summarize_frames(frames: CSIFrames) -> dict[str, object]:
    """JSON-ready facts about one stream. ``subcarriers`` counts the usable (occupied) ones."""
    band = frames_band(frames)
    steps = np.diff(frames.timestamp)
    return {
        "path": frames.source,
        "format": frames.format,
        "device": frames.info.device,
        "chip": frames.info.chip,
        "frames": len(frames),
        "duration_s": round(frames.duration_s, 3),
        "rate_hz": round(measured_rate_hz(frames.timestamp), 2),
        "mean_rate_hz": round(frames.rate_hz, 2),
        "antennas": frames.antennas,
        "subcarriers": len(band.subcarriers),
        "pilots_included": len(band.pilots) > 0,
        "data_subcarriers": band.data_subcarriers,
        "subcarriers_reported": len(frames.info.subcarriers),
        "band": band.as_dict(),
        "channel": frames.info.channel,
        "occupied_channel": _occupied_channel(frames.info.channel, band.centre),
        "bandwidth_mhz": frames.info.bandwidth_mhz,
        "transmitter": frames.info.transmitter,
        "rssi_is_real": frames.info.rssi_is_real,
        "max_gap_s": round(frames.max_gap_s, 3),
        "gaps_over_0_5_s": int((steps > GAP_THRESHOLD_S).sum()),
        "dropped": frames.dropped.as_dict(),
    }


def _occupied_channel(channel: int | None, centre: int) -> int | None:
    """802.11 channel number of the occupied band (channels are 5 MHz, bins 312.5 kHz)."""
    if channel is None or centre % 16:
        return channel
    return channel + centre // 16


def summarize(path: str | Path) -> dict[str, object]:
    """Read one recording and summarise it (raises CSIError subclasses on bad input)."""
    return summarize_frames(read_recording(path))


def find_recordings(paths: list[Path]) -> Iterator[Path]:
    """Files given, plus every recognised recording below the folders given."""
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
            if not found:
                raise NoRecordingsError(
                    path, f"no recording found (looked for {', '.join(sorted(SUFFIXES))})"
                )
            yield from found
        else:
            yield path


def summarize_many(paths: list[Path]) -> list[dict[str, object]]:
    """Summaries of many files; a file that cannot be read gets an ``error`` entry instead."""
    out: list[dict[str, object]] = []
    for path in find_recordings(paths):
        try:
            out.append(summarize(path))
        except CSIError as exc:
            out.append({"path": str(path), "error": str(exc)})
    return out
