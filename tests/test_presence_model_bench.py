"""bench/presence_model.py's pure parts: presence held as the cloud's tracker holds it, and
the pairing of the two sides' seconds recording by recording."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest
from _bench import bench_module

from csi_edge.presence import PresenceConfig, PresenceTracker


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with bench_module("presence_model") as module:
        yield module


def test_held_presence_is_the_trackers(bench: ModuleType) -> None:
    """The bench's hold over flagged seconds equals csi_edge's PresenceTracker fed scores
    above and below its threshold, second by second."""
    rng = np.random.default_rng(3)
    flags = rng.random(200) < 0.05
    starts = np.arange(200, dtype=float)
    config = PresenceConfig()
    tracker = PresenceTracker(config)
    above, below = config.motion_threshold + 1, config.motion_threshold - 1
    expected = [tracker.update(t, t + 1, above if f else below)[1]
                for f, t in zip(flags, starts, strict=True)]
    got = bench.held(flags, starts, 1.0, config.hold_s)
    assert got.tolist() == [bool(e) for e in expected]
    assert got.any() and not got.all()


def test_seconds_pair_by_their_order_in_each_recording(bench: ModuleType) -> None:
    model_rows = {7: np.array([0, 1, 2]), 3: np.array([3, 4])}
    score_rows = {7: ["a", "b"], 3: ["c", "d", "e"]}
    assert bench.pair(model_rows, score_rows, [7, 3]) == [
        (7, 0, "a"), (7, 1, "b"), (3, 3, "c"), (3, 4, "d")]
    assert bench.pair(model_rows, {}, [7]) == []
