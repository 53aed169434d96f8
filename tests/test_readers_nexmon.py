"""Nexmon pcap and UDP decoding against real recordings and against csiread."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from csi_edge import EmptyRecordingError, FormatError, MalformedPacketError, read_recording
from csi_edge.readers._pcap import read_udp_payloads
from csi_edge.readers.nexmon import (
    StreamKey,
    decode_payload,
    decode_payloads,
    parse_chanspec,
    read_nexmon_pcap,
    select_stream,
)

FITION = "fition/walking_user1_rm1/walking_user1_rm1_10.pcap"
MESSY = "fition/getintobed_user4_rm4/getintobed_user4_rm4_24.pcap"


def csiread_packets(path: Path) -> object:
    import csiread

    data = csiread.Nexmon(str(path), chip="43455c0", bw=80, if_report=False)
    data.read()
    return data


def assert_agrees_with_csiread(path: Path) -> int:
    """Every packet of the file decodes exactly as csiread decodes it; returns packets checked."""
    ref = csiread_packets(path)
    capture = read_udp_payloads(path)
    ours = decode_payloads(capture.payloads, capture.timestamps)
    assert len(ours) == ref.count, "packet count differs from csiread"
    full = ours.nfft == 256  # csiread with bw=80 fills the 20 MHz frames' extra bins with garbage
    assert np.array_equal(ours.csi[256][ours.row[full]], ref.csi[full].astype(np.complex64))
    assert np.array_equal(ours.header["seq"], ref.seq)
    assert np.array_equal(ours.header["chanspec"], ref.chan_spec)
    assert np.array_equal(ours.header["core_ss"] & 7, ref.core)
    assert np.array_equal(ours.header["mac"], ref.src_addr)
    ref_time = ref.sec.astype(np.float64) + ref.usec * 1e-6
    assert np.allclose(ours.timestamp, ref_time, atol=1e-6)
    return ref.count


@pytest.mark.parametrize("name", [FITION, MESSY])
def test_decoder_agrees_with_csiread_on_samples(samples: Path, name: str) -> None:
    assert assert_agrees_with_csiread(samples / name) == 500


@pytest.mark.shared_data
def test_decoder_agrees_with_csiread_on_every_fition_file(shared_fition: Path) -> None:
    files = sorted(shared_fition.rglob("*.pcap"))
    assert len(files) == 420
    assert sum(assert_agrees_with_csiread(p) for p in files) == 420 * 500


def test_stream_selection_and_dedupe_on_messy_file(samples: Path) -> None:
    frames = read_nexmon_pcap(samples / MESSY)
    # 500 packets: 466 of the main transmitter at 80 MHz, the rest other MACs, 2.4 GHz and 20 MHz
    assert len(frames) + sum(frames.dropped.values()) == 500
    assert frames.dropped["other_transmitter"] == 22
    assert frames.dropped["other_chanspec"] == 12
    assert frames.info.transmitter == "b8:27:eb:9d:69:92"
    assert frames.info.chanspec == 0xE02A and frames.info.bandwidth_mhz == 80
    assert frames.csi.shape == (len(frames), 1, 256)
    assert frames.max_gap_s > 2.5  # the 2.9 s hole in the capture is reported, not hidden


def test_retransmissions_removed(samples: Path) -> None:
    frames = read_nexmon_pcap(samples / FITION)
    assert frames.dropped["retransmission"] == 7
    assert np.all(np.diff(frames.seq) != 0)


def test_explicit_stream_key_picks_the_minority_stream(samples: Path) -> None:
    capture = read_udp_payloads(samples / MESSY)
    packets = decode_payloads(capture.payloads, capture.timestamps)
    key = StreamKey.parse("b8:27:eb:9d:69:92", 0xD024)  # the stray 20 MHz frames
    idx, _, dropped = select_stream(packets, key)
    # 12 stray frames, 8 of them retransmissions (same sequence number, ~1 ms apart)
    assert idx.size == 4 and set(packets.nfft[idx]) == {64}
    assert dropped["retransmission"] == 8
    assert dropped["other_chanspec"] == 466


def test_chanspec_fields() -> None:
    assert parse_chanspec(0xE02A) == (42, 80, "5GHz")
    assert parse_chanspec(0xD024) == (36, 20, "5GHz")
    assert parse_chanspec(0x1001) == (1, 20, "2.4GHz")


def test_live_payload_path_equals_file_path(samples: Path) -> None:
    """Packets fed one at a time (as from a UDP socket) decode to the same CSI as the file."""
    capture = read_udp_payloads(samples / FITION)
    file_frames = read_nexmon_pcap(samples / FITION)
    singles = [decode_payload(p, t) for p, t in zip(capture.payloads, capture.timestamps,
                                                     strict=True)]
    csi = np.stack([s.csi[s.nfft[0]][0] for s in singles])
    batch = decode_payloads(capture.payloads, capture.timestamps)
    assert np.array_equal(csi[batch.nfft == 256], batch.csi[256])
    idx, _, _ = select_stream(batch)
    assert np.array_equal(batch.csi[256][batch.row[idx]], file_frames.csi[:, 0])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "bad_length"),
        (b"\x11\x11" + bytes(100), "bad_length"),
        (b"\x22\x22" + bytes(16 + 256 * 4), "bad_magic"),
        (b"\x11\x11" + bytes(14) + b"\x99\x99" + bytes(256 * 4), "unsupported_chip"),
    ],
    ids=["empty", "short", "magic", "chip"],
)
def test_malformed_udp_payload_names_the_problem(payload: bytes, reason: str) -> None:
    with pytest.raises(MalformedPacketError) as err:
        decode_payload(payload, 0.0)
    assert err.value.reason == reason
    assert str(len(payload)) in str(err.value) or "0x" in str(err.value)


def _records(path: Path) -> tuple[bytes, list[int]]:
    buf = path.read_bytes()
    offsets, off = [], 24
    while off < len(buf):
        offsets.append(off)
        off += 16 + struct.unpack_from("<I", buf, off + 8)[0]
    return buf, offsets


def test_truncated_pcap_keeps_every_complete_record(samples: Path, tmp_path: Path) -> None:
    buf, offsets = _records(samples / FITION)
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(buf[: offsets[300] + 500])  # stops inside record 300
    capture = read_udp_payloads(cut)
    assert len(capture.payloads) == 300
    assert capture.dropped == {"truncated_record": 1}
    frames = read_recording(cut)
    assert len(frames) + sum(frames.dropped.values()) - 1 == 300  # - the truncated record


def test_corrupt_record_is_skipped_and_the_rest_kept(samples: Path, tmp_path: Path) -> None:
    buf, offsets = _records(samples / FITION)
    bad = bytearray(buf)
    struct.pack_into("<I", bad, offsets[10] + 8, 0xFFFFFF)  # absurd length in record 10
    path = tmp_path / "corrupt.pcap"
    path.write_bytes(bytes(bad))
    capture = read_udp_payloads(path)
    assert capture.dropped["corrupt_record"] >= 1
    assert len(capture.payloads) == 499  # only record 10 lost
    original = read_udp_payloads(samples / FITION)
    assert capture.payloads[10:] == original.payloads[11:]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"hello, this is not a capture" * 10, "not a libpcap file"),
        (bytes.fromhex("d4c3b2a1020004000000000000000000ffff000001000000"), "no Nexmon CSI"),
    ],
)
def test_bad_pcap_files_name_the_file_and_problem(tmp_path: Path, content: bytes,
                                                  message: str) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    with pytest.raises((FormatError, EmptyRecordingError)) as err:
        read_nexmon_pcap(path)
    assert str(path) in str(err.value) and message in str(err.value)
