"""ESPectre ``.npz`` reader: synthetic recordings in both buffer layouts read back exactly, every
malformed file named, and (from ../shared/data) the real recordings of four chips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _esp32 import FFT_ORDER, HT20, channel, collected_epoch, write_espectre
from typer.testing import CliRunner

from csi_edge._errors import EmptyRecordingError, FormatError
from csi_edge.band import frames_band, invalid_subcarriers
from csi_edge.cli import app
from csi_edge.inspect import summarize
from csi_edge.readers import detect_format, read_recording
from csi_edge.readers.esp32 import LLTF_SUBCARRIERS
from csi_edge.readers.espectre import read_espectre_npz
from csi_edge.recording import read_recording_file


@pytest.fixture(scope="module")
def csi() -> np.ndarray:
    return channel(300, 120.0, moving=(1.0, 2.0), seed=3)


def _valid(chip: str) -> np.ndarray:
    """FFT-order columns whose values the file carries (the original ESP32's first word is
    replaced by garbage)."""
    keep = np.isin(FFT_ORDER, HT20)
    if chip == "esp32":
        keep &= ~np.isin(FFT_ORDER, (0, 1))
    return keep


@pytest.mark.parametrize(("chip", "order"), [("esp32", "0..31"), ("s3", "0..31"),
                                              ("c5", "-32..31"), ("c6", "-32..31")])
def test_both_layouts_read_back_in_fft_order(tmp_path: Path, csi: np.ndarray, chip: str,
                                             order: str) -> None:
    path = write_espectre(tmp_path / f"movement_{chip}.npz", csi, chip=chip, rate_hz=120.0,
                          gain_locked=chip != "esp32")
    assert detect_format(path) == "espectre-npz"
    frames = read_recording(path)
    assert frames.format == "espectre-npz" and frames.info.device == "esp32"
    assert frames.info.chip == chip and frames.info.subcarriers == LLTF_SUBCARRIERS
    assert frames.csi.shape == (300, 1, 64) and frames.csi.dtype == np.complex64
    keep = _valid(chip)
    expected = np.rint(csi.real) + 1j * np.rint(csi.imag)
    np.testing.assert_array_equal(frames.csi[:, 0, keep], expected[:, keep])
    assert str(frames.info.extra["buffer_order"]).startswith(order)
    assert frames.info.extra["gain_locked"] is (chip != "esp32")
    assert frames.info.extra["label"] == "movement"
    invalid = (0, 1) if order == "0..31" else (-28, -27)
    assert invalid_subcarriers(frames) == invalid
    # Band: HT20, the invalid first word left out.
    band = frames_band(frames)
    assert band.layout == "ht-20" and band.match == 1.0
    assert set(band.subcarriers) == set(HT20) - set(invalid)
    assert band.excluded == tuple(s for s in invalid if s in HT20)


def test_rate_and_times_come_from_duration_and_count(tmp_path: Path, csi: np.ndarray) -> None:
    path = write_espectre(tmp_path / "b.npz", csi, duration_ms=2990.0,
                          collected_at="2026-02-14T18:30:59.355439")
    frames = read_espectre_npz(path)
    assert frames.rate_hz == pytest.approx(299 / 2.99)
    assert np.allclose(np.diff(frames.timestamp), 2.99 / 299, atol=1e-6)
    # The last packet at collected_at, read as UTC (the file names no zone).
    assert frames.timestamp[-1] == pytest.approx(collected_epoch("2026-02-14T18:30:59.355439"))
    assert frames.duration_s == pytest.approx(2.99)


def test_inspect_and_convert(tmp_path: Path, csi: np.ndarray) -> None:
    path = write_espectre(tmp_path / "baseline_c5.npz", csi, chip="c5", rate_hz=120.0,
                          label="baseline")
    summary = summarize(path)
    assert summary["format"] == "espectre-npz" and summary["chip"] == "c5"
    band = summary["band"]
    assert isinstance(band, dict) and band["excluded"] == [-28, -27]
    assert summary["subcarriers"] == 54
    assert summary["rate_hz"] == pytest.approx(120.0, abs=0.01)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["format"] == "espectre-npz"
    out = tmp_path / "c5.h5"
    result = runner.invoke(app, ["convert", str(path), "-o", str(out), "--phase"])
    assert result.exit_code == 0, result.output
    back = read_recording_file(out)
    original = read_recording(path)
    np.testing.assert_allclose(np.abs(back.csi), np.abs(original.csi), atol=1e-3)
    np.testing.assert_allclose(back.timestamp, original.timestamp)
    assert back.info.chip == "c5"
    assert invalid_subcarriers(back) == (-28, -27)
    assert frames_band(back).subcarriers == frames_band(original).subcarriers


def _npz(path: Path, **values: object) -> Path:
    with path.open("wb") as fh:
        np.savez(fh, **values)  # type: ignore[arg-type]
    return path


def _base(n: int = 10) -> dict[str, object]:
    buffers = np.zeros((n, 128), np.int8)
    # FFT order: data everywhere but the guard columns 30..34 (and their pairs of bytes).
    buffers[:, :60] = 20
    buffers[:, 70:] = 20
    return {"csi_data": buffers, "num_subcarriers": 64, "duration_ms": 100.0, "chip": "esp32"}


@pytest.mark.parametrize(("change", "match"), [
    ({"csi_data": None}, r"no \['csi_data'\]"),
    ({"csi_data": np.zeros((10, 128), np.int16)}, "2-D int8 array, got int16"),
    ({"csi_data": np.zeros((10, 64), np.int8)}, "width 64"),
    ({"num_subcarriers": 128}, "num_subcarriers 128"),
    ({"num_subcarriers": np.array([64, 64])}, "num_subcarriers must be a scalar"),
    ({"duration_ms": 0.0}, "duration_ms 0.0 is not a positive number"),
    ({"duration_ms": float("nan")}, "duration_ms nan"),
    ({"duration_ms": "ten"}, "duration_ms 'ten'"),
    ({"chip": "c6"}, "chip 'c6' records ascending-order buffers, but the zero columns say fft"),
    ({"csi_data": np.full((10, 128), 5, np.int8)}, "unknown ESP32 buffer layout"),
    ({"collected_at": "yesterday"}, "collected_at 'yesterday' is not an ISO time"),
])
def test_malformed_files_are_named(tmp_path: Path, change: dict[str, object],
                                   match: str) -> None:
    values = {**_base(), **change}
    values = {k: v for k, v in values.items() if v is not None}
    path = _npz(tmp_path / "bad.npz", **values)
    with pytest.raises(FormatError, match=match) as info:
        read_recording(path)
    assert str(path) in str(info.value)


def test_one_packet_is_empty_and_pickles_are_refused(tmp_path: Path) -> None:
    values = _base(1)
    with pytest.raises(EmptyRecordingError, match="1 packet"):
        read_recording(_npz(tmp_path / "one.npz", **values))
    # Object arrays need unpickling, which the reader never does.
    objects = {**_base(), "label": np.array([{"x": 1}], dtype=object)}
    with pytest.raises(FormatError, match=r"cannot read the archive|Object arrays"):
        read_recording(_npz(tmp_path / "pickle.npz", **objects))


def test_not_an_archive(tmp_path: Path) -> None:
    fake = tmp_path / "fake.npz"
    fake.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(FormatError, match=r"not a readable numpy \.npz archive"):
        read_recording(fake)
    other = tmp_path / "other.npz"
    other.write_bytes(b"hello, not a zip")
    with pytest.raises(FormatError, match=r"suffix '\.npz' says espectre-npz but the content"):
        detect_format(other)
    single = tmp_path / "array.npz"
    with single.open("wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(FormatError):
        read_recording(single, "espectre-npz")


@pytest.mark.shared_data
def test_the_espectre_recordings(tmp_path: Path) -> None:
    from conftest import _shared

    folder = _shared("esp32-espectre")
    info = json.loads((folder / "dataset_info.json").read_text())
    files = sorted(folder.rglob("*.npz"))
    assert len(files) == 12
    listed = {f["filename"]: f for label in info["files"].values() for f in label}
    for path in files:
        frames = read_recording(path)
        meta = listed[path.name]
        assert len(frames) == meta["num_packets"]
        assert frames.duration_s == pytest.approx(meta["duration_ms"] / 1000, abs=0.002)
        assert frames.info.extra["gain_locked"] is meta["gain_locked"]
        classic = frames.info.chip in ("esp32", "s3")
        assert str(frames.info.extra["buffer_order"]).startswith("0..31" if classic
                                                                 else "-32..31")
        band = frames_band(frames)
        assert band.layout == "ht-20" and band.match == 1.0
        assert band.excluded == ((1,) if classic else (-28, -27))
        if not classic:
            # The evidence for the ascending order (the module docstring): the two ends of the
            # band are far apart in frequency, columns 8 apart across the DC are not.
            raw = np.load(path)["csi_data"].astype(np.float64).reshape(-1, 64, 2)
            h = raw[..., 1] + 1j * raw[..., 0]
            assert (h[:, 32] == 0).all()
            assert _coherence(h, 60, 4) < 0.8 < _coherence(h, 28, 36)
    # The original ESP32's first word is a constant, not a measurement.
    frames = read_recording(next(p for p in files if "_esp32_" in p.name))
    assert np.ptp(np.abs(frames.csi[:, 0, 0])) == 0


def _coherence(h: np.ndarray, i: int, j: int) -> float:
    """How steadily two columns keep their phase difference (1: locked, as neighbours are)."""
    v = h[:, i] * np.conj(h[:, j])
    return float(np.abs(v.mean()) / np.abs(v).mean())
