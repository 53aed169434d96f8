"""The identity neighbours of the context head: the nearest training windows by window-mean
profile, mixed into the ridge layer's identity probabilities where validation says so."""

from __future__ import annotations

import numpy as np

from csi_cloud.model.context_head import ContextHead, LevelHead, fit_level
from csi_cloud.model.neighbours import ProfileNeighbours, fit_neighbours
from csi_cloud.model.rocket import WindowLayout
from csi_cloud.model.window import window_mean


def _windows(labels: np.ndarray, rng: np.random.Generator, *, n: int = 6, k: int = 4,
             spread: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows whose profile sits near a person's own point (person i at +-3 on axis i),
    with the first slot missing in every other window."""
    centres = np.zeros((labels.max() + 1, k), np.float32)
    for i in range(len(centres)):
        centres[i, i % k] = 3.0 * (1 if i < k else -1)
    coeff = (centres[labels][:, None, :]
             + spread * rng.standard_normal((len(labels), n, k))).astype(np.float32)
    present = np.ones((len(labels), n), bool)
    present[::2, 0] = False
    coeff[~present] = 99.0  # a missing slot's value must not count
    return np.zeros((len(labels), n, 0, 1), np.float32), coeff, present


def test_the_window_mean_reads_present_slots_only() -> None:
    coeff = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], np.float32)
    present = np.array([[True, True, False]])
    assert window_mean(coeff, present).tolist() == [[2.0, 3.0]]
    assert window_mean(coeff, np.zeros((1, 3), bool)).tolist() == [[0.0, 0.0]]


def test_neighbours_vote_and_mix_by_their_weight() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    _, coeff, present = _windows(labels, rng)
    model = fit_neighbours(coeff, present, labels, 3, 4, ridge_val=np.full((60, 3), 1 / 3),
                           val_coeff=coeff, val_present=present, val_labels=labels)
    assert model is not None and model.weight > 0  # a flat ridge layer: the votes decide
    p = model.probabilities(coeff, present)
    assert p.shape == (60, 3) and np.allclose(p.sum(1), 1)
    assert (p.argmax(1) == labels).all()
    ridge = np.tile(np.eye(3, dtype=np.float32)[2], (60, 1))  # always says person 2
    mixed = model.mix(ridge, coeff, present)
    assert np.allclose(mixed, (1 - model.weight) * ridge + model.weight * p)
    off = ProfileNeighbours(model.mean, model.scale, model.points, model.labels, 3, 5, 0.0)
    assert off.mix(ridge, coeff, present) is ridge


def test_no_neighbours_where_the_ridge_layer_is_already_right_or_nothing_is_known() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    _, coeff, present = _windows(labels, rng)
    right = np.eye(3, dtype=np.float32)[labels]
    assert fit_neighbours(coeff, present, labels, 3, 4, ridge_val=right, val_coeff=coeff,
                          val_present=present, val_labels=labels) is None  # ties: weight 0
    unknown = np.full(60, -1)
    assert fit_neighbours(coeff, present, unknown, 3, 4, ridge_val=right, val_coeff=coeff,
                          val_present=present, val_labels=labels) is None
    assert fit_neighbours(coeff, present, labels, 3, 4, ridge_val=right, val_coeff=coeff,
                          val_present=present, val_labels=unknown) is None


def test_a_level_head_mixes_its_neighbours_and_stores_them() -> None:
    """A level fitted with identities: its identity probabilities are the ridge layer's mixed
    with its neighbours' where validation kept them (the ridge layer's alone where it did
    not), and the head's arrays round trip either (the next test forces a mix)."""
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 12)
    z, coeff, present = _windows(labels, rng, n=8, k=4, spread=1.0)
    vz, vcoeff, vpresent = _windows(labels, rng, n=8, k=4, spread=1.0)
    activity = rng.integers(0, 2, len(labels))
    layout = WindowLayout(0, 4, profile_mean=True)
    level = fit_level((z, coeff, present), activity, layout, 2, features=168, seed=0,
                      val=((vz, vcoeff, vpresent), activity), identity=(labels, 4, labels))
    assert level.identity is not None
    feats = level.features(vz, vcoeff, vpresent)
    ridge = level.identity.probabilities(feats)
    mixed = level.identity_probabilities(feats, vcoeff, vpresent)
    assert mixed is not None
    if level.neighbours is None:  # validation kept the ridge layer alone
        assert np.array_equal(mixed, ridge)
    else:
        assert np.allclose(mixed, level.neighbours.mix(ridge, vcoeff, vpresent))
    head = ContextHead([level])
    again = ContextHead.from_arrays(head.arrays())
    assert again is not None
    _, p_id = head.predict(vz, vcoeff, vpresent, np.zeros(len(labels), int))
    _, p_again = again.predict(vz, vcoeff, vpresent, np.zeros(len(labels), int))
    assert p_id is not None and p_again is not None and np.allclose(p_id, p_again)
    assert (again.levels[0].neighbours is None) == (level.neighbours is None)


def test_a_forced_mix_round_trips_through_the_head_arrays() -> None:
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 10)
    z, coeff, present = _windows(labels, rng)
    level = fit_level((z, coeff, present), labels % 2, WindowLayout(0, 4, profile_mean=True),
                      2, features=168, seed=0, val=((z, coeff, present), labels % 2),
                      identity=(labels, 3, labels))
    nn = fit_neighbours(coeff, present, labels, 3, 4, ridge_val=np.full((30, 3), 1 / 3),
                        val_coeff=coeff, val_present=present, val_labels=labels)
    assert nn is not None
    level = LevelHead(level.layout, level.transforms, level.activity, level.identity,
                      neighbours=nn)
    again = ContextHead.from_arrays(ContextHead([level]).arrays())
    assert again is not None
    stored = again.levels[0].neighbours
    assert stored is not None
    assert (stored.k, stored.weight, stored.classes) == (nn.k, nn.weight, nn.classes)
    assert np.array_equal(stored.points, nn.points)
    assert np.array_equal(stored.labels, nn.labels)
