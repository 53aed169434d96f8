"""libpcap framing: walk records, pull UDP payloads, resync after corruption.

Written here rather than delegated: csiread crashes the interpreter (SIGSEGV) on a record
whose length field is corrupt and calls ``exit()`` on an empty file, which a long-running
agent cannot afford. This walker validates every record header, skips what is broken, and
resynchronises on the next plausible record.

File layout (https://wiki.wireshark.org/Development/LibpcapFileFormat):
  global header, 24 bytes: magic u32 (a1b2c3d4 µs / a1b23c4d ns, byte order from it),
  version u16 u16, thiszone i32, sigfigs u32, snaplen u32, linktype u32
  record header, 16 bytes: ts_sec u32, ts_frac u32, incl_len u32, orig_len u32; then data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from .._errors import FormatError
from ..frames import DropCounter
from ._files import read_file_bytes

__all__ = ["PcapPayloads", "read_udp_payloads"]

_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_LINKTYPE_ETHERNET = 1
_LINKTYPE_RAW = 101
_LINKTYPE_LINUX_SLL = 113
_MAX_RECORD = 262_144


@dataclass(slots=True)
class PcapPayloads:
    timestamps: list[float] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    dropped: DropCounter = field(default_factory=DropCounter)
    records: int = 0


def _l3_offset(data: bytes, linktype: int) -> int | None:
    """Offset of the IPv4 header inside a link-layer frame, or None if not IPv4."""
    if linktype == _LINKTYPE_ETHERNET:
        if len(data) < 14:
            return None
        off, ethertype = 14, int.from_bytes(data[12:14], "big")
        if ethertype == 0x8100 and len(data) >= 18:  # one VLAN tag
            off, ethertype = 18, int.from_bytes(data[16:18], "big")
        return off if ethertype == 0x0800 else None
    if linktype == _LINKTYPE_LINUX_SLL:
        return 16 if len(data) >= 16 and data[14:16] == b"\x08\x00" else None
    if linktype == _LINKTYPE_RAW:
        return 0
    return None


def _udp_payload(data: bytes, linktype: int, port: int | None) -> bytes | str:
    """The UDP payload of one frame, or the reason it has none."""
    off = _l3_offset(data, linktype)
    if off is None or len(data) < off + 20 or data[off] >> 4 != 4:
        return "not_ipv4"
    ihl = (data[off] & 0x0F) * 4
    if data[off + 9] != 17:
        return "not_udp"
    udp = off + ihl
    if len(data) < udp + 8:
        return "truncated_packet"
    if port is not None and int.from_bytes(data[udp + 2 : udp + 4], "big") != port:
        return "other_udp_port"
    # The UDP length, not the capture length: some captures carry trailing bytes.
    udp_len = int.from_bytes(data[udp + 4 : udp + 6], "big")
    end = udp + udp_len
    if udp_len < 8 or end > len(data):
        return "truncated_packet"
    return data[udp + 8 : end]


def read_udp_payloads(path: str | Path, port: int | None = 5500) -> PcapPayloads:
    """Every UDP payload (to ``port``) in a pcap file, with capture timestamps."""
    path = Path(path)
    buf = read_file_bytes(path, "a pcap capture")
    if len(buf) < 24 or buf[:4] not in _MAGICS:
        raise FormatError(path, f"not a libpcap file (magic {buf[:4].hex() or 'missing'})")
    endian, tick = _MAGICS[buf[:4]]
    snaplen, linktype = struct.unpack_from(endian + "II", buf, 16)
    if linktype not in (_LINKTYPE_ETHERNET, _LINKTYPE_RAW, _LINKTYPE_LINUX_SLL):
        raise FormatError(path, f"unsupported pcap link type {linktype}")
    limit = min(max(snaplen, 1), _MAX_RECORD)
    header = struct.Struct(endian + "IIII")
    out = PcapPayloads()
    off, n, last_sec = 24, len(buf), None

    def plausible(at: int) -> bool:
        if at + 16 > n:
            return False
        sec, frac, incl, orig = header.unpack_from(buf, at)
        if incl == 0 or incl > limit or orig < incl or frac >= round(1 / tick):
            return False
        if last_sec is not None and not (last_sec - 86_400 <= sec <= last_sec + 86_400):
            return False
        return bool(at + 16 + incl <= n)

    while off < n:
        if n - off < 16:
            out.dropped["truncated_record"] += 1
            break
        sec, frac, incl, _orig = header.unpack_from(buf, off)
        if not plausible(off):
            if off + 16 + incl > n and incl <= limit and (last_sec is None or sec >= last_sec):
                out.dropped["truncated_record"] += 1  # the capture stops mid-record
                break
            out.dropped["corrupt_record"] += 1
            nxt = off + 1
            while nxt < n and not plausible(nxt):
                nxt += 1
            off = nxt
            continue
        out.records += 1
        data = buf[off + 16 : off + 16 + incl]
        off += 16 + incl
        last_sec = sec
        payload = _udp_payload(data, linktype, port)
        if isinstance(payload, str):
            out.dropped[payload] += 1
            continue
        out.timestamps.append(sec + frac * tick)
        out.payloads.append(payload)
    return out
