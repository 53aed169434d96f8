"""Calibrated activity confidence: temperature scaling of the classifier's probabilities.

The classifier's activity probabilities ``p`` are rescaled as ``softmax(log p / T)``: the
ranking (and so the accuracy) is unchanged, only how sure the output claims to be. ``T`` is
fitted by minimising the negative log-likelihood of the true activity on recordings the bundle
was not trained on (its validation recordings), over the per-second windows the service
classifies. ``T > 1`` softens an overconfident classifier, ``T < 1`` sharpens an
underconfident one.

The temperature lives in the manifest as ``calibration["activity"]["temperature"]``, next to
the live-output settings fitted with it (csi_cloud.smoothing: the HMM's self-transition and the
abstention threshold); a bundle without that entry (every bundle before it) has ``T = 1``.
Like every calibration it is part of the bundle id.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

__all__ = [
    "TemperatureError",
    "activity_temperature",
    "apply_temperature",
    "expected_calibration_error",
    "fit_temperature",
    "mean_nll",
    "uncalibrated",
]

_FLOOR = 1e-12
T_MIN, T_MAX = 0.05, 20.0


class TemperatureError(ValueError):
    """A temperature, or the data to fit one, is not usable."""


def _check(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise TemperatureError(f"probabilities must be (N, K>=2), got shape {p.shape}")
    return p


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise, float32 like the classifier's output."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise TemperatureError(f"temperature must be a positive number, got {temperature!r}")
    p = np.asarray(p)
    if temperature == 1.0:
        return p
    logits = np.log(np.clip(np.asarray(p, np.float64), _FLOOR, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def uncalibrated(p: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before :func:`apply_temperature` (its exact inverse)."""
    return apply_temperature(p, 1.0 / temperature)


def mean_nll(p: np.ndarray, labels: np.ndarray) -> float:
    p = _check(p)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(p)), labels], _FLOOR, None))))


def expected_calibration_error(p: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """The gap between confidence and accuracy, averaged over equal-width confidence bins
    weighted by their share of the predictions."""
    p = _check(p)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            gap += sel.mean() * abs(float(correct[sel].mean()) - float(conf[sel].mean()))
    return float(gap)


def fit_temperature(p: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` in [0.05, 20] minimising the mean NLL of ``labels`` under
    ``apply_temperature(p, T)`` (a one-dimensional convex search over ``log T``)."""
    p = _check(p)
    labels = np.asarray(labels)
    if len(p) == 0 or len(labels) != len(p):
        raise TemperatureError(f"need as many labels as rows: {len(labels)} labels, "
                               f"{len(p)} rows")
    if labels.min() < 0 or labels.max() >= p.shape[1]:
        raise TemperatureError(f"labels must be class indices 0..{p.shape[1] - 1}, got "
                               f"{int(labels.min())}..{int(labels.max())}")
    log_p = np.log(np.clip(p, _FLOOR, None))
    rows = np.arange(len(p))

    def nll(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, labels]))

    best = minimize_scalar(nll, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded",
                           options={"xatol": 1e-4})
    return float(np.exp(best.x))


def activity_temperature(calibration: dict[str, Any]) -> float:
    """The manifest's activity temperature (1.0 where it has none)."""
    value = (calibration.get("activity") or {}).get("temperature", 1.0)
    if not isinstance(value, int | float) or not (np.isfinite(value) and value > 0):
        raise TemperatureError(f"calibration.activity.temperature must be a positive number, "
                               f"got {value!r}")
    return float(value)
