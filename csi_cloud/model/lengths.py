"""Live activity that follows changes: the context window read at several lengths.

The classifier reads the last ``N`` one-second segments of an AP (``N`` = the bundle's
``context_segments``, 8 on the shipped bundles). When the person changes activity, that window
holds seconds of the old activity for up to ``N`` seconds, and the full-length reading lags
every change. So the service classifies each window at a few lengths (the last ``k`` slots
for each ``k`` of ``lengths``, the older slots masked as missing, as at the start of a stream),
calibrates each length's probabilities with its own temperature, and combines them in one
of two ways:

- **most confident** (no ``weights``): per window, the reading of the length that is surest.
  Right after a change the short readings agree with the new activity and the long one is
  torn between the two; in a steady activity the long one is usually the surest.
- **pooled** (``weights``, one per length, >= 0): a weighted geometric pool,
  ``p(a) ∝ prod_k p_k(a) ** w_k``. The live output is filtered over time
  (csi_cloud.smoothing), and that filter treats each second's probabilities as new evidence.
  The one-second reading is the only one whose windows do not overlap from one second to the
  next, so it is the only one that is new evidence each second. The full window repeats
  seven of its eight seconds and counts them again each second. On both shipped bundles'
  validation streams the fitted weights put most of the mass on the one-second reading (about
  0.7, then 0.2-0.3 on one longer reading). The weights and the filter's ``stay`` are
  fitted together (csi_cloud.model.trust.fit_pool). A shorter length the fit weighs 0 is
  left out, so it is not read at all (a manifest may not list one with weight 0); the full
  length may weigh 0, since the classifier reads it anyway.

The shorter readings go through the context head's short-reading layer where it has one
(fitted on windows truncated to such lengths: csi_cloud.model.context_head.fit_level).

The lengths and their temperatures are fitted on recordings the bundle was not trained on
(csi_cloud.model.trust, ``csi calibrate``) and kept in the manifest as
``calibration["activity"]["contexts"] = {"lengths": [...], "temperatures": [...]}`` (and
``"weights": [...]`` where the readings are pooled); a bundle
without that entry reads the full length only, with ``calibration["activity"]["temperature"]``
(csi_cloud.model.temperature). Cost: one classification per length per segment (the random-
convolution features of each reading), nothing kept per AP beyond the context window, so an
epoch change or a gap resets it exactly as it resets the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..smoothing import EVIDENCE_FLOOR  # no reading rules an activity out for good
from .temperature import TemperatureError, apply_temperature

__all__ = ["ContextLengths", "candidate_lengths", "most_confident", "pool"]



def most_confident(p: Sequence[np.ndarray]) -> np.ndarray:
    """Per row, which reading (an index into ``p``, readings (W, K) each) has the largest
    top probability (ties go to the earlier one)."""
    return np.stack([np.asarray(x).max(axis=1) for x in p]).argmax(axis=0)


def pool(p: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted geometric pool of readings ``p`` ((W, K) each): per row,
    ``prod_k p_k ** w_k``, normalised (W, K)."""
    logits = sum((w * np.log(np.clip(np.asarray(x, np.float64), EVIDENCE_FLOOR, None))
                  for x, w in zip(p, weights, strict=True) if w), np.zeros(np.shape(p[0])))
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def candidate_lengths(n: int) -> list[tuple[int, ...]]:
    """The sets of lengths the calibration chooses from, cheapest first: the full length
    alone, then more and shorter readings with it."""
    out: list[tuple[int, ...]] = []
    for extra in ((), (2,), (2, 4), (1, 2, 4), (1, 2, 3, 4, 6)):
        lengths = tuple(sorted({k for k in extra if k < n} | {n}))
        if lengths not in out:
            out.append(lengths)
    return out


@dataclass(frozen=True, slots=True)
class ContextLengths:
    """The lengths a bundle's live output reads each window at (ascending, the last one the
    full context), each one's temperature, and, where the readings are pooled rather than the
    most confident one taken, each one's weight."""

    lengths: tuple[int, ...]
    temperatures: tuple[float, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.lengths or len(self.lengths) != len(self.temperatures):
            raise TemperatureError(f"need one temperature per context length, got lengths "
                                   f"{list(self.lengths)} and temperatures "
                                   f"{list(self.temperatures)}")
        if list(self.lengths) != sorted(set(self.lengths)) or self.lengths[0] < 1:
            raise TemperatureError(f"context lengths must be distinct positive integers in "
                                   f"ascending order, got {list(self.lengths)}")
        for t in self.temperatures:
            if not (isinstance(t, int | float) and np.isfinite(t) and t > 0):
                raise TemperatureError(f"context temperatures must be positive numbers, got "
                                       f"{t!r}")
        if self.weights is not None:
            if len(self.weights) != len(self.lengths):
                raise TemperatureError(f"need one weight per context length, got lengths "
                                       f"{list(self.lengths)} and weights "
                                       f"{list(self.weights)}")
            for w in self.weights:
                if not (isinstance(w, int | float) and np.isfinite(w) and w >= 0):
                    raise TemperatureError(f"context weights must be numbers >= 0, got {w!r}")
            if not any(self.weights):
                raise TemperatureError(f"context weights {list(self.weights)} are all 0: "
                                       f"the pool would read nothing")
            idle = [k for k, w in zip(self.lengths[:-1], self.weights, strict=False) if not w]
            if idle:
                raise TemperatureError(f"shorter context lengths {idle} have weight 0: "
                                       f"they would be read for nothing (leave them out)")

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any], n: int,
                         temperature: float) -> ContextLengths:
        """From a manifest's ``calibration`` for a classifier of ``n`` context slots; without
        a ``contexts`` entry, the full length alone with ``temperature``."""
        entry = (calibration.get("activity") or {}).get("contexts")
        if entry is None:
            return cls((n,), (temperature,))
        if not isinstance(entry, dict):
            raise TemperatureError(f"calibration.activity.contexts must be an object, got "
                                   f"{entry!r}")
        weights = entry.get("weights")
        out = cls(tuple(int(k) for k in entry.get("lengths") or ()),
                  tuple(entry.get("temperatures") or ()),
                  None if weights is None else tuple(weights))
        if out.lengths[-1] != n:
            raise TemperatureError(f"context lengths {list(out.lengths)} must end at the "
                                   f"classifier's context of {n} segments")
        return out

    def as_calibration(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {
            "lengths": list(self.lengths),
            "temperatures": [round(float(t), 4) for t in self.temperatures]}
        if self.weights is not None:
            out["weights"] = [round(float(w), 4) for w in self.weights]
        return out

    def read(self, p_raw: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Uncalibrated probabilities (W, K) at each length, in :attr:`lengths` order -> the
        live probabilities (W, K): each length's temperature, then per window the most
        confident reading, or the pool of them all; and the same without the temperatures
        (that reading's probabilities, or the pool of the uncalibrated readings)."""
        if len(p_raw) != len(self.lengths):
            raise TemperatureError(f"expected {len(self.lengths)} readings (lengths "
                                   f"{list(self.lengths)}), got {len(p_raw)}")
        calibrated = [apply_temperature(p, t)
                      for p, t in zip(p_raw, self.temperatures, strict=True)]
        if self.weights is not None:
            return pool(calibrated, self.weights), pool(p_raw, self.weights)
        if len(p_raw) == 1:
            return calibrated[0], p_raw[0]
        rows = np.arange(len(p_raw[0]))
        pick = most_confident(calibrated)
        return np.stack(calibrated)[pick, rows], np.stack(p_raw)[pick, rows]
