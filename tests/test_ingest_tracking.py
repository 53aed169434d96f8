"""The ingestor's stream accounting per AP, driven by real payloads: in-order segments,
duplicates, gaps and the late arrivals that fill them, epochs, and the 32-bit sequence wrap.
(The bound on awaited gaps and numbering jumps: tests/test_cloud_reliability.py; windows
across epochs: tests/test_window.py.)"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _harness import MODEL, Segments

from csi_cloud.ingest import APState, Ingestor
from csi_cloud.registry import ModelRegistry

torch.set_num_threads(1)

WRAP = 2**32


@pytest.fixture(scope="module")
def segments() -> Segments:
    return Segments()


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(MODEL.parent)


class Stream:
    """One AP's segments through a fresh ingestor; what each batch predicted."""

    def __init__(self, registry: ModelRegistry, segments: Segments) -> None:
        self.ingestor = Ingestor(registry)
        self.segments = segments

    def send(self, *seqs: int, epoch: int = 7) -> list[tuple[int, int]]:
        """One message per sequence number, one batch; (epoch, seq) of each prediction."""
        result = self.ingestor.process([("lab", "ap", self.segments.payload(s, epoch), 1.0)
                                        for s in seqs])
        assert not result.rejected, result.rejected
        return [(p.epoch, p.seq) for p in result.predictions]

    @property
    def state(self) -> APState:
        return self.ingestor.aps[("lab", "ap")]

    def counters(self, *names: str) -> dict[str, int]:
        return {n: self.state.counters[n] for n in names}


COUNTS = ("segments", "duplicates", "gaps", "missing_segments", "late", "seq_jumps",
          "epoch_changes")


@pytest.fixture
def stream(registry: ModelRegistry, segments: Segments) -> Stream:
    return Stream(registry, segments)


def test_in_order_segments_count_once_and_nothing_is_missing(stream: Stream) -> None:
    assert stream.send(0, 1, 2) == [(7, 0), (7, 1), (7, 2)]
    assert stream.send(3) == [(7, 3)]
    assert stream.counters(*COUNTS) == dict.fromkeys(COUNTS, 0) | {"segments": 4}
    assert (stream.state.epoch, stream.state.last_seq) == (7, 3)
    assert not stream.state.missing


def test_a_message_of_several_segments_numbers_them_from_its_first(
        stream: Stream, segments: Segments) -> None:
    result = stream.ingestor.process([("lab", "ap", segments.payload(10, n=3), 1.0),
                                      ("lab", "ap", segments.payload(13, n=2), 1.0)])
    assert [p.seq for p in result.predictions] == [10, 11, 12, 13, 14]
    assert stream.state.last_seq == 14 and stream.state.counters["messages"] == 2
    assert stream.counters("segments", "gaps", "duplicates") == {
        "segments": 5, "gaps": 0, "duplicates": 0}


def test_duplicates_are_counted_and_not_predicted_again(stream: Stream) -> None:
    assert stream.send(0, 1, 2) == [(7, 0), (7, 1), (7, 2)]
    # The newest again (a resend), then an older one already seen: both refused.
    assert stream.send(2, 1, 0) == []
    assert stream.counters("segments", "duplicates", "late", "missing_segments") == {
        "segments": 3, "duplicates": 3, "late": 0, "missing_segments": 0}
    assert stream.state.last_seq == 2


def test_a_gap_is_awaited_and_late_arrivals_fill_it_once(stream: Stream) -> None:
    assert stream.send(0, 1, 5) == [(7, 0), (7, 1), (7, 5)]
    assert stream.counters("gaps", "missing_segments") == {"gaps": 1, "missing_segments": 3}
    assert list(stream.state.missing) == [2, 3, 4]
    # Late, out of order, and one of them twice: each accepted once.
    assert stream.send(4, 2, 4) == [(7, 4), (7, 2)]
    assert list(stream.state.missing) == [3]
    assert stream.counters("late", "missing_segments", "duplicates", "segments") == {
        "late": 2, "missing_segments": 1, "duplicates": 1, "segments": 5}
    assert stream.state.last_seq == 5, "a late segment does not move the newest back"
    assert stream.send(6, 3) == [(7, 6), (7, 3)]
    assert stream.counters("gaps", "late", "missing_segments") == {
        "gaps": 1, "late": 3, "missing_segments": 0}
    assert not stream.state.missing


def test_a_new_epoch_starts_the_count_afresh(stream: Stream) -> None:
    assert stream.send(0, 1, 4) == [(7, 0), (7, 1), (7, 4)]
    assert list(stream.state.missing) == [2, 3]
    # The edge restarted: sequence numbers start again at 0, nothing of the old epoch is
    # awaited any more, and its seq 0..1 are not duplicates of the old ones.
    assert stream.send(0, 1, epoch=8) == [(8, 0), (8, 1)]
    state = stream.state
    assert (state.epoch, state.last_seq) == (8, 1)
    assert not state.missing
    assert stream.counters("epoch_changes", "duplicates", "segments") == {
        "epoch_changes": 1, "duplicates": 0, "segments": 5}
    # Counters are totals over the AP's life: the old epoch's gap stays counted.
    assert stream.counters("gaps", "missing_segments") == {"gaps": 1, "missing_segments": 2}
    # A first epoch is no change.
    fresh = Stream(stream.ingestor.registry, stream.segments)
    fresh.send(0, epoch=3)
    assert fresh.counters("epoch_changes") == {"epoch_changes": 0}


def test_the_sequence_number_wraps_at_2_to_the_32(stream: Stream) -> None:
    top = WRAP - 2
    assert stream.send(top, top + 1, 0, 1) == [(7, top), (7, top + 1), (7, 0), (7, 1)]
    assert stream.counters("gaps", "duplicates", "missing_segments") == {
        "gaps": 0, "duplicates": 0, "missing_segments": 0}
    # Before the wrap is older than after it: a duplicate, not a jump forward.
    assert stream.send(WRAP - 1) == []
    assert stream.counters("duplicates") == {"duplicates": 1}


def test_a_gap_across_the_wrap_is_awaited_modulo_2_to_the_32(stream: Stream) -> None:
    assert stream.send(WRAP - 2, 1) == [(7, WRAP - 2), (7, 1)]
    assert list(stream.state.missing) == [WRAP - 1, 0]
    assert stream.counters("gaps", "missing_segments") == {"gaps": 1, "missing_segments": 2}
    assert stream.send(0, WRAP - 1) == [(7, 0), (7, WRAP - 1)]
    assert stream.counters("late", "missing_segments") == {"late": 2, "missing_segments": 0}
    assert stream.state.last_seq == 1


def test_a_jump_beyond_the_awaited_window_is_one_jump_and_the_stream_goes_on(
        stream: Stream) -> None:
    # 4096 sequence numbers are awaited at most: a step of 4097 still lists them all, one
    # of 4098 is a jump (the numbering moved on, nothing listed).
    assert stream.send(0, 4097) == [(7, 0), (7, 4097)]
    assert stream.counters("gaps", "seq_jumps", "missing_segments") == {
        "gaps": 1, "seq_jumps": 0, "missing_segments": 4096}
    assert stream.send(4097 + 4098, 4097 + 4099) == [(7, 8195), (7, 8196)]
    assert stream.counters("gaps", "seq_jumps", "missing_segments") == {
        "gaps": 2, "seq_jumps": 1, "missing_segments": 4096}
    assert len(stream.state.missing) == 4096 and 4098 not in stream.state.missing
    # Half the number space or more behind is "older": a segment never awaited is a
    # duplicate, whatever its distance.
    assert stream.send((8196 + WRAP // 2 + 1) % WRAP) == []
    assert stream.counters("duplicates") == {"duplicates": 1}


def test_segments_restored_after_a_restart_await_what_was_not_stored(
        stream: Stream) -> None:
    stream.send(0, 1, 2, 3, 4, 5)
    # A restarted service read back seqs 0, 1, 3, 5 of the epoch: 2 and 4 are awaited again.
    stream.ingestor.restore_seen("lab", "ap", [0, 1, 3, 5])
    assert list(stream.state.missing) == [2, 4]
    assert stream.send(4, 2, 5) == [(7, 4), (7, 2)]
    assert stream.counters("late", "duplicates") == {"late": 2, "duplicates": 1}


def test_accounting_is_per_ap(registry: ModelRegistry, segments: Segments) -> None:
    ingestor = Ingestor(registry)
    result = ingestor.process([(site, ap, segments.payload(seq), 1.0)
                               for seq in (0, 1) for site, ap in (("a", "x"), ("b", "x"))]
                              + [("a", "x", segments.payload(1), 1.0)])
    assert Counter((p.site, p.seq) for p in result.predictions) == {
        ("a", 0): 1, ("a", 1): 1, ("b", 0): 1, ("b", 1): 1}
    assert ingestor.aps[("a", "x")].counters["duplicates"] == 1
    assert ingestor.aps[("b", "x")].counters["duplicates"] == 0


def test_both_wire_versions_give_the_same_predictions_and_version_1_is_counted(
        registry: ModelRegistry, segments: Segments) -> None:
    """An edge on wire version 1 (older, or told so) is served as before, and shows in its
    AP's counters; version 2 carries the same codes in fewer bytes."""
    from csi_edge.bundle import encode_segment_codes
    from csi_edge.codec import Payload, SegmentRecord, decode_payload, encode_payload

    new = segments.payload(0, n=3)
    p = decode_payload(new)
    blob = encode_segment_codes(segments.codes, segments.manifest, segments.tables)
    old = encode_payload(Payload(p.level, p.model_id, p.epoch, p.first_seq, p.timestamp_ms,
                                 tuple(SegmentRecord(1.0, blob) for _ in range(3)), version=1))
    assert len(new) < len(old)
    seen = []
    for data in (new, old):
        ingestor = Ingestor(registry)
        result = ingestor.process([("lab", "ap", data, 1.0)])
        assert not result.rejected
        seen.append([(r.seq, r.codes.latent.tolist(), r.codes.profile.tolist(), r.code_bytes)
                     for r in result.segments])
        assert ingestor.aps[("lab", "ap")].counters["wire_v1_messages"] == (data is old)
    assert seen[0] == seen[1]
