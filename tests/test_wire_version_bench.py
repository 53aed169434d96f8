"""bench/wire_version.py: which differences between two scorings of a bundle count as moved."""

from __future__ import annotations

from _bench import bench_module


def test_only_figures_the_bundle_recorded_and_that_changed_count_as_moved() -> None:
    before = {"model": "a" * 64, "levels": [
        {"level": 0, "payload_bytes_per_s": 18.35, "activity_accuracy": 0.887,
         "activity_accuracy_live_per_second": None, "encoder_ms_per_segment": 0.24}]}
    same = {"model": "b" * 64, "levels": [
        {"level": 0, "payload_bytes_per_s": 15.38, "activity_accuracy": 0.887,
         "activity_accuracy_live_per_second": 0.84, "encoder_ms_per_segment": 0.17}]}
    with bench_module("wire_version") as bench:
        assert bench._moved(before, same) == []
        moved = {**same, "levels": [{**same["levels"][0], "activity_accuracy": 0.871}]}
        assert bench._moved(before, moved) == [".levels[0].activity_accuracy: 0.887 -> 0.871"]
        fewer = {**same, "levels": []}
        assert bench._moved(before, fewer) == [f".levels: {before['levels']!r} -> []"]
