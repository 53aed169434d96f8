"""bench/model.py's helpers, targets and plots, without running the bench."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from _bench import bench_module

from csi_cloud.model.anchors import ANCHORS


def _score(mean: float) -> dict[str, float]:
    return {"mean": mean, "std": 0.01}


def test_a_run_without_the_anchors_per_second_scores_still_plots(tmp_path: Path) -> None:
    # --anchor-fits last measures the anchors per recording only.
    ours = {"activity_accuracy": _score(0.9), "activity_accuracy_per_second": _score(0.85)}
    report = {"datasets": {"wiar": {"protocols": {"random": {
        "ours": {"levels": [{"level": 0, "payload_bytes_per_s": _score(18.5), **ours}],
                 "unquantized": ours},
        "anchors": {a: {"activity_accuracy": _score(0.95)} for a in ANCHORS}}}}}}
    with bench_module("model") as model:
        written = model.plot(report, tmp_path)
    assert [Path(p).name for p in written] == ["model_wiar.png"]
    assert (tmp_path / "model_wiar.png").stat().st_size > 0


def test_level0_layout_changes_level_0_alone() -> None:
    from csi_cloud.model.network import ModelConfig

    with bench_module("model") as model:
        layout = model.level0_layout("0,16")
        assert model.level0_layout("") == {}
    default = ModelConfig(antennas=1, subcarriers=56, segment_frames=50, activities=6)
    changed = ModelConfig(antennas=1, subcarriers=56, segment_frames=50, activities=6, **layout)
    assert changed.level_channels == (0, *default.level_channels[1:])
    assert changed.profile_components == (16, *default.profile_components[1:])


def test_each_seeds_run_of_a_task_keeps_its_own_name_and_the_section_its_seed_count() -> None:
    """With several seeds the per-task scores are keyed by task and seed (one seed's run
    would otherwise overwrite another's), and the report says how many seeds a protocol's
    means are over."""
    with bench_module("model") as model:
        names = [model.run_name(f"fold{f}", s, 3) for s in range(3) for f in range(5)]
        assert len(set(names)) == 15 and names[5] == "fold0/seed1"
        assert model.seeds_of(names) == 3
        assert model.run_name("fold0", 0, 1) == "fold0"
        assert model.seeds_of(["fold0", "fold1"]) == 1
        assert model.seeds_of(["rm1/rm2->rm3/rm4"]) == 1


def test_first_seed_outside_the_seeds_is_refused_with_its_value(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """--first-seed adds seeds to an earlier run; a first seed past the last one would run
    nothing and write an empty results file, so it is refused before anything runs."""
    with bench_module("model") as model:
        for argv in (["--seeds", "2", "--first-seed", "2"], ["--first-seed", "-1"]):
            monkeypatch.setattr(sys, "argv", ["model.py", *argv])
            with pytest.raises(SystemExit) as info:
                model.main()
            assert info.value.code == 2
            assert f"--first-seed {argv[-1]} must be in" in capsys.readouterr().err


def test_the_live_figures_come_from_a_copy_calibrated_on_the_validation_recordings(
        tmp_path: Path) -> None:
    """The k-fold's live figures: the task's bundle is calibrated on its validation
    recordings (a copy: the bundle itself is left as it is) and each level's live label is
    scored on the test recordings alone."""
    import json
    import shutil

    import numpy as np

    from csi_cloud.datasets import index_dataset
    from csi_cloud.model.data import load_segments
    from csi_edge.bundle import load_manifest

    root = Path(__file__).resolve().parents[1]
    bundle = tmp_path / "wiar"
    shutil.copytree(root / "models" / "wiar", bundle)
    before = (bundle / "bundle.json").read_bytes()
    manifest = load_manifest(bundle)
    examples = list(index_dataset("wiar", root / "datasets" / "samples" / "wiar" / "height_90"))
    data = load_segments(examples, manifest.input_spec,
                         list(manifest.labels["activity"] or []), [])
    va, te = np.arange(5), np.arange(5, len(data))
    work = tmp_path / "work"
    work.mkdir()
    with bench_module("model") as model:
        calibrated = model.calibrated_copy(bundle, data, va, work)
        seen: list[tuple[int, ...]] = []
        real = model.bench_bundle

        def spy(*args: Any, **kwargs: Any) -> Any:
            seen.append(tuple(kwargs["loaded"][1].tolist()))
            return real(*args, **kwargs)

        model.bench_bundle = spy
        live = model.score_live(calibrated, data, te, 2)
    assert (bundle / "bundle.json").read_bytes() == before
    fitted = json.loads((calibrated / "bundle.json").read_text())["calibration"]["activity"]
    assert fitted["fitted_on"] == "5 validation recordings of the task"
    assert fitted["recordings"] == len(va)
    assert seen == [tuple(te.tolist())]
    assert len(live) == len(manifest.levels)
    for level in live:
        assert set(level) == {"activity_accuracy_live", "activity_accuracy_live_raw",
                              "activity_accuracy_live_settled",
                              "activity_accuracy_separate_smoothed"}
        assert all(0 <= v <= 1 for v in level.values())


def test_the_live_label_is_held_against_each_levels_per_recording_figure() -> None:
    def level(i: int, per_recording: float, live: float) -> dict[str, Any]:
        return {"level": i, "activity_accuracy": _score(per_recording),
                "activity_accuracy_live": _score(live),
                "activity_accuracy_live_raw": _score(live - 0.02),
                "activity_accuracy_live_settled": _score(live + 0.01)}

    section = {"ours": {"levels": [level(0, 0.92, 0.87), level(1, 0.95, 0.89)]}}
    with bench_module("model") as model:
        rows = model.live_targets(section)
    assert [r["target"] for r in rows] == [0.87, 0.9]
    assert [r["met"] for r in rows] == [True, False]
    assert rows[1]["margin"] == -0.01 and rows[1]["live_raw"] == 0.87


def test_the_targets_and_the_report_show_the_live_label() -> None:
    """k-fold results with live figures: the targets hold the live label against the
    per-recording figure per level and count the tasks that meet it on their own; the
    report's table shows it next to the per-second figure."""
    def level(i: int) -> dict[str, Any]:
        return {"level": i, "payload_bytes_per_s": _score(18.5 + 10 * i),
                "activity_accuracy": _score(0.92), "activity_accuracy_per_second": _score(0.85),
                "activity_accuracy_live": _score(0.88), "activity_accuracy_live_raw":
                _score(0.83), "activity_accuracy_live_settled": _score(0.88)}

    unquantized = {"activity_accuracy": _score(0.93), "activity_accuracy_per_second":
                   _score(0.86)}
    section = {"tasks": 2, "seeds": 1, "task_names": ["fold0", "fold1"],
               "ours": {"levels": [level(0), level(1)], "unquantized": unquantized},
               "anchors": {a: {"activity_accuracy": _score(0.95)} for a in ANCHORS},
               "per_task": {"fold0": {"ours_level0": 0.95, "ours_level0_live": 0.86},
                            "fold1": {"ours_level0": 0.89, "ours_level0_live": 0.86}}}
    report = {"folds": 2, "epochs": 12, "seeds": 1, "draws": 3,
              "datasets": {"wiar": {"protocols": {"random": section}}}}
    with bench_module("model") as model:
        report["targets"] = model.targets(report)
        text = model.render(report, "wiar")
    row = report["targets"]["wiar"]["random"]
    assert [r["met"] for r in row["live_label"]] == [True, True]
    assert row["live_label_level0_tasks_met"] == "1 of 2"
    assert "live label per second (raw)" in text
    assert "| ours, level 0 | 18.500 ± 0.010 | 0.920 ± 0.010 | 0.850 ± 0.010 | " \
           "0.880 ± 0.010 (0.830 ± 0.010) |" in text
