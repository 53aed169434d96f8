"""Nexmon CSI (Broadcom bcm43455c0 / bcm4339): UDP payloads from pcap files or a live socket.

One decoder serves both: :func:`decode_payloads` takes a list of UDP payloads (one or many),
so a pcap file and a live socket go through the same code. It agrees bit for bit with
csiread on the same packets (tested on the real recordings).

Payload layout (little-endian), nexmon_csi for bcm43455c0/4339, 18-byte header + CSI:
  0  u16  magic 0x1111
  2  i8   RSSI (a constant in some captures)
  3  u8   frame control byte
  4  6B   transmitter MAC
  10 u16  sequence control of the frame (sequence number << 4 | fragment)
  12 u16  core (bits 0-2) and spatial stream (bits 3-5)
  14 u16  chanspec (channel bits 0-7, bandwidth bits 11-13, band bits 14-15)
  16 u16  chip version (0x0065 bcm43455c0, 0x0039? varies; see _INT16_CHIPS)
  18 ...  CSI: per subcarrier int16 real, int16 imag, FFT order (DC first)
The number of subcarriers is (len - 18) / 4: 64, 128 or 256 for 20/40/80 MHz.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._errors import EmptyRecordingError, FormatError, MalformedPacketError
from ..frames import CSIFrames, DropCounter, RadioInfo
from ._pcap import read_udp_payloads

__all__ = [
    "LiveStreamFilter",
    "NexmonPackets",
    "StreamKey",
    "decode_payload",
    "decode_payloads",
    "parse_chanspec",
    "read_nexmon_pcap",
    "select_stream",
]

MAGIC = 0x1111
_RETRANSMIT_WINDOW = 4
HEADER_BYTES = 18
NFFT_BY_BANDWIDTH = {20: 64, 40: 128, 80: 256}
_BANDWIDTH_BY_NFFT = {v: k for k, v in NFFT_BY_BANDWIDTH.items()}
# chip_version values whose CSI is plain int16 I/Q (nexmon_csi's 4339/43455c0 format).
_INT16_CHIPS = {0x0065: "bcm43455c0", 0x4339: "bcm4339", 0x0039: "bcm4339"}
_HEADER = np.dtype(
    [
        ("magic", "<u2"),
        ("rssi", "i1"),
        ("fctl", "u1"),
        ("mac", "u1", (6,)),
        ("seq", "<u2"),
        ("core_ss", "<u2"),
        ("chanspec", "<u2"),
        ("chip", "<u2"),
    ]
)
assert _HEADER.itemsize == HEADER_BYTES


def parse_chanspec(chanspec: int) -> tuple[int, int, str]:
    """(channel, bandwidth MHz, band) of a d11ac chanspec."""
    bw_bits = (chanspec >> 11) & 0x7
    bandwidth = {2: 20, 3: 40, 4: 80, 5: 160}.get(bw_bits, 0)
    band = "5GHz" if (chanspec >> 14) == 3 else "2.4GHz" if (chanspec >> 14) == 0 else "?"
    return chanspec & 0xFF, bandwidth, band


def format_mac(mac: np.ndarray) -> str:
    return ":".join(f"{int(b):02x}" for b in mac)


@dataclass(slots=True)
class NexmonPackets:
    """Decoded packets, column-wise. ``csi`` rows are aligned with the header arrays."""

    timestamp: np.ndarray  # (N,) float64
    header: np.ndarray  # (N,) _HEADER records
    nfft: np.ndarray  # (N,) int, subcarriers in each packet
    csi: dict[int, np.ndarray]  # nfft -> (count of packets with that nfft, nfft) complex64
    row: np.ndarray  # (N,) row of packet i in csi[nfft[i]]
    dropped: DropCounter

    def __len__(self) -> int:
        return int(self.timestamp.size)

    @property
    def mac(self) -> np.ndarray:
        """(N,) uint64 MAC as an integer, for grouping."""
        m = self.header["mac"].astype(np.uint64)
        weights = np.uint64(1) << (np.arange(5, -1, -1, dtype=np.uint64) * 8)
        packed: np.ndarray = (m * weights).sum(axis=1)
        return packed


def decode_payloads(
    payloads: list[bytes], timestamps: list[float] | np.ndarray
) -> NexmonPackets:
    """Decode many UDP payloads at once (vectorised per payload length)."""
    dropped = DropCounter()
    lengths = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=len(payloads))
    ts = np.asarray(timestamps, dtype=np.float64)
    valid_len = np.isin(lengths - HEADER_BYTES, [4 * n for n in _BANDWIDTH_BY_NFFT])
    if (~valid_len).any():
        dropped["bad_length"] += int((~valid_len).sum())
    headers: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    nffts: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    csi: dict[int, np.ndarray] = {}
    for nfft in _BANDWIDTH_BY_NFFT:
        idx = np.flatnonzero(valid_len & (lengths == HEADER_BYTES + 4 * nfft))
        if idx.size == 0:
            continue
        raw = np.frombuffer(b"".join(payloads[i] for i in idx), dtype=np.uint8)
        raw = raw.reshape(idx.size, HEADER_BYTES + 4 * nfft)
        head = raw[:, :HEADER_BYTES].copy().view(_HEADER).reshape(-1)
        good = head["magic"] == MAGIC
        dropped["bad_magic"] += int((~good).sum())
        chip_ok = np.isin(head["chip"], list(_INT16_CHIPS))
        dropped["unsupported_chip"] += int((good & ~chip_ok).sum())
        good &= chip_ok
        if not good.any():
            continue
        iq = raw[good, HEADER_BYTES:].copy().view("<i2").reshape(-1, nfft, 2)
        csi[nfft] = (iq[..., 0] + 1j * iq[..., 1]).astype(np.complex64)
        headers.append(head[good])
        stamps.append(ts[idx[good]])
        positions.append(idx[good])
        nffts.append(np.full(int(good.sum()), nfft))
        rows.append(np.arange(int(good.sum())))
    if not headers:
        empty = np.zeros(0)
        return NexmonPackets(
            empty, np.zeros(0, _HEADER), empty.astype(int), {}, empty.astype(int), dropped
        )
    # Back to arrival order (the order of ``payloads``), whatever the FFT size.
    order = np.argsort(np.concatenate(positions), kind="stable")
    return NexmonPackets(
        timestamp=np.concatenate(stamps)[order],
        header=np.concatenate(headers)[order],
        nfft=np.concatenate(nffts)[order],
        csi=csi,
        row=np.concatenate(rows)[order],
        dropped=dropped,
    )


def decode_payload(payload: bytes, timestamp: float) -> NexmonPackets:
    """Decode one live UDP payload; raise :class:`MalformedPacketError` naming the problem."""
    packets = decode_payloads([payload], [timestamp])
    if len(packets) == 0:
        reason = next(iter(packets.dropped), "bad_length")
        detail = {
            "bad_length": f"{len(payload)} bytes is not 18 + 4*(64|128|256)",
            "bad_magic": f"magic 0x{payload[:2][::-1].hex()} is not 0x1111",
            "unsupported_chip": f"chip version 0x{payload[16:18][::-1].hex()} is not int16 I/Q",
        }[reason]
        raise MalformedPacketError(reason, detail)
    return packets


@dataclass(frozen=True, slots=True)
class StreamKey:
    """One Nexmon stream: transmitter, chanspec and receive core."""

    mac: int
    chanspec: int
    core: int

    @property
    def mac_str(self) -> str:
        return ":".join(f"{(self.mac >> (8 * i)) & 0xFF:02x}" for i in range(5, -1, -1))

    @classmethod
    def parse(cls, mac: str, chanspec: int, core: int = 0) -> StreamKey:
        return cls(int(mac.replace(":", ""), 16), int(chanspec), int(core))


def select_stream(
    packets: NexmonPackets, key: StreamKey | None = None
) -> tuple[np.ndarray, StreamKey, DropCounter]:
    """Indices of one stream's packets, retransmissions removed.

    ``key`` None picks the majority (transmitter, chanspec, core). Drops are counted by reason
    in the order they are tested: other transmitter, other chanspec (e.g. stray 20 MHz frames
    in an 80 MHz capture), other core, retransmission (same MAC and sequence number).
    """
    dropped = DropCounter()
    mac = packets.mac
    chanspec = packets.header["chanspec"].astype(np.int64)
    core = (packets.header["core_ss"] & 0x7).astype(np.int64)
    if key is None:
        counts = Counter(zip(mac.tolist(), chanspec.tolist(), core.tolist(), strict=True))
        (m, c, k), _ = counts.most_common(1)[0]
        key = StreamKey(int(m), int(c), int(k))
    keep = mac == np.uint64(key.mac)
    dropped["other_transmitter"] += int((~keep).sum())
    same_cs = chanspec == key.chanspec
    dropped["other_chanspec"] += int((keep & ~same_cs).sum())
    keep &= same_cs
    same_core = core == key.core
    dropped["other_core"] += int((keep & ~same_core).sum())
    keep &= same_core
    idx = np.flatnonzero(keep)
    seq = packets.header["seq"][idx]
    # A retransmission repeats the sequence control field of a frame shortly before it
    # (sequence numbers wrap every 4096 frames, so only a short window is compared).
    repeat = np.zeros(idx.size, dtype=bool)
    for lag in range(1, _RETRANSMIT_WINDOW + 1):
        repeat[lag:] |= seq[lag:] == seq[:-lag]
    dropped["retransmission"] += int(repeat.sum())
    return idx[~repeat], key, dropped


def packets_to_frames(
    packets: NexmonPackets,
    idx: np.ndarray,
    key: StreamKey,
    fmt: str,
    source: str,
    dropped: DropCounter,
) -> CSIFrames:
    nfft_values = np.unique(packets.nfft[idx])
    if nfft_values.size != 1:
        raise ValueError(f"stream {key} mixes FFT sizes {nfft_values.tolist()}")
    nfft = int(nfft_values[0])
    csi = packets.csi[nfft][packets.row[idx]][:, None, :]
    channel, bandwidth, band = parse_chanspec(key.chanspec)
    if bandwidth != _BANDWIDTH_BY_NFFT[nfft]:
        bandwidth = _BANDWIDTH_BY_NFFT[nfft]  # the payload size is what the FFT really was
    chip = _INT16_CHIPS.get(int(packets.header["chip"][idx[0]]), "unknown") if idx.size else None
    info = RadioInfo(
        device="nexmon",
        subcarriers=tuple(int(k) for k in np.fft.fftfreq(nfft, 1 / nfft)),
        chip=chip,
        channel=channel,
        bandwidth_mhz=bandwidth,
        chanspec=key.chanspec,
        core=key.core,
        transmitter=key.mac_str,
        rssi_is_real=False,
        extra={"band": band},
    )
    rssi = packets.header["rssi"][idx].astype(np.float32)
    frames = CSIFrames(
        timestamp=packets.timestamp[idx],
        csi=csi,
        info=info,
        format=fmt,
        source=source,
        rssi=rssi if np.unique(rssi).size > 1 else None,
        seq=(packets.header["seq"][idx] >> 4).astype(np.int64),
        dropped=dropped,
    )
    return frames if frames.rssi is None else _with_real_rssi(frames)


def _with_real_rssi(frames: CSIFrames) -> CSIFrames:
    from dataclasses import replace

    return replace(frames, info=replace(frames.info, rssi_is_real=True))


def read_nexmon_pcap(
    path: str | Path, key: StreamKey | None = None, port: int | None = 5500
) -> CSIFrames:
    """One Nexmon stream from a pcap capture (majority stream unless ``key`` is given)."""
    capture = read_udp_payloads(path, port=port)
    packets = decode_payloads(capture.payloads, capture.timestamps)
    dropped = DropCounter(capture.dropped)
    dropped.update(packets.dropped)
    if len(packets) == 0:
        problem = f"no Nexmon CSI packet among {capture.records} records"
        if dropped:
            problem += f" (dropped: {dropped.as_dict()})"
        raise EmptyRecordingError(path, problem)
    idx, key, stream_drops = select_stream(packets, key)
    dropped.update(stream_drops)
    if idx.size == 0:
        raise EmptyRecordingError(path, f"no packet of stream {key} ({dropped.as_dict()})")
    try:
        return packets_to_frames(packets, idx, key, "nexmon-pcap", str(path), dropped)
    except ValueError as exc:
        raise FormatError(path, str(exc)) from exc


class LiveStreamFilter:
    """Keeps one stream out of packets arriving over time (a UDP socket).

    With no explicit key, the first ``warmup`` packets are held back and the majority stream
    among them is chosen (as :func:`select_stream` does for a whole file); from then on packets
    pass straight through. Retransmissions are recognised over the same short window of
    sequence numbers as in files, so a live stream and its capture give the same frames.
    """

    def __init__(self, key: StreamKey | None = None, warmup: int = 100, source: str = "") -> None:
        self.key = key
        self.warmup = warmup
        self.source = source
        self.dropped = DropCounter()
        self._held: list[tuple[bytes, float]] = []
        self._recent: list[int] = []

    def push(self, packets: NexmonPackets, payloads: list[bytes]) -> CSIFrames | None:
        """Feed decoded packets (and their raw payloads); return the kept stream's new frames."""
        self.dropped.update(packets.dropped)
        if self.key is None:
            self._held.extend(zip(payloads, packets.timestamp.tolist(), strict=True))
            if len(self._held) < self.warmup:
                return None
            held_payloads, held_ts = zip(*self._held, strict=True)
            self._held = []
            packets = decode_payloads(list(held_payloads), list(held_ts))
        if len(packets) == 0:
            return None
        idx, self.key, dropped = select_stream(packets, self.key)
        # Retransmissions of frames already passed on in an earlier call.
        seq = packets.header["seq"][idx]
        fresh = np.array([s not in self._recent for s in seq.tolist()], dtype=bool)
        dropped["retransmission"] += int((~fresh).sum())
        idx = idx[fresh]
        self._recent = (self._recent + packets.header["seq"][idx].tolist())[-_RETRANSMIT_WINDOW:]
        self.dropped.update(dropped)
        if idx.size == 0:
            return None
        return packets_to_frames(packets, idx, self.key, "nexmon-udp", self.source, DropCounter())
