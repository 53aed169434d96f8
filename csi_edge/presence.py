"""Motion and presence without a model: a per-segment motion score computed at the edge from the
raw CSI, calibrated per access point from its own quiet periods, and the presence decision
built on it.

The approach follows ESPectre's (github.com/francescopace/espectre: a "turbulence" signal from
stable subcarriers, its moving variance, an adaptive threshold from a quiet baseline), written
anew for any receiver (Nexmon, Intel 5300, ESP32) and for the segment stream of this project.

**The statistic** (:class:`MotionMeter`, numpy only, per stream), for each segment:

1. Amplitude of the occupied band's subcarriers (:func:`csi_edge.band.frames_band`: the
   hardware's invalid subcarriers, such as the ESP32's first word, are left out). A zero or
   non-finite value is a missing value, not a measurement (ESP32 buffers zero a subcarrier
   now and then).
2. Log amplitude minus each frame's median over the subcarriers (per antenna): the gain of
   the frame drops out, so automatic gain control (the original ESP32 cannot lock its gain;
   Nexmon and Intel 5300 never do) does not read as motion. This is the role ESPectre gives
   its coefficient of variation.
3. A causal running median over ``despike_frames`` (5) frames: single-frame glitches (Nexmon
   captures hold frames whose amplitudes jump for one packet, often every few tenths of a
   second) are removed; body movement spans many frames and stays.
4. A causal moving average over ``smooth_s`` (0.1 s), minus the signal's own trailing mean
   over ``detrend_s`` (0.5 s): a band-pass of about 0.3 to 5 Hz. Measurement noise above a
   few hertz goes, and so do slow drifts (temperature, a gain that settles), which a plain
   variance counts as motion; body movement, whose energy against a quiet room is highest
   between 0.5 and 3 Hz on the Fition links, stays. Unlike a difference over a fixed lag,
   this filter has no blind frequencies in that band.
5. Per subcarrier, the standard deviation of that signal over the trailing ``window_s`` (4 s)
   ending at the segment's end: the moving variance of the signal. The window never reaches
   back across a gap in the stream longer than ``max_gap_s`` (1 s): the channel before it is
   another one.
   4 s rather than 2: a segment scores motion of its last four seconds, so a still second
   right after a movement still counts (the price: ``motion`` ends up to 4 s after the
   movement does); onset is as fast (ESP32: the first moving segment is flagged).
6. The median over the subcarriers, as log2: the **motion statistic**. The median is the
   stability selection: subcarriers that flicker on their own (a null, a spur, an invalid
   value) sit in the upper tail and do not move it. Keeping only the most stable subcarriers
   before the median, as ESPectre's NBVI does (``stable_fraction``), was measured and left
   off by default: it cost Fition ROC AUC and gained nothing on ESP32 (the ablations of
   ``python bench/presence.py``, docs/presence.md).

**Calibration** (:class:`MotionCalibration`), per AP, from what the stream has shown so far:
the quiet reference is the ``reference_quantile`` (25 %) of the statistics of the last
``horizon_segments`` segments (900: 15 min at 1 s segments), once ``warmup_segments`` (5) were
seen. A room that is quiet at least a quarter of the time is measured against its quiet
state, whatever the hardware, gain or noise floor; no label, no training.

**Calibration on an empty room** (:meth:`MotionCalibration.measure_empty`): where a room is
rarely quiet (an office, a shop, a room someone is always moving in) the quantile above lands
on movement and presence reads empty while people move. An operator who knows the room is
empty measures it: after a wait (the statistics that still look back at the time before,
and the operator leaving), the next ``segments`` statistics are the quiet state, and their
``reference_quantile`` becomes a **pinned** reference, kept until measured again or released
(:meth:`~MotionCalibration.release`, back to the automatic one), and dropped on another
stream layout. The edge keeps it in its spool across restarts (``ctl`` action
``calibrate_presence``; docs/presence.md).

**The motion score** of a segment is ``statistic - reference`` (log2 of the ratio of the
segment's variability to the quiet one): ~0 in a quiet room, 1 = twice the quiet variability.
It travels on the wire as one byte (csi_edge.codec); ``None`` while calibrating.

**The decision** (:class:`PresenceTracker`), where the scores arrive (the cloud, the bench):
``motion`` when the score reaches ``threshold / sensitivity`` (1.5, i.e. 2.8 times the quiet
variability, at sensitivity 1); ``presence`` (occupied) from the first motion segment until
``hold_s`` (30 s) pass without one.

**A threshold fitted to the room** (:func:`fit_motion_threshold`): where walking moves the
channel little (a link the person crosses at its edge), the default threshold flags few of
the moving seconds even against a measured empty room. Given the scores of seconds labelled
still and moving in that room, the AP gets the lowest threshold that flags no more of the
still seconds than asked for (none by default).
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .band import frames_band
from .codec import MOTION_STEPS
from .frames import CSIFrames
from .preprocess import InputSpec

__all__ = [
    "EMPTY_ROOM_DELAY_S",
    "EMPTY_ROOM_S",
    "MOTION_THRESHOLD_RANGE",
    "MotionCalibration",
    "MotionConfig",
    "MotionMeter",
    "MotionThresholdFit",
    "PresenceConfig",
    "PresenceTracker",
    "ThresholdFitError",
    "fit_motion_threshold",
    "presence_spec",
]

PRESENCE_SEGMENT_S = 1.0  # segment length without a bundle (the wire's NO_MODEL_SEGMENT_MS)
# An empty-room measurement: long enough to hold a quiet quarter, short of the 15 min horizon;
# and the wait before it (the operator leaving the room).
EMPTY_ROOM_S = (5.0, 600.0)
EMPTY_ROOM_DELAY_S = (0.0, 120.0)
# A motion threshold of an AP (log2 ratio to the quiet reference): from 1.19 to 256 times the
# quiet variability. Below the range the noise of a quiet room itself is motion.
MOTION_THRESHOLD_RANGE = (0.25, 8.0)
# Labelled seconds a fit needs of each kind (still and moving).
MIN_FIT_SECONDS = 10
# The thresholds a fit tries: the wire's steps of the score.
_FIT_STEP = 1 / MOTION_STEPS


_MAX_KEEP_S = 60.0  # frames kept at most, scored or not


def presence_spec(frames: CSIFrames) -> InputSpec:
    """The segmenting of a stream without a bundle: 1 s segments of its occupied band at its
    measured rate (a bundle's grid and quality rules; the segment values are not used)."""
    return InputSpec.for_stream(frames, frames_band(frames), segment_s=PRESENCE_SEGMENT_S,
                                normalisation="none")


@dataclass(frozen=True, slots=True)
class MotionConfig:
    """Parameters of the motion statistic and its calibration (the module docstring)."""

    despike_frames: int = 5
    smooth_s: float = 0.1
    detrend_s: float = 0.5
    window_s: float = 4.0
    reference_quantile: float = 0.25
    horizon_segments: int = 900
    warmup_segments: int = 5
    min_frames: int = 5  # a segment with fewer frames of its own gets no score
    max_gap_s: float = 1.0  # the trailing window never reaches back across a longer gap
    # Below 1: only this fraction of the subcarriers, the most stable in quiet periods (the
    # lowest ``reference_quantile`` of their own spread), enter the median (NBVI-like).
    stable_fraction: float = 1.0

    @property
    def lookback_s(self) -> float:
        """How far back before a segment's end its statistic reads frames (the window, the
        detrending and the smoothing before it)."""
        return self.window_s + self.detrend_s + self.smooth_s

    def __post_init__(self) -> None:
        for name in ("smooth_s", "detrend_s", "window_s", "max_gap_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"motion {name} {value!r} is not a finite number >= 0")
        if not self.window_s > 0:
            raise ValueError(f"motion window_s {self.window_s!r} must be > 0")
        if not 0 < self.reference_quantile < 1:
            raise ValueError(f"motion reference_quantile {self.reference_quantile!r} is not "
                             "in (0, 1)")
        if not 1 <= self.warmup_segments <= self.horizon_segments:
            raise ValueError(f"motion warmup_segments {self.warmup_segments!r} is not in "
                             f"[1, horizon_segments = {self.horizon_segments}]")
        if self.despike_frames < 1:
            raise ValueError(f"motion despike_frames {self.despike_frames!r} must be >= 1")
        if self.min_frames < 2:
            raise ValueError(f"motion min_frames {self.min_frames!r} must be >= 2")
        if not 0 < self.stable_fraction <= 1:
            raise ValueError(f"motion stable_fraction {self.stable_fraction!r} is not in (0, 1]")


class MotionCalibration:
    """The quiet reference of one AP: a low quantile of its recent motion statistics
    (``mode`` "auto"), or one measured on the empty room and pinned ("pinned"; "measuring"
    while its statistics are being collected, the previous reference meanwhile).

    A pinned reference belongs to the stream layout it was measured on (``layout``, set by
    the meter): on another layout (other hardware, band or antennas) it is released."""

    def __init__(self, config: MotionConfig | None = None) -> None:
        self.config = config or MotionConfig()
        self.history: deque[float] = deque(maxlen=self.config.horizon_segments)
        self._reference: float | None = None
        self.pinned: float | None = None  # the reference measured on the empty room
        self.pinned_layout: int | None = None  # the layout it was measured on (None: unknown)
        self.layout: int | None = None  # the stream layout now (MotionMeter.push)
        self.released_because: str | None = None  # why a pin was last dropped, unasked
        self._empty: list[float] = []  # statistics of the measurement under way
        self._empty_wanted = 0  # statistics the measurement still needs (0: none under way)
        self._empty_skip = 0  # statistics to pass over before it starts

    @property
    def mode(self) -> str:
        return "measuring" if self._empty_wanted else "pinned" if self.pinned is not None \
            else "auto"

    @property
    def measuring_left(self) -> int:
        """Segments until the measurement under way is complete (0: none under way)."""
        return self._empty_skip + self._empty_wanted - len(self._empty) if self._empty_wanted \
            else 0

    @property
    def calibrated(self) -> bool:
        return self.pinned is not None or len(self.history) >= self.config.warmup_segments

    @property
    def reference(self) -> float | None:
        """The quiet reference (log2 of a statistic), None while warming up."""
        if self.pinned is not None:
            return self.pinned
        return self._reference if self.calibrated else None

    def measure_empty(self, segments: int, skip: int = 0) -> None:
        """Pass over the next ``skip`` statistics (they look back at the time before; the
        operator leaving), take the ``segments`` after them as the empty room's and pin the
        reference to their ``reference_quantile``. The current reference serves meanwhile."""
        for name, value, low in (("segments", segments, 1), ("skip", skip, 0)):
            if isinstance(value, bool) or not (isinstance(value, int)
                                               and low <= value <= self.config.horizon_segments):
                raise ValueError(f"empty-room measurement {name} {value!r} is not in "
                                 f"[{low}, {self.config.horizon_segments}]")
        self._empty, self._empty_wanted, self._empty_skip = [], segments, skip

    def cancel_measurement(self) -> None:
        """Drop a measurement under way; the reference stays what it was."""
        self._empty, self._empty_wanted, self._empty_skip = [], 0, 0

    def pin(self, reference: float, layout: int | None = None) -> None:
        """Use ``reference`` (one measured earlier on ``layout``, kept across a restart)."""
        if not math.isfinite(reference):
            raise ValueError(f"pinned motion reference {reference!r} is not a finite number")
        self.pinned, self.pinned_layout = float(reference), layout
        self.check_layout()

    def release(self) -> None:
        """Back to the automatic reference (a measurement under way is dropped)."""
        self.pinned = self.pinned_layout = None
        self.cancel_measurement()

    def check_layout(self) -> None:
        """Release a pin measured on another layout than the stream's now."""
        if (self.pinned is not None and None not in (self.pinned_layout, self.layout)
                and self.pinned_layout != self.layout):
            self.release()
            self.released_because = ("the stream's layout (hardware, band or antennas) is not "
                                     "the one the empty room was measured on")

    def update(self, statistic: float) -> float | None:
        """Add one segment's statistic; its score against the reference (None while warming
        up). A non-finite statistic is not added and scores None."""
        if not math.isfinite(statistic):
            return None
        self.history.append(statistic)
        if self._empty_wanted:
            if self._empty_skip:
                self._empty_skip -= 1
            else:
                self._empty.append(statistic)
            if len(self._empty) >= self._empty_wanted:
                self.pinned = float(np.quantile(self._empty, self.config.reference_quantile))
                self.pinned_layout = self.layout
                self.cancel_measurement()
        if not self.calibrated:
            return None
        if len(self.history) >= self.config.warmup_segments:
            self._reference = float(np.quantile(np.fromiter(self.history, float),
                                                 self.config.reference_quantile))
        reference = self.reference
        assert reference is not None
        return statistic - reference

    def reset(self) -> None:
        """Forget the automatic reference's history (a pinned reference stays)."""
        self.history.clear()
        self._reference = None

    def as_dict(self) -> dict[str, Any]:
        """For a status message: whether calibrated, how, the reference, the segments the
        automatic one rests on, and those an empty-room measurement still needs."""
        ref = self.reference
        out: dict[str, Any] = {"calibrated": self.calibrated, "mode": self.mode,
                               "segments": len(self.history),
                               "reference": None if ref is None else round(ref, 3)}
        if self._empty_wanted:
            out["measuring_left"] = self.measuring_left
        return out


class MotionMeter:
    """Per-stream motion statistic and score: :meth:`push` frames in order, then
    :meth:`score` each segment once the frames up to its end were pushed."""

    def __init__(self, config: MotionConfig | None = None) -> None:
        self.config = config or MotionConfig()
        self.calibration = MotionCalibration(self.config)
        self.band_size = 0  # subcarriers the statistic uses, per antenna
        self.last_score: float | None = None
        self._layout: tuple[object, ...] | None = None
        self._columns: np.ndarray | None = None
        self._t = np.zeros(0, np.float64)
        self._x = np.zeros((0, 0), np.float32)
        self._scored_until: float | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (timestamps, band CSI)
        # The last despike_frames - 1 gain-free frames before the despiked ones, and the time of
        # the last: the running median's carry-over from one batch to the next.
        self._tail = np.zeros((0, 0), np.float64)
        self._tail_t: float | None = None
        # Per-subcarrier log spreads of recent segments, for the stability selection only.
        self._spreads: deque[np.ndarray] = deque(maxlen=self.config.horizon_segments)

    def push(self, frames: CSIFrames) -> None:
        """Keep the gain-free log amplitude of these frames for the trailing window."""
        if len(frames) == 0:
            return
        layout = (frames.info.device, frames.info.subcarriers, frames.antennas)
        if layout != self._layout:
            band = frames_band(frames)
            column = {s: i for i, s in enumerate(frames.info.subcarriers)}
            self._columns = np.array([column[s] for s in band.subcarriers], dtype=np.int64)
            self.band_size = int(self._columns.size)
            width = frames.antennas * self.band_size
            self._take_pending()  # frames of the previous layout, with its columns
            if self._x.shape[1] != width:  # another shape: the old frames cannot be mixed in
                self._t, self._x = np.zeros(0, np.float64), np.zeros((0, width), np.float32)
                self._spreads.clear()
            self._tail_t = None  # the running median starts afresh on the new layout
            self._layout = layout
            # A fingerprint of the layout, stable across processes (kept with a pinned
            # reference in the edge's spool).
            self.calibration.layout = zlib.crc32(json.dumps(
                [str(frames.info.device), [int(c) for c in frames.info.subcarriers],
                 int(frames.antennas)]).encode())
            self.calibration.check_layout()
        assert self._columns is not None
        # Kept raw until a segment is scored: the work is then done once per second, not
        # once per chunk of a tenth of one (numpy's per-call cost dominated).
        self._pending.append((np.asarray(frames.timestamp, dtype=np.float64),
                              frames.csi[:, :, self._columns]))
        if self._pending[-1][0][-1] - self._pending[0][0][0] > _MAX_KEEP_S:
            self._take_pending()  # nobody scores: keep the memory bounded all the same

    def _take_pending(self) -> None:
        """Turn the frames pushed since the last score into gain-free log amplitudes."""
        if not self._pending:
            return
        t = np.concatenate([p[0] for p in self._pending])
        csi = np.concatenate([p[1] for p in self._pending])
        self._pending.clear()
        amplitude = np.abs(csi).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_amp = np.where((amplitude > 0) & np.isfinite(amplitude), np.log(amplitude),
                               np.nan)
        gain = _nan_median(log_amp)[..., None]
        x = self._despike(t, (log_amp - gain).reshape(len(t), -1)).astype(np.float32)
        self._t = np.concatenate([self._t, t])
        self._x = np.concatenate([self._x, x])
        self._trim()

    def _despike(self, t: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The causal running median of ``despike_frames`` frames, computed once per frame as
        frames arrive (the last frames of the previous batch carried over). A missing value
        holds its subcarrier's last one. It restarts after a gap over ``max_gap_s``, the first
        frame standing in for the ones before it."""
        k = self.config.despike_frames
        if k <= 1:
            return x
        out = np.empty_like(x)
        for piece in np.split(np.arange(len(t)), np.flatnonzero(np.diff(t) > self.config.max_gap_s)
                              + 1):
            part = x[piece]
            continues = (self._tail_t is not None and self._tail.shape[1] == x.shape[1]
                         and t[piece[0]] - self._tail_t <= self.config.max_gap_s)
            head = self._tail if continues else np.repeat(part[:1], k - 1, axis=0)
            padded = _hold_last(np.concatenate([head, part]))
            out[piece] = _running_median(padded, k)
            self._tail, self._tail_t = padded[-(k - 1):], float(t[piece[-1]])
        return out

    def _trim(self) -> None:
        """Forget frames no segment still to be scored can need (and anything older than
        ``_MAX_KEEP_S``, should segments stop being scored)."""
        if not self._t.size:
            return
        cfg = self.config
        needed = cfg.lookback_s + 1.0
        newest = float(self._t[-1])
        oldest = max(newest - _MAX_KEEP_S, (self._scored_until if self._scored_until is not None
                                            else -math.inf) - needed)
        if self._t[0] < oldest:
            keep = self._t >= oldest
            self._t, self._x = self._t[keep], self._x[keep]

    def statistic(self, start: float, end: float) -> float | None:
        """The motion statistic of the segment ``[start, end)`` (log2), or None when it holds
        fewer than ``min_frames`` frames or no subcarrier has a valid spread."""
        spreads = self._spreads_of(start, end)
        return None if spreads is None else self._aggregate(spreads)

    def _aggregate(self, std: np.ndarray) -> float | None:
        chosen = std[self._stable(std)]
        chosen = chosen[np.isfinite(chosen)]
        level = float(np.median(chosen)) if chosen.size else 0.0
        return math.log2(level) if level > 0 else None

    def _spreads_of(self, start: float, end: float) -> np.ndarray | None:
        """Per subcarrier, the standard deviation over the trailing window of the despiked,
        smoothed signal's deviation from its own trailing ``detrend_s`` mean (of the signal
        itself when ``detrend_s`` is 0); NaN where too few values; None without enough
        frames."""
        self._take_pending()
        cfg = self.config
        own = (self._t >= start) & (self._t < end)
        if int(own.sum()) < cfg.min_frames:
            return None
        reach = cfg.lookback_s
        lead = (self._t >= end - reach) & (self._t < end)
        t, x = self._t[lead], self._x[lead].astype(np.float64)
        steps = np.diff(t)
        gaps = np.flatnonzero(steps > cfg.max_gap_s)
        if gaps.size:  # what came before a gap is another stretch of the channel
            t, x, steps = t[gaps[-1] + 1:], x[gaps[-1] + 1:], steps[gaps[-1] + 1:]
        rate = 1.0 / float(np.median(steps)) if steps.size and np.median(steps) > 0 else 0.0
        n = max(1, round(cfg.smooth_s * rate))
        if n > 1:
            x = _moving_average(x, n)
        m = round(cfg.detrend_s * rate)
        if m > 1:  # high-pass: slow drifts (temperature, a settling gain) fall out
            x = x - _moving_average(x, m)
        window = x[t >= end - cfg.window_s]
        valid = np.isfinite(window)
        count = valid.sum(axis=0)
        usable = count >= 3
        if not usable.any():
            return None
        filled = np.where(valid, window, 0.0)
        mean = filled.sum(axis=0) / np.maximum(count, 1)
        spread = np.where(valid, filled - mean, 0.0)
        return np.where(usable, np.sqrt((spread ** 2).sum(axis=0) / np.maximum(count, 1)),
                        np.nan)

    def _stable(self, std: np.ndarray) -> np.ndarray:
        """The subcarriers that enter the median: all of them, or (``stable_fraction`` < 1,
        once calibrated) those with the lowest quiet spread (a low quantile of their own
        recent spreads)."""
        everything: np.ndarray = np.isfinite(std)
        if self.config.stable_fraction >= 1 or len(self._spreads) < self.config.warmup_segments:
            return everything
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a subcarrier never valid
            quiet = np.nanquantile(np.stack(self._spreads), self.config.reference_quantile,
                                   axis=0)
        quiet = np.where(np.isfinite(quiet), quiet, np.inf)
        keep = max(1, round(self.config.stable_fraction * int(np.isfinite(quiet).sum())))
        chosen = np.zeros(std.size, dtype=bool)
        chosen[np.argsort(quiet, kind="stable")[:keep]] = True
        return chosen & everything if (chosen & everything).any() else everything

    def score(self, start: float, end: float) -> float | None:
        """The segment's motion score (log2 ratio to the quiet reference; None while
        calibrating or without enough frames). Call once per segment, in order: each call
        also feeds the calibration."""
        spreads = self._spreads_of(start, end)
        statistic = None if spreads is None else self._aggregate(spreads)
        if spreads is not None and self.config.stable_fraction < 1:
            with np.errstate(divide="ignore"):
                self._spreads.append(np.log(spreads))
        self.last_score = None if statistic is None else self.calibration.update(statistic)
        self._scored_until = end if self._scored_until is None else max(self._scored_until, end)
        self._trim()
        return self.last_score

    def forget_frames(self) -> None:
        """A discontinuity the timestamps do not show (another capture joined on): the
        trailing window starts afresh; the calibration stays."""
        self._pending.clear()
        self._t, self._x = self._t[:0], self._x[:0]
        self._tail_t = None

    def status(self) -> dict[str, Any]:
        """For the edge's status message."""
        return {**self.calibration.as_dict(), "subcarriers": self.band_size,
                "last_score": None if self.last_score is None else round(self.last_score, 3)}


def _nan_median(x: np.ndarray) -> np.ndarray:
    """Median over the last axis with NaN left out (NaN where all are); ``np.nanmedian`` goes
    through masked arrays and cost 30 times more per frame here."""
    valid = np.isfinite(x)
    count = valid.sum(axis=-1)
    ordered = np.sort(np.where(valid, x, np.inf), axis=-1)
    low = np.maximum((count - 1) // 2, 0)[..., None]
    high = np.maximum(count // 2, 0)[..., None]
    with np.errstate(invalid="ignore"):
        median = (np.take_along_axis(ordered, low, -1) + np.take_along_axis(ordered, high, -1))
    return np.where(count > 0, median[..., 0] / 2, np.nan)


def _running_median(x: np.ndarray, n: int) -> np.ndarray:
    """Median of each ``n`` consecutive rows (``len(x) - n + 1`` rows out; NaN propagates).
    An odd-even transposition sort of the ``n`` shifted copies, elementwise min/max: for the
    few rows of a despiking median 30 times faster than sorting windows."""
    rows = [x[i:len(x) - n + 1 + i] for i in range(n)]
    for r in range(n):
        for i in range(r % 2, n - 1, 2):
            rows[i], rows[i + 1] = np.minimum(rows[i], rows[i + 1]), np.maximum(rows[i],
                                                                                rows[i + 1])
    return rows[n // 2] if n % 2 else (rows[n // 2 - 1] + rows[n // 2]) / 2


def _hold_last(x: np.ndarray) -> np.ndarray:
    """Each missing (NaN) value replaced by the last valid one above it in its column (NaN
    while there is none)."""
    index = np.where(np.isfinite(x), np.arange(len(x))[:, None], 0)
    np.maximum.accumulate(index, axis=0, out=index)
    return np.take_along_axis(x, index, axis=0)


def _moving_average(x: np.ndarray, n: int) -> np.ndarray:
    """Causal mean of the last ``n`` rows, missing (NaN) values left out."""
    valid = np.isfinite(x)
    total = np.cumsum(np.where(valid, x, 0.0), axis=0)
    count = np.cumsum(valid, axis=0)
    total[n:] = total[n:] - total[:-n]
    count[n:] = count[n:] - count[:-n]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True, slots=True)
class PresenceConfig:
    """The decision on motion scores: ``motion`` at ``threshold / sensitivity`` and above;
    ``presence`` held ``hold_s`` after the last motion segment."""

    threshold: float = 1.5
    sensitivity: float = 1.0
    hold_s: float = 30.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"presence threshold {self.threshold!r} is not a number > 0")
        if not (math.isfinite(self.sensitivity) and self.sensitivity > 0):
            raise ValueError(f"presence sensitivity {self.sensitivity!r} is not a number > 0")
        if not (math.isfinite(self.hold_s) and self.hold_s >= 0):
            raise ValueError(f"presence hold_s {self.hold_s!r} is not a number >= 0")

    @property
    def motion_threshold(self) -> float:
        return self.threshold / self.sensitivity

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PresenceConfig:
        return cls(**{k: values[k] for k in ("threshold", "sensitivity", "hold_s")
                      if k in values})


class PresenceTracker:
    """Per-AP hysteresis over motion scores: occupied from the first motion segment, empty
    after ``hold_s`` without one. ``None`` (unknown) until the first scored segment."""

    def __init__(self, config: PresenceConfig | None = None) -> None:
        self.config = config or PresenceConfig()
        self.last_motion: float | None = None  # end time of the newest motion segment
        self.scored = False

    def update(self, start: float, end: float,
               score: float | None) -> tuple[bool | None, bool | None]:
        """``(motion, presence)`` of the segment ``[start, end)`` with this score."""
        motion: bool | None = None
        if score is not None and math.isfinite(score):
            self.scored = True
            motion = score >= self.config.motion_threshold
            if motion and (self.last_motion is None or end > self.last_motion):
                self.last_motion = end
        if not self.scored:
            return motion, None
        if motion:
            return True, True
        # A segment that arrives late, before the newest motion, counts as occupied too.
        occupied = self.last_motion is not None and end - self.last_motion < self.config.hold_s
        return motion, occupied

    def reset(self) -> None:
        self.last_motion = None
        self.scored = False


class ThresholdFitError(ValueError):
    """Labelled seconds that cannot fit a threshold (too few of a kind, a bad rate)."""


@dataclass(frozen=True, slots=True)
class MotionThresholdFit:
    """A motion threshold fitted on labelled seconds, with what it does on them."""

    threshold: float
    still_seconds: int
    moving_seconds: int
    false_positive_rate: float  # share of the still seconds at or above the threshold
    recall: float  # share of the moving seconds at or above it

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "still_seconds": self.still_seconds,
                "moving_seconds": self.moving_seconds,
                "false_positive_rate": round(self.false_positive_rate, 4),
                "recall": round(self.recall, 4)}


def fit_motion_threshold(still: Iterable[float | None], moving: Iterable[float | None],
                         max_false_positive_rate: float = 0.0,
                         min_seconds: int = MIN_FIT_SECONDS) -> MotionThresholdFit:
    """The lowest threshold, on the wire's steps of 1/16 within :data:`MOTION_THRESHOLD_RANGE`,
    that flags at most ``max_false_positive_rate`` of the ``still`` scores: as many of the
    ``moving`` seconds as the still ones allow.

    ``still`` and ``moving``: motion scores (log2, as received) of seconds labelled still (the
    room empty, or nobody moving) and moving, in the same room and reference mode. Missing
    scores (None, NaN) are left out. Raises :class:`ThresholdFitError` with fewer than
    ``min_seconds`` of either kind, a rate outside [0, 0.5], or still scores that no
    threshold of the range keeps within the rate."""
    if not (isinstance(max_false_positive_rate, numbers.Real)
            and 0 <= max_false_positive_rate <= 0.5):
        raise ThresholdFitError(f"max_false_positive_rate {max_false_positive_rate!r} is not "
                                "in [0, 0.5]")
    quiet, busy = _finite_scores(still), _finite_scores(moving)
    if quiet.size < min_seconds or busy.size < min_seconds:
        raise ThresholdFitError(
            f"{quiet.size} still and {busy.size} moving labelled second(s) with a motion "
            f"score: a fit needs {min_seconds} of each")
    low, high = MOTION_THRESHOLD_RANGE
    grid = np.arange(round(low / _FIT_STEP), round(high / _FIT_STEP) + 1) * _FIT_STEP
    # Fraction of the still scores at or above each threshold; the first one within the rate.
    flagged = (quiet[None, :] >= grid[:, None] - 1e-9).mean(axis=1)
    within = np.flatnonzero(flagged <= max_false_positive_rate + 1e-12)
    if not within.size:
        raise ThresholdFitError(
            f"even the highest threshold ({high}) flags {flagged[-1]:.0%} of the still seconds "
            f"(the highest scores {float(quiet.max()):g}), more than "
            f"max_false_positive_rate {max_false_positive_rate!r}: are they still?")
    at = int(within[0])
    threshold = float(grid[at])
    return MotionThresholdFit(
        threshold=threshold, still_seconds=int(quiet.size), moving_seconds=int(busy.size),
        false_positive_rate=float(flagged[at]),
        recall=float((busy >= threshold - 1e-9).mean()))


def _finite_scores(values: Iterable[float | None]) -> np.ndarray:
    out = np.array([np.nan if v is None else v for v in values], dtype=np.float64).ravel()
    finite: np.ndarray = out[np.isfinite(out)]
    return finite
