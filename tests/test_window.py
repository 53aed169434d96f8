"""The context window (csi_cloud.model.window): one builder for the service and the offline
paths, so the service's prediction of a segment is the offline evaluation's by construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from csi_cloud.ingest import Ingestor
from csi_cloud.model import compression
from csi_cloud.model.compression import CloudModel
from csi_cloud.model.evaluate import decode_level, encode_recordings
from csi_cloud.model.heads import CodeData, code_windows
from csi_cloud.model.robustness import arrived_windows, load_folder
from csi_cloud.model.temperature import apply_temperature
from csi_cloud.model.trust import live_streams
from csi_cloud.model.window import Windows, slot_rows
from csi_cloud.registry import ModelRegistry
from csi_edge.bundle import EdgeEncoder, SegmentCodes, encode_segment_codes
from csi_edge.codec import Payload, SegmentRecord, encode_payload

MODELS = Path(__file__).resolve().parents[1] / "models"
FITION = MODELS / "fition"
LEVEL = 1


# -- the window builder ------------------------------------------------------------------------


def test_a_window_at_the_start_of_a_stream_is_partial() -> None:
    assert slot_rows({0: 5, 1: 6}, 1, 4).tolist() == [-1, -1, 5, 6]
    assert slot_rows({0: 5}, 0, 3).tolist() == [-1, -1, 5]


def test_gaps_are_missing_slots_never_filled() -> None:
    by_slot = {0: 0, 1: 1, 4: 2, 5: 3}
    assert slot_rows(by_slot, 5, 4).tolist() == [-1, -1, 2, 3]
    assert slot_rows(by_slot, 4, 6).tolist() == [-1, 0, 1, -1, -1, 2]
    assert slot_rows(by_slot, 3, 3).tolist() == [1, -1, -1]  # a window ending in a gap
    assert slot_rows(by_slot, 20, 8).tolist() == [-1] * 8


def test_gather_zeros_missing_slots() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 2, 4)).astype(np.float32)
    profile = rng.standard_normal((3, 5)).astype(np.float32)
    rows = np.array([[-1, 0, 1], [2, -1, -1], [-1, -1, -1]])
    w = Windows.gather(rows, z, profile, np.array([0, 2, 3]))
    assert len(w) == 3 and w.present.tolist() == (rows >= 0).tolist()
    assert w.z_q.shape == (3, 3, 2, 4) and w.z_q.dtype == np.float32
    assert np.array_equal(w.z_q[0, 1:], z[:2]) and np.array_equal(w.z_q[1, 0], z[2])
    assert np.array_equal(w.profile[0, 1:], profile[:2])
    assert not w.z_q[~w.present].any() and not w.profile[~w.present].any()
    assert w.level.tolist() == [0, 2, 3]
    assert Windows.gather(rows, z, profile, 1).level.tolist() == [1, 1, 1]


def test_a_window_read_at_its_last_slots_masks_the_older_ones() -> None:
    rows = np.array([[0, 1, 2, 3], [-1, -1, 4, 5]])
    z_q = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3) + 1
    windows = Windows.gather(rows, z_q, np.ones((6, 4), np.float32), 2)
    short = windows.last(2)
    assert short.present.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert not short.z_q[:, :2].any() and not short.profile[:, :2].any()
    assert np.array_equal(short.z_q[:, 2:], windows.z_q[:, 2:])
    assert short.level.tolist() == [2, 2] and windows.last(4) is windows
    # The same as a window whose older slots never had a segment.
    assert np.array_equal(windows.last(1).z_q,
                          Windows.gather(np.array([[-1, -1, -1, 3], [-1, -1, -1, 5]]), z_q,
                                         np.ones((6, 4), np.float32), 2).z_q)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=f"no last {bad}"):
            windows.last(bad)


def test_code_windows_take_the_newest_segments_level() -> None:
    codes = CodeData(z_q=np.zeros((2, 3, 1, 1), np.float32), profile=np.zeros((2, 3, 1)),
                     level=np.array([[0, 1, 2], [3, 3, 3]]), recording=np.zeros(3, int),
                     slot=np.arange(3), start=np.array([0]), count=np.array([3]),
                     slots=np.array([3]), activity=np.array([0]), identity=np.array([-1]))
    rows = np.array([[-1, 0, 1], [2, -1, -1], [-1, -1, -1]])
    assert code_windows(codes, rows, 0).level.tolist() == [1, 2, 0]  # none present: row 0's
    assert code_windows(codes, rows, np.array([1, 0, 1])).level.tolist() == [3, 2, 3]


# -- the service's windows ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fition(samples: Path) -> tuple[Any, CloudModel, EdgeEncoder]:
    data = load_folder(FITION, "fition", samples / "fition")
    return data, CloudModel.load(FITION), EdgeEncoder(FITION)


def _payloads(data: Any, model: CloudModel, edge: EdgeEncoder, rows: np.ndarray,
              epoch: int = 1, slot_offset: int = 0) -> list[tuple[str, str, bytes, float]]:
    """One message per segment ``rows`` of ``data``, on the segment grid of its slot."""
    spec = model.manifest.level(LEVEL)
    symbols, profile = edge.encode(data.x[rows])
    out = []
    for k, row in enumerate(rows.tolist()):
        slot = int(data.slot[row]) + slot_offset
        blob = encode_segment_codes(SegmentCodes(LEVEL, symbols[k, : spec.groups],
                                                 profile[k, : spec.profile_components]),
                                    edge.manifest, edge.tables)
        out.append(("lab", "ap1", encode_payload(Payload(
            LEVEL, edge.model_id, epoch, slot, slot * model.segment_ms,
            (SegmentRecord(1.0),), codes=blob)), 0.0))
    return out


def test_the_service_and_the_offline_evaluation_classify_the_same_windows(
        fition: tuple[Any, CloudModel, EdgeEncoder], monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's per-segment windows (csi_cloud.ingest) and the offline evaluation's
    (``DecodedLevel.windows``, as ``csi evaluate`` builds them) reach the one classify call
    with equal inputs, segments lost on the way included."""
    data, model, edge = fition
    rec = np.array([0])
    start, count = int(data.start[0]), int(data.count[0])
    arrived = np.zeros(len(data.x), bool)
    arrived[start : start + count] = True
    arrived[[start + 2, start + 3]] = False  # a gap of two lost segments
    decoded = decode_level(model, edge, data, encode_recordings(edge, data, rec), LEVEL)
    offline_rows, _ = arrived_windows(data, rec, model.net.cfg.context_segments, arrived)
    offline = decoded.windows(offline_rows)
    assert not offline.present.all() and offline.present[:, -1].all()

    seen: list[Windows] = []
    classify = CloudModel.classify

    def spy(self: CloudModel, windows: Windows, **kw: Any) -> Any:
        seen.append(windows)
        return classify(self, windows, **kw)

    monkeypatch.setattr(CloudModel, "classify", spy)
    ingestor = Ingestor(ModelRegistry(MODELS))
    messages = _payloads(data, model, edge, np.flatnonzero(arrived))
    # Two batches: the context carries over from one to the next.
    predictions = [*ingestor.process(messages[:3]).predictions,
                   *ingestor.process(messages[3:]).predictions]
    assert len(seen) == 2
    for name in ("z_q", "profile", "present", "level"):
        service = np.concatenate([getattr(w, name) for w in seen])
        assert np.array_equal(service, getattr(offline, name)), name
    # The service gives the live output: the windows read at the bundle's context lengths.
    assert len(model.lengths.lengths) > 1
    expected = model.classify_live(offline)
    labels = model.manifest.labels["activity"]
    assert [p.activity for p in predictions] == [labels[a] for a in expected.activity.argmax(1)]
    assert np.allclose([p.activity_confidence for p in predictions],
                       expected.activity.max(1), atol=1e-6)
    assert [p.context_present for p in predictions] == offline.present.sum(1).tolist()
    # live_lengths off (the cloud setting): the full window alone, as the model report reads it.
    full = Ingestor(ModelRegistry(MODELS), live_lengths=False).process(messages).predictions
    expected = model.classify(offline)
    assert [p.activity for p in full] == [labels[a] for a in expected.activity.argmax(1)]
    assert np.allclose([p.activity_confidence for p in full], expected.activity.max(1),
                       atol=1e-6)
    assert [p.activity for p in full] != [p.activity for p in predictions] or not np.allclose(
        [p.activity_confidence for p in full], [p.activity_confidence for p in predictions])


def test_the_service_and_the_offline_live_streams_give_the_same_live_output(
        fition: tuple[Any, CloudModel, EdgeEncoder]) -> None:
    """Segment by segment through the service's ingest, and offline as bench/trust.py and
    ``csi calibrate`` score it (csi_cloud.model.trust): the same live probabilities, each
    reading's temperature and the bundle's combination of the lengths included."""
    data, model, edge = fition
    rec = np.array([1])
    rows = np.arange(int(data.start[1]), int(data.start[1] + data.count[1]))
    ingestor = Ingestor(ModelRegistry(MODELS))
    predictions = ingestor.process(_payloads(data, model, edge, rows)).predictions
    offline = live_streams(model, edge, data, rec, "separate", levels=[LEVEL])[0]
    live, raw = model.lengths.read([*(offline.readings[k] for k in model.lengths.lengths[:-1]),
                                    offline.p_raw])
    labels = model.manifest.labels["activity"]
    assert [p.activity for p in predictions] == [labels[a] for a in live.argmax(1)]
    assert np.allclose([p.activity_confidence for p in predictions], live.max(1), atol=1e-6)
    assert np.allclose([p.activity_confidence_raw for p in predictions],
                       raw[np.arange(len(raw)), live.argmax(1)], atol=1e-5)
    # Early in the stream the windows are short anyway; later a short reading is used where
    # it is the surest: the live output is not the full window's alone.
    full = apply_temperature(offline.p_raw, model.temperature)
    assert not np.allclose(live, full)


def test_classify_runs_in_a_few_shapes_and_padding_changes_no_result(
        fition: tuple[Any, CloudModel, EdgeEncoder], monkeypatch: pytest.MonkeyPatch) -> None:
    """Any number of windows reaches the network in runs of 64 or a power of two (torch
    keeps compiled kernels per shape), and each window's result is its own."""
    data, model, edge = fition
    decoded = decode_level(model, edge, data, encode_recordings(edge, data, np.array([0])),
                           LEVEL)
    rows, _ = arrived_windows(data, np.array([0]), model.net.cfg.context_segments,
                              np.ones(len(data.x), bool))
    rows = rows[np.arange(70) % len(rows)]  # a recording's windows, over and over
    windows = decoded.windows(rows)
    shapes: list[int] = []
    run = compression.classify_windows

    def spy(net: Any, w: Windows, **kw: Any) -> Any:
        shapes.append(len(w))
        return run(net, w, **kw)

    monkeypatch.setattr(compression, "classify_windows", spy)
    together = model.classify(windows)
    assert shapes == [64, 8]
    alone = [model.classify(decoded.windows(rows[i : i + 1])) for i in (0, 63, 64, 69)]
    assert shapes[2:] == [1, 1, 1, 1]
    assert together.activity.shape[0] == 70
    for i, one in zip((0, 63, 64, 69), alone, strict=True):
        assert np.allclose(together.activity[i], one.activity[0], atol=1e-5)


def test_the_service_window_starts_afresh_with_a_new_epoch_and_skips_gaps(
        fition: tuple[Any, CloudModel, EdgeEncoder]) -> None:
    data, model, edge = fition
    start = int(data.start[0])
    ingestor = Ingestor(ModelRegistry(MODELS))
    rows = np.arange(start, start + 6)
    assert data.slot[rows].tolist() == list(range(6))
    first = ingestor.process(_payloads(data, model, edge, rows[[0, 1, 2, 5]]))
    assert [p.context_present for p in first.predictions] == [1, 2, 3, 4]
    # Slot 12: the window (slots 5..12) holds slot 5 and itself.
    later = ingestor.process(_payloads(data, model, edge, rows[[5]], slot_offset=7))
    assert [p.context_present for p in later.predictions] == [2]
    # A new epoch (the edge restarted): nothing of the old one is in its windows.
    again = ingestor.process(_payloads(data, model, edge, rows[:3], epoch=2, slot_offset=20))
    assert [p.context_present for p in again.predictions] == [1, 2, 3]
    assert ingestor.aps[("lab", "ap1")].counters["epoch_changes"] == 1
