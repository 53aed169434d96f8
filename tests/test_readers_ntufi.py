"""NTU-Fi .mat reader: files written with scipy.io.savemat (and an HDF5 v7.3 one) read back."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from csi_edge._errors import EmptyRecordingError, FormatError
from csi_edge.band import LAYOUTS
from csi_edge.readers import detect_format, read_recording
from csi_edge.readers.ntufi import NOMINAL_RATE_HZ, read_ntufi_mat


def amplitudes(frames: int = 2000, seed: int = 0) -> np.ndarray:
    """(frames, 3, 114) amplitudes, distinct per antenna and subcarrier."""
    rng = np.random.default_rng(seed)
    return rng.uniform(30, 55, size=(frames, 3, 114))


def stacked(amp: np.ndarray) -> np.ndarray:
    """The published layout: (342, T), row = antenna * 114 + subcarrier."""
    return amp.transpose(1, 2, 0).reshape(342, amp.shape[0])


def test_stacked_layout_round_trip(tmp_path: Path) -> None:
    amp = amplitudes()
    path = tmp_path / "run_1.mat"
    scipy.io.savemat(path, {"CSIamp": stacked(amp)})
    frames = read_ntufi_mat(path)
    assert frames.csi.shape == (2000, 3, 114)
    assert frames.csi.dtype == np.float32
    np.testing.assert_array_equal(frames.csi, amp.astype(np.float32))
    assert not frames.is_complex
    assert frames.format == "ntu-fi-mat"
    assert frames.info.device == "ntu-fi"
    assert frames.info.subcarriers == LAYOUTS["ht-40"].tones
    assert frames.info.bandwidth_mhz == 40
    assert frames.info.extra["timestamps"] == "synthesised"
    assert frames.rssi is None
    assert frames.dropped.as_dict() == {}
    np.testing.assert_allclose(frames.timestamp, np.arange(2000) / NOMINAL_RATE_HZ)
    assert frames.rate_hz == pytest.approx(NOMINAL_RATE_HZ)


def test_stacked_rows_are_antenna_major(tmp_path: Path) -> None:
    # The SenseFi loader's reshape(3, 114, T): row 114 is antenna 1, subcarrier column 0.
    data = np.zeros((342, 4))
    data[114, :] = 7.0
    data[341, :] = 9.0
    path = tmp_path / "marks.mat"
    scipy.io.savemat(path, {"CSIamp": data})
    csi = read_ntufi_mat(path).csi
    assert np.all(csi[:, 1, 0] == 7.0)
    assert np.all(csi[:, 2, 113] == 9.0)
    assert csi.sum() == pytest.approx(4 * 16.0)


def test_three_axis_layout_and_custom_rate(tmp_path: Path) -> None:
    amp = amplitudes(50, seed=1)
    path = tmp_path / "cube.mat"
    scipy.io.savemat(path, {"CSIamp": amp.transpose(1, 2, 0), "CSIphase": np.zeros((342, 50))})
    frames = read_ntufi_mat(path, rate_hz=100.0)
    np.testing.assert_array_equal(frames.csi, amp.astype(np.float32))
    np.testing.assert_allclose(frames.timestamp, np.arange(50) / 100.0)
    assert frames.info.extra["other_variables"] == ["CSIphase"]


def test_nonfinite_values_are_kept_and_counted(tmp_path: Path) -> None:
    data = stacked(amplitudes(10, seed=2))
    data[0, 0] = np.nan
    data[5, 3] = np.inf
    data[341, 9] = -np.inf
    path = tmp_path / "holes.mat"
    scipy.io.savemat(path, {"CSIamp": data})
    frames = read_ntufi_mat(path)
    assert frames.dropped.as_dict() == {"nonfinite_values": 3}
    assert np.isnan(frames.csi[0, 0, 0])
    assert np.isposinf(frames.csi[3, 0, 5])
    assert len(frames) == 10


def test_mat_v73_hdf5_file(tmp_path: Path) -> None:
    # MATLAB -v7.3: a 512-byte text header, then HDF5 with the axes reversed.
    amp = amplitudes(30, seed=3)
    path = tmp_path / "v73.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("CSIamp", data=stacked(amp).T)
        f["CSIamp"].attrs["MATLAB_class"] = np.bytes_("double")
    with path.open("r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 "
                 b"HDF5 schema 1.00 .".ljust(116))
    frames = read_ntufi_mat(path)
    np.testing.assert_array_equal(frames.csi, amp.astype(np.float32))
    assert frames.info.extra["mat_version"] == "7.3"


def test_missing_variable_names_the_variables_found(tmp_path: Path) -> None:
    path = tmp_path / "other.mat"
    scipy.io.savemat(path, {"csi_trace": np.zeros((3, 3)), "label": np.array([1])})
    with pytest.raises(FormatError) as err:
        read_ntufi_mat(path)
    message = str(err.value)
    assert str(path) in message
    assert "no 'CSIamp' variable" in message
    assert "csi_trace, label" in message


@pytest.mark.parametrize(
    ("shape", "quoted"),
    [((114, 2000), "(114, 2000)"), ((2000, 342), "transposed?"), ((3, 57, 10), "(3, 57, 10)")],
)
def test_wrong_shape_is_quoted(tmp_path: Path, shape: tuple[int, ...], quoted: str) -> None:
    path = tmp_path / "shape.mat"
    scipy.io.savemat(path, {"CSIamp": np.ones(shape)})
    with pytest.raises(FormatError) as err:
        read_ntufi_mat(path)
    assert str(path) in str(err.value)
    assert quoted in str(err.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mat"
    path.write_bytes(b"")
    with pytest.raises(EmptyRecordingError) as err:
        read_ntufi_mat(path)
    assert str(path) in str(err.value)
    assert "empty file" in str(err.value)


def test_zero_packets(tmp_path: Path) -> None:
    path = tmp_path / "none.mat"
    scipy.io.savemat(path, {"CSIamp": np.zeros((342, 0))})
    with pytest.raises(EmptyRecordingError, match="no packets"):
        read_ntufi_mat(path)


def test_corrupt_mat_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.mat"
    scipy.io.savemat(path, {"CSIamp": np.ones((342, 20))})
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(FormatError) as err:
        read_ntufi_mat(path)
    assert str(path) in str(err.value)


def test_non_numeric_variable(tmp_path: Path) -> None:
    path = tmp_path / "text.mat"
    scipy.io.savemat(path, {"CSIamp": "not numbers"})
    with pytest.raises(FormatError, match="not a numeric array"):
        read_ntufi_mat(path)


def test_bad_rate_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ok.mat"
    scipy.io.savemat(path, {"CSIamp": np.ones((342, 2))})
    with pytest.raises(ValueError, match="rate_hz"):
        read_ntufi_mat(path, rate_hz=0)


def test_read_recording_dispatches_by_mat_header(tmp_path: Path) -> None:
    amp = amplitudes(8, seed=4)
    path = tmp_path / "sample.bin"  # the suffix says nothing; the MATLAB header does
    scipy.io.savemat(path, {"CSIamp": stacked(amp)}, appendmat=False)
    assert detect_format(path) == "ntu-fi-mat"
    frames = read_recording(path)
    assert frames.format == "ntu-fi-mat"
    np.testing.assert_array_equal(frames.csi, amp.astype(np.float32))
    frames = read_recording(path, rate_hz=250.0)
    assert frames.timestamp[1] == pytest.approx(1 / 250.0)
