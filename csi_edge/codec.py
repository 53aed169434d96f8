"""Wire format of one MQTT message (``{prefix}/{site}/{ap}/seg`` payload), version 1.

One message carries K consecutive segments of one stream. AP and site come from the topic;
everything else the cloud needs to reconstruct is in these bytes. All integers big-endian.

  offset  size  field          encoding
  ------  ----  -------------  -------------------------------------------------------------
  0       1     version/level  bits 7..5: format version, 1
                /flags         bits 4..3: rate level, 0..3
                               bit 0: IDLE (see below); bits 2..1: reserved, 0 (non-zero
                               is rejected)
  1       3     model id       first 3 bytes of the bundle id (``bytes.fromhex(id)[:3]``)
  4       2     stream epoch   u16; changes when the edge restarts
  6       4     first seq      u32 sequence number of the first segment
  10      6     timestamp      u48 capture time of the first segment's start, ms since the
                               Unix epoch (UTC)
  16      1     K              number of segments, 1..255; segment i has sequence number
                               (first seq + i) mod 2**32 and starts at timestamp
                               + i * segment duration (the duration is in the bundle)
  17      ...   K records      each: 1 byte quality (round(q * 255), q in [0, 1]),
                               LEB128 unsigned varint n (minimal form, 1..3 bytes),
                               n bytes of entropy-coded codes (``csi_edge.entropy``; may be 0)
  L-2     2     CRC            CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection,
                               xorout 0) of bytes 0..L-3, i.e. ``binascii.crc_hqx(.., 0xFFFF)``

Size: 17 + 2 + sum over segments of (1 + len(varint(n)) + n) bytes; every one of them counts
toward the reported bitrate. Decoded quality is ``byte / 255`` (exactly what was sent).

IDLE (flag bit 0): every record of the message has n = 0 (an empty code block) and stands for
a segment whose motion statistic stayed below the bundle's idle threshold (``csi_edge.motion``):
nothing changed since the stream's last coded segment, and the cloud predicts it from a copy of
that segment's codes. The level field is the edge's configured level. An idle message of K
segments costs 17 + 2 + 2 K bytes. A cloud that predates the flag rejects it as ``bad_flags``
(it cannot predict those segments, but it never mistakes them for coded ones), which is why the
flag lives in the bits that version 1 reserved and the version stays 1.

Decoding checks, in this order (``PayloadError.reason``): ``too_large`` (over ``max_bytes``),
``too_short`` (under 21 bytes, the smallest valid message), ``crc_mismatch``, then the fields
only once the CRC holds: ``bad_version``, ``bad_flags`` (a reserved flag bit set), ``bad_count``
(K = 0), ``bad_varint`` (runs past the body, longer than 3 bytes or not minimal),
``truncated_segment`` (n larger than what is left), ``trailing_bytes`` (bytes after the K-th
record), ``bad_idle`` (IDLE set and a record with n > 0). Every accepted message re-encodes to
exactly the same bytes.
"""

from __future__ import annotations

import binascii
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import MalformedPacketError

__all__ = [
    "CRC_BYTES",
    "DECODE_REASONS",
    "FLAG_IDLE",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_SEGMENTS",
    "MIN_PAYLOAD_BYTES",
    "Payload",
    "PayloadError",
    "SegmentRecord",
    "crc16",
    "decode_payload",
    "encode_payload",
    "idle_payload_size",
    "model_id_prefix",
    "payload_overhead",
    "payload_size",
]

FORMAT_VERSION = 1
HEADER_BYTES = 17
CRC_BYTES = 2
MAX_SEGMENTS = 255
MAX_LEVEL = 3
FLAG_IDLE = 0x1
_KNOWN_FLAGS = FLAG_IDLE
MODEL_ID_BYTES = 3
# A message holds at least one record of quality byte + 1-byte varint.
MIN_PAYLOAD_BYTES = HEADER_BYTES + 2 + CRC_BYTES
MAX_PAYLOAD_BYTES = 65536
# 3 varint bytes carry 21 bits, enough for any code block inside MAX_PAYLOAD_BYTES; a decoder
# with a larger max_bytes still accepts only what fits in 3 bytes.
_MAX_VARINT_BYTES = 3
_MAX_CODE_BYTES = (1 << (7 * _MAX_VARINT_BYTES)) - 1
_U48 = 1 << 48

DECODE_REASONS = frozenset(
    {
        "too_short",
        "too_large",
        "crc_mismatch",
        "bad_version",
        "bad_flags",
        "bad_count",
        "bad_varint",
        "truncated_segment",
        "trailing_bytes",
        "bad_idle",
    }
)


class PayloadError(MalformedPacketError, ValueError):
    """A payload that cannot be decoded (``reason`` in DECODE_REASONS) or encoded
    (``reason`` ``invalid_field``); ``detail`` quotes the bad value."""


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """One segment: quality in [0, 1] (sent as one byte) and its entropy-coded codes."""

    quality: float
    codes: bytes


@dataclass(frozen=True, slots=True)
class Payload:
    """One message. Fields are checked by :func:`encode_payload`, not on construction.

    ``idle``: the IDLE flag; every segment then has empty codes (a still segment).
    """

    level: int
    model_id: bytes
    epoch: int
    first_seq: int
    timestamp_ms: int
    segments: tuple[SegmentRecord, ...]
    idle: bool = False

    def seq(self, i: int) -> int:
        """Sequence number of segment ``i`` (wraps at 2**32)."""
        return (self.first_seq + i) & 0xFFFFFFFF

    def start_ms(self, i: int, segment_ms: int) -> int:
        """Capture start of segment ``i``, given the bundle's segment duration in ms."""
        return self.timestamp_ms + i * segment_ms


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE of ``data``."""
    return binascii.crc_hqx(data, 0xFFFF)


def model_id_prefix(bundle_id: str) -> bytes:
    """The 3 wire bytes of a bundle id (64 hex characters, a sha256)."""
    if not isinstance(bundle_id, str) or len(bundle_id) != 64:
        raise ValueError(f"bundle id must be 64 hex characters, got {bundle_id!r}")
    try:
        raw = bytes.fromhex(bundle_id)
    except ValueError as exc:
        raise ValueError(f"bundle id is not hexadecimal: {bundle_id!r}") from exc
    return raw[:MODEL_ID_BYTES]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def payload_size(code_lengths: Sequence[int]) -> int:
    """Total bytes of a message whose segments carry code blocks of these lengths."""
    return sum(code_lengths) + payload_overhead(len(code_lengths), code_lengths)


def payload_overhead(k: int, code_lengths: Sequence[int]) -> int:
    """Bytes of a K-segment message that are not code bytes: header, records, CRC."""
    if k != len(code_lengths):
        raise ValueError(f"k = {k} but {len(code_lengths)} code lengths given")
    if any(n < 0 for n in code_lengths):
        raise ValueError(f"code lengths must be >= 0, got {list(code_lengths)}")
    return HEADER_BYTES + CRC_BYTES + sum(1 + _varint_len(n) for n in code_lengths)


def idle_payload_size(k: int) -> int:
    """Bytes of an idle message of ``k`` segments (header, K two-byte records, CRC)."""
    return payload_size([0] * k)


def _field_error(detail: str) -> PayloadError:
    return PayloadError("invalid_field", detail)


def _uint(value: Any, name: str, bits: int, low: int = 0) -> int:
    """``value`` as an int in [low, 2**bits); bools and floats are refused."""
    if isinstance(value, bool):
        raise _field_error(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError as exc:
        raise _field_error(f"{name} must be an integer, got {value!r}") from exc
    if not low <= v < (1 << bits):
        raise _field_error(f"{name} = {v} is outside [{low}, {(1 << bits) - 1}]")
    return v


def _quality_byte(q: Any, i: int) -> int:
    if isinstance(q, bool) or not isinstance(q, int | float):
        try:
            q = float(q)  # numpy scalars
        except (TypeError, ValueError) as exc:
            raise _field_error(f"segment {i}: quality must be a number, got {q!r}") from exc
    if not (math.isfinite(q) and 0.0 <= q <= 1.0):
        raise _field_error(f"segment {i}: quality {q!r} is outside [0, 1]")
    return round(q * 255)


def encode_payload(payload: Payload, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> bytes:
    """Bytes of ``payload``; every field is validated (PayloadError, a ValueError, naming it)."""
    if not isinstance(payload, Payload):
        raise TypeError(f"expected a Payload, got {type(payload).__name__}")
    level = _uint(payload.level, "level", 2)
    model_id = payload.model_id
    if not isinstance(model_id, bytes | bytearray) or len(model_id) != MODEL_ID_BYTES:
        raise _field_error(f"model id must be {MODEL_ID_BYTES} bytes, got {model_id!r}")
    epoch = _uint(payload.epoch, "epoch", 16)
    first_seq = _uint(payload.first_seq, "first_seq", 32)
    timestamp = _uint(payload.timestamp_ms, "timestamp_ms", 48)
    segments = payload.segments
    if not isinstance(segments, Sequence) or not 1 <= len(segments) <= MAX_SEGMENTS:
        count = len(segments) if isinstance(segments, Sequence) else segments
        raise _field_error(f"a message holds 1..{MAX_SEGMENTS} segments, got {count!r}")
    idle = payload.idle
    if not isinstance(idle, bool):
        raise _field_error(f"idle must be a bool, got {idle!r}")
    out = bytearray()
    out.append((FORMAT_VERSION << 5) | (level << 3) | (FLAG_IDLE if idle else 0))
    out += bytes(model_id)
    out += epoch.to_bytes(2, "big")
    out += first_seq.to_bytes(4, "big")
    out += timestamp.to_bytes(6, "big")
    out.append(len(segments))
    for i, seg in enumerate(segments):
        if not isinstance(seg, SegmentRecord):
            raise _field_error(f"segment {i} is a {type(seg).__name__}, not a SegmentRecord")
        codes = seg.codes
        if not isinstance(codes, bytes | bytearray | memoryview):
            raise _field_error(f"segment {i}: codes must be bytes, got {type(codes).__name__}")
        codes = bytes(codes)
        if len(codes) > _MAX_CODE_BYTES:
            raise _field_error(f"segment {i}: {len(codes)} code bytes exceed {_MAX_CODE_BYTES}")
        if idle and codes:
            raise _field_error(f"segment {i}: an idle message carries no codes, got "
                               f"{len(codes)} code bytes")
        out.append(_quality_byte(seg.quality, i))
        out += _varint(len(codes))
        out += codes
    out += crc16(bytes(out)).to_bytes(CRC_BYTES, "big")
    if len(out) > max_bytes:
        raise _field_error(f"payload of {len(out)} bytes exceeds max_bytes = {max_bytes}")
    return bytes(out)


def decode_payload(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Payload:
    """Parse one message; PayloadError(reason, detail) if it is not a valid version-1 payload."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes-like, got {type(data).__name__}")
    data = bytes(data)
    size = len(data)
    if size > max_bytes:
        raise PayloadError("too_large", f"{size} bytes > max_bytes = {max_bytes}")
    if size < MIN_PAYLOAD_BYTES:
        raise PayloadError("too_short", f"{size} bytes < {MIN_PAYLOAD_BYTES}")
    body, crc = data[:-CRC_BYTES], int.from_bytes(data[-CRC_BYTES:], "big")
    computed = crc16(body)
    if computed != crc:
        raise PayloadError(
            "crc_mismatch", f"CRC field 0x{crc:04x}, computed 0x{computed:04x} over {size} bytes"
        )
    head = body[0]
    version, level, flags = head >> 5, (head >> 3) & 0x3, head & 0x7
    if version != FORMAT_VERSION:
        raise PayloadError("bad_version", f"version {version} (byte 0 = 0x{head:02x})")
    if flags & ~_KNOWN_FLAGS:
        raise PayloadError("bad_flags", f"reserved flags 0b{flags:03b} (byte 0 = 0x{head:02x})")
    idle = bool(flags & FLAG_IDLE)
    count = body[16]
    if count == 0:
        raise PayloadError("bad_count", "segment count 0")
    pos = HEADER_BYTES
    segments = []
    for i in range(count):
        if pos >= len(body):
            # The record's quality byte itself is missing.
            raise PayloadError(
                "truncated_segment", f"segment {i} of {count} starts at {pos}, past the body"
            )
        quality = body[pos]
        pos += 1
        n, pos = _read_varint(body, pos, i)
        if n > len(body) - pos:
            raise PayloadError(
                "truncated_segment",
                f"segment {i} declares {n} code bytes, {len(body) - pos} left",
            )
        if idle and n:
            raise PayloadError(
                "bad_idle", f"segment {i} of an idle message declares {n} code bytes (must be 0)"
            )
        segments.append(SegmentRecord(quality / 255, body[pos : pos + n]))
        pos += n
    if pos != len(body):
        raise PayloadError(
            "trailing_bytes", f"{len(body) - pos} bytes after the {count} segment(s)"
        )
    return Payload(
        level=level,
        model_id=body[1:4],
        epoch=int.from_bytes(body[4:6], "big"),
        first_seq=int.from_bytes(body[6:10], "big"),
        timestamp_ms=int.from_bytes(body[10:16], "big"),
        segments=tuple(segments),
        idle=idle,
    )


def _read_varint(body: bytes, pos: int, i: int) -> tuple[int, int]:
    """(value, next position) of the minimal LEB128 varint at ``pos``."""
    value = 0
    for j in range(_MAX_VARINT_BYTES):
        if pos + j >= len(body):
            raise PayloadError("bad_varint", f"segment {i}: length varint runs past the body")
        byte = body[pos + j]
        value |= (byte & 0x7F) << (7 * j)
        if not byte & 0x80:
            if j and byte == 0:
                # 0x80 0x00 and the like: a second spelling of a shorter number.
                raise PayloadError(
                    "bad_varint", f"segment {i}: non-minimal length varint at byte {pos}"
                )
            return value, pos + j + 1
    raise PayloadError(
        "bad_varint", f"segment {i}: length varint longer than {_MAX_VARINT_BYTES} bytes"
    )
