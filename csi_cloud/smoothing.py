"""Steady live output: an HMM forward filter over each AP's per-second activity probabilities,
and abstention where the filtered belief is weak.

The classifier gives, once a second, calibrated activity probabilities (csi_cloud.model
.temperature). Read alone they flicker: a second of walking inside a minute of sitting is
more likely a misread second than a real one. The filter treats the activity as a hidden
state that stays put from one second to the next with probability ``stay`` (one parameter;
the rest of the mass jumps to any activity, uniformly), and each second's probabilities as
the evidence:

    belief_t  ∝  p_t  *  (stay * belief_{t-1} + (1 - stay) / K)

(the classifier's output stands for the likelihood: its training classes are balanced). A
missing second applies the transition without evidence (``stay ** gap``), and the filter
starts afresh from a uniform belief on a new epoch of the AP, after a gap over
``max_gap_s``, or when the AP's bundle changes: the stream before is another one.

**Abstention**: ``uncertain`` when the filtered belief's largest probability is below
``threshold``. The label is still given (``smoothed_activity``); ``uncertain`` says not to act
on it.

**Settled labels** (:func:`fixed_lag`, :class:`Smoother` with ``settle_s``): the same HMM read
a few seconds late. A person who changes activity shows it in the seconds *after* the change,
so the belief about second ``t`` given the evidence up to ``t + lag`` follows the change
sooner in stream time. The live label stays the forward filter's (no latency); the event
timeline (csi_cloud.events) is built from the settled labels, ``settle_s`` late, so its
episodes start where the activity changed rather than where the filter noticed it.

``stay`` and ``threshold`` are fitted with the temperature on the bundle's validation
recordings (:func:`fit_stay`, :func:`fit_threshold`; where the live output pools its
readings, ``stay`` is fitted with the pool's weights: csi_cloud.model.trust.fit_pool) and
kept in its manifest under
``calibration["activity"]``; without them the defaults below apply.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_SETTLE_S",
    "DEFAULT_STAY",
    "DEFAULT_THRESHOLD",
    "EVIDENCE_FLOOR",
    "HMMFilter",
    "Settled",
    "Smoother",
    "SmoothingError",
    "TrustParams",
    "coverage_curve",
    "filter_stream",
    "fit_stay",
    "fit_threshold",
    "fixed_lag",
]

DEFAULT_STAY = 0.9
DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_GAP_S = 10.0
# How late the event timeline is given: 2 s of look-ahead gave 1.8-4.5 points of per-second
# accuracy on both shipped bundles' test streams at every level, 3 s -0.3 to +0.4 more
# (bench/trust.py, ``lag_sweep``); each second of it is a second of latency on every event.
DEFAULT_SETTLE_S = 2.0
STAY_GRID = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
EVIDENCE_FLOOR = 1e-6  # no second's evidence rules an activity out for good


class SmoothingError(ValueError):
    """A smoothing parameter is out of range."""


@dataclass(frozen=True, slots=True)
class TrustParams:
    """The live-output settings of one bundle."""

    stay: float = DEFAULT_STAY
    threshold: float = DEFAULT_THRESHOLD
    max_gap_s: float = DEFAULT_MAX_GAP_S

    def __post_init__(self) -> None:
        if not 0.0 <= self.stay < 1.0:
            raise SmoothingError(f"stay (self-transition) must be in [0, 1), got {self.stay!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise SmoothingError(f"abstention threshold must be in [0, 1], got "
                                 f"{self.threshold!r}")
        if not self.max_gap_s > 0:
            raise SmoothingError(f"max_gap_s must be positive, got {self.max_gap_s!r}")

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any]) -> TrustParams:
        """From a manifest's ``calibration`` (defaults where it has no entry)."""
        activity = calibration.get("activity") or {}
        return cls(stay=float(activity.get("stay", DEFAULT_STAY)),
                   threshold=float(activity.get("threshold", DEFAULT_THRESHOLD)))


class HMMFilter:
    """The forward filter of one stream (K activities)."""

    def __init__(self, classes: int, stay: float) -> None:
        if classes < 1:
            raise SmoothingError(f"need at least one class, got {classes}")
        TrustParams(stay=stay)  # range check
        self.classes = classes
        self.stay = stay
        self.belief: np.ndarray | None = None

    def reset(self) -> None:
        self.belief = None

    def update(self, p: np.ndarray, steps: int = 1) -> np.ndarray:
        """Take one second's probabilities ``p`` (K,), ``steps`` seconds after the last one
        (``steps - 1`` missing); return the filtered belief (K,)."""
        p = np.clip(np.asarray(p, np.float64), EVIDENCE_FLOOR, None)
        if p.shape != (self.classes,):
            raise SmoothingError(f"expected {self.classes} probabilities, got shape {p.shape}")
        if self.belief is None:
            prior = np.full(self.classes, 1.0 / self.classes)
        else:
            keep = self.stay ** max(int(steps), 1)
            prior = keep * self.belief + (1.0 - keep) / self.classes
        post = prior * p
        self.belief = post / post.sum()
        return self.belief


def filter_stream(p: np.ndarray, stay: float, starts: np.ndarray | None = None) -> np.ndarray:
    """Filter a whole stream offline: ``p`` (N, K) one row a second, ``starts`` (N,) true
    where the filter starts afresh (the first row always does). Returns beliefs (N, K)."""
    f = HMMFilter(p.shape[1], stay)
    out = np.empty_like(p, dtype=np.float64)
    for i in range(len(p)):
        if i == 0 or (starts is not None and starts[i]):
            f.reset()
        out[i] = f.update(p[i])
    return out


def fixed_lag(p: np.ndarray, stay: float, lag: int,
              starts: np.ndarray | None = None) -> np.ndarray:
    """The same HMM read ``lag`` seconds late: each second's belief given the evidence up to
    ``lag`` seconds after it (never past the next start), ``p`` (N, K) one row a second.
    Returns beliefs (N, K); ``lag`` 0 is :func:`filter_stream`.

    A forward-backward pass over a sliding horizon: ``belief_t ∝ alpha_t * beta_t`` with
    ``alpha`` the filtered belief and ``beta_t = T (p_{t+1} * beta_{t+1})`` over the next
    ``lag`` seconds, ``T = stay * I + (1 - stay) / K``. A person changing activity shows in the
    seconds after the change, so a label given ``lag`` seconds late follows the change sooner
    in stream time, at the price of ``lag`` seconds of latency."""
    if lag < 0:
        raise SmoothingError(f"lag must be >= 0 seconds, got {lag!r}")
    alpha = filter_stream(p, stay, starts)
    n = len(p)
    if lag == 0 or n == 0:
        return alpha
    evidence = np.clip(np.asarray(p, np.float64), EVIDENCE_FLOOR, None)
    fresh = np.zeros(n, bool) if starts is None else np.asarray(starts, bool).copy()
    fresh[0] = True
    # end[i]: the first start after row i (or n): row i's stream stops before it.
    end = np.empty(n, np.int64)
    nxt = n
    for i in range(n - 1, -1, -1):
        end[i] = nxt
        if fresh[i]:
            nxt = i
    out = np.empty_like(alpha)
    for t in range(n):
        ahead = range(t + 1, min(t + lag, end[t] - 1) + 1)
        out[t] = _settle(alpha[t], [evidence[u] for u in ahead], [stay] * len(ahead))
    return out


def _settle(alpha: np.ndarray, ahead: Sequence[np.ndarray], keeps: Sequence[float]
            ) -> np.ndarray:
    """The belief of one second, ``alpha`` (K,) its filtered belief, given the evidence of
    the seconds after it (``ahead``, oldest first) reached through the self-transition mass
    ``keeps`` (``stay ** steps`` of each)."""
    k = len(alpha)
    beta = np.ones(k)
    for p, keep in zip(reversed(ahead), reversed(keeps), strict=True):
        v = p * beta
        beta = keep * v + (1.0 - keep) * v.sum() / k
        beta /= beta.sum()
    post = alpha * beta
    return np.asarray(post / post.sum())


def fit_stay(streams: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
             grid: Sequence[float] = STAY_GRID) -> tuple[float, dict[str, float]]:
    """The ``stay`` of ``grid`` with the best filtered per-second accuracy over ``streams``
    (each ``(p (N, K), labels (N,), starts (N,) or None)``); ties go to the smaller one.
    Returns it and the accuracy at each grid value."""
    scores: dict[str, float] = {}
    for stay in grid:
        correct = total = 0
        for p, labels, starts in streams:
            belief = filter_stream(p, stay, starts)
            correct += int((belief.argmax(1) == labels).sum())
            total += len(labels)
        scores[f"{stay:g}"] = correct / max(total, 1)
    best = max(grid, key=lambda s: (round(scores[f"{s:g}"], 9), -s))
    return float(best), scores


def coverage_curve(confidence: np.ndarray, correct: np.ndarray,
                   thresholds: Sequence[float] | None = None) -> list[dict[str, float | None]]:
    """For each threshold: the share of seconds answered (confidence >= threshold) and the
    accuracy on them (None where none is answered)."""
    if thresholds is None:
        thresholds = [round(float(t), 2) for t in np.arange(0.0, 1.0001, 0.05)]
    out = []
    for t in thresholds:
        kept = confidence >= t
        out.append({"threshold": float(t), "coverage": float(kept.mean()) if len(kept) else 0.0,
                    "accuracy": float(correct[kept].mean()) if kept.any() else None})
    return out


def fit_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The smallest threshold (of 0.00, 0.01, ... 0.99) whose answered seconds are at least
    ``target`` accurate (most coverage at that accuracy); the largest when none is."""
    if not 0 < target <= 1:
        raise SmoothingError(f"target accuracy must be in (0, 1], got {target!r}")
    grid = [round(float(t), 2) for t in np.arange(0.0, 0.995, 0.01)]
    for row in coverage_curve(confidence, correct, grid):
        if row["accuracy"] is not None and row["accuracy"] >= target:
            return float(row["threshold"] or 0.0)
    return grid[-1]


@dataclass(frozen=True, slots=True)
class Settled:
    """The settled label of one second of one AP (``timestamp``: its capture time)."""

    site: str
    ap: str
    model: str
    timestamp: float
    activity: str
    confidence: float
    uncertain: bool


@dataclass(slots=True)
class _Second:
    """A second of a stream waiting for the evidence after it."""

    timestamp: float
    evidence: np.ndarray  # (K,), floored as the filter read it
    belief: np.ndarray  # (K,), the filtered belief
    keep: float  # stay ** steps: the self-transition mass from the second before


@dataclass
class _Stream:
    epoch: int
    model: str
    timestamp: float
    filter: HMMFilter
    labels: list[str]
    threshold: float
    lag: int  # segments of evidence a settled second waits for
    max_gap_s: float
    arrived: float  # time.monotonic() of the last prediction
    waiting: deque[_Second] = field(default_factory=deque)


class Smoother:
    """Per AP stream: the filter over its predictions, in arrival order.

    ``params_of(model_id)`` gives a bundle's :class:`TrustParams` and ``segment_s`` its
    segment length (None: an unknown bundle, whose predictions are left unsmoothed).
    ``settle_s``: how late the settled labels are given (whole segments, rounded up; 0:
    each second settles on arrival, as filtered). :meth:`drain` hands them out: a second
    settles once ``settle_s`` of later seconds have arrived, or when its stream ends with what
    came after it: a new epoch or bundle, a prediction without activity (presence only, an
    unknown bundle), no prediction for ``max_gap_s`` of wall time (:meth:`release_quiet`),
    :meth:`forget`. :meth:`drop` discards an AP's waiting seconds unsettled.

    Not thread-safe: one caller at a time (csi_cloud.events.LiveTrust holds a lock).
    """

    def __init__(self, params_of: Callable[[str], tuple[TrustParams, float] | None],
                 settle_s: float = 0.0) -> None:
        if not 0.0 <= settle_s <= 60.0:
            raise SmoothingError(f"settle_s must be in [0, 60] seconds, got {settle_s!r}")
        self.params_of = params_of
        self.settle_s = settle_s
        self.streams: dict[tuple[str, str], _Stream] = {}
        self._settled: list[Settled] = []

    def drain(self) -> list[Settled]:
        """The seconds settled since the last call, in the order they settled."""
        out, self._settled = self._settled, []
        return out

    def _release(self, key: tuple[str, str], stream: _Stream, keep_last: int) -> None:
        """Settle the stream's waiting seconds until ``keep_last`` remain."""
        while len(stream.waiting) > keep_last:
            first = stream.waiting.popleft()
            ahead = list(stream.waiting)[: stream.lag]
            belief = _settle(first.belief, [a.evidence for a in ahead], [a.keep for a in ahead])
            best = int(belief.argmax())
            confidence = float(belief[best])
            self._settled.append(Settled(
                site=key[0], ap=key[1], model=stream.model, timestamp=first.timestamp,
                activity=stream.labels[best], confidence=round(confidence, 5),
                uncertain=confidence < stream.threshold))

    def update(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """The smoothed fields of one prediction dict (``site``, ``ap``, ``epoch``,
        ``timestamp``, ``model``, ``probabilities``): ``smoothed_activity``,
        ``smoothed_confidence`` and ``uncertain``, all None where there is nothing to smooth
        (presence only, an unknown bundle, a late segment older than the stream's newest)."""
        none = {"smoothed_activity": None, "smoothed_confidence": None, "uncertain": None}
        key = (prediction["site"], prediction["ap"])
        model = prediction.get("model")
        probs = (prediction.get("probabilities") or {}).get("activity") or {}
        found = self.params_of(model) if model and probs else None
        if not model or found is None:  # no activity: the AP's activity stream, if any, ended
            self.forget(*key)
            return none
        params, segment_s = found
        labels = list(probs)
        t = float(prediction["timestamp"])
        epoch = int(prediction["epoch"])
        stream = self.streams.get(key)
        steps = 1
        if (stream is None or stream.epoch != epoch or stream.model != model
                or t - stream.timestamp > params.max_gap_s
                or stream.filter.classes != len(labels) or stream.labels != labels):
            if stream is not None:
                self._release(key, stream, 0)  # the stream before ends here
            stream = self.streams[key] = _Stream(
                epoch, model, t, HMMFilter(len(labels), params.stay), labels,
                params.threshold, math.ceil(self.settle_s / segment_s - 1e-9),
                params.max_gap_s, time.monotonic())
        elif t <= stream.timestamp and stream.filter.belief is not None:
            return none  # a late segment: the filter does not go back in time
        else:
            steps = max(1, round((t - stream.timestamp) / segment_s))
        stream.timestamp = t
        stream.arrived = time.monotonic()
        fresh = stream.filter.belief is None
        evidence = np.clip(np.array([probs[k] for k in labels], np.float64), EVIDENCE_FLOOR, None)
        belief = stream.filter.update(evidence, steps)
        stream.waiting.append(_Second(t, evidence, belief.copy(),
                                      1.0 if fresh else stream.filter.stay ** steps))
        self._release(key, stream, stream.lag)
        best = int(belief.argmax())
        confidence = float(belief[best])
        return {"smoothed_activity": labels[best],
                "smoothed_confidence": round(confidence, 5),
                "uncertain": confidence < stream.threshold}

    def forget(self, site: str, ap: str) -> None:
        """End the AP's stream: its waiting seconds settle with what came after them."""
        stream = self.streams.pop((site, ap), None)
        if stream is not None:
            self._release((site, ap), stream, 0)

    def drop(self, site: str, ap: str) -> None:
        """Forget the AP's stream without settling what waits (another worker took it over
        meanwhile: those seconds are its to tell)."""
        self.streams.pop((site, ap), None)

    def release_quiet(self, now: float | None = None) -> None:
        """End the streams with no prediction for their ``max_gap_s`` (``time.monotonic()``
        seconds; the next prediction would start a new stream anyway): an AP that went silent
        still gets the last seconds of its timeline."""
        now = time.monotonic() if now is None else now
        for key, stream in list(self.streams.items()):
            if now - stream.arrived > stream.max_gap_s:
                self.forget(*key)

    def release_all(self) -> None:
        """End every stream (the service stops)."""
        for key in list(self.streams):
            self.forget(*key)
