"""ESP32-CSI-Tool (Steven M. Hernandez) ``CSI_DATA`` lines: from a file, a serial port or stdin.

One parser serves every source: :class:`Esp32LineParser` turns one text line into an
:class:`Esp32Frame` (or raises :class:`MalformedPacketError` naming the reason and quoting
the offending value); :func:`read_esp32_csv` feeds it a file's lines, :func:`iter_lines`
yields the lines of a serial port or stdin for the same parser.

Line layout (``_components/csi_component.h`` of github.com/StevenMHernandez/ESP32-CSI-Tool;
the tool prints this header line once at start-up)::

    type,role,mac,rssi,rate,sig_mode,mcs,bandwidth,smoothing,not_sounding,aggregation,stbc,
    fec_coding,sgi,noise_floor,ampdu_cnt,channel,secondary_channel,local_timestamp,ant,
    sig_len,rx_state,real_time_set,real_timestamp,len,CSI_DATA

  type               the literal ``CSI_DATA``
  role               project type: ``AP``, ``STA`` or ``PASSIVE``
  mac                transmitter MAC, ``3C:71:BF:6D:2A:78``
  rssi .. rx_state   ``wifi_pkt_rx_ctrl_t`` fields as integers (``bandwidth`` is ``cwb``:
                     0 = 20 MHz, 1 = 40 MHz; ``local_timestamp`` is the radio's µs clock,
                     32 bits, wrapping every ~71.6 min; old builds print it with ``%d``, so
                     it can appear negative)
  real_time_set      1 once the clock was set (``SETTIME:`` on the console, or the AP)
  real_timestamp     seconds, ``"%li.%li"`` of gettimeofday in old builds (the microseconds
                     are not zero-padded, so the fraction is wrong below 0.1 s), the
                     monotonic clock printed with 6 significant digits in newer builds
  len                length in bytes of ESP-IDF's ``wifi_csi_info_t.buf``
  CSI_DATA           ``[v0 v1 ... ]``: the buffer as space-separated integers, a trailing
                     space before ``]``. Newer builds print ``(int) int8``; the oldest print
                     ``(uint8_t)`` (0..255), so values in [-128, 255] are accepted and read
                     as two's-complement int8. The tool prints either ``len`` values or
                     only the first 128 (``CONFIG_SHOULD_COLLECT_ONLY_LLTF``, and the
                     oldest builds; the tool's own ``python_utils/example_csi.csv`` has
                     ``len`` 384 with 128 values).
  (host time)        ``python_utils/serial_append_time.py`` appends ``,<host epoch s>``
                     after ``]``; that 27th field is accepted and kept in the frame.

Buffer layout (ESP-IDF ``api-guides/wifi.rst``, "Wi-Fi Channel State Information", classic
ESP32/S2/S3/C3 table): two bytes per subcarrier, **imaginary part first, then real**; the
LLTF comes first (128 bytes = 64 subcarriers), then HT-LTF and STBC-HT-LTF when present.
The LLTF's subcarrier order depends on ``secondary_channel``:

  none (0)           0..31, -32..-1 (FFT order)
  above (1) or below (2)
                     64 ascending subcarriers of the primary 20 MHz channel, DC in column
                     32 (the table numbers them 0~63 / -64~-1; the tool's example file,
                     secondary above, has zeros in columns 2-4 and 60-63, i.e. subcarriers
                     -30..-28 and 28..31, and the DC dip in column 32). They are rotated by
                     32 columns into FFT order.

This reader keeps the LLTF only: ``csi`` is ``(N, 1, 64)`` complex64, columns
``0..31, -32..-1`` whatever the secondary channel, so every ESP32 stream has one layout.
ESP-IDF notes that the first four bytes can be invalid (``first_word_invalid``, a hardware
limitation, not printed by the tool; the example file has a constant ``101 -48 5 0``
there); those two subcarriers are named in ``info.extra["first_word_invalid_subcarriers"]``.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .._errors import EmptyRecordingError, FormatError, MalformedPacketError
from ..frames import CSIFrames, DropCounter, RadioInfo
from ._files import read_file_bytes

if TYPE_CHECKING:
    import serial

__all__ = [
    "DEFAULT_BAUD",
    "FIELDS",
    "HEADER_LINE",
    "LLTF_SUBCARRIERS",
    "Esp32Frame",
    "Esp32LineParser",
    "decode_line",
    "frames_from_records",
    "iter_lines",
    "open_serial",
    "parse_lines",
    "read_esp32_csv",
]

FIELDS: tuple[str, ...] = (
    "type", "role", "mac", "rssi", "rate", "sig_mode", "mcs", "bandwidth", "smoothing",
    "not_sounding", "aggregation", "stbc", "fec_coding", "sgi", "noise_floor", "ampdu_cnt",
    "channel", "secondary_channel", "local_timestamp", "ant", "sig_len", "rx_state",
    "real_time_set", "real_timestamp", "len", "CSI_DATA",
)  # fmt: skip
HEADER_LINE = ",".join(FIELDS)
# Integer fields of the line, by position (rssi .. real_time_set, and len).
_INT_FIELDS: tuple[tuple[int, str], ...] = (
    *((i, FIELDS[i]) for i in range(3, 23)),
    (24, "len"),
)
_N_FIELDS = len(FIELDS)
LLTF_VALUES = 128  # 64 subcarriers x (imag, real)
LLTF_SUBCARRIERS: tuple[int, ...] = (*range(0, 32), *range(-32, 0))
DEFAULT_BAUD = 921600
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_UINT32 = 1 << 32
_SERIAL_READ_TIMEOUT_S = 0.05  # short, so an idle timeout can be honoured while blocked


@dataclass(frozen=True, slots=True)
class Esp32Frame:
    """One parsed ``CSI_DATA`` line. ``values`` is the printed buffer as int8."""

    role: str
    mac: str  # lower case, "3c:71:bf:6d:2a:78"
    rssi: int
    rate: int
    sig_mode: int
    mcs: int
    bandwidth: int  # cwb: 0 = 20 MHz, 1 = 40 MHz
    smoothing: int
    not_sounding: int
    aggregation: int
    stbc: int
    fec_coding: int
    sgi: int
    noise_floor: int
    ampdu_cnt: int
    channel: int
    secondary_channel: int  # 0 none, 1 above, 2 below
    local_timestamp: int  # µs, uint32 (wraps)
    ant: int
    sig_len: int
    rx_state: int
    real_time_set: bool
    real_timestamp: float  # seconds
    len: int  # bytes in wifi_csi_info_t.buf
    values: np.ndarray  # (n,) int8, n == len or 128
    host_timestamp: float | None = None  # appended by serial_append_time.py

    def lltf(self) -> np.ndarray:
        """The LLTF as (64,) complex64, columns ``LLTF_SUBCARRIERS`` (FFT order)."""
        iq = self.values[:LLTF_VALUES].astype(np.float32).reshape(64, 2)
        csi = (iq[:, 1] + 1j * iq[:, 0]).astype(np.complex64)
        return np.roll(csi, 32) if self.secondary_channel else csi


class Esp32LineParser:
    """Parse ``CSI_DATA`` lines. :meth:`parse` is pure; :meth:`feed` also counts drops.

    The only state is bookkeeping for :meth:`feed`: lines seen, frames parsed, drops by
    reason and the first problem of each reason (with its line number) for messages.
    """

    def __init__(self) -> None:
        self.lines = 0
        self.frames = 0
        self.dropped = DropCounter()
        self.first_problem: dict[str, str] = {}

    @staticmethod
    def is_header(line: str) -> bool:
        """True for the column header the tool prints at start-up."""
        return line.strip().startswith("type,role,mac,")

    def parse(self, line: str) -> Esp32Frame:
        """One line to a frame; :class:`MalformedPacketError` says why it is not one."""
        text = line.strip()
        if not text.startswith("CSI_DATA"):
            if "CSI_DATA" in text:
                # Serial output interleaved with a log line, or two lines run together.
                raise MalformedPacketError(
                    "garbled_line", f"CSI_DATA at column {text.index('CSI_DATA')}: {_clip(text)!r}"
                )
            raise MalformedPacketError("not_csi_line", f"{_clip(text)!r}")
        if "\ufffd" in text:
            raise MalformedPacketError("bad_encoding", f"invalid UTF-8 in {_clip(text)!r}")
        fields = text.split(",")
        if len(fields) not in (_N_FIELDS, _N_FIELDS + 1):
            # Cut short (a partial last line, a lost serial chunk) vs another layout.
            cut = len(fields) < _N_FIELDS and not text.endswith("]")
            raise MalformedPacketError(
                "truncated" if cut else "field_count",
                f"{len(fields)} comma-separated fields, expected {_N_FIELDS} "
                f"(or {_N_FIELDS + 1} with a host timestamp): {_clip(text)!r}",
            )
        if fields[0] != "CSI_DATA":
            raise MalformedPacketError("bad_field", f"type is {fields[0]!r}, not 'CSI_DATA'")
        mac = fields[2].strip()
        if not _MAC_RE.match(mac):
            raise MalformedPacketError("bad_field", f"mac {mac!r} is not aa:bb:cc:dd:ee:ff")
        ints: dict[str, int] = {}
        for i, name in _INT_FIELDS:
            try:
                ints[name] = int(fields[i])
            except ValueError:
                raise MalformedPacketError(
                    "bad_field", f"{name} is {fields[i]!r}, not an integer"
                ) from None
        real_timestamp = _parse_float(fields[23], "real_timestamp")
        host_timestamp = (
            _parse_float(fields[26], "host timestamp") if len(fields) > _N_FIELDS else None
        )
        values = _parse_csi(fields[25], ints["len"])
        real_time_set = ints.pop("real_time_set") == 1
        # Old builds print the uint32 µs clock with %d: bring it back into [0, 2^32).
        local_timestamp = ints.pop("local_timestamp") % _UINT32
        return Esp32Frame(
            role=fields[1].strip(),
            mac=mac.lower(),
            real_time_set=real_time_set,
            real_timestamp=real_timestamp,
            local_timestamp=local_timestamp,
            values=values,
            host_timestamp=host_timestamp,
            **ints,
        )

    def feed(self, line: str) -> Esp32Frame | None:
        """Parse one line; header and blank lines give None uncounted, bad lines None counted."""
        self.lines += 1
        if not line.strip() or self.is_header(line):
            return None
        try:
            frame = self.parse(line)
        except MalformedPacketError as exc:
            self.dropped[exc.reason] += 1
            self.first_problem.setdefault(exc.reason, f"line {self.lines}: {exc.detail}")
            return None
        self.frames += 1
        return frame


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_float(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MalformedPacketError("bad_field", f"{name} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise MalformedPacketError("bad_field", f"{name} is {text!r}, not finite")
    return value


def _parse_csi(field: str, length: int) -> np.ndarray:
    body = field.strip()
    if not body.startswith("["):
        raise MalformedPacketError("bad_csi", f"CSI_DATA {_clip(body)!r} does not start with '['")
    if not body.endswith("]"):
        raise MalformedPacketError(
            "truncated", f"CSI_DATA has no closing ']' (ends {body[-20:]!r})"
        )
    tokens = body[1:-1].split()
    try:
        raw = np.array(tokens, dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not _is_int(t))
        raise MalformedPacketError(
            "bad_csi_value", f"CSI value {bad!r} is not an integer"
        ) from None
    n = raw.size
    # The tool prints all ``len`` bytes, or only the LLTF's 128 of a longer buffer.
    if n != length and not (n == LLTF_VALUES and length >= LLTF_VALUES):
        raise MalformedPacketError(
            "len_mismatch", f"len is {length} but CSI_DATA holds {n} values"
        )
    if n % 2:
        raise MalformedPacketError("odd_count", f"{n} CSI values: not (imaginary, real) pairs")
    if n < LLTF_VALUES:
        raise MalformedPacketError(
            "short_csi", f"{n} CSI values: fewer than the LLTF's {LLTF_VALUES} (64 subcarriers)"
        )
    if raw.min() < -128 or raw.max() > 255:
        bad_value = int(raw[np.argmax((raw < -128) | (raw > 255))])
        raise MalformedPacketError(
            "bad_csi_value", f"CSI value {bad_value} is outside int8/uint8 [-128, 255]"
        )
    # Two's complement covers both printings: -1 and 255 are the same byte (the cast to
    # uint8 keeps the low 8 bits).
    return raw.astype(np.uint8).view(np.int8)


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def decode_line(raw: bytes) -> str:
    """Bytes of one line to text; invalid UTF-8 becomes U+FFFD (the parser counts it)."""
    return raw.decode("utf-8", errors="replace").rstrip("\r\n")


def parse_lines(
    lines: Iterable[str], parser: Esp32LineParser | None = None
) -> Iterator[Esp32Frame]:
    """The frames among ``lines``; drops are counted in ``parser.dropped``."""
    parser = parser or Esp32LineParser()
    for line in lines:
        frame = parser.feed(line)
        if frame is not None:
            yield frame


_T = TypeVar("_T")


def _majority(values: Sequence[_T]) -> _T:
    # Counter.most_common keeps first-seen order among ties: the earliest wins.
    return Counter(values).most_common(1)[0][0]


def _unwrap_uint32(ticks: np.ndarray) -> np.ndarray:
    """A wrapping 32-bit counter made monotonic: a backward step over half the range is a wrap."""
    steps = np.diff(ticks)
    wraps = np.concatenate(([0], np.cumsum(steps < -(_UINT32 // 2))))
    unwrapped: np.ndarray = ticks + wraps * _UINT32
    return unwrapped


def frames_from_records(
    records: Sequence[Esp32Frame],
    source: str,
    mac: str | None = None,
    dropped: DropCounter | None = None,
    fmt: str = "esp32-csv",
) -> CSIFrames:
    """One stream (a transmitter, a channel, a CSI layout) from parsed frames.

    ``mac`` None keeps the transmitter with most frames. Drops are counted, in the order
    tested: ``other_transmitter``, ``other_channel``, ``other_layout`` (another
    secondary-channel position or buffer length, i.e. another packet type).

    Timestamps come from ``local_timestamp`` (µs, unwrapped): it is the precise clock. When
    ``real_time_set`` is 1 on any kept frame, they are shifted onto ``real_timestamp`` by
    the median offset of those frames, so they read as the device's real time while
    keeping microsecond spacing (``real_timestamp`` itself is coarse or mis-printed in
    some builds, see the module docstring).
    """
    dropped = DropCounter(dropped or {})
    if not records:
        raise EmptyRecordingError(source, f"no CSI_DATA frame ({dropped.as_dict()})")
    macs = np.array([r.mac for r in records])
    given = None if mac is None else mac.strip().lower().replace("-", ":")
    wanted = given or str(_majority(macs.tolist()))
    keep = macs == wanted
    if not keep.any():
        seen = dict(Counter(macs.tolist()).most_common())
        raise EmptyRecordingError(
            source, f"no frame from transmitter {wanted}; transmitters seen: {seen}"
        )
    dropped["other_transmitter"] += int((~keep).sum())

    channel = np.array([r.channel for r in records])
    main_channel = int(_majority(channel[keep].tolist()))
    same = channel == main_channel
    dropped["other_channel"] += int((keep & ~same).sum())
    keep &= same

    layout = [(r.secondary_channel, r.len) for r in records]
    idx = np.flatnonzero(keep)
    secondary, length = _majority([layout[i] for i in idx])
    same_layout = np.array([lay == (secondary, length) for lay in layout])
    dropped["other_layout"] += int((keep & ~same_layout).sum())
    keep &= same_layout
    idx = np.flatnonzero(keep)
    kept = [records[i] for i in idx]

    values = np.stack([r.values[:LLTF_VALUES] for r in kept]).astype(np.float32)
    iq = values.reshape(len(kept), 64, 2)
    csi = (iq[..., 1] + 1j * iq[..., 0]).astype(np.complex64)
    if secondary:
        csi = np.roll(csi, 32, axis=1)  # ascending -32..31 -> FFT order 0..31, -32..-1

    local = _unwrap_uint32(np.array([r.local_timestamp for r in kept], dtype=np.int64))
    timestamp = local.astype(np.float64) / 1e6
    real_set = np.array([r.real_time_set for r in kept])
    clock = "local_timestamp"
    if real_set.any():
        real = np.array([r.real_timestamp for r in kept], dtype=np.float64)
        timestamp = timestamp + float(np.median(real[real_set] - timestamp[real_set]))
        clock = "real_timestamp (offset), local_timestamp (spacing)"

    info = RadioInfo(
        device="esp32",
        subcarriers=LLTF_SUBCARRIERS,
        channel=main_channel,
        bandwidth_mhz=20,  # the LLTF spans the primary 20 MHz channel
        transmitter=wanted,
        rssi_is_real=True,
        extra={
            "role": _majority([r.role for r in kept]),
            "secondary_channel": int(secondary),
            "csi_len": int(length),
            "sig_mode": _majority([r.sig_mode for r in kept]),
            "ltf": "lltf",
            "first_word_invalid_subcarriers": (-32, -31) if secondary else (0, 1),
            "timestamps": clock,
        },
    )
    return CSIFrames(
        timestamp=timestamp,
        csi=csi[:, None, :],
        info=info,
        format=fmt,
        source=source,
        rssi=np.array([r.rssi for r in kept], dtype=np.float32),
        seq=None,
        dropped=dropped,
    )


def read_esp32_csv(path: str | Path, mac: str | None = None) -> CSIFrames:
    """One ESP32 stream from an ESP32-CSI-Tool capture (majority transmitter unless ``mac``)."""
    path = Path(path)
    raw = read_file_bytes(path, "an ESP32-CSI-Tool capture")
    if not raw.strip():
        raise EmptyRecordingError(path, "empty file (no lines)")
    parser = Esp32LineParser()
    records = list(parse_lines((decode_line(line) for line in raw.splitlines()), parser))
    dropped = DropCounter(parser.dropped)
    if not records:
        csi_lines = sum(v for k, v in dropped.items() if k != "not_csi_line")
        if not csi_lines:
            raise FormatError(
                path, f"no CSI_DATA line among {parser.lines} lines (not an ESP32-CSI-Tool log?)"
            )
        first = "; ".join(f"{k}: {v}" for k, v in parser.first_problem.items())
        raise EmptyRecordingError(
            path, f"no valid CSI_DATA line among {parser.lines} lines "
            f"(dropped: {dropped.as_dict()}; first problems: {first})",
        )
    return frames_from_records(records, str(path), mac=mac, dropped=dropped)


def open_serial(url: str, baud: int | None = None) -> serial.SerialBase:
    """Open ``esp32-serial:///dev/ttyUSB0?baud=921600`` or any pyserial URL (``loop://``)."""
    try:
        import serial
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "reading an ESP32 serial port needs pyserial: pip install 'csi-pipeline[edge]'"
        ) from exc
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "esp32-serial":
        port = parts.netloc + parts.path  # netloc holds "COM3" on Windows-style URLs
        if not port:
            raise FormatError(url, "no serial device in URL (esp32-serial:///dev/ttyUSB0)")
        target = port
    elif parts.scheme:
        target = url  # pyserial's own URL handlers: loop://, socket://, rfc2217://, ...
    else:
        raise FormatError(url, "not a serial URL; use esp32-serial:///dev/ttyUSB0?baud=921600")
    if baud is None:
        text = query.get("baud", [str(DEFAULT_BAUD)])[0]
        try:
            baud = int(text)
        except ValueError:
            raise FormatError(url, f"baud {text!r} is not an integer") from None
    try:
        return serial.serial_for_url(target, baudrate=baud, timeout=_SERIAL_READ_TIMEOUT_S)
    except (serial.SerialException, ValueError) as exc:
        raise FormatError(url, f"cannot open serial port: {exc}") from exc


def iter_lines(
    url: str, *, idle_timeout_s: float | None = None, port: serial.SerialBase | None = None
) -> Iterator[str]:
    """Text lines from ``stdin`` (or ``-``) or a serial URL, until EOF or ``idle_timeout_s``.

    A serial port has no end: the generator runs until the caller stops, or until no byte
    arrived for ``idle_timeout_s`` seconds. An already open ``port`` (pyserial) may be
    passed instead of opening ``url``; it is left open. Invalid UTF-8 becomes U+FFFD.
    """
    if port is None and url in ("stdin", "-", "stdin://"):
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # stdin replaced by a text object (embedding, tests)
            for text in sys.stdin:
                yield text.rstrip("\r\n")
            return
        for raw in stream:
            yield decode_line(raw)
        return
    own = port is None
    if port is None:
        port = open_serial(url)
    try:
        yield from _serial_lines(port, idle_timeout_s)
    finally:
        if own:
            port.close()


def _serial_lines(port: serial.SerialBase, idle_timeout_s: float | None) -> Iterator[str]:
    buffer = bytearray()
    last_data = time.monotonic()
    while True:
        chunk = port.read(max(1, port.in_waiting))
        if chunk:
            last_data = time.monotonic()
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                yield decode_line(line)
        elif idle_timeout_s is not None and time.monotonic() - last_data >= idle_timeout_s:
            break
    if buffer:
        yield decode_line(bytes(buffer))  # an unterminated last line: the parser judges it
