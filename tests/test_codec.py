"""Wire format version 1 (csi_edge.codec), which the cloud still decodes: golden bytes, every
rejection reason, and a mutation fuzz (version 2: tests/test_codec_v2.py)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from _crc import crc16_bitwise, with_crc

from csi_edge._errors import CSIError, MalformedPacketError
from csi_edge.codec import (
    CRC_BYTES,
    DECODE_REASONS,
    FLAG_IDLE,
    FLAG_MOTION,
    HEADER_BYTES,
    MIN_PAYLOAD_BYTES,
    NO_MODEL_ID,
    Payload,
    PayloadError,
    SegmentRecord,
    crc16,
    decode_payload,
    encode_payload,
    idle_payload_size,
    model_id_prefix,
    motion_byte,
    motion_from_byte,
    payload_overhead,
    payload_size,
)

BUNDLE_ID = "a1b2c3" + "0" * 58

# 1 segment, level 1. Qualities are k/255 so the decoded dataclass equals the original.
GOLDEN_1 = Payload(
    version=1,
    level=1,
    model_id=model_id_prefix(BUNDLE_ID),
    epoch=0x1234,
    first_seq=7,
    timestamp_ms=1_700_000_000_123,
    segments=(SegmentRecord(128 / 255, b"\x01\x02\x03"),),
)
GOLDEN_1_HEX = (
    "28"  # version 1, level 1, flags 0
    "a1b2c3"  # model id
    "1234"  # epoch
    "00000007"  # first seq
    "018bcfe5687b"  # 1_700_000_000_123 ms
    "01"  # K
    "80"  # quality round(0.502 * 255) = 128
    "03"  # varint: 3 code bytes
    "010203"  # codes
    "102f"  # CRC
)

# 4 segments, one 200-byte block (varint c8 01), one empty block.
GOLDEN_2 = Payload(
    version=1,
    level=2,
    model_id=bytes.fromhex("00ff10"),
    epoch=65535,
    first_seq=1000,
    timestamp_ms=1_714_000_000_000,
    segments=(
        SegmentRecord(1.0, b"\xaa"),
        SegmentRecord(64 / 255, bytes(range(200))),
        SegmentRecord(191 / 255, b""),
        SegmentRecord(26 / 255, b"\x7f\x80"),
    ),
)
GOLDEN_2_HEX = (
    "3000ff10ffff000003e8018f125c740004"  # level 2, epoch 65535, seq 1000, K = 4
    "ff01aa"  # quality 255, 1 byte
    "40c801"  # quality 64, varint 200 = c8 01, then 200 bytes 00..c7:
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324252627"
    "28292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f"
    "505152535455565758595a5b5c5d5e5f606162636465666768696a6b6c6d6e6f7071727374757677"
    "78797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
    "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7"
    "bf00"  # quality 191, empty block
    "1a027f80"  # quality 26, 2 bytes
    "edc4"  # CRC
)

# Level 3, qualities 0 and 1, the sequence number wraps, the largest u48 timestamp.
GOLDEN_3 = Payload(
    version=1,
    level=3,
    model_id=bytes.fromhex("deadbe"),
    epoch=0,
    first_seq=2**32 - 1,
    timestamp_ms=2**48 - 1,
    segments=(SegmentRecord(0.0, b"\x00"), SegmentRecord(1.0, b"\xff\xfe")),
)
GOLDEN_3_HEX = (
    "38deadbe0000ffffffffffffffffffff02"  # level 3, seq 2**32-1, K = 2
    "000100"  # quality 0, 1 byte 00
    "ff02fffe"  # quality 255, 2 bytes
    "5021"  # CRC
)

# IDLE (flag bit 0): 3 still segments at level 1, every code block empty: 17 + 3 * 2 + 2 bytes.
GOLDEN_IDLE = Payload(
    version=1,
    level=1,
    model_id=model_id_prefix(BUNDLE_ID),
    epoch=0x1234,
    first_seq=7,
    timestamp_ms=1_700_000_000_123,
    segments=(SegmentRecord(1.0, b""), SegmentRecord(128 / 255, b""), SegmentRecord(0.0, b"")),
    idle=True,
)
GOLDEN_IDLE_HEX = (
    "29"  # version 1, level 1, flags 0b001 (IDLE)
    "a1b2c3"  # model id
    "1234"  # epoch
    "00000007"  # first seq
    "018bcfe5687b"  # 1_700_000_000_123 ms
    "03"  # K
    "ff00"  # quality 255, no codes
    "8000"  # quality 128, no codes
    "0000"  # quality 0, no codes
    "c62b"  # CRC (checked against _crc16_bitwise)
)

# MOTION (flag bit 1): a motion byte after each quality byte, (b - 64) / 16 = the score;
# 0 = no score. Two coded segments at level 1: 17 + (1 + 1 + 1 + 3) + (1 + 1 + 1 + 1) + 2.
GOLDEN_MOTION = Payload(
    version=1,
    level=1,
    model_id=model_id_prefix(BUNDLE_ID),
    epoch=0x1234,
    first_seq=7,
    timestamp_ms=1_700_000_000_123,
    segments=(SegmentRecord(128 / 255, b"\x01\x02\x03", 2.5), SegmentRecord(1.0, b"\x04", None)),
    motion=True,
)
GOLDEN_MOTION_HEX = (
    "2a"  # version 1, level 1, flags 0b010 (MOTION)
    "a1b2c3" "1234" "00000007" "018bcfe5687b" "02"  # model id, epoch, seq, time, K = 2
    "80" "68" "03" "010203"  # quality 128, motion 0x68 = 64 + 16 * 2.5, 3 code bytes
    "ff" "00" "01" "04"  # quality 255, motion 0 (no score), 1 code byte
    "8d12"  # CRC
)

# IDLE and MOTION at level 2: still segments keep telling how still: 17 + 2 * 3 + 2 bytes.
GOLDEN_IDLE_MOTION = Payload(
    version=1,
    level=2,
    model_id=model_id_prefix(BUNDLE_ID),
    epoch=0x1234,
    first_seq=9,
    timestamp_ms=1_700_000_002_123,
    segments=(SegmentRecord(1.0, b"", 0.0), SegmentRecord(1.0, b"", -0.5)),
    idle=True,
    motion=True,
)
GOLDEN_IDLE_MOTION_HEX = (
    "33"  # version 1, level 2, flags 0b011 (IDLE, MOTION)
    "a1b2c3" "1234" "00000009" "018bcfe5704b" "02"
    "ff" "40" "00"  # quality 255, motion 0x40 = score 0.0, no codes
    "ff" "38" "00"  # quality 255, motion 0x38 = score -0.5, no codes
    "cfcf"  # CRC
)

# Presence only: model id 00 00 00, level 0, MOTION, no codes: 17 + 3 * 3 + 2 bytes.
GOLDEN_PRESENCE = Payload(
    version=1,
    level=0,
    model_id=NO_MODEL_ID,
    epoch=0x0102,
    first_seq=0,
    timestamp_ms=1_700_000_000_000,
    segments=(SegmentRecord(1.0, b"", None), SegmentRecord(1.0, b"", 0.25),
              SegmentRecord(128 / 255, b"", 11.9375)),
    motion=True,
)
GOLDEN_PRESENCE_HEX = (
    "22"  # version 1, level 0, flags 0b010 (MOTION)
    "000000" "0102" "00000000" "018bcfe56800" "03"  # no model, epoch 258, seq 0, K = 3
    "ff" "00" "00"  # quality 255, no score yet (calibrating), no codes
    "ff" "44" "00"  # motion 0x44 = score 0.25
    "80" "ff" "00"  # quality 128, motion 0xff = 11.9375, the top of the range
    "5cee"  # CRC
)

GOLDEN = [(GOLDEN_1, GOLDEN_1_HEX), (GOLDEN_2, GOLDEN_2_HEX), (GOLDEN_3, GOLDEN_3_HEX),
          (GOLDEN_IDLE, GOLDEN_IDLE_HEX), (GOLDEN_MOTION, GOLDEN_MOTION_HEX),
          (GOLDEN_IDLE_MOTION, GOLDEN_IDLE_MOTION_HEX), (GOLDEN_PRESENCE, GOLDEN_PRESENCE_HEX)]


def _header(byte0: int = 0x28, count: int = 1) -> bytes:
    # Same fields as GOLDEN_1: model id, epoch, first seq, timestamp.
    fields = bytes.fromhex("a1b2c3" + "1234" + "00000007" + "018bcfe5687b")
    return bytes([byte0]) + fields + bytes([count])


@pytest.mark.parametrize(("payload", "hex_bytes"), GOLDEN)
def test_golden_bytes(payload: Payload, hex_bytes: str) -> None:
    data = encode_payload(payload)
    assert data.hex() == hex_bytes
    assert decode_payload(data) == payload
    assert len(data) == payload_size(len(payload.segments),
                                     [len(s.codes) for s in payload.segments],
                                     motion=payload.motion, version=1)
    assert crc16_bitwise(data[:-CRC_BYTES]) == int.from_bytes(data[-CRC_BYTES:], "big")


def test_crc_standard_check_value_and_golden_crc_by_hand() -> None:
    # "123456789" -> 0x29B1 is the catalogued check value of CRC-16/CCITT-FALSE.
    assert crc16_bitwise(b"123456789") == 0x29B1 == crc16(b"123456789")
    data = bytes.fromhex(GOLDEN_2_HEX)
    assert crc16_bitwise(data[:-CRC_BYTES]) == int.from_bytes(data[-CRC_BYTES:], "big") == 0xEDC4


def test_golden_3_sequence_wraps_and_start_times() -> None:
    assert [GOLDEN_3.seq(i) for i in range(2)] == [2**32 - 1, 0]
    assert GOLDEN_2.start_ms(3, 500) == 1_714_000_001_500


def test_quality_is_one_byte_rounded() -> None:
    for q, byte in [(0.5, 128), (0.25, 64), (0.1, 26), (0.0, 0), (1.0, 255), (0.002, 1)]:
        p = dataclasses.replace(GOLDEN_1, segments=(SegmentRecord(q, b"x"),))
        data = encode_payload(p)
        assert data[HEADER_BYTES] == byte
        assert decode_payload(data).segments[0].quality == byte / 255
    # byte -> byte/255 -> byte for every value: decoded payloads re-encode identically.
    for byte in range(256):
        p = dataclasses.replace(GOLDEN_1, segments=(SegmentRecord(byte / 255, b""),))
        assert encode_payload(p)[HEADER_BYTES] == byte


def test_model_id_prefix() -> None:
    assert model_id_prefix("ABCDEF" + "1" * 58) == b"\xab\xcd\xef"
    with pytest.raises(ValueError, match="64 hex"):
        model_id_prefix("abcd")
    with pytest.raises(ValueError, match="not hexadecimal"):
        model_id_prefix("zz" + "0" * 62)
    # The no-model id (presence only) is never a bundle's.
    with pytest.raises(ValueError, match="starts with 000000, the wire's no-model id"):
        model_id_prefix("000000" + "a" * 58)
    assert model_id_prefix("000001" + "a" * 58) == b"\x00\x00\x01"


def test_overhead_and_size() -> None:
    assert HEADER_BYTES == 17 and CRC_BYTES == 2
    assert payload_overhead(1, [3], version=1) == 17 + 2 + 1 + 1
    assert payload_overhead(2, [127, 128], version=1) == 17 + 2 + 2 + 1 + 2
    assert payload_size(2, [127, 128], version=1) == 17 + 2 + 2 + 3 + 255
    with pytest.raises(ValueError, match="k = 3"):
        payload_overhead(3, [1], version=1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"level": 5}, "level = 5"),
        ({"level": -1}, "level = -1"),
        ({"level": 1.0}, "level must be an integer"),
        ({"model_id": b"\x01\x02"}, "model id must be 3 bytes"),
        ({"model_id": "abc"}, "model id must be 3 bytes"),
        ({"epoch": 65536}, "epoch = 65536"),
        ({"first_seq": 2**32}, "first_seq = 4294967296"),
        ({"first_seq": True}, "first_seq must be an integer"),
        ({"timestamp_ms": 2**48}, "timestamp_ms = 281474976710656"),
        ({"segments": ()}, "got 0"),
        ({"segments": (SegmentRecord(0.5, b""),) * 300}, "got 300"),
        ({"segments": (SegmentRecord(1.2, b""),)}, "quality 1.2"),
        ({"segments": (SegmentRecord(-0.1, b""),)}, "quality -0.1"),
        ({"segments": (SegmentRecord(float("nan"), b""),)}, "quality nan"),
        ({"segments": (SegmentRecord(0.5, "codes"),)}, "codes must be bytes"),
        ({"segments": ("x",)}, "not a SegmentRecord"),
    ],
)
def test_encode_rejects_bad_fields(change: dict, match: str) -> None:
    bad = dataclasses.replace(GOLDEN_1, **change)
    with pytest.raises(PayloadError, match=match) as info:
        encode_payload(bad)
    assert info.value.reason == "invalid_field"
    assert isinstance(info.value, ValueError) and isinstance(info.value, CSIError)


def test_encode_respects_max_bytes() -> None:
    big = dataclasses.replace(GOLDEN_1, segments=(SegmentRecord(0.5, bytes(70_000)),))
    with pytest.raises(PayloadError, match="exceeds max_bytes = 65536"):
        encode_payload(big)
    assert len(encode_payload(big, max_bytes=100_000)) == 17 + 1 + 3 + 70_000 + 2


def _crafted() -> dict[str, bytes]:
    one = b"\x80\x01\x05"  # quality 128, 1 code byte
    return {
        "too_short": encode_payload(GOLDEN_1)[: MIN_PAYLOAD_BYTES - 1],
        "too_large": with_crc(_header() + b"\x80\x80\x80\x04" + bytes(65536)),
        "crc_mismatch": encode_payload(GOLDEN_1)[:-1] + b"\x00",
        "bad_version": with_crc(_header(byte0=0x68) + one),  # version 3
        "bad_flags": with_crc(_header(byte0=0x2C) + one),  # flag bit 2 (reserved)
        "bad_count": with_crc(_header(count=0) + one),
        "bad_varint": with_crc(_header() + b"\x80\x80\x00" + b"\x05"),  # non-minimal 0
        "truncated_segment": with_crc(_header() + b"\x80\x05\x01\x02"),
        "trailing_bytes": with_crc(_header() + one + b"\x00"),
        "bad_idle": with_crc(_header(byte0=0x29) + one),  # IDLE with a 1-byte code block
        # No model (presence only) without the MOTION flag.
        "bad_no_model": with_crc(bytes([0x20]) + NO_MODEL_ID + _header()[4:] + b"\x80\x00"),
    }


@pytest.mark.parametrize("reason", sorted(DECODE_REASONS))
def test_every_decode_reason(reason: str) -> None:
    data = _crafted()[reason]
    with pytest.raises(PayloadError) as info:
        decode_payload(data)
    assert info.value.reason == reason, info.value
    assert isinstance(info.value, MalformedPacketError)


@pytest.mark.parametrize(
    ("count", "tail", "reason", "match"),
    [
        (1, b"\x80\x80", "bad_varint", "runs past"),  # continuation bit on the last body byte
        (1, b"\x80\x80\x80\x80\x01", "bad_varint", "longer than 3"),
        (2, b"\x80\x01\x05\x80", "bad_varint", "segment 1"),  # 2nd varint missing
        (2, b"\x80\x01\x05", "truncated_segment", "segment 1 of 2"),  # 2nd record missing
    ],
)
def test_more_malformed_records(count: int, tail: bytes, reason: str, match: str) -> None:
    with pytest.raises(PayloadError, match=match) as info:
        decode_payload(with_crc(_header(count=count) + tail))
    assert info.value.reason == reason


def test_size_limits_come_before_the_crc() -> None:
    assert decode_payload(encode_payload(GOLDEN_2), max_bytes=500) == GOLDEN_2
    with pytest.raises(PayloadError) as info:
        decode_payload(encode_payload(GOLDEN_2), max_bytes=200)
    assert info.value.reason == "too_large"
    with pytest.raises(PayloadError) as info:
        decode_payload(b"\xff" * 5)  # garbage, but the size is checked first
    assert info.value.reason == "too_short"


def test_crc_is_checked_before_fields() -> None:
    data = bytearray(_crafted()["bad_version"])
    data[-1] ^= 1
    with pytest.raises(PayloadError) as info:
        decode_payload(bytes(data))
    assert info.value.reason == "crc_mismatch"


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(6)
    if op == 0:  # flip 1..3 bits
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # truncate
        del b[rng.randrange(len(b)) :]
    elif op == 2:  # extend
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 3:  # overwrite a byte
        b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 4:  # insert bytes in the middle
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    else:  # delete a slice
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 4)]
    if rng.random() < 0.5 and len(b) > CRC_BYTES:
        # Fix the CRC so the mutation reaches the field parser.
        body = bytes(b[:-CRC_BYTES])
        b[-CRC_BYTES:] = crc16(body).to_bytes(2, "big")
    return bytes(b)


def test_fuzz_mutations_only_raise_payload_error_and_round_trip() -> None:
    rng = random.Random(20240611)
    seeds = [encode_payload(p) for p, _ in GOLDEN]
    reasons: dict[str, int] = {}
    accepted = 0
    for _ in range(6000):
        data = _mutate(rng, rng.choice(seeds))
        try:
            payload = decode_payload(data)
        except PayloadError as exc:
            assert exc.reason in DECODE_REASONS
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
            continue
        accepted += 1
        assert encode_payload(payload) == data
    # The fuzz reaches the parser, not only the CRC check.
    assert {"crc_mismatch", "too_short", "truncated_segment", "trailing_bytes"} <= set(reasons)
    assert accepted > 0


def test_random_bit_flips_are_caught_by_the_crc() -> None:
    rng = random.Random(7)
    data = encode_payload(GOLDEN_2)
    for _ in range(2000):
        b = bytearray(data)
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        with pytest.raises(PayloadError) as info:
            decode_payload(bytes(b))
        assert info.value.reason == "crc_mismatch"


def test_random_payloads_round_trip() -> None:
    rng = random.Random(3)
    for _ in range(300):
        k = rng.randint(1, 12)
        payload = Payload(
            version=1,
            level=rng.randrange(4),
            model_id=bytes(rng.randrange(256) for _ in range(3)),
            epoch=rng.randrange(2**16),
            first_seq=rng.randrange(2**32),
            timestamp_ms=rng.randrange(2**48),
            segments=tuple(
                SegmentRecord(
                    rng.randrange(256) / 255,
                    bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 127, 128, 300]))),
                )
                for _ in range(k)
            ),
        )
        data = encode_payload(payload)
        assert decode_payload(data) == payload
        assert len(data) == payload_size(
            len(payload.segments), [len(s.codes) for s in payload.segments], version=1)
        # The same message with a motion byte per record: exactly K bytes more.
        scored = dataclasses.replace(payload, motion=True, segments=tuple(
            dataclasses.replace(seg, motion=rng.choice([None, rng.randrange(-63, 192) / 16]))
            for seg in payload.segments))
        data_m = encode_payload(scored)
        assert decode_payload(data_m) == scored
        assert len(data_m) == len(data) + k == payload_size(
            k, [len(s.codes) for s in payload.segments], motion=True, version=1)


def test_idle_message_size_and_flag() -> None:
    data = encode_payload(GOLDEN_IDLE)
    assert len(data) == idle_payload_size(3, version=1) == HEADER_BYTES + 3 * 2 + CRC_BYTES
    assert data[0] & FLAG_IDLE and decode_payload(data).idle
    # The same segments without the flag are an ordinary message (empty code blocks).
    plain = dataclasses.replace(GOLDEN_IDLE, idle=False)
    assert encode_payload(plain)[0] == 0x28 and not decode_payload(encode_payload(plain)).idle
    assert idle_payload_size(10, version=1) == 39


@pytest.mark.parametrize("flags", [0b100, 0b101, 0b110, 0b111])
def test_reserved_flags_are_rejected_even_with_idle(flags: int) -> None:
    body = _header(byte0=0x28 | flags) + b"\x80\x00"
    with pytest.raises(PayloadError, match="reserved flags") as info:
        decode_payload(with_crc(body))
    assert info.value.reason == "bad_flags"


def test_idle_with_codes_is_a_clear_error_both_ways() -> None:
    bad = dataclasses.replace(GOLDEN_IDLE, segments=(SegmentRecord(1.0, b""),
                                                     SegmentRecord(1.0, b"\x01\x02")))
    with pytest.raises(PayloadError, match="segment 1: an idle message carries no codes, got 2"):
        encode_payload(bad)
    body = _header(byte0=0x29, count=2) + b"\xff\x00" + b"\xff\x02\x01\x02"
    with pytest.raises(PayloadError, match="segment 1 of an idle message declares 2") as info:
        decode_payload(with_crc(body))
    assert info.value.reason == "bad_idle"
    with pytest.raises(PayloadError, match="idle must be a bool"):
        encode_payload(dataclasses.replace(GOLDEN_IDLE, idle=1))


def test_motion_byte_scale() -> None:
    assert motion_byte(None) == 0 and motion_from_byte(0) is None
    assert motion_byte(0.0) == 64 and motion_byte(1.5) == 88 and motion_byte(-1) == 48
    # Steps of 1/16, saturating at both ends; byte 0 never stands for a score.
    assert motion_byte(100.0) == 255 and motion_byte(-100.0) == 1
    assert motion_from_byte(1) == -3.9375 and motion_from_byte(255) == 11.9375
    for byte in range(1, 256):
        assert motion_byte(motion_from_byte(byte)) == byte
    assert abs(motion_from_byte(motion_byte(1.23)) - 1.23) <= 1 / 32
    for bad in (float("nan"), float("inf"), "1.0"):
        with pytest.raises(ValueError, match="motion score"):
            motion_byte(bad)
    with pytest.raises(ValueError, match="outside"):
        motion_from_byte(256)


def test_motion_costs_one_byte_per_segment() -> None:
    plain = dataclasses.replace(GOLDEN_MOTION, motion=False, segments=tuple(
        dataclasses.replace(s, motion=None) for s in GOLDEN_MOTION.segments))
    assert len(encode_payload(GOLDEN_MOTION)) == len(encode_payload(plain)) + 2
    assert encode_payload(GOLDEN_MOTION)[0] & FLAG_MOTION
    assert not encode_payload(plain)[0] & FLAG_MOTION
    assert idle_payload_size(10, motion=True, version=1) == 17 + 30 + 2 \
        == idle_payload_size(10, version=1) + 10
    assert decode_payload(encode_payload(GOLDEN_PRESENCE)).presence_only
    assert not GOLDEN_MOTION.presence_only
    # A score without the flag, or a bad score, is refused on encoding, naming the segment.
    with pytest.raises(PayloadError, match=r"segment 0 has motion score 1\.0 but the message"):
        encode_payload(dataclasses.replace(GOLDEN_1, segments=(SegmentRecord(1.0, b"", 1.0),)))
    with pytest.raises(PayloadError, match="segment 0: motion score nan"):
        encode_payload(dataclasses.replace(GOLDEN_MOTION, segments=(
            SegmentRecord(1.0, b"", float("nan")),)))
    with pytest.raises(PayloadError, match="motion must be a bool"):
        encode_payload(dataclasses.replace(GOLDEN_MOTION, motion=1))


@pytest.mark.parametrize("change", [{"motion": False}, {"idle": True}, {"level": 1},
                                    {"segments": (SegmentRecord(1.0, b"\x01", 0.0),)}])
def test_presence_only_rules_both_ways(change: dict) -> None:
    bad = dataclasses.replace(GOLDEN_PRESENCE, **change)
    if "motion" in change:
        bad = dataclasses.replace(bad, segments=tuple(
            dataclasses.replace(s, motion=None) for s in bad.segments))
    with pytest.raises(PayloadError) as info:
        encode_payload(bad)
    assert info.value.reason == "invalid_field"
    # The same message crafted by hand is refused by the decoder as bad_no_model.
    head = bytes([0x20 | (bad.level << 3) | (FLAG_IDLE if bad.idle else 0)
                  | (FLAG_MOTION if bad.motion else 0)])
    records = b"".join(bytes([255]) + (b"\x40" if bad.motion else b"")
                       + bytes([len(s.codes)]) + s.codes for s in bad.segments)
    data = with_crc(head + NO_MODEL_ID + bytes.fromhex("0102" "00000000" "018bcfe56800")
                     + bytes([len(bad.segments)]) + records)
    with pytest.raises(PayloadError) as info:
        decode_payload(data)
    assert info.value.reason == "bad_no_model"


def test_motion_byte_cut_off_is_truncated() -> None:
    # MOTION set, two records announced, the body ends right after the second quality byte.
    with pytest.raises(PayloadError, match="segment 1 of 2: motion byte at 21") as info:
        decode_payload(with_crc(_header(byte0=0x2A, count=2) + b"\x80\x40\x00" + b"\x80"))
    assert info.value.reason == "truncated_segment"


def test_message_groups_split_at_gaps_kinds_and_sizes() -> None:
    from csi_edge.codec import message_groups

    assert message_groups([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert message_groups([5, 6, 8, 9, 10], 4) == [[0, 1], [2, 3, 4]]  # a gap ends one
    assert message_groups([], 3) == []
    idle = [False, False, True, True, True, False]
    assert message_groups(range(6), 4, idle=idle, idle_per_message=2) == [
        [0, 1], [2, 3], [4], [5]]
