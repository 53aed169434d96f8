"""Training on an AP's own recording uses only the frames inside each labelled range."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from csi_cloud.datasets import index_dataset
from csi_cloud.model.data import load_segments
from csi_edge import read_recording
from csi_edge.bundle import load_manifest
from csi_edge.convert import convert
from csi_edge.recording import Label

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "datasets" / "samples" / "fition" / "walking_user1_rm1" / \
    "walking_user1_rm1_10.pcap"


def test_examples_of_a_recording_keep_only_their_range(tmp_path: Path) -> None:
    t = read_recording(SAMPLE).timestamp
    t0, t1 = float(t[0]), float(t[-1])
    middle = t0 + 4.0
    folder = tmp_path / "recordings" / "lab"
    folder.mkdir(parents=True)
    convert(SAMPLE, folder / "ap1.h5", labels=[Label(t0, middle, "walking", "user1"),
                                               Label(middle, t1 + 1, "sitdown", "user1")])
    index = index_dataset("recordings", tmp_path / "recordings")
    examples = sorted(index.examples, key=lambda e: e.start or 0)
    assert [e.activity for e in examples] == ["walking", "sitdown"]
    spec = load_manifest(ROOT / "models" / "fition").input_spec
    data = load_segments(examples, spec, ["walking", "sitdown"], ["user1"])
    whole = load_segments([replace(examples[0], start=None, end=None)], spec,
                          ["walking", "sitdown"], ["user1"])
    # 4 s, then the rest: each example holds only the segments of its own range.
    assert data.count[0] == 4
    assert whole.count[0] - 5 <= data.count[1] <= whole.count[0] - 4
    assert list(data.activity) == [0, 1]
