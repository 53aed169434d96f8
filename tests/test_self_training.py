"""Self-training after ``csi adapt``: pseudo-labels, the refit on them, and the guard that keeps
it unless the held-out support reads it worse beyond chance. On the committed Fition bundle and
the sample recordings, each cut into thirds so that every activity has several."""

from __future__ import annotations

import numpy as np
import pytest
from _harness import FOLDER, MODEL

from csi_cloud.model.adapt import HeadWindows, adapt_head, head_windows, load_codes
from csi_cloud.model.compression import CloudModel
from csi_cloud.model.heads import CodeData
from csi_cloud.model.network import CSICodecNet
from csi_cloud.model.self_training import (
    GuardResult,
    PseudoLabels,
    guard_folds,
    pseudo_labels,
    refit_with_pseudo_labels,
    self_train,
)


def _cut(codes: CodeData, parts: int) -> CodeData:
    """Each recording cut into ``parts`` recordings of consecutive segments (same labels)."""
    order, recording, slot, owner = [], [], [], []
    for r in range(len(codes)):
        rows = np.flatnonzero(codes.recording == r)
        rows = rows[np.argsort(codes.slot[rows], kind="stable")]
        for piece in np.array_split(rows, parts):
            if not len(piece):
                continue
            order.append(piece)
            recording.append(np.full(len(piece), len(owner)))
            slot.append(codes.slot[piece] - codes.slot[piece].min())
            owner.append(r)
    rows = np.concatenate(order)
    count = np.array([len(p) for p in order])
    return CodeData(
        z_q=codes.z_q[:, rows], profile=codes.profile[:, rows], level=codes.level[:, rows],
        recording=np.concatenate(recording), slot=np.concatenate(slot),
        start=np.concatenate([[0], np.cumsum(count)[:-1]]), count=count,
        slots=np.array([int(s.max()) + 1 for s in slot]),
        activity=codes.activity[owner].copy(), identity=codes.identity[owner].copy(),
        names=[f"{codes.names[r]}#{i}" for i, r in enumerate(owner)])


Thirds = tuple[CloudModel, CodeData, np.ndarray, np.ndarray, HeadWindows, CSICodecNet]


@pytest.fixture(scope="module")
def thirds() -> Thirds:
    """The model, the sample recordings in thirds, a support of two thirds of each recording
    (so two or more per activity), the last thirds as the unlabelled pool, the head's
    features of every window, and the model adapted on the support (never changed by a
    test: every function here returns new networks)."""
    model, codes = load_codes(MODEL, "fition", FOLDER)
    cut = _cut(codes, 3)
    index = np.arange(len(cut))
    pool = index[2::3]
    support = np.setdiff1d(index, pool)
    windows = head_windows(model.net, cut, index)
    return (model, cut, support, pool, windows,
            adapt_head(model.net, cut, support, windows=windows))


def test_guard_folds_hold_about_one_recording_of_every_activity() -> None:
    activity = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, -1])
    support = np.arange(14)
    folds = guard_folds(activity, support, seed=3)
    assert len(folds) == 3  # the rarest activity (0) has three
    assert np.array_equal(np.sort(np.concatenate(folds)), support)
    for fold in folds:
        assert set(activity[fold].tolist()) == {0, 1, 2}
    assert all(np.array_equal(a, b) for a, b in zip(folds, guard_folds(activity, support, 3),
                                                    strict=True))
    # At most five folds; none where an activity has one labelled recording.
    many = np.repeat([0, 1], 9)
    assert len(guard_folds(many, np.arange(18))) == 5
    assert guard_folds(np.array([0, 0, 1]), np.arange(3)) == []
    assert guard_folds(np.array([0, 1]), np.arange(0)) == []


def test_the_guard_drops_self_training_only_where_recordings_read_it_worse_beyond_chance(
        ) -> None:
    # No held-out recording reads differently: kept, whatever the window counts say.
    assert GuardResult(2, 10, 6, 5).keeps
    # One-sided sign test over the recordings that differ: P(at least `worse` of n).
    assert GuardResult(2, 50, 30, 25, better=0, worse=4).p_worse == 1 / 16
    assert GuardResult(2, 50, 30, 25, better=0, worse=4).keeps  # 0.0625
    assert not GuardResult(2, 50, 30, 25, better=0, worse=5).keeps  # 1/32
    assert GuardResult(2, 50, 30, 25, better=2, worse=8).p_worse == (45 + 10 + 1) / 1024
    assert GuardResult(2, 50, 30, 25, better=2, worse=8).keeps
    assert not GuardResult(2, 50, 30, 25, better=1, worse=9).keeps  # 11 / 1024
    assert GuardResult(2, 50, 30, 25, better=9, worse=1).p_worse > 0.99
    assert not GuardResult(2, 0, 0, 0).keeps
    assert GuardResult(2, 8, 4, 6, better=3, worse=1).as_dict() == {
        "folds": 2, "windows": 8, "accuracy_adapted": 0.5, "accuracy_self_trained": 0.75,
        "recordings_better": 3, "recordings_worse": 1, "p_worse": 0.9375, "kept": True}


def test_pseudo_labels_are_the_activity_a_head_reads_over_each_recording(
        thirds: Thirds) -> None:
    _, codes, support, pool, windows, adapted = thirds
    pseudo = pseudo_labels(adapted, windows, pool)
    assert np.array_equal(pseudo.recordings, pool)
    assert pseudo.labels.shape == pseudo.confidence.shape == pool.shape
    assert (pseudo.confidence <= 0).all()  # a mean log-probability
    # The head fitted on the support reads the support's own recordings as their labels.
    own = pseudo_labels(adapted, windows, support)
    assert (own.labels == codes.activity[support]).mean() >= 0.8
    # A recording without a window is left out.
    assert len(pseudo_labels(adapted, windows, np.array([len(codes) + 5])).recordings) == 0


def test_self_training_refits_from_the_parent_on_the_support_and_the_pseudo_labels(
        thirds: Thirds) -> None:
    model, codes, support, pool, windows, adapted = thirds
    pseudo = pseudo_labels(adapted, windows, pool)
    trained = self_train(model.net, adapted, codes, support, pool, windows=windows,
                         guarded=False)
    assert trained.kept and trained.guard is None and trained.unlabelled == len(pool)
    assert trained.pseudo_label_counts == {
        int(c): int(n) for c, n in zip(*np.unique(pseudo.labels, return_counts=True),
                                       strict=True)}
    expected = refit_with_pseudo_labels(model.net, codes, support, pseudo, windows=windows)
    head, want, before = (n.context_head for n in (trained.net, expected, adapted))
    assert head is not None and want is not None and before is not None
    for got, ref in zip(head.levels, want.levels, strict=True):
        assert np.array_equal(got.activity.coef, ref.activity.coef)
    assert any(not np.array_equal(got.activity.coef, old.activity.coef)
               for got, old in zip(head.levels, before.levels, strict=True))
    # The refit reads the pool as its pseudo-labels, not as what the codes say.
    flipped = PseudoLabels(pseudo.recordings, (pseudo.labels + 1) % 6, pseudo.confidence)
    other = refit_with_pseudo_labels(model.net, codes, support, flipped, windows=windows)
    assert other.context_head is not None
    assert any(not np.array_equal(a.activity.coef, b.activity.coef)
               for a, b in zip(other.context_head.levels, head.levels, strict=True))


def test_the_guard_cross_validates_one_round_on_the_support(
        thirds: Thirds) -> None:
    model, codes, support, pool, windows, adapted = thirds
    trained = self_train(model.net, adapted, codes, support, pool, windows=windows, seed=1)
    guard = trained.guard
    assert guard is not None and guard.folds == 2
    # Every window of every support recording was read once, held out.
    assert guard.windows == sum(int(np.isin(g[2], support).sum()) for g in windows.groups)
    assert 0 <= guard.correct_adapted <= guard.windows
    assert 0 <= guard.correct_self_trained <= guard.windows
    assert guard.better + guard.worse <= len(support)
    if guard.better == guard.worse == 0:
        assert guard.correct_adapted == guard.correct_self_trained
    assert trained.kept == guard.keeps
    assert (trained.net is adapted) == (not trained.kept)
    assert trained.as_dict()["guard"] == guard.as_dict()


def test_without_unlabelled_recordings_or_enough_labelled_ones_the_adapted_head_stays(
        thirds: Thirds) -> None:
    model, codes, support, pool, windows, adapted = thirds
    none = self_train(model.net, adapted, codes, support, np.array([], dtype=np.int64),
                      windows=windows)
    assert not none.kept and none.net is adapted and none.reason == "no unlabelled recordings"
    # One labelled recording of an activity: the guard cannot hold one out.
    one = np.array([int(np.flatnonzero(codes.activity == c)[0])
                    for c in np.unique(codes.activity)])
    single = adapt_head(model.net, codes, one, windows=windows)
    few = self_train(model.net, single, codes, one, pool, windows=windows)
    assert not few.kept and few.net is single and "at least 2 labelled" in few.reason
    assert few.unlabelled == len(np.setdiff1d(pool, one))
    assert few.as_dict(["a", "b", "c", "d", "e", "f"])["reason"] == few.reason
