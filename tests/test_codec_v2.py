"""Wire format version 2 (csi_edge.codec, csi_edge.bundle): one coder stream a message.

Golden bytes of the payload and of a message stream, every rejection version 2 has, the
round trip of a message's codes through one stream, and what it saves against version 1.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
from _crc import crc16_bitwise, with_crc

from csi_edge import entropy
from csi_edge.bundle import (
    BundleManifest,
    SegmentCodes,
    decode_message_codes,
    decode_segment_codes,
    encode_message_codes,
    encode_segment_codes,
    load_manifest,
    payload_codes,
)
from csi_edge.codec import (
    CRC_BYTES,
    FLAG_FULL_QUALITY,
    FORMAT_VERSION,
    MIN_PAYLOAD_BYTES,
    NO_MODEL_ID,
    Payload,
    PayloadError,
    SegmentRecord,
    decode_payload,
    encode_payload,
    idle_payload_size,
    model_id_prefix,
    payload_overhead,
    payload_size,
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ID = "a1b2c3" + "0" * 58
R = 15  # the shipped bundles' profile range

# Two coded segments at level 1 with motion bytes, and the message's one stream of 4 bytes.
GOLDEN_V2 = Payload(
    level=1,
    model_id=model_id_prefix(BUNDLE_ID),
    epoch=0x1234,
    first_seq=7,
    timestamp_ms=1_700_000_000_123,
    segments=(SegmentRecord(128 / 255, motion=2.5), SegmentRecord(1.0, motion=None)),
    motion=True,
    codes=b"\x01\x02\x03\x04",
)
GOLDEN_V2_HEX = (
    "4a"  # version 2, level 1, flags 0b010 (MOTION)
    "a1b2c3" "1234" "00000007" "018bcfe5687b" "02"  # model id, epoch, seq, time, K = 2
    "80" "68"  # quality 128, motion 0x68 = 64 + 16 * 2.5
    "ff" "00"  # quality 255, motion 0 (no score)
    "01020304"  # the message's stream: no lengths, it runs up to the CRC
    "9079"  # CRC
)

# IDLE: 3 still segments at level 1, no motion: 17 + 3 + 2 bytes (version 1: 17 + 6 + 2).
GOLDEN_V2_IDLE = Payload(
    level=1,
    model_id=model_id_prefix(BUNDLE_ID),
    epoch=0x1234,
    first_seq=7,
    timestamp_ms=1_700_000_000_123,
    segments=(SegmentRecord(1.0), SegmentRecord(128 / 255), SegmentRecord(0.0)),
    idle=True,
)
GOLDEN_V2_IDLE_HEX = "49a1b2c3123400000007018bcfe5687b03ff8000cf88"

# Presence only: no model, level 0, MOTION, no codes: 17 + 3 * 2 + 2 bytes.
GOLDEN_V2_PRESENCE = Payload(
    level=0,
    model_id=NO_MODEL_ID,
    epoch=0x0102,
    first_seq=0,
    timestamp_ms=1_700_000_000_000,
    segments=(SegmentRecord(1.0, motion=None), SegmentRecord(1.0, motion=0.25),
              SegmentRecord(128 / 255, motion=11.9375)),
    motion=True,
)
GOLDEN_V2_PRESENCE_HEX = "420000000102000000000" "18bcfe5680003ff00ff4480ff" "eb6f"

# A coded message of one whole segment whose stream is empty (every symbol 0 costs nothing:
# csi_edge.entropy): FULL_QUALITY, no record bytes at all, the smallest message (19 bytes).
GOLDEN_V2_EMPTY = Payload(level=0, model_id=bytes.fromhex("deadbe"), epoch=0,
                          first_seq=2**32 - 1, timestamp_ms=2**48 - 1,
                          segments=(SegmentRecord(1.0),))
GOLDEN_V2_EMPTY_HEX = "44deadbe0000ffffffffffffffffffff01" "4d48"

# Four whole segments at level 0 with motion bytes: FULL_QUALITY, so a record is its motion
# byte alone.
GOLDEN_V2_FULL = Payload(
    level=0,
    model_id=model_id_prefix(BUNDLE_ID),
    epoch=0x1234,
    first_seq=7,
    timestamp_ms=1_700_000_000_123,
    segments=tuple(SegmentRecord(1.0, motion=m) for m in (0.0, None, -0.5, 2.5)),
    motion=True,
    codes=b"\xab\xcd",
)
GOLDEN_V2_FULL_HEX = (
    "46"  # version 2, level 0, flags 0b110 (FULL_QUALITY, MOTION)
    "a1b2c3" "1234" "00000007" "018bcfe5687b" "04"
    "40" "00" "38" "68"  # motion bytes only: scores 0, none, -0.5, 2.5
    "abcd"  # the stream
    "fc62"  # CRC
)

GOLDEN = [(GOLDEN_V2, GOLDEN_V2_HEX), (GOLDEN_V2_IDLE, GOLDEN_V2_IDLE_HEX),
          (GOLDEN_V2_PRESENCE, GOLDEN_V2_PRESENCE_HEX), (GOLDEN_V2_EMPTY, GOLDEN_V2_EMPTY_HEX),
          (GOLDEN_V2_FULL, GOLDEN_V2_FULL_HEX)]


def _header(byte0: int, count: int, model: str = "a1b2c3") -> bytes:
    return bytes([byte0]) + bytes.fromhex(model + "1234" + "00000007" + "018bcfe5687b") \
        + bytes([count])


@pytest.mark.parametrize(("payload", "hex_bytes"), GOLDEN)
def test_golden_bytes(payload: Payload, hex_bytes: str) -> None:
    data = encode_payload(payload)
    assert data.hex() == hex_bytes
    assert decode_payload(data) == payload
    assert payload.version == FORMAT_VERSION == 2
    full = all(s.quality == 1.0 for s in payload.segments)
    assert bool(data[0] & FLAG_FULL_QUALITY) == full
    assert len(data) == payload_size(len(payload.segments), len(payload.codes),
                                     motion=payload.motion, full_quality=full)
    assert crc16_bitwise(data[:-CRC_BYTES]) == int.from_bytes(data[-CRC_BYTES:], "big")


def test_sizes_against_version_1() -> None:
    """Version 2 drops each record's length byte: idle and presence-only messages save one
    byte a segment, and a coded one its varints and all streams but one."""
    assert MIN_PAYLOAD_BYTES == 19
    assert payload_overhead(4) == 17 + 4 + 2
    assert payload_overhead(4, motion=True) == 17 + 8 + 2
    assert payload_overhead(4, motion=True, full_quality=True) == 17 + 4 + 2
    assert idle_payload_size(10, motion=True, full_quality=True) == 29
    with pytest.raises(ValueError, match="no FULL_QUALITY"):
        payload_overhead(1, [0], full_quality=True, version=1)
    assert idle_payload_size(10) == 29 == idle_payload_size(10, version=1) - 10
    assert idle_payload_size(10, motion=True) == 39 == idle_payload_size(
        10, motion=True, version=1) - 10
    with pytest.raises(ValueError, match="one count"):
        payload_size(2, [3, 4])
    with pytest.raises(ValueError, match="each segment's code length"):
        payload_size(2, 7, version=1)
    assert payload_size(2, [3, 200], version=1) == 17 + 2 + (1 + 1 + 3) + (1 + 2 + 200)
    with pytest.raises(ValueError, match=r"1\.\.255 segments"):
        payload_overhead(0)


@pytest.mark.parametrize(
    ("data", "reason", "match"),
    [
        # IDLE (0x49) or presence only with code bytes after the records.
        (with_crc(_header(0x49, 1) + b"\x80" + b"\x05"), "bad_idle", "1 code bytes"),
        (with_crc(_header(0x46, 1, "000000") + b"\x00" + b"\x05"), "bad_no_model",
         "1 code bytes"),
        # Three records announced, two present (the motion byte of the second missing).
        (with_crc(_header(0x4a, 3) + b"\xff\x40\xff"), "truncated_segment", "segment 1 of 3"),
        (with_crc(_header(0x40, 4) + b"\xff\xff"), "truncated_segment", "segment 2 of 4"),
        (with_crc(_header(0x40, 0) + b"\xff\xff"), "bad_count", "segment count 0"),
        (with_crc(_header(0x60, 1) + b"\xff"), "bad_version", "version 3"),
        # 20 bytes are a whole version-2 message but too short for version 1.
        (with_crc(_header(0x28, 1) + b"\xff"), "too_short", "20 bytes < 21"),
        # Every quality byte 255 without FULL_QUALITY: a second spelling, refused.
        (with_crc(_header(0x42, 2) + b"\xff\x40\xff\x40"), "bad_flags",
         "2 quality bytes is 255"),
        # FULL_QUALITY is version 2's: version 1 still reserves the bit.
        (with_crc(_header(0x2C, 1) + b"\x01\x05"), "bad_flags", "reserved flags 0b100"),
    ],
)
def test_rejections(data: bytes, reason: str, match: str) -> None:
    with pytest.raises(PayloadError, match=match) as info:
        decode_payload(data)
    assert info.value.reason == reason


def test_encode_refuses_codes_in_the_wrong_place() -> None:
    with pytest.raises(PayloadError, match="codes its segments together"):
        encode_payload(dataclasses.replace(GOLDEN_V2, segments=(SegmentRecord(1.0, b"\x01"),)))
    with pytest.raises(PayloadError, match="keeps each segment's codes in its record"):
        encode_payload(dataclasses.replace(GOLDEN_V2, version=1))
    with pytest.raises(PayloadError, match="idle message carries no codes"):
        encode_payload(dataclasses.replace(GOLDEN_V2_IDLE, codes=b"\x01"))
    with pytest.raises(PayloadError, match="presence-only message carries no codes"):
        encode_payload(dataclasses.replace(GOLDEN_V2_PRESENCE, codes=b"\x01"))
    with pytest.raises(PayloadError, match="version must be one of"):
        encode_payload(dataclasses.replace(GOLDEN_V2, version=3))
    with pytest.raises(PayloadError, match="codes must be bytes"):
        encode_payload(dataclasses.replace(GOLDEN_V2, codes="0102"))  # type: ignore[arg-type]


def test_fuzzed_messages_only_raise_payload_errors_and_round_trip() -> None:
    rng = random.Random(7)
    seeds = [encode_payload(p) for p, _ in GOLDEN]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(3)
            if op == 0 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == 1:
                data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
            elif data:
                del data[rng.randrange(len(data))]
        # Fix the CRC half of the time, so the field checks behind it are reached.
        if rng.random() < 0.5 and len(data) > CRC_BYTES:
            data[-CRC_BYTES:] = crc16_bitwise(bytes(data[:-CRC_BYTES])).to_bytes(2, "big")
        try:
            payload = decode_payload(bytes(data))
        except PayloadError:
            continue
        assert encode_payload(payload) == bytes(data)


def _manifest() -> tuple[BundleManifest, tuple[entropy.EntropyTable, ...]]:
    """The shipped WiAR manifest with fixed tables and level 0 fixed at 1 latent channel + 12
    profile coefficients, so the stream's bytes are pinned whatever the bundle sends."""
    manifest = load_manifest(ROOT / "models" / "wiar")
    manifest = manifest.model_copy(update={"levels": [
        lv.model_copy(update={"groups": 1, "profile_components": 12}) if lv.level == 0 else lv
        for lv in manifest.levels]})
    values = np.ones((16, 2 * R + 1), np.int64)
    values[:, R - 3 : R + 4] = [2, 4, 8, 10, 8, 4, 2]
    latent = np.array([[3, 5, 9, 5, 3]] * 16, np.int64)
    tables = {"latent": entropy.EntropyTable("latent", latent).to_dict(),
              "profile": entropy.EntropyTable("profile", values).to_dict()}
    fixed = manifest.model_copy(update={"entropy": {**manifest.entropy, **tables}})
    return fixed, fixed.tables()


def _codes(manifest: BundleManifest, level: int, k: int, seed: int) -> list[SegmentCodes]:
    rng = np.random.default_rng(seed)
    spec = manifest.level(level)
    t = int(manifest.quantizer["latent_steps"])
    return [SegmentCodes(level, rng.integers(0, 5, (spec.groups, t)),
                         rng.integers(-3, 4, spec.profile_components)) for _ in range(k)]


def test_golden_message_stream_and_its_round_trip() -> None:
    manifest, tables = _manifest()
    codes = _codes(manifest, 0, 4, seed=0)
    stream = encode_message_codes(codes, manifest, tables)
    assert stream.hex() == GOLDEN_STREAM_HEX
    back = decode_message_codes(stream, 4, 0, manifest, tables)
    for a, b in zip(codes, back, strict=True):
        assert b.latent.tolist() == a.latent.tolist()
        assert b.profile.tolist() == a.profile.tolist()
    # The stream is the four segments' symbol groups in order: segment 0's first.
    assert decode_message_codes(stream, 4, 0, manifest, tables)[0].profile.tolist() \
        == codes[0].profile.tolist()


GOLDEN_STREAM_HEX = (
    "f943798875bb349365da013f2f8857a30368ca2b1de136532202f4b7e61901"
)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_one_stream_a_message_costs_less_and_reads_back_as_version_1(level: int) -> None:
    manifest, tables = _manifest()
    codes = _codes(manifest, level, 4, seed=level)
    blobs = [encode_segment_codes(c, manifest, tables) for c in codes]
    v1 = encode_payload(Payload(level, bytes.fromhex("a1b2c3"), 1, 0, 0,
                                tuple(SegmentRecord(1.0, b) for b in blobs), version=1))
    v2 = encode_payload(Payload(level, bytes.fromhex("a1b2c3"), 1, 0, 0,
                                tuple(SegmentRecord(1.0) for _ in blobs),
                                codes=encode_message_codes(codes, manifest, tables)))
    assert len(v2) < len(v1)
    one, two = (payload_codes(decode_payload(d), manifest, tables) for d in (v1, v2))
    for a, b, c in zip(codes, one, two, strict=True):
        assert a.latent.tolist() == b.latent.tolist() == c.latent.tolist()
        assert a.profile.tolist() == b.profile.tolist() == c.profile.tolist()
    # Each segment's own stream (what the edge queues) decodes as before.
    assert decode_segment_codes(blobs[0], level, manifest, tables).profile.tolist() \
        == codes[0].profile.tolist()


def test_a_stream_read_with_the_wrong_count_is_rejected() -> None:
    manifest, tables = _manifest()
    stream = encode_message_codes(_codes(manifest, 1, 4, seed=3), manifest, tables)
    with pytest.raises(entropy.EntropyDecodeError) as info:
        decode_message_codes(stream, 3, 1, manifest, tables)
    assert info.value.reason == "leftover_data"
    with pytest.raises(entropy.EntropyDecodeError):
        decode_message_codes(stream + b"\x01", 4, 1, manifest, tables)


def test_a_message_holds_one_level() -> None:
    manifest, tables = _manifest()
    mixed = _codes(manifest, 0, 1, seed=1) + _codes(manifest, 1, 1, seed=1)
    with pytest.raises(ValueError, match="one rate level"):
        encode_message_codes(mixed, manifest, tables)
