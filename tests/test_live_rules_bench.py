"""bench/live_rules.py on synthetic readings: each combination rule's math, the all-stays
filter against the service's filter, and the validation judgement that tells a rule that
generalises from one that only fits its own recordings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from _bench import bench_module

from csi_cloud.smoothing import STAY_GRID, filter_stream

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rules() -> Iterator[ModuleType]:
    with bench_module("live_rules") as module:
        yield module


def _p(winner: int, strength: float, k: int = 3) -> np.ndarray:
    p = np.full(k, (1 - strength) / (k - 1))
    p[winner] = strength
    return p


def test_the_filter_of_every_stay_is_the_service_filter(rules: ModuleType) -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=120)
    starts = rng.uniform(size=120) < 0.05
    together = rules.filtered_predictions(p, starts)
    for j, stay in enumerate(STAY_GRID):
        assert np.array_equal(together[j], filter_stream(p, stay, starts).argmax(1)), stay


def test_the_parameter_free_rules(rules: ModuleType) -> None:
    # One window, three lengths: two say class 1 mildly, one says class 0 firmly.
    readings = np.array([[_p(1, 0.5), _p(1, 0.55), _p(0, 0.8)]])
    assert rules.most_confident(readings).argmax(1).tolist() == [0]
    assert rules.majority_vote(readings).argmax(1).tolist() == [1]
    # The vote gives the surest reading among the winners' voters.
    assert np.allclose(rules.majority_vote(readings)[0], _p(1, 0.55))
    product = readings[0].prod(0) / readings[0].prod(0).sum()
    assert np.allclose(rules.weighted_logs(np.ones(3), readings)[0], product)
    assert np.allclose(rules.weighted_mean(np.full(3, 1 / 3), readings)[0], readings[0].mean(0))
    # Margin and entropy differ from the top probability where the runner-up is close.
    close = np.array([[[0.5, 0.45, 0.05], [0.48, 0.26, 0.26]]])
    assert rules.most_confident(close).tolist() == [[0.5, 0.45, 0.05]]
    assert rules.largest_margin(close).tolist() == [[0.48, 0.26, 0.26]]
    # Offsets: zero is the bundle's rule; a large one on a length makes it win or lose.
    assert np.array_equal(rules.offset_confident(np.zeros(3), readings),
                          rules.most_confident(readings))
    assert rules.offset_confident(np.array([0.4, 0.0, 0.0]), readings).argmax(1).tolist() == [1]
    # A gate that ignores the confidence is a weighted mean.
    assert np.allclose(rules.gated_mixture(np.array([0.0, 0.0, 0.0, 0.0]), readings),
                       readings.mean(1))


def test_stacking_penalised_hard_is_the_geometric_mean(rules: ModuleType) -> None:
    rng = np.random.default_rng(1)
    n, k = 600, 3
    y = np.arange(n) % k
    readings = rng.dirichlet(np.ones(k), size=(n, 2))
    streams = [(readings, y, np.r_[True, np.zeros(n - 1, bool)], np.arange(n) // 20)]
    stacked = rules.fit_stacking(1e6)(streams, None)(readings)
    geometric = rules.weighted_logs(np.full(2, 0.5), readings)
    # Only the (unpenalised) per-class bias is free: near zero for balanced classes.
    assert np.allclose(stacked, geometric, atol=0.02)


def _lagging(seed: int, lag: int = 3) -> object:
    """Episodes of 10 s: the full window (last length) is sure but ``lag`` seconds behind each
    change; the short reading follows at once, is right 85 % of the time, and is less sure,
    so the most confident reading mostly keeps the lagging full one."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.permutation(np.arange(30) % 3), 10)
    behind = np.r_[np.full(lag, labels[0]), labels[:-lag]]
    full = np.stack([_p(int(c), 0.8) for c in behind])
    short = np.stack([_p(int(c) if rng.uniform() < 0.85 else int(rng.integers(0, 3)), 0.7)
                      for c in labels])
    n = len(labels)
    return (np.stack([short, full], 1), labels, np.r_[True, np.zeros(n - 1, bool)],
            np.arange(n) // 10)


def test_validation_tells_a_rule_that_generalises_from_one_that_overfits(
        rules: ModuleType) -> None:
    streams = [_lagging(s) for s in range(3)]
    mc = rules.cross_fitted(streams, rules.CANDIDATES["most confident"], 2, 1)
    # An offset for the short reading is learnt on some recordings and holds on the others.
    offsets = rules.cross_fitted(streams, rules.CANDIDATES["most confident + offsets"], 2, 1)
    assert offsets > mc + 0.05
    # Readings that carry no information: a lightly penalised stacking model fits its own
    # recordings far better than chance, which the held-out recordings reveal.
    rng = np.random.default_rng(3)
    noise = []
    for _ in range(3):
        n = 300
        noise.append((rng.dirichlet(np.ones(3), size=(n, 2)), rng.integers(0, 3, n),
                      np.r_[True, np.zeros(n - 1, bool)], np.arange(n) // 10))
    fit = rules.fit_stacking(1e-4)
    in_sample = rules.best_stay(noise, fit(noise, None))[0]
    held_out = rules.cross_fitted(noise, fit, 2, 1)
    assert in_sample > held_out + 0.03
    assert held_out < 0.42  # chance is 1/3


def test_the_pool_fitted_with_the_filter_keeps_its_own_stay(rules: ModuleType) -> None:
    streams = [_lagging(s) for s in range(3)]
    fit = rules.CANDIDATES["pool fitted with the filter"]
    rule = fit(streams, None)
    # Its stay is its own (fitted with the weights), not a grid value chosen afterwards.
    assert rules.stays_of(rule) == (rule.stay,) and 0.0 <= rule.stay <= 0.99
    _, stay = rules.best_stay(streams, rule)
    assert stay == rule.stay
    rd, labels, _, _ = streams[0]
    p = rule(rd)
    assert p.shape == (len(labels), 3) and np.allclose(p.sum(1), 1.0)
    # The short reading follows each change: pooled and filtered it beats keeping the most
    # confident (mostly the lagging full) reading, on folds it was not fitted on too.
    mc = rules.cross_fitted(streams, rules.CANDIDATES["most confident"], 2, 1)
    assert rules.cross_fitted(streams, fit, 2, 1) > mc + 0.05
    # Only the masked seconds count: fitted on each stream's first 10 s (one episode, no
    # change in it) the filter should hold on, unlike the fit on every second.
    first = [np.arange(len(s[1])) < 10 for s in streams]
    assert fit(streams, first).stay > rule.stay + 0.05
