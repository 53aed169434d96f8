"""Accuracy anchors from maintained libraries, on uncompressed CSI: not products, they mark
what the data allows, on the same recordings, windows and splits as our model (bench/model.py,
``csi evaluate --protocol few-shot``). They need the ``bench`` extra (aeon, scikit-learn):

- ``minirocket``: aeon's MiniRocket (10,000 random-convolution features) on the window's
  dynamics (log amplitude minus the window's per-subcarrier mean) and their frame-to-frame
  difference -> scikit-learn ``RidgeClassifierCV``; with identity labels it is fitted on the
  joint activity x identity label and both are read from it (as the field notes measured);
- ``profile_knn``: the static per-subcarrier profile (the window's mean log amplitude) ->
  5-nearest neighbours: no motion at all, it measures how much the session gives away;
- ``stats_boosting``: hand-crafted per-subcarrier statistics of the window (spread, range,
  mean absolute difference, low- and high-frequency energy, profile) -> scikit-learn
  ``HistGradientBoostingClassifier``;
- ``fusion``: the mean of the three's class probabilities.

A window is the last ``N`` segment slots of a recording up to a segment (missing slots are
left out of the means and zero in the series), exactly the windows our model classifies.

Shapes: R windows, C channels (antennas x subcarriers), L frames in a window.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .window import take

__all__ = ["ANCHORS", "AnchorFeatures", "anchor_features", "fit_predict", "minirocket_features",
           "require"]

ANCHORS = ("minirocket", "profile_knn", "stats_boosting", "fusion")


@dataclass
class AnchorFeatures:
    """Uncompressed window inputs of every window the anchors classify."""

    series: np.ndarray  # (R, 2C, L) dynamics and their difference, float32
    profile: np.ndarray  # (R, C) window mean log amplitude
    stats: np.ndarray  # (R, 6C) hand-crafted statistics


def anchor_features(x: np.ndarray, rows: np.ndarray) -> AnchorFeatures:
    """Segments ``x`` (M, L, A, S) and window rows (R, N) (-1 missing) -> anchor inputs."""
    present = rows >= 0
    r, n = rows.shape
    seg = x.reshape(len(x), x.shape[1], -1)  # (M, Ls, C)
    ls, c = seg.shape[1:]
    w = take(rows, seg)  # (R, N, Ls, C)
    mask = np.repeat(present, ls, axis=1)[..., None]  # (R, N*Ls, 1)
    w = w.reshape(r, n * ls, c)
    count = mask.sum(axis=1).clip(1)
    profile = (w * mask).sum(axis=1) / count
    dyn = (w - profile[:, None]) * mask
    diff = np.diff(dyn, axis=1, prepend=dyn[:, :1])
    series = np.concatenate([dyn, diff], axis=2).transpose(0, 2, 1).astype(np.float32)
    spec = np.abs(np.fft.rfft(dyn, axis=1)) ** 2
    half = spec.shape[1] // 8
    stats = np.concatenate([
        np.sqrt((dyn**2).sum(1) / count),
        np.where(mask, w, -np.inf).max(1) - np.where(mask, w, np.inf).min(1),
        np.abs(diff).sum(1) / count,
        np.log1p(spec[:, 1 : half + 1].sum(1)),
        np.log1p(spec[:, half + 1 :].sum(1)),
        profile,
    ], axis=1)
    return AnchorFeatures(series, profile.astype(np.float32), stats.astype(np.float32))


def require() -> None:
    """Raise a clear error when the anchors' libraries are not installed."""
    try:
        import aeon  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"the anchors need aeon and scikit-learn ({exc.name} is missing): "
                         "pip install -e '.[bench]'") from exc


def _cache_key(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def minirocket_features(train: np.ndarray, every: np.ndarray, *, seed: int,
                        cache: Path | None) -> np.ndarray:
    """aeon MiniRocket fitted on ``train`` series, transform of ``every`` series (cached)."""
    key = cache / f"minirocket-{_cache_key(train[:, :, ::7], every[:, :, ::7])}-{seed}.npy" \
        if cache is not None else None
    if key is not None and key.is_file():
        return np.load(key)
    from aeon.transformations.collection.convolution_based import MiniRocket

    transform = MiniRocket(n_kernels=10_000, random_state=seed).fit(train)
    out = np.concatenate([transform.transform(every[i : i + 256])
                          for i in range(0, len(every), 256)]).astype(np.float32)
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        np.save(key, out)
    return out


def _softmax(scores: np.ndarray) -> np.ndarray:
    s = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def _full(proba: np.ndarray, classes_seen: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(proba), n))
    out[:, classes_seen] = proba
    return out


def fit_predict(rocket: np.ndarray, feats: AnchorFeatures, train: np.ndarray,
                test: np.ndarray, activity: np.ndarray, identity: np.ndarray | None,
                n_act: int, n_id: int, *, weight: np.ndarray | None = None,
                seed: int = 0, threads: int | None = 1) -> dict[str, dict[str, np.ndarray]]:
    """Fit every anchor on windows ``train`` and predict windows ``test``.

    ``rocket``: MiniRocket features of every window; ``activity``/``identity``: labels of
    every window (identity -1 = unknown, None = no identity task); ``weight``: per training
    window weights (the support's weight when training on source + support); ``threads``:
    OpenMP threads of the gradient boosting (None: scikit-learn's default, every core).
    Returns anchor -> {"activity": (T, A) probabilities, "identity": (T, I) or absent}.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    w = np.ones(len(train)) if weight is None else weight
    # The identity task, where every training window has a known identity.
    ids = identity if identity is not None and n_id > 0 and (identity[train] >= 0).all() else None
    use_id = ids is not None
    out: dict[str, dict[str, np.ndarray]] = {}

    # MiniRocket + ridge (joint activity x identity label where there are identities).
    scaler = StandardScaler().fit(rocket[train])
    xtr, xte = scaler.transform(rocket[train]), scaler.transform(rocket[test])
    label = activity[train] if ids is None else activity[train] * n_id + ids[train]
    ridge = RidgeClassifierCV(alphas=np.logspace(-3, 3, 10)).fit(xtr, label, sample_weight=w)
    joint = _full(_softmax(ridge.decision_function(xte).reshape(len(test), -1)),
                  ridge.classes_, n_act * n_id if use_id else n_act)
    if use_id:
        joint = joint.reshape(len(test), n_act, n_id)
        out["minirocket"] = {"activity": joint.sum(2), "identity": joint.sum(1)}
    else:
        out["minirocket"] = {"activity": joint}

    # Static profile, k nearest neighbours (the support is replicated to stand for its weight).
    reps = np.maximum(np.round(w / w.min()).astype(int), 1)
    ptr = np.repeat(feats.profile[train], reps, axis=0)
    pscale = StandardScaler().fit(ptr)
    k = int(min(5, len(ptr)))
    entry = {}
    for name, y, n in (("activity", activity, n_act), ("identity", ids, n_id)):
        if y is None:
            continue
        knn = KNeighborsClassifier(k).fit(pscale.transform(ptr), np.repeat(y[train], reps))
        entry[name] = _full(knn.predict_proba(pscale.transform(feats.profile[test])),
                            knn.classes_, n)
    out["profile_knn"] = entry

    # Hand-crafted statistics + gradient boosting. Its trees are small (a thousand windows,
    # a few hundred features), so OpenMP's per-split synchronisation dominates: on a busy
    # 2-core machine two threads took 85 s of CPU for one fit on a Fition source + support
    # set and one thread 18 s, with the same trees (bench/model.py passes --threads). Equal
    # weights are no weights: given any sample_weight, scikit-learn (1.6+) bins every feature
    # with one weighted percentile call per bin edge in Python, 24 of the 27 s of CPU of
    # one support-only fit of the anchors on Fition (336 features x 255 edges).
    from threadpoolctl import threadpool_limits

    hgb_weight = None if np.all(w == w[0]) else w
    entry = {}
    for name, y, n in (("activity", activity, n_act), ("identity", ids, n_id)):
        if y is None:
            continue
        if len(np.unique(y[train])) < 2:
            entry[name] = _full(np.ones((len(test), 1)), np.unique(y[train]), n)
            continue
        with threadpool_limits(limits=threads, user_api="openmp"):
            hgb = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1,
                                                 random_state=seed)
            hgb.fit(feats.stats[train], y[train], sample_weight=hgb_weight)
            entry[name] = _full(hgb.predict_proba(feats.stats[test]), hgb.classes_, n)
    out["stats_boosting"] = entry

    out["fusion"] = {name: np.mean([out[a][name] for a in ANCHORS[:3]], axis=0)
                     for name in out["minirocket"]}
    return out
