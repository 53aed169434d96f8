"""ESP32-CSI-Tool reader: lines written in the tool's layout from known CSI, read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import serial

from csi_edge._errors import EmptyRecordingError, FormatError, MalformedPacketError
from csi_edge.readers import detect_format, read_recording
from csi_edge.readers.esp32 import (
    HEADER_LINE,
    LLTF_SUBCARRIERS,
    Esp32LineParser,
    frames_from_records,
    iter_lines,
    parse_lines,
    read_esp32_csv,
)

MAC_A = "3C:71:BF:6D:2A:78"
MAC_B = "24:0A:C4:00:11:22"


def known_csi(n: int, seed: int = 0) -> np.ndarray:
    """(n, 64) complex CSI with int8 parts, indexed by LLTF subcarrier (FFT order)."""
    rng = np.random.default_rng(seed)
    re = rng.integers(-128, 128, size=(n, 64))
    im = rng.integers(-128, 128, size=(n, 64))
    return (re + 1j * im).astype(np.complex64)


def tool_line(
    csi: np.ndarray,
    *,
    mac: str = MAC_A,
    rssi: int = -60,
    channel: int = 6,
    secondary: int = 0,
    local_us: int = 1_000_000,
    real_time_set: int = 0,
    real_timestamp: str = "1.0",
    extra_values: int = 0,
    length: int | None = None,
    unsigned: bool = False,
) -> str:
    """One line as csi_component.h prints it: buffer = (imag, real) per subcarrier."""
    columns = csi if secondary == 0 else np.roll(csi, 32)  # ascending order on the wire
    pairs = np.stack([columns.imag, columns.real], axis=-1).astype(np.int64).reshape(-1)
    values = [*pairs.tolist(), *([7] * extra_values)]
    if unsigned:  # the oldest builds print (uint8_t)
        values = [v & 0xFF for v in values]
    body = "".join(f"{v} " for v in values)
    n = len(values) if length is None else length
    head = [
        "CSI_DATA", "STA", mac, rssi, 11, 1, 0, 0, 0, 0, 0, 0, 0, 0, -93, 0,
        channel, secondary, local_us, 0, 101, 0, real_time_set, real_timestamp, n,
    ]  # fmt: skip
    return ",".join(str(v) for v in head) + f",[{body}]"


def test_header_layout_matches_the_tool() -> None:
    assert HEADER_LINE == (
        "type,role,mac,rssi,rate,sig_mode,mcs,bandwidth,smoothing,not_sounding,aggregation,"
        "stbc,fec_coding,sgi,noise_floor,ampdu_cnt,channel,secondary_channel,local_timestamp,"
        "ant,sig_len,rx_state,real_time_set,real_timestamp,len,CSI_DATA"
    )
    assert list(LLTF_SUBCARRIERS) == [*range(32), *range(-32, 0)]


def test_parse_one_line_exactly() -> None:
    csi = known_csi(1)[0]
    frame = Esp32LineParser().parse(tool_line(csi, rssi=-71, local_us=123456))
    assert frame.mac == MAC_A.lower()
    assert (frame.rssi, frame.channel, frame.local_timestamp, frame.len) == (-71, 6, 123456, 128)
    assert frame.values.dtype == np.int8
    np.testing.assert_array_equal(frame.lltf(), csi)


@pytest.mark.parametrize("secondary", [0, 1, 2])
def test_file_round_trip_column_order(tmp_path: Path, secondary: int) -> None:
    csi = known_csi(20, seed=secondary)
    lines = [
        tool_line(c, secondary=secondary, local_us=1_000_000 + 10_000 * i, rssi=-50 - i)
        for i, c in enumerate(csi)
    ]
    path = tmp_path / "capture.csv"
    path.write_text(HEADER_LINE + "\n" + "\n".join(lines) + "\n")
    frames = read_esp32_csv(path)
    assert frames.csi.shape == (20, 1, 64)
    assert frames.csi.dtype == np.complex64
    np.testing.assert_array_equal(frames.csi[:, 0, :], csi)
    assert frames.info.subcarriers == LLTF_SUBCARRIERS
    assert frames.info.device == "esp32"
    assert frames.info.bandwidth_mhz == 20
    assert frames.info.channel == 6
    assert frames.info.transmitter == MAC_A.lower()
    assert frames.info.rssi_is_real
    assert frames.info.extra["secondary_channel"] == secondary
    np.testing.assert_array_equal(frames.rssi, -50 - np.arange(20, dtype=np.float32))
    np.testing.assert_allclose(frames.timestamp, 1.0 + 0.01 * np.arange(20))
    assert frames.dropped.as_dict() == {}
    assert frames.format == "esp32-csv"


def test_full_buffer_and_lltf_only_printing_both_accepted() -> None:
    csi = known_csi(2)
    parser = Esp32LineParser()
    full = parser.parse(tool_line(csi[0], extra_values=256))  # len 384, 384 values
    lltf_only = parser.parse(tool_line(csi[1], length=384))  # len 384, 128 values
    assert (full.len, full.values.size) == (384, 384)
    assert (lltf_only.len, lltf_only.values.size) == (384, 128)
    np.testing.assert_array_equal(full.lltf(), csi[0])
    np.testing.assert_array_equal(lltf_only.lltf(), csi[1])


def test_unsigned_printing_is_read_as_int8() -> None:
    csi = known_csi(1, seed=3)[0]
    frame = Esp32LineParser().parse(tool_line(csi, unsigned=True))
    np.testing.assert_array_equal(frame.lltf(), csi)


def test_tool_example_line_has_legacy_tones_where_expected() -> None:
    # From the tool's python_utils/example_csi.csv: secondary channel above, len 384,
    # 128 values printed. Legacy tones +-1..26 must be the strong ones after reordering.
    values = (
        "101 -48 5 0 0 0 0 0 0 0 5 2 23 12 25 13 27 16 28 19 27 20 24 22 22 23 20 24 19 25 "
        "18 25 20 27 20 27 18 26 16 26 16 25 16 25 14 23 12 21 12 21 12 20 14 19 15 18 14 17 "
        "16 17 18 16 18 14 10 6 20 11 20 10 22 10 22 10 23 10 25 11 25 10 24 8 25 7 27 5 27 "
        "5 26 6 26 7 27 8 27 7 28 6 29 5 27 4 25 3 25 3 26 4 26 4 26 3 26 3 25 3 24 1 5 0 0 "
        "0 0 0 0 0 0 0 "
    )
    line = (
        "CSI_DATA,AP,3C:71:BF:6D:2A:78,-73,11,1,0,1,1,1,0,0,0,0,-93,0,1,1,80272146,0,101,0,0,"
        f"80.363225,384,[{values}]"
    )
    amplitude = np.abs(Esp32LineParser().parse(line).lltf())
    subcarrier = np.array(LLTF_SUBCARRIERS)
    legacy = (np.abs(subcarrier) >= 1) & (np.abs(subcarrier) <= 26)
    guard = (np.abs(subcarrier) >= 28) & (np.abs(subcarrier) <= 30)
    assert amplitude[legacy].min() > 15
    assert amplitude[guard].max() == 0


@pytest.mark.parametrize(
    ("line", "reason", "quoted"),
    [
        ("I (1234) wifi: connected", "not_csi_line", "I (1234) wifi"),
        ("garbageCSI_DATA,STA", "garbled_line", "CSI_DATA at column 7"),
        ("CSI_DATA,STA,3C:71:BF:6D:2A:78,-60,11", "truncated", "5 comma-separated fields"),
        ("CSI_DATA,STA,not-a-mac" + ",0" * 22 + ",[1 2]", "bad_field", "'not-a-mac'"),
        ("CSI_DATA,STA,\ufffdC:71" + ",0" * 22 + ",[1 2]", "bad_encoding", "invalid UTF-8"),
    ],
)
def test_malformed_lines_name_reason_and_value(line: str, reason: str, quoted: str) -> None:
    with pytest.raises(MalformedPacketError) as err:
        Esp32LineParser().parse(line)
    assert err.value.reason == reason
    assert quoted in err.value.detail


def _mutate(field: int, value: str, **more: str) -> str:
    """A good line with field ``field`` (and ``f<index>=value`` in ``more``) replaced."""
    parts = tool_line(known_csi(1)[0]).split(",")
    parts[field] = value
    for key, text in more.items():
        parts[int(key[1:])] = text
    return ",".join(parts)


@pytest.mark.parametrize(
    ("line", "reason", "quoted"),
    [
        (_mutate(3, "-6x"), "bad_field", "rssi is '-6x'"),
        (_mutate(23, "soon"), "bad_field", "real_timestamp is 'soon'"),
        (_mutate(24, "64"), "len_mismatch", "len is 64 but CSI_DATA holds 128"),
        (_mutate(25, "[1 2 3 x 5 ]"), "bad_csi_value", "'x'"),
        (_mutate(25, "[" + "1 " * 127 + "300 ]"), "bad_csi_value", "300"),
        (_mutate(25, "[1 2 3 4 5 6"), "truncated", "no closing ']'"),
        (tool_line(known_csi(1)[0], extra_values=1), "odd_count", "129 CSI values"),
        (_mutate(24, "4", f25="[1 2 3 4 ]"), "short_csi", "4 CSI values"),
        (tool_line(known_csi(1)[0]) + ",1700000000.5,extra", "field_count", "28"),
    ],
)
def test_malformed_fields_name_reason_and_value(line: str, reason: str, quoted: str) -> None:
    with pytest.raises(MalformedPacketError) as err:
        Esp32LineParser().parse(line)
    assert err.value.reason == reason
    assert quoted in err.value.detail


def test_host_timestamp_field_is_accepted() -> None:
    frame = Esp32LineParser().parse(tool_line(known_csi(1)[0]) + ",1700000000.25")
    assert frame.host_timestamp == 1700000000.25


def test_mixed_file_keeps_every_good_frame(tmp_path: Path) -> None:
    csi = known_csi(30, seed=7)
    good = [tool_line(c, local_us=5_000_000 + 20_000 * i) for i, c in enumerate(csi)]
    other_tx = tool_line(known_csi(1, seed=9)[0], mac=MAC_B)
    wrong_len = tool_line(known_csi(1, seed=10)[0], extra_values=256)  # another packet type
    lines = [
        "ets Jun  8 2016 00:22:57",  # boot log
        HEADER_LINE,
        *good[:10],
        "I (523) wifi:mode : sta (24:0a:c4:00:11:22)",
        other_tx,
        *good[10:20],
        good[20].replace("11,", "1x,", 1),  # corrupt integer field
        wrong_len,
        "",
        other_tx,
        *good[21:29],
        good[29][:-40],  # truncated last line, no newline
    ]
    path = tmp_path / "mixed.csv"
    path.write_text("\n".join(lines))
    frames = read_esp32_csv(path)
    kept = [*range(20), *range(21, 29)]
    np.testing.assert_array_equal(frames.csi[:, 0, :], csi[kept])
    assert frames.info.transmitter == MAC_A.lower()
    assert frames.dropped.as_dict() == {
        "bad_field": 1,
        "not_csi_line": 2,
        "other_layout": 1,
        "other_transmitter": 2,
        "truncated": 1,
    }


def test_explicit_mac_selects_the_minority_transmitter(tmp_path: Path) -> None:
    a, b = known_csi(5, seed=1), known_csi(2, seed=2)
    lines = [tool_line(c) for c in a] + [tool_line(c, mac=MAC_B) for c in b]
    path = tmp_path / "two.csv"
    path.write_text("\n".join(lines) + "\n")
    frames = read_esp32_csv(path, mac=MAC_B.lower())
    np.testing.assert_array_equal(frames.csi[:, 0, :], b)
    assert frames.dropped["other_transmitter"] == 5
    with pytest.raises(EmptyRecordingError, match="no frame from transmitter 00:00"):
        read_esp32_csv(path, mac="00:00:00:00:00:00")


def test_other_channel_is_counted(tmp_path: Path) -> None:
    csi = known_csi(4)
    lines = [tool_line(c, channel=6) for c in csi[:3]] + [tool_line(csi[3], channel=11)]
    path = tmp_path / "hop.csv"
    path.write_text("\n".join(lines) + "\n")
    frames = read_esp32_csv(path)
    assert len(frames) == 3
    assert frames.dropped.as_dict() == {"other_channel": 1}


def test_local_timestamp_wrap_is_unwrapped() -> None:
    csi = known_csi(4)
    ticks = [2**32 - 20_000, 2**32 - 10_000, 0, 10_000]
    parser = Esp32LineParser()
    records = [parser.parse(tool_line(c, local_us=t)) for c, t in zip(csi, ticks, strict=True)]
    frames = frames_from_records(records, "mem")
    np.testing.assert_allclose(np.diff(frames.timestamp), 0.01)


def test_signed_local_timestamp_of_old_builds() -> None:
    # printf("%d") of a uint32 past 2^31 shows a negative number.
    frame = Esp32LineParser().parse(tool_line(known_csi(1)[0], local_us=-5))
    assert frame.local_timestamp == 2**32 - 5


def test_real_time_anchors_the_local_clock() -> None:
    csi = known_csi(3)
    parser = Esp32LineParser()
    records = [
        parser.parse(
            tool_line(c, local_us=2_000_000 + 5_000 * i, real_time_set=1,
                      real_timestamp=f"{1_700_000_000 + 0.005 * i:.6f}")
        )
        for i, c in enumerate(csi)
    ]
    frames = frames_from_records(records, "mem")
    np.testing.assert_allclose(frames.timestamp, 1_700_000_000 + 0.005 * np.arange(3), atol=1e-6)
    assert "real_timestamp" in str(frames.info.extra["timestamps"])


def test_empty_file_names_file_and_problem(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(FormatError) as err:
        read_esp32_csv(path)
    assert str(path) in str(err.value)
    assert "empty file" in str(err.value)


def test_file_without_csi_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(HEADER_LINE + "\nI (1) boot: ESP-IDF v4.3\n")
    with pytest.raises(FormatError) as err:
        read_esp32_csv(path)
    assert str(path) in str(err.value)
    assert "no CSI_DATA line among 2 lines" in str(err.value)


def test_file_with_only_bad_csi_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(_mutate(25, "[1 2 x ]") + "\n" + _mutate(3, "loud") + "\n")
    with pytest.raises(EmptyRecordingError) as err:
        read_esp32_csv(path)
    message = str(err.value)
    assert str(path) in message
    assert "bad_csi_value" in message and "'x'" in message
    assert "rssi is 'loud'" in message


def test_serial_loop_url_goes_through_the_same_parser() -> None:
    csi = known_csi(5, seed=11)
    port = serial.serial_for_url("loop://", timeout=0.05)
    try:
        payload = "\n".join(
            ["boot noise", HEADER_LINE, *(tool_line(c, local_us=10_000 * i) for i, c in
                                          enumerate(csi))]
        ).encode() + b"\n\xff\xfeCSI_DATA junk\n"
        port.write(payload)
        parser = Esp32LineParser()
        records = list(parse_lines(iter_lines("loop://", port=port, idle_timeout_s=0.3), parser))
    finally:
        port.close()
    np.testing.assert_array_equal(np.stack([r.lltf() for r in records]), csi)
    assert parser.dropped.as_dict() == {"garbled_line": 1, "not_csi_line": 1}


def test_serial_url_opens_a_pyserial_port() -> None:
    # loop:// opened by URL: nothing written, so the idle timeout ends the stream.
    assert list(iter_lines("loop://", idle_timeout_s=0.1)) == []


def test_serial_url_errors_name_the_url() -> None:
    with pytest.raises(FormatError, match="esp32-serial:///dev/nonexistent-tty"):
        list(iter_lines("esp32-serial:///dev/nonexistent-tty?baud=115200", idle_timeout_s=0.1))
    with pytest.raises(FormatError, match="baud 'fast'"):
        list(iter_lines("esp32-serial:///dev/ttyUSB0?baud=fast"))
    with pytest.raises(FormatError, match="not a serial URL"):
        list(iter_lines("/dev/ttyUSB0"))


def test_read_recording_dispatches_by_content(tmp_path: Path) -> None:
    csi = known_csi(3)
    path = tmp_path / "capture.txt"  # the suffix says nothing; the content does
    path.write_text(HEADER_LINE + "\n" + "\n".join(tool_line(c) for c in csi) + "\n")
    assert detect_format(path) == "esp32-csv"
    frames = read_recording(path)
    assert frames.format == "esp32-csv"
    np.testing.assert_array_equal(frames.csi[:, 0, :], csi)
    frames = read_recording(path, mac=MAC_A)
    assert frames.info.transmitter == MAC_A.lower()
