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


def test_the_three_byte_counts_of_the_samples_and_the_evaluations_agree() -> None:
    """Version 1 > one stream a message > version 2 as sent, and version 2 is what the
    evaluation counts through its own payloads (each segment's own quality)."""
    from pathlib import Path

    import numpy as np

    from csi_cloud.datasets import index_dataset
    from csi_cloud.model.compression import CloudModel
    from csi_cloud.model.data import load_segments
    from csi_cloud.model.evaluate import decode_level, encode_recordings
    from csi_edge.bundle import EdgeEncoder

    root = Path(__file__).resolve().parents[1]
    edge = EdgeEncoder(root / "models" / "fition")
    model = CloudModel.load(root / "models" / "fition")
    labels = edge.manifest.labels
    data = load_segments(list(index_dataset("fition", root / "datasets" / "samples" /
                                            "fition")), edge.spec,
                         list(labels["activity"]), list(labels["identity"] or []))
    recordings = np.arange(len(data))
    assert data.quality is not None and (data.quality < 1).any(), "no segment that is not whole"
    with bench_module("wire_version") as bench:
        counts = bench.level_bytes(edge, data, recordings, 0)
    assert counts["version_1_bytes_per_s"] > counts["one_stream_only_bytes_per_s"] \
        > counts["version_2_bytes_per_s"]
    assert 0 < counts["whole_segments_share"] < 1
    decoded = decode_level(model, edge, data, encode_recordings(edge, data, recordings), 0)
    seconds = len(data.x) * edge.spec.segment_s
    assert round(decoded.payload_bytes / seconds, 2) == counts["version_2_bytes_per_s"]
