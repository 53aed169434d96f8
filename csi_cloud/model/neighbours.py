"""Who is in the room, by the nearest training windows of the static profile.

A window's mean profile (the mean of its present segments' decoded PCA coefficients) says
much about the person and the session it was recorded in: a person standing in the path
changes the static channel. The ridge layer of the context head reads that mean too, but
linearly; the nearest training windows read it as it is, clusters and all. The two err on
different windows, so their probabilities are mixed (``weight``, chosen on validation
windows; 0 leaves the ridge layer alone). It is cloud-side only: the window mean is what
every level already decodes, no byte on the wire changes.

Stored in ``cloud.npz`` beside the level's head (``head.<level>.nn.`` keys): the training
windows' standardised means and their identity labels. A few thousand points of 16 values.

Shapes: W windows, N context slots, K profile components, P stored training windows,
I identities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .window import window_mean

__all__ = ["ProfileNeighbours", "fit_neighbours"]

WEIGHTS = (0.0, 0.25, 0.5, 0.75)
NEIGHBOURS = (3, 5, 9)


def _mean(coeff: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The windows' mean coefficients (W, K), float32 (the stored points' precision)."""
    return window_mean(coeff, present).astype(np.float32)


@dataclass(slots=True)
class ProfileNeighbours:
    """The ``k`` nearest training windows by standardised window-mean profile -> identity
    probabilities (the share of each identity among them), mixed into the ridge layer's."""

    mean: np.ndarray  # (K,)
    scale: np.ndarray  # (K,)
    points: np.ndarray  # (P, K) standardised window means of the training windows
    labels: np.ndarray  # (P,) their identities
    classes: int
    k: int
    weight: float  # the neighbours' share of the mixed probability

    def probabilities(self, coeff: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Windows' coefficients (W, N, K') and present slots (W, N) -> (W, I); only the
        first K coefficients are read (the level's)."""
        q = (_mean(coeff[:, :, : len(self.mean)], present) - self.mean) / self.scale
        # Squared distances summed component by component in float64, and the nearest taken
        # by a stable sort (equal distances: the earlier training window): the same
        # neighbours on every machine. A matrix product would sum in the order of the
        # machine's kernels, and a partition breaks ties as it likes; training windows of
        # one recording often have equal means.
        d = np.zeros((len(q), len(self.points)))
        for j in range(q.shape[1]):
            d += (q[:, j, None].astype(np.float64) - self.points[None, :, j]) ** 2
        k = min(self.k, len(self.points))
        near = np.argsort(d, axis=1, kind="stable")[:, :k]
        votes = np.zeros((len(q), self.classes), np.float32)
        np.add.at(votes, (np.repeat(np.arange(len(q)), k), self.labels[near].ravel()), 1.0)
        return votes / k

    def mix(self, ridge: np.ndarray, coeff: np.ndarray, present: np.ndarray) -> np.ndarray:
        """The ridge layer's identity probabilities (W, I) mixed with the neighbours'."""
        if self.weight <= 0:
            return ridge
        return ((1 - self.weight) * ridge
                + self.weight * self.probabilities(coeff, present)).astype(np.float32)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean, f"{prefix}scale": self.scale,
                f"{prefix}points": self.points, f"{prefix}labels": self.labels,
                f"{prefix}setting": np.array([self.classes, self.k, self.weight], np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> ProfileNeighbours:
        classes, k, weight = arrays[f"{prefix}setting"].tolist()
        return cls(arrays[f"{prefix}mean"], arrays[f"{prefix}scale"], arrays[f"{prefix}points"],
                   arrays[f"{prefix}labels"].astype(np.int64), int(classes), int(k),
                   float(weight))


def fit_neighbours(coeff: np.ndarray, present: np.ndarray, labels: np.ndarray, classes: int,
                   components: int, *, ridge_val: np.ndarray, val_coeff: np.ndarray,
                   val_present: np.ndarray, val_labels: np.ndarray,
                   weights: Sequence[float] = WEIGHTS,
                   neighbours: Sequence[int] = NEIGHBOURS) -> ProfileNeighbours | None:
    """The neighbours of the training windows (coefficients (W, N, K'), present (W, N),
    identities (W,), -1 unknown) over their first ``components`` coefficients, with the
    number of neighbours and the mixing weight that identify the validation windows best
    (``ridge_val``: the ridge layer's probabilities of them; ties go to the fewer neighbours,
    then the smaller weight). None without training windows of known identity, or without
    validation windows to choose on."""
    known = labels >= 0
    val_known = val_labels >= 0
    if components < 1 or not known.any() or not val_known.any():
        return None
    means = _mean(coeff[known][:, :, :components], present[known])
    mean = means.mean(axis=0)
    scale = means.std(axis=0) + 1e-6
    points = ((means - mean) / scale).astype(np.float32)
    best: tuple[float, ProfileNeighbours] | None = None
    vc, vp, vy, vr = (val_coeff[val_known], val_present[val_known], val_labels[val_known],
                      ridge_val[val_known])
    for k in neighbours:
        model = ProfileNeighbours(mean.astype(np.float32), scale.astype(np.float32), points,
                                  labels[known].astype(np.int64), classes, k, 0.0)
        p_nn = model.probabilities(vc, vp)
        for w in weights:
            acc = float((((1 - w) * vr + w * p_nn).argmax(1) == vy).mean())
            if best is None or acc > best[0] + 1e-9:
                model_w = ProfileNeighbours(model.mean, model.scale, points, model.labels,
                                            classes, k, float(w))
                best = (acc, model_w)
    assert best is not None
    return best[1] if best[1].weight > 0 else None
