"""The few-shot protocol's anchors: measured apart from ours on the same support draws, the
source + support fit weighted as documented, boosting threads changing nothing but time, and
the bench's merge and table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from csi_cloud.model.adapt import draw_support, pick_support
from csi_cloud.model.anchors import AnchorFeatures, fit_predict
from csi_cloud.model.fewshot import (
    SUPPORT_SHARE,
    Windows,
    few_shot_anchors,
    support_weights,
)

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parents[1]


def _bench_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_model", ROOT / "bench" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_model"] = module
    spec.loader.exec_module(module)
    return module


def _windows(recordings: int = 36, per: int = 4, classes: int = 3, shift: float = 0.0,
             seed: int = 0) -> tuple[Windows, np.ndarray]:
    """Synthetic windows: ``per`` windows of each recording, the activity in the profile,
    statistics and series; recordings from ``recordings // 2`` on are a second setting whose
    profile is moved by ``shift``. Returns the windows and stand-in MiniRocket features."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(recordings), per)
    act_of = np.arange(recordings) % classes
    activity = act_of[owner]
    second = owner >= recordings // 2
    centre = np.eye(classes, 8)[activity] * 2.0 + rng.normal(0, 0.6, (len(owner), 8))
    centre[second] += shift
    win = Windows.__new__(Windows)
    win.rows = np.zeros((len(owner), 1), dtype=np.int64)
    win.owner = owner
    win.last = np.tile(np.arange(per) == per - 1, recordings)
    win.activity = activity
    win.identity = np.full(len(owner), -1)
    series = np.repeat(centre[:, :, None], 12, axis=2).astype(np.float32)
    win.features = AnchorFeatures(series, centre.astype(np.float32),
                                  np.concatenate([centre, centre**2], 1).astype(np.float32))
    rocket = np.concatenate([centre, rng.normal(0, 1, (len(owner), 24))], 1)
    return win, rocket.astype(np.float32)


def test_the_anchors_draw_the_support_ours_draws() -> None:
    """few_shot_anchors (no bundle) and few_shot (a bundle's codes) draw the same support:
    the anchors' rows measured apart belong to ours' draws."""
    activity = np.arange(60) % 6
    codes = SimpleNamespace(activity=activity)
    target = np.arange(20, 60)
    for k in (1, 3, 5):
        for draw in range(3):
            a = pick_support(codes, target, k, draw)  # type: ignore[arg-type]
            b = draw_support(activity, target, k, draw)
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
            assert np.bincount(activity[b[0]], minlength=6).tolist() == [k] * 6


def test_the_support_gets_its_share_of_the_weight() -> None:
    w = support_weights(1000, 50)
    assert w[:1000].sum() == pytest.approx(w[1000:].sum())  # SUPPORT_SHARE = 0.5
    assert SUPPORT_SHARE == 0.5
    w = support_weights(1000, 50, 0.8)
    assert w[1000:].sum() / w.sum() == pytest.approx(0.8)
    with pytest.raises(ValueError, match=r"got 1\.0"):
        support_weights(10, 5, 1.0)
    with pytest.raises(ValueError, match="n_support=0"):
        support_weights(10, 0)


def test_boosting_threads_change_nothing_but_time() -> None:
    win, rocket = _windows()
    train, test = np.arange(0, 80), np.arange(80, 144)
    one = fit_predict(rocket, win.features, train, test, win.activity, None, 3, 0, threads=1)
    two = fit_predict(rocket, win.features, train, test, win.activity, None, 3, 0, threads=2)
    for name in one:
        np.testing.assert_array_equal(one[name]["activity"], two[name]["activity"])


def test_source_and_support_rows_on_a_shifted_setting() -> None:
    """Every anchor gets a support-only and a source + support row at each K; with a source
    whose profile sits elsewhere, the weighted support still carries the new setting."""
    win, rocket = _windows(recordings=72, shift=3.0)
    source, target = np.arange(36), np.arange(36, 72)
    out = few_shot_anchors(win, rocket, target, 3, [1, 3], 2, source=source,
                           source_shots=[3])
    assert "minirocket_source_and_support" not in out["1"]
    for name in ("minirocket", "profile_knn", "stats_boosting", "fusion"):
        assert f"{name}_support_only" in out["1"]
        row = out["3"][f"{name}_source_and_support"]
        assert 0 <= row["activity_accuracy"]["mean"] <= 1
    assert out["3"]["minirocket_source_and_support"]["activity_accuracy"]["mean"] >= 0.8
    assert out["3"]["anchors_cpu_s"]["seconds"]["mean"] >= 0


def test_merged_runs_keep_ours_and_add_the_anchors_rows() -> None:
    bench = _bench_model()
    acc = {"mean": 0.5, "std": 0.0}
    ours = {"u1->u2/seed0": {"5": {
        "ours_before": {"level0_activity_accuracy": {"mean": 0.3, "std": 0.0}},
        "ours_adapted": {"level0_activity_accuracy": {"mean": 0.8, "std": 0.0},
                         "level0_prior_weight": {"mean": 0.4, "std": 0.0}},
        "minirocket_support_only": {"activity_accuracy": acc}}}}
    anchors = {"u1->u2/seed0": {"5": {
        "minirocket_support_only": {"activity_accuracy": {"mean": 0.7, "std": 0.0}},
        "fusion_source_and_support": {"activity_accuracy": {"mean": 0.85, "std": 0.0}}}}}
    runs = bench._merge_runs(ours, anchors)
    methods = runs["u1->u2/seed0"]["5"]
    assert methods["ours_adapted"] == ours["u1->u2/seed0"]["5"]["ours_adapted"]
    assert methods["minirocket_support_only"]["activity_accuracy"]["mean"] == 0.7
    assert "fusion_source_and_support" in methods
    assert ours["u1->u2/seed0"]["5"]["minirocket_support_only"]["activity_accuracy"] is acc
    table = bench.few_shot_table({"runs": runs, "mean": bench._few_mean(runs)})
    row = next(line for line in table if line.startswith("| 5 |"))
    assert "0.850 (fusion source and support)" in row and "| -5.0 |" in row
    assert "0.800 (lam 0.40)" in row
