"""Training data: labelled recordings -> preprocessed segments -> context windows.

Segments are cut exactly as the edge cuts them (``csi_edge.preprocess.Preprocessor``), one
recording at a time, so training sees what the cloud will receive. A window is the last
``N`` segment slots of a recording up to some segment (csi_cloud.model.window); slots whose
segment is missing (a gap in the capture, a low-quality segment) are masked, never filled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from csi_edge import CSIError, read_recording
from csi_edge.band import stream_band
from csi_edge.frames import CSIFrames, DropCounter
from csi_edge.preprocess import InputSpec, Preprocessor

from ..datasets import Example
from .window import slot_rows

__all__ = ["NOMINAL_RATES", "SegmentData", "input_spec_for", "load_segments", "rows_by_slot",
           "segment_windows", "windows"]

# The model grid per source kind: near each device's measured packet rate.
NOMINAL_RATES = {"nexmon": 50.0, "intel5300": 30.0, "esp32": 50.0, "ntu-fi": 500.0,
                 "recording": 50.0}


def input_spec_for(examples: list[Example], segment_s: float = 1.0, probe: int = 12,
                   **options: object) -> InputSpec:
    """The input spec of a dataset: the band most of its first recordings occupy."""
    bands: Counter[tuple[int, ...]] = Counter()
    first = None
    described = {}
    for example in examples[:probe]:
        frames = read_recording(example.path)
        band = stream_band(frames.amplitude(), frames.info.subcarriers, frames.info.bandwidth_mhz,
                           frames.info.device)
        bands[band.subcarriers] += 1
        described[band.subcarriers] = band
        first = first or frames
    if first is None:
        raise ValueError("no example to derive an input spec from")
    band = described[bands.most_common(1)[0][0]]
    rate = NOMINAL_RATES.get(first.info.device, round(first.rate_hz))
    return InputSpec.for_stream(first, band, nominal_rate_hz=rate, segment_s=segment_s,
                                **{"normalisation": "log", **options})


@dataclass(slots=True)
class SegmentData:
    """Every segment of a set of recordings, grouped by recording (in index order)."""

    x: np.ndarray  # (M, L, A, S) float32, log1p amplitude
    recording: np.ndarray  # (M,) recording number
    slot: np.ndarray  # (M,) segment index within its recording
    start: np.ndarray  # (R,) first row of each recording in x
    count: np.ndarray  # (R,) rows of each recording
    slots: np.ndarray  # (R,) highest segment index + 1
    activity: np.ndarray  # (R,) label index
    identity: np.ndarray  # (R,) label index, -1 where unknown
    examples: list[Example]
    native_bytes_per_s: np.ndarray  # (R,) the raw CSI stream the AP would otherwise send
    dropped: DropCounter = field(default_factory=DropCounter)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it was left out
    # (M,) each segment's quality as the edge sends it (the share of its frames that were
    # measured, not filled in); None: every segment whole
    quality: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.examples)


def native_bytes_per_packet(frames: CSIFrames) -> int:
    """Bytes one packet of the native CSI stream carries.

    Nexmon: every reported subcarrier as int16 I/Q (256 x 4 bytes at 80 MHz); Intel 5300: the
    bfee record (20-byte header + 8-bit I/Q per antenna and group + 3 framing bytes); other
    sources: int16 I/Q of every reported subcarrier and antenna.
    """
    subcarriers = len(frames.info.subcarriers)
    if frames.info.device == "intel5300":
        return 3 + 20 + (30 * (frames.antennas * 16 + 3) + 7) // 8
    return 4 * subcarriers * frames.antennas


def load_segments(examples: list[Example], spec: InputSpec, activities: list[str],
                  identities: list[str]) -> SegmentData:
    """Preprocess every recording; recordings that cannot be read are skipped and reported."""
    xs: list[np.ndarray] = []
    qualities: list[np.ndarray] = []
    rec: list[np.ndarray] = []
    slot: list[np.ndarray] = []
    kept: list[Example] = []
    native: list[float] = []
    dropped = DropCounter()
    skipped: dict[str, str] = {}
    act_index = {a: i for i, a in enumerate(activities)}
    id_index = {a: i for i, a in enumerate(identities)}
    for example in examples:
        try:
            frames = read_recording(example.path)
            if example.start is not None or example.end is not None:
                # A labelled time range of a longer recording (the recording's clock).
                t = frames.timestamp
                lo = -np.inf if example.start is None else example.start
                hi = np.inf if example.end is None else example.end
                inside = np.flatnonzero((t >= lo) & (t < hi))
                if inside.size == 0:
                    skipped[f"{example.path}@{lo:.3f}"] = "no frame in the labelled range"
                    continue
                frames = frames.take(inside)
            batch = Preprocessor(spec).process(frames)
        except CSIError as exc:
            skipped[str(example.path)] = str(exc)
            continue
        dropped.update(batch.dropped)
        good = batch.ok
        dropped["low_quality_segment"] += int((~good).sum())
        if not good.any():
            skipped[str(example.path)] = "no segment of sufficient quality"
            continue
        native.append(native_bytes_per_packet(frames) * frames.rate_hz)
        xs.append(batch.data[good])
        qualities.append(batch.quality[good])
        slot.append(batch.index[good])
        rec.append(np.full(int(good.sum()), len(kept)))
        kept.append(example)
    if not kept:
        raise ValueError(f"none of {len(examples)} recordings gave a segment ({skipped})")
    counts = np.array([len(s) for s in slot])
    return SegmentData(
        x=np.concatenate(xs).astype(np.float32),
        recording=np.concatenate(rec),
        slot=np.concatenate(slot),
        start=np.concatenate([[0], np.cumsum(counts)[:-1]]),
        count=counts,
        slots=np.array([int(s.max()) + 1 for s in slot]),
        activity=np.array([act_index[e.activity] for e in kept]),
        identity=np.array([id_index.get(e.identity, -1) if e.identity else -1 for e in kept]),
        examples=kept,
        native_bytes_per_s=np.array(native),
        dropped=dropped,
        skipped=skipped,
        quality=np.concatenate(qualities).astype(np.float64),
    )


def rows_by_slot(data: Any, recording: int, rows: np.ndarray | None = None) -> dict[int, int]:
    """One recording's ``slot -> row`` map (of its ``rows`` only, default all of them)."""
    if rows is None:
        start = int(data.start[recording])
        rows = np.arange(start, start + int(data.count[recording]))
    return dict(zip(data.slot[rows].tolist(), np.asarray(rows).tolist(), strict=True))


def windows(data: SegmentData, recordings: np.ndarray, context: int,
            rng: np.random.Generator | None = None, per_recording: int = 1) -> tuple[
                np.ndarray, np.ndarray]:
    """Rows of ``data.x`` for windows of ``context`` slots (-1 = missing), and their recording.

    With ``rng`` None each recording gives one window ending at its last segment (what the
    service predicts once the recording has streamed); otherwise ``per_recording`` windows end
    at random segments, so the classifier also learns from partial contexts.
    """
    rows: list[np.ndarray] = []
    owners: list[int] = []
    for r in recordings.tolist():
        lookup = rows_by_slot(data, r)
        ends = (
            [int(data.slots[r]) - 1] if rng is None
            else rng.integers(min(context // 2, int(data.slots[r]) - 1), int(data.slots[r]),
                              per_recording).tolist()
        )
        for end in ends:
            rows.append(slot_rows(lookup, end, context))
            owners.append(r)
    return np.stack(rows), np.array(owners)


def segment_windows(data: Any, recordings: np.ndarray, n: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every segment's context window (rows, -1 missing) (W, n), owner recording (W,), and
    whether it is the recording's last segment (W,): one prediction per segment, as the
    service makes them. ``data``: anything laid out like :class:`SegmentData`."""
    windows, owners, last = [], [], []
    for r in np.asarray(recordings).tolist():
        start, count = int(data.start[r]), int(data.count[r])
        lookup = rows_by_slot(data, r)
        for row in range(start, start + count):
            windows.append(slot_rows(lookup, int(data.slot[row]), n))
            owners.append(r)
            last.append(row == start + count - 1)
    return np.stack(windows), np.array(owners), np.array(last)
