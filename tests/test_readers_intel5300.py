"""Intel 5300 .dat logs: real WiAR files, and the broken files csiread alone would crash on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csi_edge import EmptyRecordingError, FormatError, read_recording
from csi_edge.readers.intel5300 import SUBCARRIERS_20MHZ, read_intel5300_dat, scan_records

WIAR = "wiar/height_90/csi_a1_1.dat"


def record_offsets(buf: bytes) -> list[int]:
    offsets, off = [], 0
    while off < len(buf):
        offsets.append(off)
        off += 2 + int.from_bytes(buf[off : off + 2], "big")
    return offsets


def test_real_file_matches_csiread(samples: Path) -> None:
    import csiread

    path = samples / WIAR
    ref = csiread.Intel(str(path), nrxnum=3, ntxnum=1, if_report=False)
    ref.read()
    frames = read_recording(path)
    assert frames.format == "intel5300-dat"
    assert frames.csi.shape == (ref.count, 3, 30)
    assert np.array_equal(frames.csi, ref.csi[:, :, :, 0].transpose(0, 2, 1).astype(np.complex64))
    assert frames.info.subcarriers == SUBCARRIERS_20MHZ and len(set(SUBCARRIERS_20MHZ)) == 30
    assert 29.0 < frames.rate_hz < 30.5
    assert frames.rssi is not None and np.all(frames.rssi < 0)


def test_corrupt_record_skipped_neighbours_kept(samples: Path, tmp_path: Path) -> None:
    buf = bytearray((samples / WIAR).read_bytes())
    offsets = record_offsets(bytes(buf))
    buf[offsets[5] : offsets[5] + 2] = (60000).to_bytes(2, "big")  # absurd length
    path = tmp_path / "corrupt.dat"
    path.write_bytes(bytes(buf))
    frames = read_intel5300_dat(path)  # csiread alone segfaults on this file
    good = read_intel5300_dat(samples / WIAR)
    assert frames.dropped["corrupt_record"] == 1
    assert len(frames) == len(good) - 1
    assert np.array_equal(frames.csi[:5], good.csi[:5])
    assert np.array_equal(frames.csi[5:], good.csi[6:])


def test_truncated_log_keeps_complete_records(samples: Path, tmp_path: Path) -> None:
    buf = (samples / WIAR).read_bytes()
    offsets = record_offsets(buf)
    path = tmp_path / "cut.dat"
    path.write_bytes(buf[: offsets[100] + 57])
    frames = read_intel5300_dat(path)
    assert len(frames) == 100
    assert frames.dropped["truncated_record"] == 1


def test_other_record_kinds_are_skipped(samples: Path) -> None:
    buf = (samples / WIAR).read_bytes()
    extra = (5).to_bytes(2, "big") + b"\xc1" + b"abcd"
    offsets = record_offsets(buf)
    mixed = buf[: offsets[3]] + extra + buf[offsets[3] :]
    records, dropped = scan_records(mixed)
    assert len(records) == len(offsets)
    assert dropped["non_csi_record"] == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"\x00\x05\xbbabcd" * 40, "no valid Intel 5300 bfee record")],
    ids=["empty", "garbage"],
)
def test_bad_dat_files_name_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises((FormatError, EmptyRecordingError)) as err:
        read_recording(path)
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.shared_data
def test_every_wiar_file_reads(shared_wiar: Path) -> None:
    files = sorted(shared_wiar.glob("*.dat"))
    assert len(files) == 480
    for path in files:
        frames = read_intel5300_dat(path)
        assert frames.csi.shape[1:] == (3, 30), path
        assert 29.0 < frames.rate_hz < 30.5, path
        assert 250 <= len(frames) <= 330, path
