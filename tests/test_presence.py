"""Motion score, calibration and presence decision (csi_edge.presence) on synthetic channels
with known motion, and on the committed Nexmon and Intel 5300 samples."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _esp32 import HT20, channel, write_espectre

from csi_edge.agent import EncoderCache, StreamAgent, group_messages
from csi_edge.codec import NO_MODEL_ID, motion_byte
from csi_edge.frames import CSIFrames, RadioInfo
from csi_edge.preprocess import Preprocessor
from csi_edge.presence import (
    MOTION_THRESHOLD_RANGE,
    MotionCalibration,
    MotionConfig,
    MotionMeter,
    PresenceConfig,
    PresenceTracker,
    ThresholdFitError,
    fit_motion_threshold,
    presence_spec,
)
from csi_edge.readers import read_recording
from csi_edge.readers.esp32 import LLTF_SUBCARRIERS
from csi_edge.settings import EdgeSettings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples"
RATE = 100.0


def frames_of(csi: np.ndarray, rate: float = RATE, t0: float = 1_700_000_000.0,
              invalid: tuple[int, ...] = (0, 1)) -> CSIFrames:
    """ESP32-like frames (FFT-order columns) of (n, 64) or (n, A, 64) CSI."""
    if csi.ndim == 2:
        csi = csi[:, None, :]
    info = RadioInfo(device="esp32", subcarriers=LLTF_SUBCARRIERS, bandwidth_mhz=20,
                     extra={"first_word_invalid_subcarriers": invalid})
    return CSIFrames(timestamp=t0 + np.arange(len(csi)) / rate, csi=csi.astype(np.complex64),
                     info=info, format="test")


def scores(frames: CSIFrames, meter: MotionMeter | None = None,
           chunk: int = 10) -> list[float | None]:
    """Each 1 s segment's score, the frames pushed ``chunk`` at a time as a source does."""
    meter = meter or MotionMeter()
    pre = Preprocessor(presence_spec(frames.take(np.arange(min(chunk, len(frames))))))
    out = []
    for a in range(0, len(frames), chunk):
        part = frames.take(np.arange(a, min(a + chunk, len(frames))))
        meter.push(part)
        out += [meter.score(s.start_time, s.start_time + pre.spec.segment_s)
                for s in pre.push(part)]
    return out


def known(values: list[float | None]) -> list[float]:
    """The scores, every one of them present."""
    assert all(v is not None for v in values), values
    return [float(v) for v in values if v is not None]


def test_motion_stands_out_from_a_quiet_room() -> None:
    out = scores(frames_of(channel(3000, RATE, moving=(15.0, 25.0), seed=1)))
    assert out[:4] == [None] * 4  # warming up: 5 segments before a reference exists
    quiet = [s for s in out[4:15] if s is not None]
    moving = out[16:28]  # the first moving second may straddle the onset
    assert len(quiet) == 11 and max(abs(s) for s in quiet) < 0.5
    assert min(known(moving)) > 2.5
    # Motion stays in the score while the 4 s window still sees it (to about 29 s).
    after = out[29:]
    assert after and max(known(after)) < 0.5


def test_gain_jumps_and_flickering_subcarriers_are_not_motion() -> None:
    base = channel(2000, RATE, seed=2)
    # Automatic gain control: every frame scaled by up to +-3 dB (the original ESP32).
    rng = np.random.default_rng(0)
    agc = base * 10 ** (rng.normal(0, 1.5, len(base)) / 20)[:, None]
    # A subcarrier that drops to zero in a tenth of the frames, another one that is garbage.
    flicker = agc.copy()
    flicker[rng.random(len(base)) < 0.1, 5] = 0
    flicker[:, 7] = rng.normal(0, 40, len(base))
    for csi in (agc, flicker):
        out = [s for s in scores(frames_of(csi)) if s is not None]
        assert len(out) >= 14 and max(abs(s) for s in out) < 0.6, out


def test_single_frame_glitches_and_slow_drifts_are_not_motion() -> None:
    base = channel(2500, RATE, seed=11)
    # From 10 s on, one frame in 13 distorted across the band (Nexmon's one-packet jumps).
    glitch = base.copy()
    glitch[np.arange(1000, 2500, 13)] *= np.where(np.arange(64) < 32, 0.5, 1.5)[None, :]
    # From 10 s on, the band tilts slowly (0.15 log units per second at its edges).
    t = np.arange(len(base)) / RATE
    tilt = np.clip(t - 10, 0, None)[:, None] * 0.15 * np.linspace(-1, 1, 64)[None, :]
    drift = base * np.exp(tilt)
    for csi, undone, floor in ((glitch, {"despike_frames": 1}, 0.5),
                               (drift, {"detrend_s": 0.0}, 3.0)):
        default = known(scores(frames_of(csi))[4:])
        ablated = known(scores(frames_of(csi), MotionMeter(MotionConfig(**undone)))[4:])
        assert max(default) < 1.0 and max(default[:6]) < 0.3, default
        assert max(ablated) > floor, ablated  # what the running median / detrending remove


def test_the_despiking_median() -> None:
    from csi_edge.presence import _hold_last, _running_median

    x = np.random.default_rng(4).normal(size=(30, 6))
    for n in (2, 3, 5):
        expected = np.median(np.lib.stride_tricks.sliding_window_view(x, n, axis=0), axis=-1)
        np.testing.assert_allclose(_running_median(x, n), expected)
    gappy = np.array([[np.nan, 1.0], [2.0, np.nan], [np.nan, np.nan], [3.0, 4.0]])
    np.testing.assert_array_equal(_hold_last(gappy),
                                  [[np.nan, 1.0], [2.0, 1.0], [2.0, 1.0], [3.0, 4.0]])


def test_stability_selection_keeps_the_quiet_subcarriers() -> None:
    csi = channel(2500, RATE, moving=(15.0, 22.0), seed=9)
    rng = np.random.default_rng(3)
    noisy = [3, 9, 40, 50]  # FFT-order columns of subcarriers 3, 9, -24, -14
    csi[:, noisy] *= 10 ** (rng.normal(0, 3, (len(csi), len(noisy))) / 20)
    meter = MotionMeter(MotionConfig(stable_fraction=0.5))
    out = scores(frames_of(csi), meter)
    quiet, moving = out[5:15], out[16:22]
    assert max(abs(s) for s in known(quiet)) < 0.5 < 2.0 < min(known(moving))
    spreads = np.stack(meter._spreads)
    quiet_level = np.nanquantile(spreads, 0.25, axis=0)
    chosen = meter._stable(np.exp(spreads[-1]))
    assert chosen.sum() == round(0.5 * np.isfinite(quiet_level).sum())
    # The four flickering subcarriers are the least stable: none is chosen.
    band = sorted(set(HT20.tolist()) - {1})  # the band, ascending
    columns = [band.index(s) for s in (3, 9, -24, -14)]
    assert not chosen[columns].any()


def test_the_invalid_first_word_is_left_out() -> None:
    csi = channel(1500, RATE, seed=4)
    csi[:, 1] = np.random.default_rng(1).normal(0, 100, len(csi))  # garbage on subcarrier 1
    meter = MotionMeter()
    scores(frames_of(csi), meter)
    assert meter.band_size == len(HT20) - 1  # 56 tones less subcarrier 1
    # Named invalid elsewhere, the same garbage counts (and the band keeps it).
    other = MotionMeter()
    scores(frames_of(csi, invalid=()), other)
    assert other.band_size == len(HT20)


def test_scores_do_not_depend_on_chunking_and_are_causal() -> None:
    frames = frames_of(channel(2500, RATE, moving=(12.0, 18.0), seed=5))
    a = scores(frames, chunk=7)
    b = scores(frames, chunk=100)
    n = min(len(a), len(b))
    assert n >= 24 and a[:4] == b[:4] == [None] * 4
    np.testing.assert_allclose(known(a[4:n]), known(b[4:n]), atol=1e-9)
    # Causal: the first 12 s score the same without the motion that follows.
    c = scores(frames.take(np.arange(1250)))
    np.testing.assert_allclose(known(c[4:12]), known(a[4:12]), atol=1e-9)
    assert max(known(a[4:12])) < 0.5 < 3.0 < min(known(a[13:18]))


def test_the_window_does_not_reach_across_a_gap() -> None:
    frames = frames_of(channel(2600, RATE, moving=(0.0, 12.0), seed=6))
    # 12 s of motion, a 1.5 s hole, then a quiet room (the same channel, nobody moving).
    moving = frames.take(np.arange(1200))
    quiet = frames.take(np.arange(1200, 2600))
    quiet = replace(quiet, timestamp=quiet.timestamp + 1.5)
    quiet = replace(quiet, csi=frames_of(channel(1400, RATE, seed=6)).csi)
    t0 = float(frames.timestamp[0])
    results = {}
    for max_gap_s in (1.0, 10.0):
        meter = MotionMeter(MotionConfig(window_s=4.0, max_gap_s=max_gap_s))
        meter.push(moving)
        for k in range(12):
            meter.score(t0 + k, t0 + k + 1)
        meter.push(quiet)
        start = float(quiet.timestamp[0])
        results[max_gap_s] = meter.statistic(start, start + 1.0)
    # Without the gap rule the first quiet second would carry the motion before the hole.
    assert results[1.0] is not None and results[10.0] is not None
    assert results[10.0] - results[1.0] > 2.0
    # A segment with fewer than min_frames frames of its own gets no score.
    meter = MotionMeter()
    meter.push(moving)
    assert meter.statistic(t0 + 11.99, t0 + 12.0) is None
    meter.forget_frames()
    assert meter.statistic(t0 + 10, t0 + 11) is None


def test_calibration_is_a_low_quantile_of_what_was_seen() -> None:
    cal = MotionCalibration(MotionConfig(warmup_segments=3, horizon_segments=10))
    assert [cal.update(v) for v in (1.0, 2.0)] == [None, None]
    assert not cal.calibrated and cal.reference is None
    assert cal.update(3.0) == pytest.approx(3.0 - np.quantile([1, 2, 3], 0.25))
    assert cal.update(float("nan")) is None and len(cal.history) == 3
    # A room that moves 70 % of the time keeps its quiet reference.
    rng = np.random.default_rng(0)
    cal = MotionCalibration()
    quiet = rng.normal(-6.0, 0.1, 900)
    busy = rng.random(900) < 0.7
    values = np.where(busy, quiet + 3.0, quiet)
    for v in values:
        cal.update(float(v))
    assert cal.reference == pytest.approx(-6.0, abs=0.15)
    # Only the horizon counts: after 900 busy segments the busy level is the reference.
    for v in quiet + 3.0:
        cal.update(float(v))
    assert cal.reference == pytest.approx(-3.0, abs=0.15)
    assert cal.as_dict()["calibrated"] is True
    cal.reset()
    assert cal.reference is None


def test_a_room_always_moving_reads_empty_until_measured_empty() -> None:
    """The automatic reference of a room that moves all the time is its movement; measured
    on the empty room, the reference is pinned to that room's quiet state."""
    rng = np.random.default_rng(1)
    cal = MotionCalibration()
    moving = rng.normal(-3.0, 0.2, 300)
    scores = [cal.update(float(v)) for v in moving]
    assert cal.mode == "auto" and abs(float(np.median(scores[10:]))) < 0.3  # movement reads quiet
    cal.measure_empty(30, skip=3)
    assert cal.mode == "measuring" and cal.as_dict()["measuring_left"] == 33
    before = cal.reference
    for v in rng.normal(-3.0, 0.2, 3):  # passed over: they look back at the movement
        cal.update(float(v))
    assert cal.measuring_left == 30
    quiet = rng.normal(-6.0, 0.1, 30)
    for v in quiet[:29]:
        cal.update(float(v))
    # Until the measurement is complete the previous reference serves.
    assert cal.mode == "measuring" and cal.as_dict()["measuring_left"] == 1
    assert cal.reference == pytest.approx(before, abs=0.3)
    cal.update(float(quiet[29]))
    assert cal.mode == "pinned" and "measuring_left" not in cal.as_dict()
    assert cal.pinned == pytest.approx(float(np.quantile(quiet, 0.25)))
    # Movement now scores about 3 (8 times the quiet variability), whatever the history says.
    later = [cal.update(float(v)) for v in rng.normal(-3.0, 0.2, 900)]
    assert cal.reference == cal.pinned
    assert min(s for s in later if s is not None) > 2.0
    assert cal.as_dict()["mode"] == "pinned" and cal.as_dict()["reference"] == round(cal.pinned, 3)
    # Released: the automatic reference (the history kept meanwhile) at once.
    cal.release()
    assert cal.mode == "auto" and cal.pinned is None
    assert cal.reference == pytest.approx(-3.0, abs=0.3)
    # A pinned reference needs no warm-up (one kept across a restart).
    fresh = MotionCalibration()
    fresh.pin(-6.0)
    assert fresh.calibrated and fresh.update(-5.0) == pytest.approx(1.0)
    fresh.reset()
    assert fresh.reference == -6.0
    # A measurement can be cancelled: the reference stays what it was.
    fresh.measure_empty(10)
    fresh.cancel_measurement()
    assert fresh.mode == "pinned" and fresh.reference == -6.0 and fresh.measuring_left == 0


def test_a_pinned_reference_is_dropped_on_another_stream_layout() -> None:
    """A reference measured on one layout (hardware, band, antennas) does not score another:
    on the first frames of another layout the meter releases it and says why."""
    meter = MotionMeter()
    meter.push(frames_of(channel(200, RATE, seed=3)))
    measured_on = meter.calibration.layout
    assert measured_on is not None
    meter.calibration.pin(-6.0, measured_on)
    meter.push(frames_of(channel(200, RATE, seed=3), t0=1_700_000_010.0))  # the same layout
    assert meter.calibration.mode == "pinned" and meter.calibration.released_because is None
    # Restored after a restart, before any frame: kept until the first frames say otherwise.
    restarted = MotionMeter()
    restarted.calibration.pin(-6.0, measured_on + 1)
    assert restarted.calibration.mode == "pinned"
    restarted.push(frames_of(channel(200, RATE, seed=3)))
    assert restarted.calibration.mode == "auto" and restarted.calibration.pinned is None
    assert "layout" in str(restarted.calibration.released_because)
    # Another antenna count is another layout.
    two = frames_of(np.stack([channel(200, RATE, seed=3)] * 2, axis=1))
    meter.push(two)
    assert meter.calibration.mode == "auto"


@pytest.mark.parametrize("segments", [0, -1, 901, 2.5, True])
def test_an_empty_room_measurement_of_a_bad_length_is_refused(segments: Any) -> None:
    with pytest.raises(ValueError, match=f"segments {segments!r}"):
        MotionCalibration().measure_empty(segments)


@pytest.mark.parametrize("skip", [-1, 901, 1.5, False])
def test_an_empty_room_measurement_with_a_bad_wait_is_refused(skip: Any) -> None:
    with pytest.raises(ValueError, match=f"skip {skip!r}"):
        MotionCalibration().measure_empty(10, skip)


@pytest.mark.parametrize("reference", [float("nan"), float("inf")])
def test_a_pinned_reference_must_be_finite(reference: float) -> None:
    with pytest.raises(ValueError, match="not a finite number"):
        MotionCalibration().pin(reference)


@pytest.mark.parametrize(("config", "match"), [
    ({"window_s": 0}, "window_s 0 must be > 0"),
    ({"smooth_s": -1}, "smooth_s -1"),
    ({"detrend_s": -0.5}, "detrend_s -0.5"),
    ({"despike_frames": 0}, "despike_frames 0"),
    ({"reference_quantile": 1.0}, "reference_quantile 1.0"),
    ({"warmup_segments": 0}, "warmup_segments 0"),
    ({"min_frames": 1}, "min_frames 1"),
    ({"max_gap_s": math.nan}, "max_gap_s nan"),
])
def test_motion_config_names_bad_values(config: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MotionConfig(**config)  # type: ignore[arg-type]


def test_presence_hysteresis_and_sensitivity() -> None:
    tracker = PresenceTracker(PresenceConfig(threshold=1.5, hold_s=5.0))
    assert tracker.update(0, 1, None) == (None, None)  # nothing known yet
    assert tracker.update(1, 2, 0.2) == (False, False)
    assert tracker.update(2, 3, 1.5) == (True, True)  # at the threshold: motion
    assert tracker.update(3, 4, None) == (None, True)  # no score: presence held
    assert tracker.update(6, 7, 0.0) == (False, True)  # 4 s after the last motion
    assert tracker.update(7, 8, 0.0) == (False, False)  # 5 s: empty
    assert tracker.update(2, 3, 0.0) == (False, True)  # a late segment, before the motion
    sensitive = PresenceTracker(PresenceConfig(threshold=1.5, sensitivity=2.0))
    assert sensitive.update(0, 1, 0.8)[0] is True
    assert PresenceConfig(threshold=1.5, sensitivity=0.5).motion_threshold == 3.0
    tracker.reset()
    assert tracker.update(9, 10, None) == (None, None)
    for bad, match in (({"sensitivity": 0}, "sensitivity 0"), ({"threshold": -1}, "-1"),
                       ({"hold_s": math.inf}, "hold_s inf")):
        with pytest.raises(ValueError, match=match):
            PresenceConfig(**bad)  # type: ignore[arg-type]


def test_a_fitted_threshold_flags_no_still_second_and_as_many_moving_ones_as_it_can() -> None:
    still = [-0.5, 0.0, 0.25, 0.5, 0.1, None, math.nan, -1.0, 0.3, 0.2, 0.4, 0.0]
    moving = [0.5, 0.75, 1.0, 1.25, 2.0, 3.0, 0.55, 0.6, 0.9, 1.1]
    fit = fit_motion_threshold(still, moving)
    # The first step of 1/16 above the highest still score (0.5): the one at 0.5 is flagged.
    assert fit.threshold == 0.5625
    assert fit.still_seconds == 10 and fit.moving_seconds == 10  # None and NaN left out
    assert fit.false_positive_rate == 0.0 and fit.recall == 0.8  # 0.5 and 0.55 are missed
    # Letting a tenth of the still seconds through: the first step above the second highest
    # (0.4); only the highest (0.5) is flagged.
    loose = fit_motion_threshold(still, moving, max_false_positive_rate=0.1)
    assert loose.threshold == 0.4375 and loose.false_positive_rate == 0.1 and loose.recall == 1.0
    # Never below the range: a quiet room's own noise is no motion.
    assert fit_motion_threshold([-3.0] * 10, [0.0] * 10).threshold == MOTION_THRESHOLD_RANGE[0]
    assert fit.as_dict() == {"threshold": 0.5625, "still_seconds": 10, "moving_seconds": 10,
                             "false_positive_rate": 0.0, "recall": 0.8}


@pytest.mark.parametrize(("still", "moving", "rate", "match"), [
    ([0.0] * 9, [1.0] * 20, 0.0, "9 still and 20 moving"),
    ([0.0] * 20, [1.0] * 3 + [None] * 10, 0.0, "20 still and 3 moving"),
    ([0.0] * 20, [1.0] * 20, 0.6, "max_false_positive_rate 0.6"),
    ([0.0] * 20, [1.0] * 20, -0.1, "max_false_positive_rate -0.1"),
    # Still seconds above the whole range: no threshold keeps them still.
    ([0.0] * 8 + [9.0] * 2, [9.5] * 10, 0.1, r"flags 20% of the still seconds .* 9"),
])
def test_a_threshold_fit_names_what_it_lacks(still: list[float | None], moving: list[float | None],
                                            rate: float, match: str) -> None:
    with pytest.raises(ThresholdFitError, match=match):
        fit_motion_threshold(still, moving, rate)


def test_runs_on_nexmon_and_intel5300_samples() -> None:
    pcaps = sorted((SAMPLES / "fition").rglob("*.pcap"))
    nexmon = read_recording(pcaps[0])
    out = scores(nexmon, chunk=5)
    assert len(out) >= 8 and all(s is None or math.isfinite(s) for s in out)
    assert sum(s is not None for s in out) >= 3
    meter = MotionMeter()
    scores(nexmon, meter)
    assert meter.band_size == 56  # the 20 MHz channel inside the 80 MHz capture
    wiar = read_recording(sorted((SAMPLES / "wiar").rglob("*.dat"))[0])
    assert wiar.antennas == 3
    meter = MotionMeter()
    out = scores(wiar, meter, chunk=3)
    assert meter.band_size == 30 and sum(s is not None for s in out) >= 3
    assert all(s is None or math.isfinite(s) for s in out)


def test_the_edge_keeps_gives_up_and_drops_an_empty_room_measurement(tmp_path: Path) -> None:
    """The agent's side of ``calibrate_presence``: the pin kept in the spool and restored by
    the next run, a measurement that cannot complete given up after its deadline, a pin of
    another layout dropped and reported."""
    folder = tmp_path / "esp32"
    write_espectre(folder / "a_baseline.npz", channel(1500, RATE, seed=8), chip="c6",
                   rate_hz=RATE, label="baseline")
    settings = EdgeSettings(source=f"file://{folder}?speed=max", site="home", ap="hall",
                            presence_only=True, spool_dir=tmp_path / "spool",
                            model=tmp_path / "no-bundle-needed")

    def run() -> StreamAgent:
        agent = StreamAgent(settings.all_streams()[0], settings, EncoderCache())
        agent.check()
        agent.open_spool()
        return agent

    agent = run()
    asyncio.run(agent._control(json.dumps({"action": "calibrate_presence", "empty_s": 5})))
    assert agent.motion is not None and agent.motion.calibration.mode == "measuring"
    # 5 s measured after the ~5 s (4.6 s rounded up) its statistics look back.
    assert agent.motion.calibration.measuring_left == 10
    asyncio.run(agent.produce())
    calibration = agent.motion.calibration
    assert calibration.mode == "pinned" and calibration.pinned_layout == calibration.layout
    assert agent.spool is not None
    assert agent.spool.setting("presence_reference") == pytest.approx(calibration.pinned)
    assert agent._status()["motion"]["mode"] == "pinned"
    pinned = calibration.pinned
    agent.spool.close()

    # The next run starts pinned; a measurement that cannot complete is given up in time.
    agent = run()
    assert agent.motion is not None and agent.motion.calibration.pinned == pinned
    asyncio.run(agent._control(json.dumps({"action": "calibrate_presence", "empty_s": 30,
                                           "delay_s": 10})))
    assert agent.motion.calibration.mode == "measuring"
    agent._keep_pinned()
    assert agent.motion.calibration.mode == "measuring"  # not yet due
    agent._measure_deadline = 0.0  # as if the source had stalled past it
    agent._keep_pinned()
    assert agent.motion.calibration.mode == "pinned"
    assert agent.motion.calibration.pinned == pinned  # the reference stays what it was
    assert "presence_measurement_expired" in agent.problems.first
    # A pin of another layout (another source behind the same AP name) is dropped, said and
    # forgotten by the spool.
    assert agent.spool is not None
    agent.spool.set_setting("presence_reference_layout", 12345.0)
    agent.spool.close()
    agent = run()
    assert agent.motion is not None and agent.motion.calibration.mode == "pinned"
    asyncio.run(agent.produce())
    assert agent.motion.calibration.mode == "auto"
    assert "layout" in agent.problems.first["presence_calibration_dropped"]
    assert agent.spool is not None and agent.spool.setting("presence_reference") is None
    # A bad value names itself; auto releases.
    with pytest.raises(ValueError, match="empty_s 4"):
        asyncio.run(agent._control(json.dumps({"action": "calibrate_presence",
                                               "empty_s": 4})))
    asyncio.run(agent._control(json.dumps({"action": "calibrate_presence", "auto": True})))
    assert agent.motion.calibration.mode == "auto"
    agent.spool.close()


def test_presence_only_stream_queues_motion_without_codes(tmp_path: Path) -> None:
    """The edge without a bundle: 1 s segments, model id 00 00 00, a motion byte each."""
    folder = tmp_path / "esp32"
    write_espectre(folder / "a_baseline.npz", channel(800, RATE, seed=7), chip="c6",
                   rate_hz=RATE, label="baseline")
    write_espectre(folder / "b_movement.npz", channel(800, RATE, moving=(0, 8), seed=7),
                   chip="c6", rate_hz=RATE, label="movement")
    settings = EdgeSettings(source=f"file://{folder}?speed=max", site="home", ap="hall",
                            presence_only=True, spool_dir=tmp_path / "spool",
                            model=tmp_path / "no-bundle-needed")
    agent = StreamAgent(settings.all_streams()[0], settings, EncoderCache())
    assert agent.encoder is None
    agent.check()
    agent.open_spool()
    asyncio.run(agent.produce())
    assert agent.state == "source_ended"
    assert agent.spool is not None
    rows = agent.spool.peek(100)
    assert 14 <= len(rows) <= 16
    assert {r.model_id for r in rows} == {NO_MODEL_ID} and {r.level for r in rows} == {0}
    assert all(r.codes == b"" and not r.idle for r in rows)
    assert [r.seq for r in rows] == list(range(len(rows)))
    assert np.all(np.diff([r.timestamp_ms for r in rows]) == 1000)
    motion = [r.motion if r.motion is not None else -1 for r in rows]
    assert motion[:4] == [0] * 4  # no score while calibrating
    assert max(motion[4:7]) < motion_byte(0.75)
    assert min(motion[9:]) > motion_byte(3.0)
    status = agent._status()
    assert status["mode"] == "presence-only" and status["model"] is None
    assert status["motion"]["calibrated"] is True
    assert status["motion"]["subcarriers"] == 54
    # One message per segment by default; old rows without a motion byte never join them.
    groups = group_messages(rows, per_message=agent._per_message, segment_ms=agent._segment_ms,
                            limit=1)
    assert [len(g) for g in groups] == [1] * len(rows)
    mixed = [replace(rows[0], motion=None), *rows[1:4]]
    groups = group_messages(mixed, per_message=lambda m, lv: 10, segment_ms=lambda m: 1000,
                            limit=1)
    assert [len(g) for g in groups] == [1, 3]
    # A backlog of a bundle the stream no longer runs still goes out, a segment a message.
    old = [replace(r, model_id=b"\x01\x02\x03", level=1, motion=None) for r in rows[:3]]
    assert agent._per_message(b"\x01\x02\x03", 1) == 1
    groups = group_messages(old, per_message=agent._per_message, segment_ms=agent._segment_ms,
                            limit=1)
    assert [len(g) for g in groups] == [1, 1, 1]
    agent.spool.close()


def test_presence_only_refuses_rate_changes(tmp_path: Path) -> None:
    path = write_espectre(tmp_path / "x.npz", channel(300, RATE, seed=8), rate_hz=RATE)
    settings = EdgeSettings(source=f"file://{path}", site="home", ap="hall",
                            presence_only=True, spool_dir=tmp_path / "spool")
    agent = StreamAgent(settings.all_streams()[0], settings, EncoderCache())
    with pytest.raises(ValueError, match="set_rate level 1: a presence-only stream has no"):
        asyncio.run(agent._control(b'{"action": "set_rate", "level": 1}'))


def _presence_bench() -> Any:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_presence", ROOT / "bench" /
                                                  "presence.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_presence"] = bench  # its dataclass looks itself up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench_presence"]
    return bench


def test_the_bench_measures_the_empty_room_before_the_stream() -> None:
    """bench/presence.py (f): a stream that moves throughout reads still against its
    automatic reference and moving against one measured on the empty room played first."""
    bench = _presence_bench()
    empty = replace(frames_of(channel(1000, RATE, seed=5)), source="empty.npz")
    moving = replace(frames_of(channel(2000, RATE, moving=(0.0, 20.0), seed=5),
                               t0=1_700_000_100.0), source="moving.npz")
    alone = [s for s in bench.run_stream([(moving, 1)]) if s.motion is not None]
    measured = bench.run_stream([(moving, 1)], empty=[(empty, 0)])
    after = [s for s in measured if s.source == moving.source and s.motion is not None]
    assert len(alone) >= 10 and sum(s.motion for s in alone) <= 0.2 * len(alone)
    assert len(after) >= 15 and all(s.motion for s in after)
    # The empty recording measured is the quiet state: none of its seconds reads as motion.
    assert all(not s.motion for s in measured if s.source == empty.source)


def test_the_docs_table_is_the_committed_results() -> None:
    """docs/presence.md quotes bench/results/presence.json, nothing typed by hand."""
    bench = _presence_bench()
    result = json.loads((ROOT / "bench" / "results" / "presence.json").read_text())
    doc = (ROOT / "docs" / "presence.md").read_text()
    table = doc.split(bench.DOC_BEGIN, 1)[1].split(bench.DOC_END, 1)[0].strip()
    assert table == bench.render_table(result).strip(), "run: python bench/presence.py"
    assert result["esp32_espectre"]["target_f1"] == bench.TARGET_ESP32_F1


def _recording_scores(meter: MotionMeter, frames: CSIFrames, t0: float) -> list[float | None]:
    """Each whole second's score of one recording, replayed from ``t0`` (after a gap)."""
    frames = replace(frames, timestamp=frames.timestamp - frames.timestamp[0] + t0)
    meter.push(frames)
    return [meter.score(t0 + k, t0 + k + 1) for k in range(int(frames.duration_s))]


@pytest.mark.shared_data
def test_real_movement_scores_above_the_quiet_room() -> None:
    """On real recordings (../shared/data): the ESP32 chips' movement seconds all score above
    their baseline's, and on a Nexmon session moving recordings score above still ones."""
    from conftest import _shared

    folder = _shared("esp32-espectre")
    for chip in ("esp32", "c6"):
        meter = MotionMeter()
        quiet = _recording_scores(meter, read_recording(
            sorted((folder / "baseline").glob(f"*_{chip}_*.npz"))[0]), 0.0)
        moving = _recording_scores(meter, read_recording(
            sorted((folder / "movement").glob(f"*_{chip}_*.npz"))[0]), 20.0)
        assert max(known(quiet[4:])) < 1.5 <= min(known(moving)), (chip, quiet, moving)
    fition = _shared("fition")
    meter = MotionMeter()
    by_label: dict[str, list[float]] = {"nm": [], "walking": [], "standup": []}
    taken = dict.fromkeys(by_label, 0)
    for k, activity in enumerate(("nm", "walking", "nm", "standup", "nm")):
        path = sorted((fition / f"{activity}_user3_rm3").rglob("*.pcap"))[taken[activity]]
        taken[activity] += 1
        out = _recording_scores(meter, read_recording(path), 15.0 * k)
        by_label[activity] += [s for s in out if s is not None]
    # Per recording, not per second: moving recordings hold still seconds (docs/presence.md).
    assert np.median(by_label["nm"]) + 1.0 < np.median(by_label["walking"] +
                                                       by_label["standup"]), by_label
