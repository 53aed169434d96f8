"""The few-shot protocol's anchors: measured apart from ours on the same support draws, the
source + support fit weighted as documented, boosting threads changing nothing but time, and
the bench's merge and table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

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


def test_a_score_measured_on_some_runs_only_gets_no_mean() -> None:
    """Seeds whose anchors fitted the last windows alone have per-recording scores and no
    per-second ones: the per-second mean would be the other seeds' alone, so there is none,
    and the table says '-' for it."""
    bench = _bench_model()

    def row(acc: float, per_second: float | None) -> dict[str, Any]:
        scores = {"activity_accuracy": {"mean": acc, "std": 0.0}}
        if per_second is not None:
            scores["activity_accuracy_per_second"] = {"mean": per_second, "std": 0.0}
        return {"5": {"fusion_source_and_support": scores,
                      "ours_adapted": {"level0_activity_accuracy": {"mean": 0.8, "std": 0.0},
                                       "level0_activity_accuracy_per_second":
                                           {"mean": 0.7, "std": 0.0}}}}

    runs = {"fold0/seed0": row(0.9, 0.6), "fold0/seed1": row(0.7, None)}
    mean = bench._few_mean(runs)["5"]
    assert mean["fusion_source_and_support"] == {"activity_accuracy": 0.8}
    assert mean["ours_adapted"]["level0_activity_accuracy_per_second"] == 0.7
    # A method run on some seeds only gets no mean at all; CPU timings are the runs' that
    # timed them.
    partial = {"fold0/seed0": {"5": {**row(0.9, 0.6)["5"],
                                     "anchors_cpu_s": {"seconds": {"mean": 20.0, "std": 0}},
                                     "minirocket_support_only": {
                                         "activity_accuracy": {"mean": 0.5, "std": 0}}}},
               "fold0/seed1": row(0.7, None)}
    partial_mean = bench._few_mean(partial)["5"]
    assert "minirocket_support_only" not in partial_mean
    assert partial_mean["anchors_cpu_s"] == {"seconds": 20.0}
    few = {"runs": runs, "mean": {"5": mean}}
    report = {"draws": 3, "folds": 5, "epochs": 12, "targets": {},
              "datasets": {"wiar": {"protocols": {}, "few_shot": {"wiar-learning-curve": few}}}}
    assert "| fusion_source_and_support | 0.800 / - |" in bench.render(report, "wiar")
    # Per direction, a direction's seeds are one row: their mean.
    runs["fold1/seed0"] = row(0.5, 0.5)
    table = bench.few_shot_table({"runs": runs, "mean": bench._few_mean(runs)})
    assert "per direction (mean over the 2 seeds and the support draws)" in "\n".join(table)
    fold0 = [line for line in table if line.startswith("| fold0 |")]
    assert len(fold0) == 1 and "0.800 (fusion source and support)" in fold0[0]


def test_per_recording_scores_come_from_anchors_fitted_on_last_windows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-recording score reads each recording's last window, so its anchors are fitted on
    the training recordings' last windows (plus the support's, weighted); the per-second
    score's anchors on every window. Each fit sees the windows it should and nothing else."""
    from csi_cloud.model import anchors
    from csi_cloud.model.fewshot import run_anchors

    win, rocket = _windows(recordings=48)
    seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    real = anchors.fit_predict

    def spy(rocket: np.ndarray, feats: AnchorFeatures, train: np.ndarray, test: np.ndarray,
            *args: object, **kwargs: object) -> dict[str, dict[str, np.ndarray]]:
        weight = kwargs.get("weight")
        assert isinstance(weight, np.ndarray)
        seen.append((train, test, weight))
        return real(rocket, feats, train, test, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(anchors, "fit_predict", spy)
    source, support, test = np.arange(24), np.array([24, 25, 26]), np.arange(30, 48)
    out = run_anchors(win, rocket, source, test, 3, 0, identity=False, seed=0,
                      support=support)
    (last_train, last_test, last_w), (every_train, every_test, _) = seen
    assert win.last[last_train].all() and win.last[last_test].all()
    assert set(win.owner[last_train]) == set(source) | set(support)
    assert len(last_test) == len(test)  # one window a test recording
    assert last_w[-3:].sum() == pytest.approx(last_w[:-3].sum())  # the support's share
    assert len(every_train) == 4 * (len(source) + len(support))
    assert len(every_test) == 4 * len(test)
    row = out["minirocket"]
    assert set(row) == {"activity_accuracy", "activity_accuracy_every_window_fit",
                        "activity_accuracy_per_second"}
    seen.clear()
    only_last = run_anchors(win, rocket, source, test, 3, 0, identity=False, seed=0,
                            fits=("last",))
    assert len(seen) == 1 and set(only_last["fusion"]) == {"activity_accuracy"}
    with pytest.raises(ValueError, match="'first'"):
        run_anchors(win, rocket, source, test, 3, 0, identity=False, seed=0,
                    fits=("first",))


def test_support_alone_rows_fit_every_window_and_a_last_only_run_adds_scores() -> None:
    """On the support alone K last windows an activity are too few to fit on: those rows
    use every window, and a ``fits=("last",)`` run gives only the source + support rows'
    per-recording scores, which the bench merges next to the per-second ones."""
    win, rocket = _windows(recordings=72, shift=3.0)
    source, target = np.arange(36), np.arange(36, 72)
    both = few_shot_anchors(win, rocket, target, 3, [3], 1, source=source)
    assert "activity_accuracy_per_second" in both["3"]["minirocket_support_only"]
    assert "activity_accuracy_every_window_fit" not in both["3"]["minirocket_support_only"]
    last = few_shot_anchors(win, rocket, target, 3, [3], 1, source=source, fits=("last",))
    assert not any(m.endswith("_support_only") for m in last["3"])
    assert set(last["3"]["fusion_source_and_support"]) == {"activity_accuracy"}
    bench = _bench_model()
    earlier = {"fold0/seed0": {"3": {"fusion_source_and_support": {
        "activity_accuracy": {"mean": 0.1, "std": 0.0},
        "activity_accuracy_per_second": {"mean": 0.6, "std": 0.0}}}}}
    merged = bench._merge_runs(earlier, {"fold0/seed0": {"3": last["3"]}})
    row = merged["fold0/seed0"]["3"]["fusion_source_and_support"]
    assert row["activity_accuracy_per_second"]["mean"] == 0.6
    assert row["activity_accuracy"] == last["3"]["fusion_source_and_support"]["activity_accuracy"]


def test_an_anchors_only_protocol_section_replaces_the_anchor_scores_of_ours() -> None:
    bench = _bench_model()
    acc = {"mean": 0.5, "std": 0.0}
    ours = {"tasks": 2, "task_names": ["fold0", "fold1"], "ours": {"levels": []},
            "anchors": {"minirocket": {"activity_accuracy": acc,
                                       "activity_accuracy_per_second": acc}},
            "per_task": {"fold0": {"ours_level0": 0.9, "minirocket": 0.5},
                         "fold1": {"ours_level0": 0.8, "minirocket": 0.5}}}
    new = {"mean": 0.95, "std": 0.01}
    anchors = {"anchors_only": True, "tasks": 2, "task_names": ["fold0", "fold1"],
               "anchors": {"minirocket": {"activity_accuracy": new}},
               "per_task": {"fold0": {"minirocket": 0.96}, "fold1": {"minirocket": 0.94}}}
    for first, second in ((ours, anchors), (anchors, ours)):
        merged = bench._merge_protocol({"random": first}, "random", second)["random"]
        assert "anchors_only" not in merged and merged["ours"] == {"levels": []}
        assert merged["anchors"]["minirocket"] == {"activity_accuracy": new,
                                                  "activity_accuracy_per_second": acc}
        assert merged["per_task"]["fold0"] == {"ours_level0": 0.9, "minirocket": 0.96}
    with pytest.raises(ValueError, match="fold0"):
        bench._merge_protocol({"random": ours}, "random",
                              {**anchors, "task_names": ["fold0"]})


def test_a_cross_room_direction_keeps_its_whole_name_in_the_table() -> None:
    bench = _bench_model()
    row = {"ours_before": {"level0_activity_accuracy": {"mean": 0.2, "std": 0.0}},
           "ours_adapted": {"level0_activity_accuracy": {"mean": 0.7, "std": 0.0},
                            "level0_prior_weight": {"mean": 0.1, "std": 0.0}},
           "fusion_support_only": {"activity_accuracy": {"mean": 0.6, "std": 0.0}}}
    runs = {"rm1/rm2->rm3/rm4/seed0": {"5": row}, "rm3/rm4->rm1/rm2/seed0": {"5": row}}
    table = bench.few_shot_table({"runs": runs, "mean": bench._few_mean(runs)})
    assert any(line.startswith("| rm1/rm2->rm3/rm4 |") for line in table), table
    assert any(line.startswith("| rm3/rm4->rm1/rm2 |") for line in table), table
