"""Self-training of an adapted head on unlabelled recordings of the new setting.

``csi adapt`` learns a new session or room from K labelled recordings per activity. The room
also gives unlabelled recordings: the live stream between calibrations. One round of
self-training uses them: the adapted head labels each unlabelled recording with the activity
of highest mean log-probability over its windows (every rate level's), and the head is
fitted again from the parent (:func:`~.adapt.adapt_head`) on the support plus those
recordings read as their pseudo-labels.

A guard drops it where the room's labelled recordings say it does harm: the support is split
into folds (each holds about one recording per activity); for each fold, the head is adapted
on the other folds, self-trained from there on the same unlabelled recordings, and both
heads read every window of the held-out fold. Each held-out recording reads better, worse or
the same self-trained (its share of windows right); self-training is dropped only when a
one-sided sign test over those that differ says worse beyond chance (p < :data:`ALPHA`).
Recordings are the units: a recording's windows are not independent of one another. It
needs two labelled recordings of every activity (K >= 2); with fewer the adapted head stays.
On Fition's new sessions and rooms at K = 5 (bench/self_training.py) one round gains 1.3 and
3.7 points at level 0, and the guard dropped it in 1 draw of 54. A first guard that kept the
round only where the held-out windows read at least as well took away half the gain
(docs/model.md, "Self-training", has both).

Shapes: recordings are indices into a :class:`~.heads.CodeData` (its recordings axis);
``activity`` labels are (R,) with -1 where a recording has none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .adapt import HeadWindows, adapt_head
from .heads import CodeData
from .network import CSICodecNet

__all__ = ["ALPHA", "GuardResult", "PseudoLabels", "SelfTraining", "guard_folds", "pseudo_labels",
           "refit_with_pseudo_labels", "self_train"]

MIN_FOLDS = 2  # the guard holds out one fold and fits on the rest: two labelled per activity
MAX_FOLDS = 5
# The guard drops self-training only where the held-out support recordings read it worse
# beyond chance at this level (a one-sided sign test, recordings being the independent units).
ALPHA = 0.05


@dataclass(slots=True)
class PseudoLabels:
    """Each unlabelled recording's activity as a head reads it: ``recordings`` (P,),
    ``labels`` (P,) and ``confidence`` (P,), the mean log-probability of that activity over
    the recording's windows."""

    recordings: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray


@dataclass(slots=True)
class GuardResult:
    """What the guard measured on the held-out support folds: windows read right by the
    adapted head and by the self-trained one, out of ``windows``, and the held-out
    recordings that the self-trained head reads ``better`` or ``worse`` (a higher or lower
    share of their windows right)."""

    folds: int
    windows: int
    correct_adapted: int
    correct_self_trained: int
    better: int = 0
    worse: int = 0

    @property
    def p_worse(self) -> float:
        """One-sided sign test over the held-out recordings that differ: the chance of at
        least ``worse`` of them reading worse if self-training changed nothing."""
        n = self.better + self.worse
        return sum(math.comb(n, k) for k in range(self.worse, n + 1)) / 2 ** n if n else 1.0

    @property
    def keeps(self) -> bool:
        """Kept unless the held-out recordings read it worse beyond chance (p < ALPHA)."""
        return self.windows > 0 and self.p_worse >= ALPHA

    def as_dict(self) -> dict[str, Any]:
        return {"folds": self.folds, "windows": self.windows,
                "accuracy_adapted": round(self.correct_adapted / max(self.windows, 1), 4),
                "accuracy_self_trained": round(
                    self.correct_self_trained / max(self.windows, 1), 4),
                "recordings_better": self.better, "recordings_worse": self.worse,
                "p_worse": round(self.p_worse, 4), "kept": self.keeps}


@dataclass(slots=True)
class SelfTraining:
    """The head :func:`self_train` returns and why: ``kept`` says whether it is the
    self-trained one (else the adapted head, unchanged); ``reason`` says why not."""

    net: CSICodecNet
    kept: bool
    unlabelled: int
    pseudo_label_counts: dict[int, int] = field(default_factory=dict)
    guard: GuardResult | None = None
    reason: str = ""

    def as_dict(self, activities: Sequence[str] | None = None) -> dict[str, Any]:
        def name(c: int) -> str:
            return activities[c] if activities is not None and c < len(activities) else str(c)
        return {"kept": self.kept, "unlabelled": self.unlabelled,
                "pseudo_labels": {name(c): n for c, n in sorted(
                    self.pseudo_label_counts.items())},
                "guard": self.guard.as_dict() if self.guard is not None else None,
                "reason": self.reason}


def pseudo_labels(net: CSICodecNet, windows: HeadWindows, recordings: np.ndarray
                  ) -> PseudoLabels:
    """Each recording's activity of highest mean log-probability over its windows at every
    rate level, as ``net``'s context head reads them (``windows``: the head's features of at
    least these recordings). Recordings without a window are left out."""
    if net.context_head is None:
        raise ValueError("self-training needs a bundle with a context head")
    logp: dict[int, list[np.ndarray]] = {}
    for _, owners, probs in windows.probabilities(net.context_head, recordings):
        for owner, p in zip(owners.tolist(), np.log(np.clip(probs, 1e-6, 1.0)), strict=True):
            logp.setdefault(owner, []).append(p)
    recs = np.array(sorted(logp), dtype=np.int64)
    if not len(recs):
        return PseudoLabels(recs, recs.copy(), np.zeros(0))
    mean = np.stack([np.mean(logp[int(r)], axis=0) for r in recs])
    return PseudoLabels(recs, mean.argmax(1).astype(np.int64), mean.max(1))


def refit_with_pseudo_labels(parent: CSICodecNet, codes: CodeData, support: np.ndarray,
                             pseudo: PseudoLabels, *, windows: HeadWindows,
                             short_lengths: Sequence[int] = ()) -> CSICodecNet:
    """:func:`~.adapt.adapt_head` from the parent on the support plus the pseudo-labelled
    recordings, whose windows read as their pseudo-labels."""
    labels = codes.activity.copy()
    labels[pseudo.recordings] = pseudo.labels
    return adapt_head(parent, replace(codes, activity=labels),
                      np.union1d(support, pseudo.recordings), windows=windows,
                      short_lengths=short_lengths)


def guard_folds(activity: np.ndarray, support: np.ndarray, seed: int = 0
                ) -> list[np.ndarray]:
    """The support split into folds, each with about one recording of every activity: as
    many folds as the rarest activity has recordings (at most :data:`MAX_FOLDS`); none when
    that is below :data:`MIN_FOLDS`."""
    support = np.asarray(support, dtype=np.int64)
    classes = sorted(set(activity[support].tolist()))
    if not classes:
        return []
    n = min(MAX_FOLDS, min(int((activity[support] == c).sum()) for c in classes))
    if n < MIN_FOLDS:
        return []
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(n)]
    for c in classes:
        for i, r in enumerate(rng.permutation(support[activity[support] == c]).tolist()):
            folds[i % n].append(r)
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def _correct(net: CSICodecNet, windows: HeadWindows, labels: np.ndarray,
             recordings: np.ndarray) -> dict[int, tuple[int, int]]:
    """Recording -> (its windows that ``net``'s head reads right, its windows): every window
    the service would classify, at every rate level."""
    assert net.context_head is not None
    out: dict[int, tuple[int, int]] = {}
    for _, owners, probs in windows.probabilities(net.context_head, recordings):
        right = probs.argmax(1) == labels[owners]
        for r in np.unique(owners).tolist():
            mine = owners == r
            have = out.get(r, (0, 0))
            out[r] = (have[0] + int(right[mine].sum()), have[1] + int(mine.sum()))
    return out


def guard(parent: CSICodecNet, codes: CodeData, support: np.ndarray, pool: np.ndarray, *,
          windows: HeadWindows, seed: int = 0) -> GuardResult | None:
    """Cross-validation of one round of self-training on the support (see the module's
    docstring); None when the support has too few recordings of some activity. The heads
    it fits have no short-reading layer: it reads full windows only, as the accuracy
    ``csi adapt`` reports does."""
    folds = guard_folds(codes.activity, support, seed)
    if not folds:
        return None
    result = GuardResult(len(folds), 0, 0, 0)
    for held in folds:
        rest = np.setdiff1d(support, held)
        adapted = adapt_head(parent, codes, rest, windows=windows)
        trained = refit_with_pseudo_labels(parent, codes, rest,
                                           pseudo_labels(adapted, windows, pool),
                                           windows=windows)
        before = _correct(adapted, windows, codes.activity, held)
        after = _correct(trained, windows, codes.activity, held)
        for r, (right, total) in before.items():
            result.windows += total
            result.correct_adapted += right
            result.correct_self_trained += after[r][0]
            result.better += int(after[r][0] > right)
            result.worse += int(after[r][0] < right)
    return result


def self_train(parent: CSICodecNet, adapted: CSICodecNet, codes: CodeData,
               support: np.ndarray, pool: np.ndarray, *, windows: HeadWindows,
               short_lengths: Sequence[int] = (), seed: int = 0,
               guarded: bool = True) -> SelfTraining:
    """One round of self-training of ``adapted`` (the parent adapted on ``support``) on the
    unlabelled ``pool`` recordings; ``windows`` must hold the head's features of the support
    and the pool. With ``guarded`` (the default) the result is dropped where the guard says
    the held-out support reads it worse beyond chance; otherwise it is always kept."""
    pool = np.setdiff1d(np.asarray(pool, dtype=np.int64), support)
    if not len(pool):
        return SelfTraining(adapted, False, 0, reason="no unlabelled recordings")
    pseudo = pseudo_labels(adapted, windows, pool)
    if not len(pseudo.recordings):
        return SelfTraining(adapted, False, 0,
                            reason="no unlabelled recording is long enough for a window")
    counts = {int(c): int(n) for c, n in zip(*np.unique(pseudo.labels, return_counts=True),
                                             strict=True)}
    checked = None
    if guarded:
        checked = guard(parent, codes, support, pseudo.recordings, windows=windows,
                        seed=seed)
        if checked is None:
            return SelfTraining(adapted, False, len(pseudo.recordings), counts,
                                reason=f"the guard needs at least {MIN_FOLDS} labelled "
                                       "recordings of every activity")
        if not checked.keeps:
            return SelfTraining(adapted, False, len(pseudo.recordings), counts, checked,
                                reason=f"{checked.worse} of the held-out labelled recordings "
                                       f"read worse self-trained, {checked.better} better "
                                       f"(sign test p = {checked.p_worse:.3f} < {ALPHA})")
    trained = refit_with_pseudo_labels(parent, codes, support, pseudo, windows=windows,
                                       short_lengths=short_lengths)
    return SelfTraining(trained, True, len(pseudo.recordings), counts, checked)
