"""Preprocessing shared by training and the edge: CSIFrames -> normalised fixed-length segments.

Steps, in order (all numpy, vectorised over frames):
1. ``select``: keep the input spec's subcarriers (the occupied band), in ascending order.
2. ``repair``: drop frames with non-increasing timestamps, all-zero CSI, or mostly non-finite
   values; fill a few non-finite bins of an otherwise good frame from their neighbours.
3. features: amplitude ``|H|``; optionally sanitised phase (unwrapped across subcarriers, linear
   trend removed, which cancels timing and carrier offsets).
4. ``Segmenter``: linear resampling onto a uniform grid at the nominal rate starting at the
   stream's first frame, cut into consecutive non-overlapping segments of ``segment_frames``.
   A grid point is *real* when the two frames around it are at most ``max_interp_gap_s``
   apart; each segment's ``quality`` is its fraction of real points. Segments with no real
   point are not emitted (the index skips, so a consumer sees the gap); segments below
   ``min_quality`` are emitted but marked ``ok=False``.
5. ``Normaliser``: ``none``, ``log`` (log1p), ``segment`` (log1p minus each subcarrier's mean
   over the segment: removes the static channel and gain), ``stream`` (log1p standardised with
   running per-subcarrier statistics, causal).
The streaming classes keep state between calls, and the batch entry point feeds a whole
recording through the same classes, so offline and live results are identical.

Shapes: frames ``(N, A, S)``; a segment ``(L, A, S)``; a batch ``(M, L, A, S)``; float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ._errors import SpecMismatchError
from .band import Band
from .frames import CSIFrames, DropCounter, RadioInfo

__all__ = [
    "InputSpec",
    "Normaliser",
    "Preprocessor",
    "Segment",
    "SegmentBatch",
    "Segmenter",
    "measured_rate_hz",
    "repair",
    "sanitised_phase",
    "select",
]

NormalisationMode = Literal["none", "log", "segment", "stream"]


class InputSpec(BaseModel):
    """What a stream must look like to feed a model: part of every model bundle."""

    model_config = ConfigDict(frozen=True)

    source_kind: str = Field(description="reader kind: nexmon, intel5300, esp32, ntu-fi, recording")
    subcarriers: tuple[int, ...] = Field(description="receiver subcarrier numbers kept, ascending")
    antennas: int = Field(ge=1)
    band: str = Field(default="", description="the occupied band these subcarriers form")
    nominal_rate_hz: float = Field(gt=0, description="uniform grid the stream is resampled to")
    segment_frames: int = Field(ge=2, description="grid points per segment")
    features: Literal["amplitude", "amplitude+phase"] = "amplitude"
    normalisation: NormalisationMode = "segment"
    max_interp_gap_s: float = Field(default=0.1, gt=0)
    min_quality: float = Field(default=0.5, ge=0, le=1)
    stream_tau_s: float = Field(default=30.0, gt=0)

    @property
    def segment_s(self) -> float:
        return self.segment_frames / self.nominal_rate_hz

    @property
    def channels(self) -> int:
        """Feature planes per antenna: 1 (amplitude) or 2 (amplitude and phase)."""
        return 2 if self.features == "amplitude+phase" else 1

    @classmethod
    def for_stream(
        cls,
        frames: CSIFrames,
        band: Band,
        *,
        nominal_rate_hz: float | None = None,
        segment_s: float = 1.0,
        **options: object,
    ) -> InputSpec:
        """A spec that keeps ``band`` of this stream, at its measured rate unless given."""
        rate = nominal_rate_hz or round(measured_rate_hz(frames.timestamp))
        return cls(
            source_kind=frames.info.device,
            subcarriers=band.subcarriers,
            antennas=frames.antennas,
            band=band.describe(),
            nominal_rate_hz=rate,
            segment_frames=max(2, round(segment_s * rate)),
            **options,  # type: ignore[arg-type]
        )

    def check(self, info: RadioInfo, antennas: int) -> np.ndarray:
        """Column positions of the spec's subcarriers in a stream, or why it cannot fit."""
        if info.device != self.source_kind:
            raise SpecMismatchError(
                f"stream from {info.device!r} cannot feed a spec for {self.source_kind!r}"
            )
        if antennas != self.antennas:
            raise SpecMismatchError(
                f"stream has {antennas} antennas, the spec needs {self.antennas}"
            )
        column = {s: i for i, s in enumerate(info.subcarriers)}
        missing = [s for s in self.subcarriers if s not in column]
        if missing:
            raise SpecMismatchError(
                f"stream ({len(info.subcarriers)} subcarriers, {info.bandwidth_mhz} MHz) lacks "
                f"{len(missing)} of the spec's {len(self.subcarriers)} subcarriers "
                f"(band {self.band!r}), e.g. {missing[:5]}"
            )
        return np.array([column[s] for s in self.subcarriers], dtype=np.int64)


def measured_rate_hz(timestamp: np.ndarray) -> float:
    """Packet rate from the median interval (robust to gaps), 0 when undefined."""
    if timestamp.size < 2:
        return 0.0
    step = float(np.median(np.diff(timestamp)))
    return 1.0 / step if step > 0 else 0.0


def select(frames: CSIFrames, spec: InputSpec) -> CSIFrames:
    """Keep the spec's subcarriers; raise SpecMismatchError naming both sides if impossible."""
    return frames.select_subcarriers(spec.check(frames.info, frames.antennas))


def repair(
    timestamp: np.ndarray, csi: np.ndarray, dropped: DropCounter, max_bad_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """Drop unusable frames (counted by reason) and patch a few bad bins of good ones."""
    n = timestamp.size
    keep = np.ones(n, dtype=bool)
    # Timestamps must increase: a frame not later than the latest kept one is dropped.
    running_max = np.maximum.accumulate(timestamp) if n else timestamp
    not_later = np.zeros(n, dtype=bool)
    not_later[1:] = timestamp[1:] <= running_max[:-1]
    dropped["timestamp_not_increasing"] += int(not_later.sum())
    keep &= ~not_later
    flat = csi.reshape(n, -1)
    bad = ~np.isfinite(flat)
    bad_fraction = bad.mean(axis=1) if flat.shape[1] else np.zeros(n)
    mostly_bad = keep & (bad_fraction > max_bad_fraction)
    dropped["nonfinite_frame"] += int(mostly_bad.sum())
    keep &= ~mostly_bad
    zero = keep & ~np.any(np.where(bad, 1, flat) != 0, axis=1)
    dropped["zero_frame"] += int(zero.sum())
    keep &= ~zero
    timestamp, csi = timestamp[keep], csi[keep]
    bad = bad[keep]
    if bad.any():
        csi = csi.copy()
        flat = csi.reshape(csi.shape[0], -1)
        rows = np.flatnonzero(bad.any(axis=1))
        dropped["patched_frames"] += int(rows.size)
        positions = np.arange(flat.shape[1])
        for r in rows:  # rare: only frames with a few bad bins
            good = ~bad[r]
            flat[r, ~good] = np.interp(positions[~good], positions[good], flat[r, good].real) + (
                1j * np.interp(positions[~good], positions[good], flat[r, good].imag)
                if np.iscomplexobj(flat) else 0
            )
    return timestamp, csi


def sanitised_phase(csi: np.ndarray, subcarriers: tuple[int, ...]) -> np.ndarray:
    """Phase unwrapped across subcarriers with the per-frame linear trend removed."""
    phase = np.unwrap(np.angle(csi), axis=-1)
    k = np.asarray(subcarriers, dtype=np.float64)
    kc = k - k.mean()
    slope = (phase * kc).sum(axis=-1, keepdims=True) / (kc**2).sum()
    offset = phase.mean(axis=-1, keepdims=True)
    cleaned: np.ndarray = (phase - slope * kc - offset).astype(np.float32)
    return cleaned


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment of the uniform grid. ``data`` is (L, A, S) or (L, 2A, S) with phase."""

    index: int  # segment number since the stream's first frame
    start_time: float  # time of its first grid point
    data: np.ndarray
    quality: float  # fraction of grid points backed by real frames
    ok: bool  # quality >= the spec's min_quality


@dataclass(slots=True)
class SegmentBatch:
    """Segments of one recording, stacked: ``data`` is (M, L, A', S)."""

    data: np.ndarray
    index: np.ndarray
    start_time: np.ndarray
    quality: np.ndarray
    ok: np.ndarray
    dropped: DropCounter = field(default_factory=DropCounter)

    def __len__(self) -> int:
        return int(self.data.shape[0])


class Segmenter:
    """Streaming uniform resampler + segmenter. Feed frames in order with :meth:`push`."""

    def __init__(self, rate_hz: float, segment_frames: int, max_interp_gap_s: float,
                 min_quality: float) -> None:
        self.rate_hz = rate_hz
        self.segment_frames = segment_frames
        self.max_interp_gap_s = max_interp_gap_s
        self.min_quality = min_quality
        self.dropped = DropCounter()
        self._t0: float | None = None
        self._next_k = 0  # next grid point to produce
        self._last_t: float | None = None
        self._last_x: np.ndarray | None = None
        self._pending: list[np.ndarray] = []
        self._pending_real: list[np.ndarray] = []

    def push(self, timestamp: np.ndarray, x: np.ndarray) -> list[Segment]:
        """Add frames (``timestamp`` (n,), ``x`` (n, ...)); return the segments they complete."""
        if timestamp.size == 0:
            return []
        if self._t0 is None:
            self._t0 = float(timestamp[0])
        if self._last_t is not None and self._last_x is not None:
            timestamp = np.concatenate([[self._last_t], timestamp])
            x = np.concatenate([self._last_x[None], x])
        self._last_t, self._last_x = float(timestamp[-1]), x[-1].copy()
        last_k = int(np.floor((timestamp[-1] - self._t0) * self.rate_hz + 1e-9))
        if last_k < self._next_k:
            return []
        k = np.arange(self._next_k, last_k + 1)
        self._next_k = last_k + 1
        grid = self._t0 + k / self.rate_hz
        right = np.clip(np.searchsorted(timestamp, grid, side="left"), 1, timestamp.size - 1)
        left = right - 1
        exact = timestamp[right] == grid  # a frame exactly on the grid point
        left = np.where(exact, right, left)
        t_left, t_right = timestamp[left], timestamp[right]
        span = np.where(exact, 0.0, t_right - t_left)
        w = np.where(span > 0, (grid - t_left) / np.where(span > 0, span, 1), 0.0)
        w = w.reshape(-1, *([1] * (x.ndim - 1))).astype(np.float32)
        values = x[left] * (1 - w) + x[right] * w
        real = span <= self.max_interp_gap_s + 1e-9
        self._pending.append(values.astype(np.float32, copy=False))
        self._pending_real.append(real)
        return self._emit(int(k[-1]) + 1)

    def _emit(self, produced: int) -> list[Segment]:
        values = np.concatenate(self._pending)
        real = np.concatenate(self._pending_real)
        first_k = produced - values.shape[0]
        out: list[Segment] = []
        pos = 0
        # Grid point first_k belongs to segment first_k // L; the buffer starts on a boundary.
        while values.shape[0] - pos >= self.segment_frames:
            seg_real = real[pos : pos + self.segment_frames]
            index = (first_k + pos) // self.segment_frames
            quality = float(seg_real.mean())
            if quality == 0:
                self.dropped["empty_segment"] += 1
            else:
                out.append(
                    Segment(
                        index=index,
                        start_time=self._t0 + index * self.segment_frames / self.rate_hz,
                        data=values[pos : pos + self.segment_frames],
                        quality=quality,
                        ok=quality >= self.min_quality,
                    )
                )
            pos += self.segment_frames
        self._pending = [values[pos:]]
        self._pending_real = [real[pos:]]
        return out

    def pending_frames(self) -> int:
        """Grid points waiting for their segment to fill (dropped at the end of a recording)."""
        return int(sum(p.shape[0] for p in self._pending))


class Normaliser:
    """Per-segment normalisation; ``stream`` mode keeps causal running statistics."""

    def __init__(self, mode: NormalisationMode, segment_s: float, tau_s: float = 30.0) -> None:
        self.mode = mode
        self._alpha = min(1.0, segment_s / tau_s)
        self._mean: np.ndarray | None = None
        self._var: np.ndarray | None = None

    def __call__(self, data: np.ndarray) -> np.ndarray:
        """Normalise one segment ``(L, ...)``."""
        if self.mode == "none":
            return data
        z: np.ndarray = np.log1p(np.maximum(data, 0))
        if self.mode == "log":
            return z
        if self.mode == "segment":
            centred: np.ndarray = (z - z.mean(axis=0, keepdims=True)).astype(np.float32)
            return centred
        mean, var = z.mean(axis=0), z.var(axis=0)
        if self._mean is None or self._var is None:
            self._mean, self._var = mean, var
        out = (z - self._mean) / np.sqrt(self._var + 1e-3)
        a = self._alpha
        self._var = (1 - a) * self._var + a * (var + (mean - self._mean) ** 2)
        self._mean = (1 - a) * self._mean + a * mean
        normalised: np.ndarray = out.astype(np.float32)
        return normalised


class Preprocessor:
    """The whole chain for one stream. ``push`` for live frames, ``process`` for a recording."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.dropped = DropCounter()
        self._columns: np.ndarray | None = None
        self._layout: tuple[object, ...] | None = None
        self._segmenter = Segmenter(
            spec.nominal_rate_hz, spec.segment_frames, spec.max_interp_gap_s, spec.min_quality
        )
        self._normaliser = Normaliser(spec.normalisation, spec.segment_s, spec.stream_tau_s)
        self._last_t = -np.inf

    def push(self, frames: CSIFrames) -> list[Segment]:
        """Feed frames of the stream in order; return the segments completed so far."""
        # A stream may change layout (another file of a folder); check each new one.
        layout = (frames.info.device, frames.info.subcarriers, frames.antennas)
        if layout != self._layout:
            self._columns = self.spec.check(frames.info, frames.antennas)
            self._layout = layout
        csi = frames.csi[:, :, self._columns]
        t = frames.timestamp
        # Frames not later than the last one already accepted are out of order.
        late = t <= self._last_t
        if late.any():
            self.dropped["timestamp_not_increasing"] += int(late.sum())
            t, csi = t[~late], csi[~late]
        t, csi = repair(t, csi, self.dropped)
        if t.size == 0:
            return []
        self._last_t = float(t[-1])
        features = np.abs(csi).astype(np.float32) if np.iscomplexobj(csi) else csi
        if self.spec.features == "amplitude+phase":
            if not np.iscomplexobj(csi):
                raise SpecMismatchError(
                    f"the spec needs phase but the {frames.format} stream has amplitude only"
                )
            phase = sanitised_phase(csi, self.spec.subcarriers)
            features = np.concatenate([features, phase], axis=1)
        segments = self._segmenter.push(t, features)
        self.dropped.update(self._segmenter.dropped)
        self._segmenter.dropped.clear()
        return [
            Segment(s.index, s.start_time, self._normaliser(s.data), s.quality, s.ok)
            for s in segments
        ]

    def process(self, frames: CSIFrames) -> SegmentBatch:
        """A whole recording through the same streaming chain; the unfinished tail is dropped."""
        segments = self.push(frames)
        dropped = DropCounter(frames.dropped)
        dropped.update(self.dropped)
        tail = self._segmenter.pending_frames()
        if tail:
            dropped["tail_grid_points"] += tail
        shape = (0, self.spec.segment_frames, self.spec.antennas * self.spec.channels,
                 len(self.spec.subcarriers))
        return SegmentBatch(
            data=np.stack([s.data for s in segments]) if segments else np.zeros(shape, np.float32),
            index=np.array([s.index for s in segments], dtype=np.int64),
            start_time=np.array([s.start_time for s in segments], dtype=np.float64),
            quality=np.array([s.quality for s in segments], dtype=np.float32),
            ok=np.array([s.ok for s in segments], dtype=bool),
            dropped=dropped,
        )
