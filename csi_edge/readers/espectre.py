"""ESPectre ``.npz`` recordings: ESP32-family CSI buffers of HT20 frames, one file per recording.

ESPectre (github.com/francescopace/espectre) saves what its ESP32 firmware streamed over UDP
as a numpy archive (``np.savez_compressed``, read here with ``allow_pickle=False``)::

  csi_data          int8 (packets, 2 * num_subcarriers): the CSI buffer of each packet
  num_subcarriers   int, 64 (HT20)
  label             str, e.g. "baseline" (quiet room) or "movement"
  chip              str, "esp32", "s3", "c5", "c6", ...
  collected_at      str, ISO time the file was saved (host local time, no zone)
  duration_ms       float, host receive time of the last packet minus that of the first
  format_version    str, "1.0"
  gain_locked       bool, AGC gain locked during the capture (the original ESP32 cannot)

There are **no per-packet timestamps**. Packets are spaced evenly: ``duration_ms / (packets
- 1)`` apart (the duration spans first to last packet), so the rate is ``(packets - 1) /
duration``. The last packet is placed at ``collected_at`` read as UTC (the file does not say
which zone its clock was in; replays shift times to now anyway).

Buffer layout (ESP-IDF ``api-guides/wifi-driver/wifi-vendor-features.rst``, "Wi-Fi Channel
State Information"): two bytes per subcarrier, **imaginary part first, then real part**. The
order of the subcarriers depends on the chip generation, and is checked against the data:

- classic MAC (ESP32, ESP32-S2/S3, ESP32-C3), secondary channel none: ``0..31, -32..-1``
  (FFT order, DC in column 0; columns 30..34, subcarriers 30..-30, are zero). ESP-IDF's
  ``first_word_invalid`` says the first four bytes, subcarriers 0 and 1, can be invalid (a
  hardware limitation); the ESPectre files of the original ESP32 hold a constant there
  (|H| 126 and 10 against ~45 around). The files store no flag, so both are always named
  invalid. The guard tones beyond ±29 are zero.
- ESP32-C5/C6 (``wifi_csi_acquire_config_t``, HT-LTF of an HT20 frame): 57 subcarriers
  -28..28 (114 bytes), which ESPectre pads to 64 with 4 zero subcarriers in front and 3
  behind. ESP-IDF's C5 table lists this buffer as ``0~28, -28~-1``, but the recordings say
  ascending order: the column that is zero in every packet is column 32 (the DC, subcarrier
  0 of an ascending -32..31 grid), and the coherence of the two ends of the band (columns
  4 and 60, adjacent under the documented order) is 0.70 against 0.99 for columns eight
  apart across the middle. So these buffers are read as -32..31; subcarriers -28 and -27
  (the buffer's first word) are named invalid.

The layout is taken from the data (where the all-zero columns are), and the chip named in
the file must agree. Frames come out in FFT order (``0..31, -32..-1``), the column order of
every other ESP32 stream of this project (:data:`csi_edge.readers.esp32.LLTF_SUBCARRIERS`),
so one ESP32 stream has one layout whatever the chip.
"""

from __future__ import annotations

import math
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import EmptyRecordingError, FormatError
from ..frames import CSIFrames, DropCounter, RadioInfo
from ..limits import check_declared
from .esp32 import LLTF_SUBCARRIERS

__all__ = ["CLASSIC_CHIPS", "HE_CHIPS", "NPZ_KEYS", "read_espectre_npz"]

NPZ_KEYS = ("csi_data", "num_subcarriers", "duration_ms")
# Chips with the classic Wi-Fi MAC (FFT-order buffers) and the Wi-Fi 6 ones (acquire config).
CLASSIC_CHIPS = frozenset({"esp32", "s2", "s3", "c3", "esp32s2", "esp32s3", "esp32c3"})
HE_CHIPS = frozenset({"c5", "c6", "c61", "esp32c5", "esp32c6", "esp32c61"})
_SUBCARRIERS = 64
# FFT-order guard columns that are zero in an HT20 buffer: subcarriers 30, 31 and -32..-30
# (the original ESP32 fills ±29 too; the S3 leaves them zero).
_FFT_GUARD = np.array([30, 31, 32, 33, 34])
# Ascending-order columns that are zero: the padding (-32..-29, 29..31) and the DC (0).
_ASCENDING_ZERO = np.array([0, 1, 2, 3, 32, 61, 62, 63])


def _scalar(archive: Any, key: str, path: Path) -> Any:
    value = archive[key]
    if value.ndim != 0:
        raise FormatError(path, f"{key} must be a scalar, got an array of shape {value.shape}")
    return value.item()


def _layout(csi: np.ndarray, chip: str | None, path: Path) -> str:
    """``"fft"`` or ``"ascending"``, from the columns that are zero in (almost) every packet."""
    zero = (np.abs(csi) == 0).mean(axis=0) > 0.95
    fft = bool(zero[_FFT_GUARD].all())
    ascending = bool(zero[_ASCENDING_ZERO].all()) and not fft
    if not (fft or ascending):
        raise FormatError(path, "unknown ESP32 buffer layout: no zero guard columns where "
                          "either the FFT order (30..34) or the padded ascending order "
                          f"(0-3, 32, 61-63) has them; all-zero columns: "
                          f"{np.flatnonzero(zero).tolist()}")
    layout = "fft" if fft else "ascending"
    expected = "fft" if chip in CLASSIC_CHIPS else "ascending" if chip in HE_CHIPS else None
    if expected is not None and layout != expected:
        raise FormatError(path, f"chip {chip!r} records {expected}-order buffers, but the "
                          f"zero columns say {layout} order")
    return layout


def _check_npz_sizes(path: Path) -> None:
    """The archive's declared sizes against the decoded-byte limit, before numpy reads it:
    the uncompressed size of every member (a deflate bomb) and the shape in each ``.npy``
    header (numpy allocates the array from it before reading the data)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            check_declared(path, f"the archive's {len(members)} members uncompressed",
                           (sum(m.file_size for m in members),), 1)
            for member in members:
                if not member.filename.endswith(".npy"):
                    continue
                with zf.open(member) as fh:
                    # numpy.lib.format is not annotated, and its stub lacks max_header_size.
                    version = np.lib.format.read_magic(fh)  # type: ignore[no-untyped-call]
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(  # type: ignore[no-untyped-call, call-arg]
                        fh, max_header_size=4096)
                check_declared(path, f"array {member.filename[:-4]!r} {shape} {dtype}",
                               shape, dtype.itemsize)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FormatError(path, f"not a readable numpy .npz archive: {exc}") from exc


def read_espectre_npz(path: str | Path) -> CSIFrames:
    """One ESPectre recording as ``(N, 1, 64)`` complex64 CSI in FFT order (see the module)."""
    path = Path(path)
    _check_npz_sizes(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FormatError(path, f"not a readable numpy .npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise FormatError(path, "a single numpy array, not an .npz archive of named arrays")
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise FormatError(path, f"not an ESPectre recording: no {missing} among "
                              f"{sorted(archive.files)}")
        try:
            raw = archive["csi_data"]
            n_sub = _scalar(archive, "num_subcarriers", path)
            duration_ms = _scalar(archive, "duration_ms", path)
            meta = {k: _scalar(archive, k, path) for k in
                    ("label", "chip", "collected_at", "format_version", "gain_locked")
                    if k in archive.files}
        except (ValueError, zipfile.BadZipFile, EOFError) as exc:  # a damaged member
            raise FormatError(path, f"cannot read the archive's arrays: {exc}") from exc
    if raw.dtype != np.int8 or raw.ndim != 2:
        raise FormatError(path, f"csi_data must be a 2-D int8 array, got {raw.dtype} "
                          f"{raw.shape}")
    if n_sub != _SUBCARRIERS or raw.shape[1] != 2 * _SUBCARRIERS:
        raise FormatError(path, f"num_subcarriers {n_sub!r} with csi_data of width "
                          f"{raw.shape[1]}: only HT20 buffers of {_SUBCARRIERS} subcarriers "
                          f"({2 * _SUBCARRIERS} values) are known")
    packets = raw.shape[0]
    if packets < 2:
        raise EmptyRecordingError(path, f"{packets} packet(s): at least 2 are needed to know "
                                  "the rate")
    if (isinstance(duration_ms, bool) or not isinstance(duration_ms, int | float)
            or not math.isfinite(duration_ms) or duration_ms <= 0):
        raise FormatError(path, f"duration_ms {duration_ms!r} is not a positive number")
    chip = str(meta["chip"]).lower() if "chip" in meta else None
    iq = raw.astype(np.float32).reshape(packets, _SUBCARRIERS, 2)
    csi = (iq[..., 1] + 1j * iq[..., 0]).astype(np.complex64)  # (imaginary, real) pairs
    layout = _layout(csi, chip, path)
    if layout == "ascending":
        csi = np.roll(csi, -32, axis=1)  # -32..31 -> FFT order 0..31, -32..-1
        invalid = (-28, -27)
    else:
        invalid = (0, 1)

    step = duration_ms / 1000 / (packets - 1)
    end = _collected_at(meta.get("collected_at"), path)
    timestamp = end - step * np.arange(packets - 1, -1, -1, dtype=np.float64)
    gain_locked = meta.get("gain_locked")
    info = RadioInfo(
        device="esp32",
        subcarriers=LLTF_SUBCARRIERS,
        chip=chip,
        bandwidth_mhz=20,
        extra={
            "ltf": "ht-ltf",
            "buffer_order": "0..31, -32..-1 (FFT order)" if layout == "fft" else
                            "-32..31 (ascending, 57 subcarriers padded 4 + 3)",
            "first_word_invalid_subcarriers": invalid,
            "gain_locked": None if gain_locked is None else bool(gain_locked),
            "label": meta.get("label"),
            "collected_at": meta.get("collected_at"),
            "format_version": meta.get("format_version"),
            "timestamps": "evenly spaced from duration_ms (no per-packet times), last "
                          "packet at collected_at read as UTC",
        },
    )
    return CSIFrames(timestamp=timestamp, csi=csi[:, None, :], info=info,
                     format="espectre-npz", source=str(path), rssi=None, seq=None,
                     dropped=DropCounter())


def _collected_at(value: object, path: Path) -> float:
    """Epoch seconds of ``collected_at`` read as UTC; 0.0 when the file has none."""
    if value is None:
        return 0.0
    try:
        stamp = datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise FormatError(path, f"collected_at {value!r} is not an ISO time") from exc
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()
