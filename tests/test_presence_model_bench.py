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


def test_seconds_pair_by_their_slot_in_each_recording(bench: ModuleType) -> None:
    """Slots both sides have, recording by recording: a slot the model side lacks (a gap in
    the recording's packets) shifts nothing after it."""
    model_rows = {7: {0: 10, 1: 11, 3: 12}, 3: {0: 20, 1: 21}}
    score_rows = {7: {0: "a", 1: "b", 2: "c", 3: "d"}, 3: {1: "e", 2: "f"}}
    assert bench.pair(model_rows, score_rows, [7, 3]) == [
        (7, 10, "a"), (7, 11, "b"), (7, 12, "d"), (3, 21, "e")]
    assert bench.pair(model_rows, {}, [7]) == []


def test_scored_seconds_are_slotted_from_the_recordings_first(bench: ModuleType) -> None:
    def second(start: float, motion: bool | None) -> object:
        return bench.Second(start, 1, "r", None if motion is None else 2.0, motion, None, None)

    seconds = [second(40.0, None), second(41.0, True), second(43.0, False)]
    slots = bench.score_slots(seconds)
    assert sorted(slots) == [1, 3], "the unscored first second is left out"
    assert slots[1] is seconds[1] and slots[3] is seconds[2]
    assert bench.score_slots([]) == {}
