"""Open-set identity: whether a window's person is one of the enrolled people.

The bundle keeps each enrolled person's mean identity feature and one shared per-feature
spread (``calibration["identity"]``); the score is the standardised distance of a window's
identity feature to the nearest person's mean, and a window farther than the threshold is an
unknown person (reported as :data:`UNKNOWN`). Older bundles score the highest identity
probability instead (``score`` ``max_probability``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["UNKNOWN", "feature_distance", "needs_features", "open_set_decision"]

UNKNOWN = "unknown"


def feature_distance(features: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Root-mean-square standardised distance of each identity feature (W, F) to the nearest
    enrolled person's mean (``stats``: ``feature_mean`` (I, F), ``feature_std`` (F,))."""
    means = np.asarray(stats["feature_mean"], np.float32)
    std = np.asarray(stats["feature_std"], np.float32)
    d = (((features[:, None, :] - means[None]) / std) ** 2).mean(-1)
    return np.sqrt(d.min(1))


def needs_features(calibration: dict[str, Any] | None) -> bool:
    """Whether the open-set decision of a bundle with this calibration reads the identity
    features."""
    ident = (calibration or {}).get("identity") or {}
    return ident.get("threshold") is not None and ident.get("score") == "feature_distance"


def open_set_decision(p_id: np.ndarray, calibration: dict[str, Any] | None,
                      features: np.ndarray | None = None) -> np.ndarray:
    """(W, I) identity probabilities and (W, F) identity features -> (W,) bool: the window
    is an unknown person. ``score`` ``feature_distance``: farther than the threshold from
    every enrolled person; ``max_probability``: highest probability below it."""
    ident = (calibration or {}).get("identity") or {}
    threshold = ident.get("threshold")
    if threshold is None:
        return np.zeros(len(p_id), dtype=bool)
    if ident.get("score") == "feature_distance":
        if features is None:
            raise ValueError("the feature-distance open-set score needs the identity features")
        return feature_distance(features, ident) > float(threshold)
    return p_id.max(axis=1) < float(threshold)
