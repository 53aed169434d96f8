"""bench/model.py's plots from a results file, without running the bench."""

from __future__ import annotations

from pathlib import Path

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
