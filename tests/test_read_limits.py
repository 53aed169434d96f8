"""Readers check the sizes a file declares against the decoded-byte limit before allocating:
HDF5 dataset shapes, MAT dimensions and decompressed sizes, ``.npz`` members and headers."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import _bombs
import numpy as np
import pytest
import scipy.io

from csi_edge import read_recording
from csi_edge.limits import (
    DEFAULT_MAX_DECODED_BYTES,
    DeclaredSizeError,
    check_declared,
    decoded_limit,
    max_decoded_bytes,
)
from csi_edge.readers.espectre import read_espectre_npz
from csi_edge.readers.ntufi import read_ntufi_mat
from csi_edge.recording import read_labels

ROOT = Path(__file__).resolve().parents[1]
PCAP = ROOT / "datasets/samples/fition/walking_user1_rm1/walking_user1_rm1_10.pcap"
MiB = 2**20


def test_the_limit_is_scoped_and_checked_in_python_integers() -> None:
    assert max_decoded_bytes() == DEFAULT_MAX_DECODED_BYTES
    with decoded_limit(1000):
        assert check_declared("f", "x", (10, 100), 1) == 1000
        with pytest.raises(DeclaredSizeError, match=r"x declares 1,001 bytes .* 1,000 bytes"):
            check_declared("f", "x", (7, 11, 13), 1)
        # A forged shape that overflows int64 products is still just too large.
        with pytest.raises(DeclaredSizeError) as caught:
            check_declared("f", "x", (2**62, 2**62), 8)
        assert caught.value.declared == 2**127
    assert max_decoded_bytes() == DEFAULT_MAX_DECODED_BYTES
    with pytest.raises(ValueError, match="positive integer, got 0"), decoded_limit(0):
        pass


def test_hdf5_claiming_40_million_frames_is_refused_before_reading(tmp_path: Path) -> None:
    path = _bombs.hdf5_claiming_frames(PCAP, tmp_path / "bomb.h5", 40_000_000)
    assert path.stat().st_size < 2 * MiB
    t0 = time.monotonic()
    with pytest.raises(DeclaredSizeError) as caught:
        read_recording(path)
    assert time.monotonic() - t0 < 5  # nothing was read
    message = str(caught.value)
    assert "40,000,000 frames" in message and "amplitude (40000000, 1, 256) float32" in message
    assert f"limit of {DEFAULT_MAX_DECODED_BYTES:,} bytes" in message
    assert caught.value.declared > 40_000_000 * 256 * 4


def test_hdf5_within_the_limit_reads_and_the_limit_is_what_counts(tmp_path: Path) -> None:
    from csi_edge.convert import convert

    path = tmp_path / "ok.h5"
    convert(PCAP, path)
    frames = read_recording(path)
    assert len(frames) > 400
    assert read_labels(path) == []
    with decoded_limit(64 * 1024), pytest.raises(DeclaredSizeError, match="frames"):
        read_recording(path)


def test_mat_zlib_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    """~1.6 GB of zeros behind 1.6 MB: inflated only up to the limit, in bounded steps."""
    path = _bombs.mat_zlib_bomb(tmp_path / "bomb.mat", 600_000)
    assert path.stat().st_size < 2 * MiB
    assert scipy.io.whosmat(path) == [("CSIamp", (342, 600_000), "double")]
    with decoded_limit(64 * MiB), pytest.raises(DeclaredSizeError) as caught:
        read_ntufi_mat(path)
    assert "compressed variables decompress to more than the limit of 67,108,864" in \
        str(caught.value)


def test_mat_declared_shape_is_checked(tmp_path: Path) -> None:
    """An uncompressed variable: the shape in its header against the limit (x float32)."""
    path = tmp_path / "big.mat"
    scipy.io.savemat(path, {"CSIamp": np.zeros((342, 2000))})
    with decoded_limit(342 * 2000 * 12 - 1), pytest.raises(DeclaredSizeError,
                                                             match=r"CSIamp \(342, 2000\)"):
        read_ntufi_mat(path)
    with decoded_limit(342 * 2000 * 12 + 128):
        assert read_ntufi_mat(path).csi.shape == (2000, 3, 114)


def test_compressed_mat_within_the_limit_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    amp = rng.uniform(30, 55, size=(342, 500))
    path = tmp_path / "ok.mat"
    scipy.io.savemat(path, {"CSIamp": amp, "other": np.arange(10)}, do_compression=True)
    frames = read_ntufi_mat(path)
    assert frames.csi.shape == (500, 3, 114)
    small = _bombs.mat_zlib_bomb(tmp_path / "zeros.mat", 3000)  # the builder, read whole
    assert read_ntufi_mat(small).csi.shape == (3000, 3, 114)


def _npz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_npz_member_and_header_sizes_are_checked(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.npz"  # 256 MiB of zeros deflated
    bomb.write_bytes(_npz({"csi_data.npy": _npy_header((2**20, 256), "|i1") + bytes(256 * MiB)}))
    assert bomb.stat().st_size < MiB
    with decoded_limit(64 * MiB), pytest.raises(DeclaredSizeError, match="members uncompressed"):
        read_espectre_npz(bomb)
    forged = tmp_path / "forged.npz"  # a header claiming 10^12 values, no data behind it
    forged.write_bytes(_npz({"csi_data.npy": _npy_header((10**6, 10**6), "|i1")}))
    with pytest.raises(DeclaredSizeError, match=r"array 'csi_data' \(1000000, 1000000\)"):
        read_espectre_npz(forged)
