"""Preprocessing: band selection, repair, uniform resampling with quality, segments, norms."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from csi_edge import CSIFrames, RadioInfo, SpecMismatchError, read_recording
from csi_edge.band import stream_band
from csi_edge.frames import DropCounter
from csi_edge.preprocess import InputSpec, Normaliser, Preprocessor, Segmenter, repair

FITION = "fition/walking_user1_rm1/walking_user1_rm1_10.pcap"
GAPPY = "fition/getintobed_user4_rm4/getintobed_user4_rm4_24.pcap"


def fition_spec(frames: CSIFrames, **options: object) -> InputSpec:
    band = stream_band(frames.amplitude(), frames.info.subcarriers, 80, "nexmon")
    return InputSpec.for_stream(frames, band, nominal_rate_hz=50, segment_s=1.0, **options)


def synthetic(t: np.ndarray, antennas: int = 1, subcarriers: int = 4) -> CSIFrames:
    values = (1 + t[:, None, None]) * np.ones((1, antennas, subcarriers))
    return CSIFrames(
        timestamp=t,
        csi=values.astype(np.complex64),
        info=RadioInfo(device="test", subcarriers=tuple(range(subcarriers))),
        format="test",
    )


def test_fition_segments_have_56_subcarriers(samples: Path) -> None:
    frames = read_recording(samples / FITION)
    spec = fition_spec(frames)
    batch = Preprocessor(spec).process(frames)
    assert batch.data.shape == (9, 50, 1, 56)  # 9.5 s at 50 Hz, the tail half-second dropped
    assert batch.data.dtype == np.float32
    assert np.all(batch.quality == 1) and batch.ok.all()
    assert batch.dropped["tail_grid_points"] > 0
    assert batch.dropped["other_transmitter"] == 21  # reader drops carried through


def test_gap_is_marked_not_invented(samples: Path) -> None:
    frames = read_recording(samples / GAPPY)
    batch = Preprocessor(fition_spec(frames)).process(frames)
    missing = sorted(set(range(int(batch.index[-1]) + 1)) - set(batch.index.tolist()))
    assert missing, "segments inside the 2.9 s gap must not be emitted"
    assert batch.dropped["empty_segment"] == len(missing)
    assert (~batch.ok).sum() >= 1 and batch.quality.min() < 0.5


def test_streaming_equals_batch(samples: Path) -> None:
    frames = read_recording(samples / GAPPY)
    spec = fition_spec(frames, normalisation="stream")
    batch = Preprocessor(spec).process(frames)
    live = Preprocessor(spec)
    segments = []
    for start in range(0, len(frames), 23):  # odd chunk size, as packets would arrive
        segments += live.push(frames.take(np.arange(start, min(start + 23, len(frames)))))
    assert [s.index for s in segments] == batch.index.tolist()
    np.testing.assert_allclose(np.stack([s.data for s in segments]), batch.data, atol=1e-5)


def test_resampling_is_linear_and_on_grid() -> None:
    t = np.array([0.0, 0.013, 0.031, 0.052, 0.069, 0.1, 0.12, 0.14, 0.161, 0.18, 0.2])
    seg = Segmenter(rate_hz=50, segment_frames=5, max_interp_gap_s=0.1, min_quality=0.5)
    out = seg.push(t, (1 + t)[:, None])
    assert len(out) == 2
    np.testing.assert_allclose(out[0].data[:, 0], 1 + np.arange(5) / 50, atol=1e-6)
    np.testing.assert_allclose(out[1].data[:, 0], 1 + (5 + np.arange(5)) / 50, atol=1e-6)


def test_quality_counts_points_inside_gaps() -> None:
    t = np.concatenate([np.arange(0, 0.5, 0.02), np.arange(0.8, 2.0, 0.02)])
    seg = Segmenter(rate_hz=50, segment_frames=50, max_interp_gap_s=0.05, min_quality=0.9)
    first, *_ = seg.push(t, np.ones((t.size, 1)))
    assert first.quality == pytest.approx(0.7, abs=0.03)
    assert not first.ok


def test_repair_drops_and_patches_by_reason() -> None:
    t = np.arange(6, dtype=np.float64)
    t[3] = 1.5  # out of order
    csi = np.ones((6, 1, 8), dtype=np.complex64)
    csi[1] = 0  # all-zero frame
    csi[2, 0, :5] = np.nan  # mostly non-finite
    csi[4, 0, 3] = np.inf  # one bad bin: patched
    dropped = DropCounter()
    t2, c2 = repair(t, csi, dropped)
    assert t2.tolist() == [0, 4, 5]
    assert dropped == {"timestamp_not_increasing": 1, "zero_frame": 1, "nonfinite_frame": 1,
                       "patched_frames": 1}
    assert np.isfinite(c2).all()


def test_normalisation_modes() -> None:
    x = np.random.default_rng(0).uniform(10, 100, (50, 1, 8)).astype(np.float32)
    assert np.array_equal(Normaliser("none", 1.0)(x), x)
    np.testing.assert_allclose(Normaliser("log", 1.0)(x), np.log1p(x), rtol=1e-6)
    seg = Normaliser("segment", 1.0)(x)
    np.testing.assert_allclose(seg.mean(axis=0), 0, atol=1e-5)
    stream = Normaliser("stream", 1.0, tau_s=10.0)
    first = stream(x)
    assert abs(float(first.mean())) < 1e-4 and float(first.std()) == pytest.approx(1, abs=0.05)
    shifted = stream(x * 10)  # a jump in level shows against the running statistics
    assert float(shifted.mean()) > 3  # ln(10) / std of log-amplitude


def test_spec_refuses_a_stream_that_cannot_fit(samples: Path) -> None:
    frames = read_recording(samples / FITION)
    spec = fition_spec(frames)
    wiar = read_recording(samples / "wiar/height_90/csi_a1_1.dat")
    with pytest.raises(SpecMismatchError, match=r"intel5300.*nexmon"):
        Preprocessor(spec).process(wiar)
    narrow = replace(frames, info=frames.info.with_subcarriers(tuple(range(256))))
    with pytest.raises(SpecMismatchError, match="lacks 56 of the spec's 56 subcarriers"):
        Preprocessor(spec).process(narrow)
    two = replace(frames, csi=np.repeat(frames.csi, 2, axis=1))
    with pytest.raises(SpecMismatchError, match="2 antennas, the spec needs 1"):
        Preprocessor(spec).process(two)


def test_phase_feature_doubles_the_planes(samples: Path) -> None:
    wiar = read_recording(samples / "wiar/height_90/csi_a1_1.dat")
    band = stream_band(wiar.amplitude(), wiar.info.subcarriers, 20, "intel5300")
    spec = InputSpec.for_stream(wiar, band, nominal_rate_hz=30, features="amplitude+phase")
    batch = Preprocessor(spec).process(wiar)
    assert batch.data.shape[1:] == (30, 6, 30)


def test_spec_round_trips_through_json(samples: Path) -> None:
    frames = read_recording(samples / FITION)
    spec = fition_spec(frames)
    assert InputSpec.model_validate_json(spec.model_dump_json()) == spec
    assert spec.segment_s == 1.0 and spec.nominal_rate_hz == 50


def test_synthetic_helper_is_consistent() -> None:
    frames = synthetic(np.arange(0, 2, 0.02))
    spec = InputSpec(source_kind="test", subcarriers=(0, 1, 2, 3), antennas=1,
                     nominal_rate_hz=50, segment_frames=50, normalisation="none")
    batch = Preprocessor(spec).process(frames)
    assert batch.data.shape == (2, 50, 1, 4)
    np.testing.assert_allclose(batch.data[1, :, 0, 0], 2 + np.arange(50) / 50, atol=1e-5)
