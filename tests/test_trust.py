"""Live output a person can trust: temperature scaling, the HMM filter, abstention, events
(the tracker, the table, ``GET /api/v1/events`` and the live event stream on a real service
with SQLite, fed through its ingest path)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_cloud_api import FITION, PCAP, ROOT, settings

from csi_cloud.api.app import create_app
from csi_cloud.events import EventTracker
from csi_cloud.model.lengths import ContextLengths, candidate_lengths, most_confident, pool
from csi_cloud.model.temperature import (
    TemperatureError,
    activity_temperature,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    mean_nll,
    uncalibrated,
)
from csi_cloud.model.trust import (
    LiveStreams,
    _filter_nll,
    fit_lengths,
    fit_pool,
    fit_pool_weights,
    stream_layout,
)
from csi_cloud.smoothing import (
    STAY_GRID,
    HMMFilter,
    Smoother,
    SmoothingError,
    TrustParams,
    coverage_curve,
    filter_stream,
    fit_stay,
    fit_threshold,
    fixed_lag,
)
from csi_edge import read_recording
from csi_edge.bundle import EdgeEncoder
from csi_edge.preprocess import Preprocessor

LABELS = ["sit", "walk", "fall"]
SAMPLES = ROOT / "datasets" / "samples" / "fition"


def _p(winner: int, strength: float = 0.7, k: int = 3) -> np.ndarray:
    p = np.full(k, (1 - strength) / (k - 1))
    p[winner] = strength
    return p


# -- temperature ----------------------------------------------------------------------------


def _overconfident(n: int = 4000, k: int = 5, sharpen: float = 3.0, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(logits); the 'classifier' says softmax(sharpen * logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.0, (n, k))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in true])
    z = sharpen * logits
    return np.exp(z) / np.exp(z).sum(1, keepdims=True), labels


def test_temperature_lowers_nll_of_an_overconfident_classifier() -> None:
    p, y = _overconfident()
    t = fit_temperature(p, y)
    assert 2.5 < t < 3.5  # the sharpening undone
    calibrated = apply_temperature(p, t)
    assert mean_nll(calibrated, y) < mean_nll(p, y) - 0.3
    assert expected_calibration_error(calibrated, y) < expected_calibration_error(p, y) / 2
    # The ranking, and so the accuracy, does not change.
    assert (calibrated.argmax(1) == p.argmax(1)).all()
    # The raw probabilities come back exactly (the API's activity_confidence_raw).
    np.testing.assert_allclose(uncalibrated(calibrated, t), p, atol=1e-5)


def test_temperature_of_a_calibrated_classifier_stays_near_one() -> None:
    p, y = _overconfident(sharpen=1.0, seed=1)
    assert 0.85 < fit_temperature(p, y) < 1.15


def test_old_bundles_have_temperature_one_and_bad_values_are_refused() -> None:
    assert activity_temperature({}) == 1.0
    assert activity_temperature({"identity": {"threshold": 1.0}}) == 1.0
    assert activity_temperature({"activity": {"temperature": 1.7}}) == 1.7
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(TemperatureError, match="temperature"):
            activity_temperature({"activity": {"temperature": bad}})
    with pytest.raises(TemperatureError, match="labels"):
        fit_temperature(np.full((3, 2), 0.5), np.array([0, 1, 2]))
    p = np.array([[0.6, 0.4]], np.float32)
    assert apply_temperature(p, 1.0) is p


def test_the_shipped_bundles_apply_their_temperature() -> None:
    from csi_cloud.model.compression import CloudModel

    model = CloudModel.load(FITION)
    assert model.temperature == activity_temperature(model.manifest.calibration)


# -- the filter -----------------------------------------------------------------------------


def test_filter_stays_put_on_flicker() -> None:
    seq = [0] * 20 + [1] + [0] * 5 + [2] + [0] * 5  # two single misread seconds
    p = np.stack([_p(c) for c in seq])
    belief = filter_stream(p, stay=0.9)
    assert (p.argmax(1) != 0).sum() == 2
    assert (belief.argmax(1) == 0).all()


def test_filter_switches_on_a_sustained_change() -> None:
    p = np.stack([_p(0)] * 30 + [_p(1)] * 10)
    belief = filter_stream(p, stay=0.9)
    switched = int(np.flatnonzero(belief.argmax(1) == 1)[0])
    assert 30 <= switched <= 33  # within three seconds of the change
    assert (belief[switched:].argmax(1) == 1).all()
    # The stickier, the later: a longer dwell needs more evidence.
    later = filter_stream(p, stay=0.99)
    assert int(np.flatnonzero(later.argmax(1) == 1)[0]) > switched
    # stay 0 is the classifier itself.
    np.testing.assert_allclose(filter_stream(p, stay=0.0), p / p.sum(1, keepdims=True))


def test_filter_missing_seconds_weaken_the_belief() -> None:
    f = HMMFilter(3, 0.9)
    for _ in range(20):
        f.update(_p(0))
    held = f.belief.copy()  # type: ignore[union-attr]
    g = HMMFilter(3, 0.9)
    g.belief = held.copy()
    one = f.update(_p(1), steps=1)
    many = g.update(_p(1), steps=30)  # 29 seconds missing: the old belief has faded
    assert many[1] > one[1]
    with pytest.raises(SmoothingError, match="stay"):
        HMMFilter(3, 1.0)
    with pytest.raises(SmoothingError, match="3 probabilities"):
        HMMFilter(3, 0.9).update(np.array([0.5, 0.5]))


def _pred(t: float, winner: int, *, epoch: int = 1, model: str = "m", strength: float = 0.7,
          site: str = "home", ap: str = "hall") -> dict[str, Any]:
    probs = dict(zip(LABELS, _p(winner, strength).tolist(), strict=True))
    return {"site": site, "ap": ap, "epoch": epoch, "timestamp": t, "model": model,
            "probabilities": {"activity": probs}}


def _smoother(params: TrustParams | None = None) -> Smoother:
    return Smoother(lambda model: (params or TrustParams(stay=0.95, threshold=0.5), 1.0)
                    if model == "m" else None)


def test_smoother_resets_on_epoch_change_and_gaps() -> None:
    s = _smoother()
    for t in range(30):
        out = s.update(_pred(float(t), 0))
    assert out["smoothed_activity"] == "sit"
    # Still the same stream: one second of walk does not move it.
    assert s.update(_pred(30.0, 1))["smoothed_activity"] == "sit"
    # A new epoch (the AP restarted): no memory of the old stream.
    fresh = s.update(_pred(31.0, 1, epoch=2))
    assert fresh["smoothed_activity"] == "walk"
    assert fresh["smoothed_confidence"] == pytest.approx(0.7, abs=1e-4)
    for t in range(32, 60):
        s.update(_pred(float(t), 1, epoch=2))
    # A gap longer than max_gap_s (10 s): the stream starts afresh.
    assert s.update(_pred(75.0, 2, epoch=2))["smoothed_activity"] == "fall"
    # A late segment (older than the newest) is not smoothed backwards.
    assert s.update(_pred(70.0, 0, epoch=2)) == {"smoothed_activity": None,
                                                 "smoothed_confidence": None,
                                                 "uncertain": None}
    # Presence only, or an unknown bundle: nothing to smooth.
    assert s.update({**_pred(76.0, 0, epoch=2), "model": None})["uncertain"] is None
    assert s.update({**_pred(76.0, 0, epoch=2), "model": "gone"})["uncertain"] is None


def _noisy_changes(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Episodes of 6-14 s; each second's evidence points at the truth 70 % of the time."""
    rng = np.random.default_rng(seed)
    labels: list[int] = []
    while len(labels) < n:
        labels += [int(rng.integers(3))] * int(rng.integers(6, 15))
    truth = np.array(labels[:n])
    said = np.where(rng.uniform(size=n) < 0.7, truth, rng.integers(3, size=n))
    return np.stack([_p(int(c), 0.6) for c in said]), truth


def test_fixed_lag_follows_changes_sooner_than_the_filter() -> None:
    p, truth = _noisy_changes()
    np.testing.assert_allclose(fixed_lag(p, 0.8, 0), filter_stream(p, 0.8))
    filtered = (filter_stream(p, 0.8).argmax(1) == truth).mean()
    settled = (fixed_lag(p, 0.8, 2).argmax(1) == truth).mean()
    assert settled > filtered + 0.03
    # Never across a start: the stream after it says nothing of the one before.
    starts = np.zeros(len(p), bool)
    starts[60] = True
    cut = fixed_lag(p, 0.8, 3, starts)
    np.testing.assert_allclose(cut[:60], fixed_lag(p[:60], 0.8, 3))
    np.testing.assert_allclose(cut[59], filter_stream(p[:60], 0.8)[59])  # nothing after it
    np.testing.assert_allclose(cut[60:], fixed_lag(p[60:], 0.8, 3))
    with pytest.raises(SmoothingError, match="-1"):
        fixed_lag(p, 0.8, -1)


def test_the_smoother_settles_each_second_as_the_bench_does() -> None:
    """Online, second by second, with a new epoch halfway: the settled labels are the
    offline fixed-lag ones, each given once, at its own capture time."""
    p, _ = _noisy_changes(1, 60)
    s = Smoother(lambda model: (TrustParams(stay=0.8), 1.0), settle_s=2.0)
    settled = []
    for t in range(60):
        probs = dict(zip(LABELS, p[t].tolist(), strict=True))
        s.update({"site": "home", "ap": "hall", "epoch": 1 if t < 30 else 2,
                  "timestamp": float(t), "model": "m", "probabilities": {"activity": probs}})
        got = s.drain()
        # 2 s late; the new epoch at 30 ends the old stream: its last two seconds settle.
        assert [x.timestamp for x in got] == (
            [28.0, 29.0] if t == 30 else [] if t in (0, 1, 31) else [t - 2.0])
        settled += got
    s.forget("home", "hall")
    settled += s.drain()
    assert [x.timestamp for x in settled] == [float(t) for t in range(60)]
    starts = np.zeros(60, bool)
    starts[30] = True
    expected = fixed_lag(p, 0.8, 2, starts)
    assert [x.activity for x in settled] == [LABELS[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([x.confidence for x in settled], expected.max(1), atol=1e-5)
    # settle 0: each second settles on arrival, as the filter read it.
    now = Smoother(lambda model: (TrustParams(stay=0.8), 1.0))
    out = now.update(_pred(0.0, 1))
    assert [(x.activity, x.confidence) for x in now.drain()] == [
        (out["smoothed_activity"], out["smoothed_confidence"])]
    with pytest.raises(SmoothingError, match="-1"):
        Smoother(lambda model: None, settle_s=-1)


def test_settling_across_missing_seconds_uses_the_transition_over_the_gap() -> None:
    """Seconds 0, 1, 4, 5: the settled belief of second 1 is the exact forward-backward
    posterior with the 3-step transition T**3 into second 4."""
    stay, k = 0.8, 3
    evidence = [_p(0), _p(0), _p(1, 0.9), _p(1, 0.9)]
    s = Smoother(lambda model: (TrustParams(stay=stay), 1.0), settle_s=2.0)
    for t, e in zip((0.0, 1.0, 4.0, 5.0), evidence, strict=True):
        s.update({"site": "a", "ap": "b", "epoch": 1, "timestamp": t, "model": "m",
                  "probabilities": {"activity": dict(zip(LABELS, e.tolist(), strict=True))}})
    second = next(x for x in s.drain() if x.timestamp == 1.0)

    def trans(steps: int) -> np.ndarray:
        keep = stay ** steps
        return keep * np.eye(k) + (1 - keep) / k

    alpha = evidence[0] / evidence[0].sum()
    alpha = evidence[1] * (trans(1) @ alpha)
    beta = trans(1) @ (evidence[3] * np.ones(k))  # second 5 into second 4
    beta = trans(3) @ (evidence[2] * beta)  # second 4 into second 1, across the gap
    post = alpha * beta / (alpha * beta).sum()
    assert second.activity == LABELS[int(post.argmax())]
    assert second.confidence == pytest.approx(float(post.max()), abs=1e-5)


def test_streams_that_end_without_a_next_prediction_still_settle() -> None:
    params = (TrustParams(stay=0.8, max_gap_s=10.0), 1.0)
    s = Smoother(lambda model: params if model == "m" else None, settle_s=2.0)
    for t in range(5):
        s.update(_pred(float(t), 1, ap="quiet"))
        s.update(_pred(float(t), 1, ap="switched"))
        s.update(_pred(float(t), 1, ap="moved"))
    assert [x.timestamp for x in s.drain()] == [0.0] * 3 + [1.0] * 3 + [2.0] * 3
    # An AP that turns presence-only (no bundle) ends its activity stream at once.
    s.update({**_pred(5.0, 1, ap="switched"), "model": None})
    assert [(x.ap, x.timestamp) for x in s.drain()] == [("switched", 3.0), ("switched", 4.0)]
    # A silent AP's stream ends once it has been quiet for max_gap_s of wall time.
    s.release_quiet(now=time.monotonic())
    assert s.drain() == []
    s.drop("home", "moved")  # another worker tells its seconds now: never settled here
    s.release_quiet(now=time.monotonic() + 11.0)
    assert [(x.ap, x.timestamp) for x in s.drain()] == [("quiet", 3.0), ("quiet", 4.0)]
    assert s.streams == {}
    s.update(_pred(10.0, 1, ap="x"))
    s.release_all()
    assert [x.timestamp for x in s.drain()] == [10.0]


def test_abstention_below_the_threshold() -> None:
    s = _smoother(TrustParams(stay=0.0, threshold=0.6))
    assert s.update(_pred(0.0, 0, strength=0.9))["uncertain"] is False
    weak = s.update(_pred(1.0, 1, strength=0.45))
    assert weak["uncertain"] is True and weak["smoothed_activity"] == "walk"
    with pytest.raises(SmoothingError, match="threshold"):
        TrustParams(threshold=1.5)
    assert TrustParams.from_calibration({}) == TrustParams()
    assert TrustParams.from_calibration(
        {"activity": {"stay": 0.5, "threshold": 0.7}}) == TrustParams(stay=0.5, threshold=0.7)


def test_threshold_and_coverage_curve() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.2, 1.0, 5000)
    correct = rng.uniform(size=5000) < confidence  # calibrated: right as often as it says
    curve = coverage_curve(confidence, correct)
    coverage = [row["coverage"] for row in curve]
    assert coverage == sorted(coverage, reverse=True) and coverage[0] == 1.0
    accuracy = [row["accuracy"] for row in curve if row["accuracy"] is not None]
    assert accuracy[-1] > accuracy[0] + 0.2  # abstaining buys accuracy
    t = fit_threshold(confidence, correct, 0.9)
    kept = confidence >= t
    assert correct[kept].mean() >= 0.9
    assert correct[confidence >= t - 0.05].mean() < 0.9  # the lowest such threshold (about)
    assert fit_threshold(confidence, correct, 1.0) >= 0.95


def test_fit_stay_prefers_smoothing_on_noisy_long_episodes() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 3, 20), 60)  # one-minute episodes
    p = np.stack([_p(int(c) if rng.uniform() < 0.7 else int(rng.integers(0, 3)), 0.6)
                  for c in labels])
    stay, scores = fit_stay([(p, labels, None)])
    assert stay >= 0.8
    assert scores[f"{stay:g}"] > scores["0"] + 0.1


def test_joined_streams_lay_recordings_end_to_end() -> None:
    class Layout:  # three recordings of 3, 2 and 4 slots (the second has a hole)
        start = np.array([0, 3, 4])
        count = np.array([3, 1, 4])
        slots = np.array([3, 2, 4])
        slot = np.array([0, 1, 2, 1, 0, 1, 2, 3])

    win, owner, stream, starts = stream_layout(Layout, np.array([0, 1, 2]), 3,  # type: ignore[arg-type]
                                               "joined", np.random.default_rng(0))
    assert len(win) == 8 and set(stream.tolist()) == {0} and starts.sum() == 1
    # A window reaches back into the recording before it (the live condition).
    rec_of_row = np.repeat(np.arange(3), Layout.count)
    assert any(len(set(rec_of_row[w[w >= 0]].tolist())) > 1 for w in win)
    assert (rec_of_row[[w[-1] for w in win]] == owner).all()  # each window ends in its own
    sep_win, sep_owner, _sep_stream, sep_starts = stream_layout(
        Layout, np.array([0, 1, 2]), 3, "separate")  # type: ignore[arg-type]
    assert sep_starts.sum() == 3
    for w, o in zip(sep_win, sep_owner, strict=True):  # never across recordings
        rows = w[w >= 0]
        assert ((rows >= Layout.start[o]) & (rows < Layout.start[o] + Layout.count[o])).all()


def test_position_counts_seconds_into_each_recording_of_each_stream() -> None:
    recording = np.array([4, 4, 4, 7, 7, 2, 2, 2, 2])
    stream = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1])  # recording 2 runs on into a new stream
    n = len(recording)
    ls = LiveStreams(0, np.full((n, 2), 0.5), np.zeros(n, int), stream,
                     np.r_[True, stream[1:] != stream[:-1]], recording)
    assert ls.position().tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1]


# -- context lengths --------------------------------------------------------------------------


def test_the_live_output_gives_the_most_confident_length() -> None:
    short = np.array([_p(0, 0.9), _p(1, 0.4)])
    full = np.array([_p(1, 0.6), _p(2, 0.8)])
    assert most_confident([short, full]).tolist() == [0, 1]
    live, raw = ContextLengths((2, 8), (1.0, 1.0)).read([short, full])
    assert live.argmax(1).tolist() == [0, 2] and np.array_equal(raw, live)
    # Each length's own temperature first: a softened short reading loses to the full one.
    live, raw = ContextLengths((2, 8), (5.0, 1.0)).read([short, full])
    assert live.argmax(1).tolist() == [1, 2]
    assert np.allclose(raw, full) and np.allclose(live, full, atol=1e-6)
    # One length: its temperature alone (every bundle without a ``contexts`` entry).
    only = ContextLengths.from_calibration({"activity": {"temperature": 2.0}}, 8, 2.0)
    assert only.lengths == (8,)
    assert np.allclose(only.read([full])[0], apply_temperature(full, 2.0))


def test_context_lengths_from_the_manifest_and_bad_values() -> None:
    cal = {"activity": {"contexts": {"lengths": [1, 2, 8], "temperatures": [0.9, 1.0, 1.5]}}}
    assert ContextLengths.from_calibration(cal, 8, 1.5).as_calibration() == \
        cal["activity"]["contexts"]
    with pytest.raises(TemperatureError, match="must end at"):
        ContextLengths.from_calibration(cal, 6, 1.5)
    with pytest.raises(TemperatureError, match="ascending"):
        ContextLengths((8, 2), (1.0, 1.0))
    with pytest.raises(TemperatureError, match="one temperature per"):
        ContextLengths((2, 8), (1.0,))
    with pytest.raises(TemperatureError, match="positive"):
        ContextLengths((2, 8), (0.0, 1.0))
    assert candidate_lengths(8)[0] == (8,) and all(c[-1] == 8 for c in candidate_lengths(8))
    assert candidate_lengths(2) == [(2,), (1, 2)]


def _lagging_streams(seed: int, lag: int = 4) -> LiveStreams:
    """Episodes of 10 s; the full window is sure but ``lag`` seconds behind each change, a
    short reading follows at once but is right only 80 % of the time and less sure."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.permutation(np.arange(30) % 3), 10)
    behind = np.r_[np.full(lag, labels[0]), labels[:-lag]]
    full = np.stack([_p(int(c), 0.8) for c in behind])
    short = np.stack([_p(int(c) if rng.uniform() < 0.8 else int(rng.integers(0, 3)), 0.6)
                      for c in labels])
    n = len(labels)
    return LiveStreams(0, full, labels, np.zeros(n, int), np.r_[True, np.zeros(n - 1, bool)],
                       np.zeros(n, int), {k: short for k in (1, 2, 3, 4, 6)})


def test_reading_short_lengths_follows_changes_the_full_window_lags() -> None:
    joined = [_lagging_streams(s) for s in range(3)]
    lengths, stay, scores = fit_lengths(joined, 8)
    assert lengths.lengths != (8,) and len(lengths.temperatures) == len(lengths.lengths)
    assert scores[",".join(map(str, lengths.lengths))] > scores["8"] + 0.05
    test = _lagging_streams(7)
    full_acc = float((test.p_raw.argmax(1) == test.labels).mean())
    live = filter_stream(test.live(lengths), stay, test.starts)
    assert float((live.argmax(1) == test.labels).mean()) > full_acc + 0.05
    # Right after each change the live output already has the new activity more often.
    after = np.flatnonzero(np.r_[False, test.labels[1:] != test.labels[:-1]])
    follows = np.concatenate([after + 1, after + 2])
    assert (test.live(lengths).argmax(1)[follows] == test.labels[follows]).mean() > \
        (test.p_raw.argmax(1)[follows] == test.labels[follows]).mean() + 0.3


def test_the_pool_is_the_weighted_geometric_mean_of_the_readings() -> None:
    short = np.array([_p(0, 0.9), _p(1, 0.4)])
    full = np.array([_p(1, 0.6), _p(2, 0.8)])
    assert np.allclose(pool([short, full], [1.0, 0.0]), short)
    both = pool([short, full], [0.5, 0.5])
    expected = np.sqrt(short * full)
    assert np.allclose(both, expected / expected.sum(1, keepdims=True))
    # Through ContextLengths: each reading's temperature first, then the pool.
    lengths = ContextLengths((2, 8), (2.0, 1.0), (1.0, 1.0))
    live, raw = lengths.read([short, full])
    assert np.allclose(live, pool([apply_temperature(short, 2.0), full], [1.0, 1.0]))
    assert np.allclose(raw, pool([short, full], [1.0, 1.0]))


def test_pooled_lengths_in_the_manifest_and_bad_weights() -> None:
    cal = {"activity": {"contexts": {"lengths": [1, 2, 8], "temperatures": [0.9, 1.0, 1.5],
                                     "weights": [0.7, 0.2, 0.0]}}}
    lengths = ContextLengths.from_calibration(cal, 8, 1.5)
    assert lengths.weights == (0.7, 0.2, 0.0)
    assert lengths.as_calibration() == cal["activity"]["contexts"]
    with pytest.raises(TemperatureError, match=r"one weight per context length.*\[0.5\]"):
        ContextLengths((2, 8), (1.0, 1.0), (0.5,))
    with pytest.raises(TemperatureError, match=r"-0\.1"):
        ContextLengths((2, 8), (1.0, 1.0), (-0.1, 1.0))
    with pytest.raises(TemperatureError, match="all 0"):
        ContextLengths((2, 8), (1.0, 1.0), (0.0, 0.0))
    with pytest.raises(TemperatureError, match="nan"):
        ContextLengths((2, 8), (1.0, 1.0), (float("nan"), 1.0))
    with pytest.raises(TemperatureError, match=r"lengths \[2\] have weight 0"):
        ContextLengths((1, 2, 8), (1.0, 1.0, 1.0), (0.5, 0.0, 1.0))
    assert ContextLengths((1, 8), (1.0, 1.0), (0.5, 0.0)).weights == (0.5, 0.0)


@pytest.mark.parametrize("weights", [(0.7, 0.2), (2.0, 1.5), (4.0, 0.0)])
def test_the_fitted_objective_is_the_filter_s_own_nll(weights: tuple[float, float]) -> None:
    """What fit_pool_weights minimises is the NLL of csi_cloud.smoothing's filter run on the
    pool, floor included (heavy weights make sharp evidence the floor clips)."""
    rng = np.random.default_rng(5)
    readings = [rng.dirichlet(np.full(4, 0.3), size=60) for _ in weights]
    labels = rng.integers(0, 4, 60)
    labels[[7, 30]] = -1  # not scored, the filter still runs through them
    stay = 0.8
    belief = filter_stream(pool(readings, list(weights)), stay)
    scored = labels >= 0
    expected = -np.log(belief[scored, labels[scored]]).mean()
    logs = np.log(np.clip(np.stack(readings, axis=-1), 1e-6, None))[None]  # (1, T, K, L)
    assert _filter_nll(np.r_[weights, stay], logs, labels[None]) == pytest.approx(expected,
                                                                                 rel=1e-9)


def test_the_fitted_stay_follows_how_long_activities_last() -> None:
    """Fresh evidence each second: long episodes want a filter that holds on, an activity
    drawn anew each second wants none."""
    rng = np.random.default_rng(2)

    def pieces(labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        p = np.stack([_p(int(c) if rng.uniform() < 0.6 else int(rng.integers(0, 3)), 0.5)
                      for c in labels])
        return [(np.log(p)[:, :, None], labels)]

    _, long_stay = fit_pool_weights(pieces(np.repeat(rng.integers(0, 3, 30), 20)))
    _, no_stay = fit_pool_weights(pieces(rng.integers(0, 3, 600)))
    assert long_stay > 0.8 and no_stay < 0.2


def _fresh_evidence_streams(seed: int) -> LiveStreams:
    """Episodes of 10 s; the full window is sure but 4 s behind each change; the one-second
    reading is fresh evidence each second, right 65 % of the time and never sure (0.5)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.permutation(np.arange(30) % 3), 10)
    behind = np.r_[np.full(4, labels[0]), labels[:-4]]
    full = np.stack([_p(int(c), 0.8) for c in behind])
    one = np.stack([_p(int(c) if rng.uniform() < 0.65 else int(rng.integers(0, 3)), 0.5)
                    for c in labels])
    n = len(labels)
    return LiveStreams(0, full, labels, np.zeros(n, int), np.r_[True, np.zeros(n - 1, bool)],
                       np.zeros(n, int), {1: one, 2: full, 3: full, 4: full, 6: full})


def test_pooling_fresh_evidence_beats_the_most_confident_reading() -> None:
    joined = [_fresh_evidence_streams(s) for s in range(3)]
    # The most confident reading is always the lagging full window: it never follows a
    # change before it catches up. Pooled and filtered, the one-second reading's evidence
    # adds up over the seconds after a change.
    confident = ContextLengths((1, 8), (1.0, 1.0))
    pooled, stay = fit_pool(joined, confident)
    assert pooled.weights is not None and pooled.lengths[0] == 1
    assert pooled.weights[0] > 0.5 and 0.0 < stay < 0.99
    lengths, chosen_stay, scores = fit_lengths(joined, 8)
    assert lengths.weights is not None, scores
    assert scores[",".join(map(str, lengths.lengths)) + " pooled"] > scores["1,2,4,8"] + 0.05
    test = _fresh_evidence_streams(11)

    def accuracy(p: np.ndarray, stay: float) -> float:
        return float((filter_stream(p, stay, test.starts).argmax(1) == test.labels).mean())

    best_confident = max(accuracy(test.live(confident), s) for s in STAY_GRID)
    assert accuracy(test.live(lengths), chosen_stay) > best_confident + 0.05
    # Every candidate set was tried both ways, each under its own name.
    assert {"1,2,4,8", "1,2,4,8 pooled"} <= {k.split(" (")[0] for k in scores}
    assert len(scores) == 2 * len(candidate_lengths(8)) - 1


# -- events ---------------------------------------------------------------------------------


def test_event_tracker_episodes() -> None:
    tracker = EventTracker()
    base = {"site": "home", "ap": "hall", "model": "m"}
    first = tracker.update({**base, "timestamp": 10.0, "smoothed_activity": "sit",
                            "smoothed_confidence": 0.8, "uncertain": False, "presence": True})
    assert [(c["kind"], c["value"], c["previous"]) for c in first] == [
        ("activity", "sit", None), ("presence", "occupied", None)]
    same = tracker.update({**base, "timestamp": 11.0, "smoothed_activity": "sit",
                           "smoothed_confidence": 0.9, "uncertain": False, "presence": True})
    assert same == []
    change = tracker.update({**base, "timestamp": 12.0, "smoothed_activity": "walk",
                             "smoothed_confidence": 0.4, "uncertain": True, "presence": None})
    assert [(c["kind"], c["value"]) for c in change] == [("activity", "uncertain")]
    assert change[0]["previous"] == {"value": "sit", "start": 10.0, "end": 12.0,
                                     "confidence": 0.9}
    # An older prediction arriving late changes nothing.
    assert tracker.update({**base, "timestamp": 5.0, "smoothed_activity": "fall",
                           "smoothed_confidence": 0.9, "uncertain": False,
                           "presence": False}) == []


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tmp_path))) as c:
        yield c


def _wait(predicate: Any, timeout_s: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_events_api_from_live_ingest(client: TestClient) -> None:
    """Segments of a real recording through the service's ingest: predictions carry the
    smoothed fields, the activity episode is stored, listed and streamed."""
    service = client.app.state.service  # type: ignore[attr-defined]
    edge = EdgeEncoder(FITION)
    # Three recordings back to back on one AP: walking, sitting down, nobody.
    segments = np.concatenate([Preprocessor(edge.spec).process(read_recording(path)).data
                               for path in (PCAP, *(SAMPLES / f for f in (
                                   "sitdown_user3_rm3/sitdown_user3_rm3_20.pcap",
                                   "nm_user2_rm2/nm_user2_rm2_10.pcap")))])
    def send(i: int) -> None:
        payload = edge.compress(segments[i : i + 1], level=1, first_seq=i, epoch=7,
                                timestamp_ms=1_000_000 + i * 1000)
        service.submit("lab", "ap1", payload, time.time())

    def stored() -> int:
        return int(client.get("/api/v1/predictions?site=lab&limit=1000").json()["count"])

    for i in range(2):
        send(i)
    _wait(lambda: stored() == 2, what="two predictions stored")
    # The first two seconds wait for two more before their label settles: no episode yet.
    assert client.get("/api/v1/events", params={"site": "lab", "kind": "activity"}
                      ).json()["count"] == 0
    with client.websocket_connect("/api/v1/events/ws?site=lab") as ws:
        for i in range(2, len(segments)):
            send(i)
        first = ws.receive_json()  # the first prediction opens an activity episode
    assert first["site"] == "lab" and first["kind"] == "activity"
    assert first["event_type"] == "activity" and first["end"] is None
    assert first["start"] == pytest.approx(1000.0)
    preds = _wait(lambda: (r := client.get("/api/v1/predictions?site=lab&limit=1000").json())
                  ["count"] == len(segments) and r, what="every prediction stored")
    for p in preds["data"]:
        assert p["smoothed_activity"] in p["probabilities"]["activity"]
        assert 0 < p["smoothed_confidence"] <= 1 and isinstance(p["uncertain"], bool)
        assert p["activity_confidence_raw"] is not None
    events = client.get("/api/v1/events", params={"site": "lab", "ap": "ap1"}).json()
    assert events["count"] >= 1
    rows = sorted(events["data"], key=lambda e: e["start"])
    assert rows[0]["start"] == pytest.approx(1000.0) and rows[-1]["end"] is None
    for before, after in itertools.pairwise(rows):
        assert before["end"] == after["start"]  # each episode ends where the next begins
        assert before["value"] != after["value"]
    # The activity episodes are the settled labels' runs: the filter over the stored
    # probabilities read 2 s late (the last 2 s of the stream wait for more seconds).
    stream = sorted(preds["data"], key=lambda p: p["timestamp"])
    labels = list(stream[0]["probabilities"]["activity"])
    p = np.array([[r["probabilities"]["activity"][k] for k in labels] for r in stream])
    params = TrustParams.from_calibration(service.registry.get(stream[0]["model"])
                                          .manifest.calibration)
    belief = fixed_lag(p, params.stay, 2)[:-2]
    settled = [labels[i] if c >= params.threshold else "uncertain"
               for i, c in zip(belief.argmax(1), belief.max(1), strict=True)]
    runs = [(stream[i]["timestamp"], v) for i, v in enumerate(settled)
            if i == 0 or v != settled[i - 1]]
    assert len(runs) >= 3  # the recordings' changes, at least

    def activity_events() -> list[dict[str, Any]]:
        rows = client.get("/api/v1/events", params={"site": "lab", "kind": "activity"}
                          ).json()["data"]
        return sorted(rows, key=lambda e: e["start"])

    # The events of the last batch are stored just after its predictions: wait for them.
    acts = _wait(lambda: a if len(a := activity_events()) >= len(runs) else None,
                 what=f"{len(runs)} activity episodes")
    assert [e["value"] for e in acts] == [v for _, v in runs]
    assert [e["start"] for e in acts] == pytest.approx([t for t, _ in runs])
    # The AP's latest prediction (the state HA and the dashboard read) has them too.
    ap = client.get("/api/v1/aps/lab/ap1").json()
    assert ap["prediction"]["smoothed_activity"] is not None


def test_stopping_settles_what_waits(tmp_path: Path) -> None:
    """Two seconds streamed, then the service stops: their labels still settle (with
    nothing after them) and their activity episode is stored before the database closes."""
    edge = EdgeEncoder(FITION)
    segments = Preprocessor(edge.spec).process(read_recording(PCAP)).data[:2]
    with TestClient(create_app(settings(tmp_path))) as first:
        service = first.app.state.service  # type: ignore[attr-defined]
        for i in range(2):
            service.submit("lab", "ap1", edge.compress(
                segments[i : i + 1], level=1, first_seq=i, epoch=3,
                timestamp_ms=2_000_000 + i * 1000), time.time())
        _wait(lambda: first.get("/api/v1/predictions?site=lab").json()["count"] == 2,
              what="two predictions stored")
        assert first.get("/api/v1/events", params={"kind": "activity"}).json()["count"] == 0
    assert service.trust.smoother.streams == {}
    with TestClient(create_app(settings(tmp_path))) as again:
        events = again.get("/api/v1/events", params={"kind": "activity"}).json()["data"]
    assert [e["start"] for e in events][-1:] == [2000.0] and len(events) in (1, 2)


def test_events_api_filters_and_closes_open_episodes(client: TestClient) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    trust = service.trust
    base = {"model": None, "smoothed_activity": None}
    script = [("a", "x", 100.0, True), ("a", "x", 105.0, False), ("a", "y", 101.0, True),
              ("b", "x", 102.0, False), ("a", "x", 110.0, True)]
    for site, ap, t, presence in script:
        trust.pending.extend(trust.tracker.update(
            {**base, "site": site, "ap": ap, "timestamp": t, "presence": presence}))
    published = client.portal.call(trust.flush)  # type: ignore[union-attr]
    assert [p["value"] for p in published] == ["occupied", "empty", "occupied", "empty",
                                               "occupied"]
    assert all(isinstance(p["id"], int) for p in published)

    def get(**params: Any) -> list[dict[str, Any]]:
        r = client.get("/api/v1/events", params=params)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    ax = get(site="a", ap="x")
    assert [(e["value"], e["start"], e["end"]) for e in ax] == [
        ("occupied", 110.0, None), ("empty", 105.0, 110.0), ("occupied", 100.0, 105.0)]
    assert [e["ap"] for e in get(site="a")] == ["x", "x", "y", "x"]
    assert len(get(limit=2)) == 2
    # since: episodes still going at or after it.
    assert [e["start"] for e in get(site="a", ap="x", since=106.0)] == [110.0, 105.0]
    assert {e["kind"] for e in get(kind="presence")} == {"presence"}
    assert get(kind="activity", site="a") == []
    for bad in ({"limit": 0}, {"kind": "mood"}, {"site": "s" * 65}):
        r = client.get("/api/v1/events", params=bad)
        assert r.status_code == 422 and str(next(iter(bad.values())))[:10] in r.text
    # A restarted service (no episode in memory) closes the one left open by the change.
    trust.tracker.current.clear()
    trust.pending.extend(trust.tracker.update(
        {**base, "site": "a", "ap": "x", "timestamp": 120.0, "presence": False}))
    client.portal.call(trust.flush)  # type: ignore[union-attr]
    ax = get(site="a", ap="x")
    assert [(e["value"], e["start"], e["end"]) for e in ax[:2]] == [
        ("empty", 120.0, None), ("occupied", 110.0, 120.0)]


def test_a_pooled_bundles_raw_confidence_is_not_guessed_from_its_probabilities(
        tmp_path: Path) -> None:
    """A prediction that arrives without ``activity_confidence_raw`` from a bundle whose live
    output pools several readings: no one temperature undoes the pool, so the figure stays
    unknown rather than wrong; the service's own figure passes through."""
    from csi_cloud.db import Database
    from csi_cloud.events import LiveTrust
    from csi_cloud.registry import ModelRegistry

    registry = ModelRegistry(ROOT / "models")
    model_id = next(i for i in registry.ids() if registry.get(i).manifest.name == "fition")
    model = registry.get(model_id)
    assert len(model.lengths.lengths) > 1 and model.temperature != 1.0
    live = LiveTrust(registry, Database(f"sqlite:///{tmp_path / 'db.sqlite'}"), "csi/v1")
    activities = model.manifest.labels["activity"]
    assert activities
    probs = {a: 1 / len(activities) for a in activities}
    probs[activities[0]] += 0.2
    without = {"model": model_id, "activity_confidence": 0.9,
               "probabilities": {"activity": probs}}
    assert live._raw_confidence(without) is None
    assert live._raw_confidence({**without, "activity_confidence_raw": 0.61}) == 0.61


def test_a_change_stored_after_a_later_one_is_closed_where_that_one_began(
        tmp_path: Path) -> None:
    """Two workers and one AP around a hand-over: the one that held it settles its last
    seconds (a change at t = 100) after the next one stored a change at t = 110. The late
    episode ends at 110, and only the newest stays open."""
    from sqlalchemy import select

    from csi_cloud.db import Database, Event
    from csi_cloud.events import LiveTrust
    from csi_cloud.registry import ModelRegistry

    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    live = LiveTrust(ModelRegistry(ROOT / "models"), db, "csi/v1")

    def change(start: float, value: str, previous: str | None) -> dict[str, Any]:
        return {"site": "lab", "ap": "ap1", "kind": "activity", "value": value,
                "start": start, "end": None, "confidence": 0.8, "model": "m",
                "previous": None if previous is None else {
                    "value": previous, "start": start - 10, "end": start,
                    "confidence": 0.7}}

    live._store([change(90.0, "sitting", None)])
    live._store([change(110.0, "walking", "sitting")])  # the next worker
    late = change(100.0, "standing", "sitting")  # the worker that handed over, settling
    live._store([late])
    with db.session() as s:
        rows = [(e.value, e.start, e.end) for e in s.execute(
            select(Event).order_by(Event.start)).scalars()]
    assert rows == [("sitting", 90.0, 100.0), ("standing", 100.0, 110.0),
                    ("walking", 110.0, None)]
    assert late["end"] == 110.0  # and what is published says so
