"""bench/ablation.py's wire bytes of a level-0 layout: real payloads of the committed bundle."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from _bench import bench_module

from csi_edge.bundle import EdgeEncoder
from csi_edge.codec import decode_payload
from csi_edge.preprocess import Preprocessor
from csi_edge.readers import read_recording

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = next(iter(sorted((ROOT / "datasets" / "samples" / "fition").rglob("*.pcap"))))


def test_layout_bytes_of_the_bundles_own_level_0_are_its_payloads() -> None:
    edge = EdgeEncoder(ROOT / "models" / "fition")
    level = edge.manifest.level(0)
    batch = Preprocessor(edge.spec).process(read_recording(SAMPLE))
    k = level.segments_per_message
    n = len(batch.data) // k * k
    assert n >= k, "the sample holds too few segments for one level-0 message"
    data = SimpleNamespace(x=batch.data[:n], recording=np.zeros(n, dtype=np.int64))
    sizes, codes = [], []
    for i in range(0, n, k):
        payload = edge.compress(batch.data[i : i + k], level=0, first_seq=i, epoch=1,
                                timestamp_ms=0)
        # As the agent sends it: a motion byte a segment (bench counts it, the edge sends it).
        sizes.append(len(payload) + k)
        codes.append(len(decode_payload(payload).codes) / k)  # one stream a message
    with bench_module("ablation") as ablation:
        wire = ablation.layout_bytes(edge, data, np.array([0]), level.groups,
                                     level.profile_components)
        more = ablation.layout_bytes(edge, data, np.array([0]), level.groups + 1,
                                     level.profile_components)  # one more latent channel
    assert wire["code_bytes_per_segment"] == round(float(np.mean(codes)), 2)
    seconds = k * edge.spec.segment_s
    assert wire["payload_bytes_per_s"] == round(float(np.mean(sizes)) / seconds, 2)
    assert more["payload_bytes_per_s"] > wire["payload_bytes_per_s"]


def test_rows_aggregate_over_tasks_and_seeds_and_keep_each_tasks_mean() -> None:
    rows = [{"task": "a", "activity_accuracy": 0.8}, {"task": "a", "activity_accuracy": 0.6},
            {"task": "b", "activity_accuracy": 1.0}]
    with bench_module("ablation") as ablation:
        out = ablation._aggregate({"cross-session": {"base": rows}})["cross-session"]["base"]
    assert out["tasks"] == 3
    assert out["activity_accuracy"]["mean"] == 0.8
    assert out["per_task"] == {"a": {"activity_accuracy": 0.7}, "b": {"activity_accuracy": 1.0}}
