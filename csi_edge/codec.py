"""Wire format of one MQTT message (``{prefix}/{site}/{ap}/seg`` payload), version 2.

One message carries K consecutive segments of one stream. AP and site come from the topic;
everything else the cloud needs to reconstruct is in these bytes. All integers big-endian.

  offset  size  field          encoding
  ------  ----  -------------  -------------------------------------------------------------
  0       1     version/level  bits 7..5: format version, 2 (1: the earlier format, below)
                /flags         bits 4..3: rate level, 0..3
                               bit 0: IDLE, bit 1: MOTION, bit 2: FULL_QUALITY (see below)
  1       3     model id       first 3 bytes of the bundle id (``bytes.fromhex(id)[:3]``);
                               00 00 00: no model (presence only, below)
  4       2     stream epoch   u16; changes when the edge restarts
  6       4     first seq      u32 sequence number of the first segment
  10      6     timestamp      u48 capture time of the first segment's start, ms since the
                               Unix epoch (UTC)
  16      1     K              number of segments, 1..255; segment i has sequence number
                               (first seq + i) mod 2**32 and starts at timestamp
                               + i * segment duration (the duration is in the bundle)
  17      K*r   K records      each (r = f + m bytes): without FULL_QUALITY 1 byte quality
                               (round(q * 255), q in [0, 1]), with MOTION 1 byte motion
                               score (below)
  17+K*r  n     codes          ONE entropy-coded stream (``csi_edge.entropy``) of the codes of
                               all K segments, segment 0's first (csi_edge.bundle,
                               ``encode_message_codes``); it runs up to the CRC, so n is
                               L - 2 - (17 + K*r) and may be 0
  L-2     2     CRC            CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection,
                               xorout 0) of bytes 0..L-3, i.e. ``binascii.crc_hqx(.., 0xFFFF)``

Size: 17 + K * (f + m) + n + 2 bytes, f = 0 with FULL_QUALITY and 1 without, m = 1 with
MOTION and 0 without; every one of them counts toward the reported bitrate. Decoded quality is
``byte / 255`` (exactly what was sent). How many symbols each segment holds follows from the
bundle and the level, so the stream needs no lengths: the bundle's decoder reads K segments'
symbols and then checks that nothing is left (``csi_edge.entropy``, ``leftover_data``).

FULL_QUALITY (flag bit 2): every segment of the message has quality 1 (byte 255: no frame of
it was filled in by the resampler), so the records carry no quality byte. Nearly every
segment is whole (98-99 % of the Fition test recordings' segments, all of WiAR's:
``bench/wire_version.py``), so this saves about one byte a segment. The flag is set exactly
when every quality byte would be 255: a message whose quality bytes are all 255 without it is
rejected (``bad_flags``), so each message has one spelling.

Why one stream a message (version 2): an ANS stream ends by flushing its coder state, about
2.8 bytes beyond the information it holds whatever its length, and version 1 paid that and a
length byte on every segment. One stream a message pays it once: 2.9-3.0 B/s less at level 0
(4 segments a message) on the shipped bundles' test recordings, 1 B/s at the levels of one
segment a message; FULL_QUALITY saves 1 B/s more at every level (docs/model.md, "Bits";
``bench/wire_version.py``).

MOTION (flag bit 1): each record carries the segment's motion score (``csi_edge.presence``:
log2 of the ratio of the segment's CSI variability to the AP's quiet reference) as one byte
b: 0 = no score (the edge is still calibrating, or the segment had too few frames), else
score = (b - 64) / 16, i.e. b = clip(round(16 * score) + 64, 1, 255): steps of 1/16 (4.4 %
in ratio) from -3.9375 to +11.9375, scores beyond saturate. It costs one byte per segment,
1 B/s at one segment a second, at every rate level and in idle messages.

IDLE (flag bit 0): the message has no codes (n = 0); each segment stands for one whose motion
statistic stayed below the bundle's idle threshold (``csi_edge.motion``): nothing changed since
the stream's last coded segment, and the cloud predicts it from a copy of that segment's codes.
The level field is the edge's configured level. An idle message of K whole segments costs
17 + 2 bytes, and K more with MOTION (K more again when any segment is not whole).

No model (model id 00 00 00, presence only): the edge runs without a bundle
(``csi edge --presence-only``) and sends motion scores only. Such a message must set MOTION,
not IDLE, level 0, and has no codes; segments are 1 s long (``NO_MODEL_SEGMENT_MS``).
A message of K whole segments costs 17 + 2 + K bytes.

Version 1 (still decoded, and sent by an edge told ``wire_version = 1`` for a cloud that
predates version 2, or for queued segments of a bundle the edge no longer holds): each record
is quality, [motion], a LEB128 unsigned varint n (minimal form, 1..3 bytes) and n bytes of that
segment's own entropy-coded stream (``csi_edge.bundle.encode_segment_codes``); an IDLE or
no-model message has n = 0 in every record; flag bit 2 is reserved (non-zero is rejected).
Size 17 + 2 + sum over segments of (1 + m + len(varint(n)) + n). A cloud that predates
version 2 rejects a version-2 message as ``bad_version``, or as ``too_short`` when it is under
21 bytes (an idle or presence-only message of one whole segment): it never mistakes one for
the other.

Decoding checks, in this order (``PayloadError.reason``): ``too_large`` (over ``max_bytes``),
``too_short`` (under 19 bytes, the smallest valid message), ``crc_mismatch``, then the fields
only once the CRC holds: ``bad_version`` (neither 1 nor 2), ``too_short`` (version 1 under 21
bytes, its smallest), ``bad_flags`` (a reserved flag bit set), ``bad_no_model`` (model id
00 00 00 without MOTION, with IDLE or a level above 0), ``bad_count`` (K = 0), then record by
record ``truncated_segment`` (a record runs past the body); version 1 also ``bad_varint`` (runs
past the body, longer than 3 bytes or not minimal), ``truncated_segment`` (n larger than what
is left), ``bad_idle`` / ``bad_no_model`` (n > 0 in an idle or presence-only message) and, after
the last record, ``trailing_bytes``; version 2, after the records, ``bad_flags`` (every quality
byte 255 without FULL_QUALITY) and ``bad_idle`` / ``bad_no_model`` (codes in an idle or
presence-only message). Every accepted message re-encodes to exactly the same bytes.
"""

from __future__ import annotations

import binascii
import math
import numbers
import operator
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import MalformedPacketError

__all__ = [
    "CRC_BYTES",
    "DECODE_REASONS",
    "FLAG_FULL_QUALITY",
    "FLAG_IDLE",
    "FLAG_MOTION",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_SEGMENTS",
    "MIN_PAYLOAD_BYTES",
    "MOTION_NONE",
    "MOTION_STEPS",
    "NO_MODEL_ID",
    "NO_MODEL_SEGMENT_MS",
    "Payload",
    "PayloadError",
    "SegmentRecord",
    "crc16",
    "decode_payload",
    "encode_payload",
    "idle_payload_size",
    "message_groups",
    "model_id_prefix",
    "motion_byte",
    "motion_from_byte",
    "payload_overhead",
    "payload_size",
]

FORMAT_VERSION = 2  # what encode_payload writes unless told otherwise
FORMAT_VERSIONS = frozenset({1, 2})  # what decode_payload reads
HEADER_BYTES = 17
CRC_BYTES = 2
MAX_SEGMENTS = 255
MAX_LEVEL = 3
FLAG_IDLE = 0x1
FLAG_MOTION = 0x2
FLAG_FULL_QUALITY = 0x4  # version 2: every segment's quality is 1, no quality bytes
_KNOWN_FLAGS = FLAG_IDLE | FLAG_MOTION
_U32 = 1 << 32  # sequence numbers are 32-bit and wrap
MODEL_ID_BYTES = 3
NO_MODEL_ID = bytes(MODEL_ID_BYTES)  # presence only: no bundle, motion scores only
NO_MODEL_SEGMENT_MS = 1000
MOTION_NONE = 0  # the motion byte of a segment without a score
_MOTION_OFFSET = 64
MOTION_STEPS = 16  # per unit of log2 ratio
# Version 2 with FULL_QUALITY and no motion: a record takes no byte. Version 1: every record
# takes at least its quality byte and a 1-byte varint.
MIN_PAYLOAD_BYTES = HEADER_BYTES + CRC_BYTES
_MIN_V1_BYTES = HEADER_BYTES + 2 + CRC_BYTES
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
        "bad_no_model",
    }
)


class PayloadError(MalformedPacketError, ValueError):
    """A payload that cannot be decoded (``reason`` in DECODE_REASONS) or encoded
    (``reason`` ``invalid_field``); ``detail`` quotes the bad value."""


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """One segment: quality in [0, 1] (sent as one byte), its motion score (sent as one byte
    when the message has MOTION; None: no score) and, in a version-1 message only, its own
    entropy-coded codes (version 2 codes the message's segments together: ``Payload.codes``)."""

    quality: float
    codes: bytes = b""
    motion: float | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    """One message. Fields are checked by :func:`encode_payload`, not on construction.

    ``idle``: the IDLE flag; the message then has no codes (still segments).
    ``motion``: the MOTION flag; every record carries a motion byte (its score, or none).
    ``codes``: version 2, the one entropy-coded stream of every segment's codes
    (csi_edge.bundle.encode_message_codes); version 1 keeps each segment's in its record.
    A ``model_id`` of :data:`NO_MODEL_ID` is a presence-only message.
    """

    level: int
    model_id: bytes
    epoch: int
    first_seq: int
    timestamp_ms: int
    segments: tuple[SegmentRecord, ...]
    idle: bool = False
    motion: bool = False
    codes: bytes = b""
    version: int = FORMAT_VERSION

    @property
    def presence_only(self) -> bool:
        """No bundle: motion scores only, 1 s segments."""
        return bytes(self.model_id) == NO_MODEL_ID

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
    if raw[:MODEL_ID_BYTES] == NO_MODEL_ID:
        # 1 bundle in 2**24: its payloads would read as presence only. A new training run
        # (new weights, new id) gives another prefix.
        raise ValueError(f"bundle id {bundle_id!r} starts with {NO_MODEL_ID.hex()}, the wire's "
                         "no-model id: retrain to get another id")
    return raw[:MODEL_ID_BYTES]


def motion_byte(score: float | None) -> int:
    """The wire byte of a motion score (log2 ratio); 0 for None. Scores beyond the range
    [-3.9375, 11.9375] saturate; NaN and infinities are refused (ValueError)."""
    if score is None:
        return MOTION_NONE
    if isinstance(score, bool) or not isinstance(score, int | float | numbers.Real):
        raise ValueError(f"motion score must be a number or None, got {score!r}")
    score = float(score)  # numpy scalars
    if not math.isfinite(score):
        raise ValueError(f"motion score {score!r} is not finite")
    return min(255, max(1, round(score * MOTION_STEPS) + _MOTION_OFFSET))


def motion_from_byte(value: int) -> float | None:
    """The motion score a wire byte stands for (None for 0)."""
    if not 0 <= value <= 255:
        raise ValueError(f"motion byte {value!r} is outside [0, 255]")
    return None if value == MOTION_NONE else (value - _MOTION_OFFSET) / MOTION_STEPS


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


def payload_size(k: int, code_bytes: int | Sequence[int], *, motion: bool = False,
                 full_quality: bool = False, version: int = FORMAT_VERSION) -> int:
    """Total bytes of a version-2 message of ``k`` segments whose codes take ``code_bytes``
    (and a motion byte each with ``motion``; no quality bytes with ``full_quality``, every
    segment whole). For version 1 pass ``code_bytes`` as the list of each segment's code
    length."""
    return payload_overhead(k, code_bytes, motion=motion, full_quality=full_quality,
                            version=version) + (
        code_bytes if isinstance(code_bytes, int) else sum(code_bytes))


def payload_overhead(k: int, code_bytes: int | Sequence[int] = 0, *, motion: bool = False,
                     full_quality: bool = False, version: int = FORMAT_VERSION) -> int:
    """Bytes of a K-segment message that are not code bytes: header, records, CRC (version 1:
    ``code_bytes`` is each segment's code length, whose varints count here)."""
    if not 1 <= k <= MAX_SEGMENTS:
        raise ValueError(f"a message holds 1..{MAX_SEGMENTS} segments, got k = {k}")
    per_record = 2 if motion else 1
    if version == 2:
        if not isinstance(code_bytes, int) or code_bytes < 0:
            raise ValueError(f"version 2: code_bytes must be one count >= 0, got {code_bytes!r}")
        return HEADER_BYTES + CRC_BYTES + k * (per_record - (1 if full_quality else 0))
    if version != 1:
        raise ValueError(f"version must be one of {sorted(FORMAT_VERSIONS)}, got {version!r}")
    if isinstance(code_bytes, int):
        raise ValueError(f"version 1: code_bytes must be each segment's code length, got "
                         f"{code_bytes!r}")
    if full_quality:
        raise ValueError("version 1 has no FULL_QUALITY: every record has its quality byte")
    lengths = list(code_bytes)
    if k != len(lengths):
        raise ValueError(f"k = {k} but {len(lengths)} code lengths given")
    if any(n < 0 for n in lengths):
        raise ValueError(f"code lengths must be >= 0, got {lengths}")
    return HEADER_BYTES + CRC_BYTES + sum(per_record + _varint_len(n) for n in lengths)


def idle_payload_size(k: int, *, motion: bool = False, full_quality: bool = False,
                      version: int = FORMAT_VERSION) -> int:
    """Bytes of an idle message of ``k`` segments (header, K records of 1 byte, 2 with a
    motion byte, one less each with ``full_quality``, CRC; version 1: one byte more a record,
    always with its quality byte); also the size of a presence-only message
    (``motion=True``)."""
    if version == 1:
        return payload_overhead(k, [0] * k, motion=motion, version=1)
    return payload_overhead(k, 0, motion=motion, full_quality=full_quality, version=version)


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


def _code_bytes(value: Any, name: str) -> bytes:
    """``value`` as bytes; anything but a bytes-like object is refused, naming its type."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise _field_error(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


def _quality_byte(q: Any, i: int) -> int:
    if isinstance(q, bool) or not isinstance(q, int | float):
        try:
            q = float(q)  # numpy scalars
        except (TypeError, ValueError) as exc:
            raise _field_error(f"segment {i}: quality must be a number, got {q!r}") from exc
    if not (math.isfinite(q) and 0.0 <= q <= 1.0):
        raise _field_error(f"segment {i}: quality {q!r} is outside [0, 1]")
    return round(float(q) * 255)


def message_groups(seqs: Sequence[int], per_message: int | Sequence[int], *,
                   idle: Sequence[bool] | None = None, idle_per_message: int = 1,
                   keys: Sequence[Hashable] | None = None,
                   timestamps_ms: Sequence[int] | None = None,
                   segment_ms: Sequence[int] | None = None) -> list[list[int]]:
    """Positions of a stream's segments (in order) grouped into messages as the edge sends
    them: the one rule the agent's queue and the offline paths (evaluation, idle, upload)
    share.

    A message holds consecutive sequence numbers (modulo 2**32) of one kind (coded or idle)
    and one ``key`` (the agent's epoch, level, model and motion byte); given
    ``timestamps_ms``, their start times follow each other by ``segment_ms``; it holds at
    most ``per_message`` (per segment, or one number for all) coded or ``idle_per_message``
    idle segments."""
    groups: list[list[int]] = []
    for i, seq in enumerate(seqs):
        kind = bool(idle[i]) if idle is not None else False
        if groups:
            group = groups[-1]
            head, last = group[0], group[-1]
            size = idle_per_message if kind else (
                per_message if isinstance(per_message, int) else per_message[i])
            if (kind == (bool(idle[head]) if idle is not None else False)
                    and (keys is None or keys[i] == keys[head])
                    and int(seq) == (int(seqs[last]) + 1) % _U32
                    and (timestamps_ms is None or segment_ms is None
                         or timestamps_ms[i] == timestamps_ms[head]
                         + len(group) * segment_ms[i])
                    and len(group) < size):
                group.append(i)
                continue
        groups.append([i])
    return groups


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
    motion = payload.motion
    if not isinstance(motion, bool):
        raise _field_error(f"motion must be a bool, got {motion!r}")
    version = payload.version
    if isinstance(version, bool) or version not in FORMAT_VERSIONS:
        raise _field_error(f"version must be one of {sorted(FORMAT_VERSIONS)}, got {version!r}")
    no_model = bytes(model_id) == NO_MODEL_ID
    if no_model and (idle or not motion or level):
        raise _field_error(f"a presence-only message (model id {NO_MODEL_ID.hex()}) needs "
                           f"motion, no idle and level 0; got motion={motion}, idle={idle}, "
                           f"level={level}")
    stream = _code_bytes(payload.codes, "codes")
    if version == 1 and stream:
        raise _field_error(f"a version-1 message keeps each segment's codes in its record, "
                           f"got {len(stream)} message code bytes")
    if (idle or no_model) and stream:
        raise _field_error(f"an {'idle' if idle else 'presence-only'} message carries no "
                           f"codes, got {len(stream)} code bytes")
    for i, seg in enumerate(segments):
        if not isinstance(seg, SegmentRecord):
            raise _field_error(f"segment {i} is a {type(seg).__name__}, not a SegmentRecord")
    qualities = [_quality_byte(seg.quality, i) for i, seg in enumerate(segments)]
    full = version == 2 and all(q == 255 for q in qualities)
    out = bytearray()
    out.append((version << 5) | (level << 3) | (FLAG_IDLE if idle else 0)
               | (FLAG_MOTION if motion else 0) | (FLAG_FULL_QUALITY if full else 0))
    out += bytes(model_id)
    out += epoch.to_bytes(2, "big")
    out += first_seq.to_bytes(4, "big")
    out += timestamp.to_bytes(6, "big")
    out.append(len(segments))
    for i, seg in enumerate(segments):
        codes = _code_bytes(seg.codes, f"segment {i}: codes")
        if version == 2 and codes:
            raise _field_error(f"segment {i}: a version-2 message codes its segments together "
                               f"(Payload.codes), got {len(codes)} code bytes in the record")
        if len(codes) > _MAX_CODE_BYTES:
            raise _field_error(f"segment {i}: {len(codes)} code bytes exceed {_MAX_CODE_BYTES}")
        if (idle or no_model) and codes:
            raise _field_error(f"segment {i}: an {'idle' if idle else 'presence-only'} "
                               f"message carries no codes, got {len(codes)} code bytes")
        if not full:
            out.append(qualities[i])
        if motion:
            try:
                out.append(motion_byte(seg.motion))
            except ValueError as exc:
                raise _field_error(f"segment {i}: {exc}") from exc
        elif seg.motion is not None:
            raise _field_error(f"segment {i} has motion score {seg.motion!r} but the "
                               "message has no MOTION flag")
        if version == 1:
            out += _varint(len(codes))
            out += codes
    out += stream
    out += crc16(bytes(out)).to_bytes(CRC_BYTES, "big")
    if len(out) > max_bytes:
        raise _field_error(f"payload of {len(out)} bytes exceeds max_bytes = {max_bytes}")
    return bytes(out)


def decode_payload(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Payload:
    """Parse one message (version 1 or 2); PayloadError(reason, detail) if it is not valid."""
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
    if version not in FORMAT_VERSIONS:
        raise PayloadError("bad_version", f"version {version} (byte 0 = 0x{head:02x})")
    if version == 1 and size < _MIN_V1_BYTES:
        raise PayloadError("too_short", f"{size} bytes < {_MIN_V1_BYTES} (version 1)")
    known = _KNOWN_FLAGS | (FLAG_FULL_QUALITY if version == 2 else 0)
    if flags & ~known:
        raise PayloadError("bad_flags", f"reserved flags 0b{flags:03b} (byte 0 = 0x{head:02x})")
    full = bool(flags & FLAG_FULL_QUALITY)
    idle = bool(flags & FLAG_IDLE)
    motion = bool(flags & FLAG_MOTION)
    model_id = body[1:4]
    no_model = model_id == NO_MODEL_ID
    if no_model and (idle or not motion or level):
        raise PayloadError("bad_no_model", f"model id {NO_MODEL_ID.hex()} (presence only) with "
                           f"motion={motion}, idle={idle}, level={level} (byte 0 = "
                           f"0x{head:02x})")
    count = body[16]
    if count == 0:
        raise PayloadError("bad_count", "segment count 0")
    pos = HEADER_BYTES
    segments = []
    qualities = []
    for i in range(count):
        quality = 255
        if not full:
            if pos >= len(body):
                # The record's quality byte itself is missing.
                raise PayloadError(
                    "truncated_segment", f"segment {i} of {count} starts at {pos}, past the "
                    "body")
            quality = body[pos]
            pos += 1
        qualities.append(quality)
        score = None
        if motion:
            if pos >= len(body):
                raise PayloadError(
                    "truncated_segment", f"segment {i} of {count}: motion byte at {pos}, past "
                    "the body")
            score = motion_from_byte(body[pos])
            pos += 1
        if version == 2:
            segments.append(SegmentRecord(quality / 255, b"", score))
            continue
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
        if no_model and n:
            raise PayloadError(
                "bad_no_model", f"segment {i} of a presence-only message declares {n} code "
                "bytes (must be 0)")
        segments.append(SegmentRecord(quality / 255, body[pos : pos + n], score))
        pos += n
    stream = b""
    if version == 2:
        if not full and all(q == 255 for q in qualities):
            # One spelling per message: whole segments only ever go with the flag.
            raise PayloadError(
                "bad_flags", f"every one of the {count} quality bytes is 255 but FULL_QUALITY "
                f"(bit 2) is not set (byte 0 = 0x{head:02x})")
        stream = body[pos:]
        if idle and stream:
            raise PayloadError(
                "bad_idle", f"an idle message carries {len(stream)} code bytes (must be 0)")
        if no_model and stream:
            raise PayloadError(
                "bad_no_model", f"a presence-only message carries {len(stream)} code bytes "
                "(must be 0)")
    elif pos != len(body):
        raise PayloadError(
            "trailing_bytes", f"{len(body) - pos} bytes after the {count} segment(s)"
        )
    return Payload(
        level=level,
        model_id=model_id,
        epoch=int.from_bytes(body[4:6], "big"),
        first_seq=int.from_bytes(body[6:10], "big"),
        timestamp_ms=int.from_bytes(body[10:16], "big"),
        segments=tuple(segments),
        idle=idle,
        motion=motion,
        codes=stream,
        version=version,
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
