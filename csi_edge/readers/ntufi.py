"""NTU-Fi HAR and NTU-Fi Human-ID ``.mat`` files (Yang et al., SenseFi benchmark).

Sources: the SenseFi loader (github.com/xyanchen/WiFi-CSI-Sensing-Benchmark, ``dataset.py``)
reads ``scipy.io.loadmat(f)["CSIamp"]``, keeps every 4th column (2000 -> 500) and reshapes
to ``(3, 114, 500)``; its README gives the NTU-Fi CSI size as 3 x 114 x 500 after that
downsampling. EfficientFi (Yang et al., IEEE IoT-J 2022, arXiv 2204.04138), the paper the
NTU-Fi HAR data comes from, states the raw stream as 1.368 Mb/s = 342 values x 8 bit x
500 packets/s, so a file's 2000 packets span 4 s at a nominal 500 Hz.

Layout of a file:
  CSIamp   (342, T) float, T = 2000 in the published files: rows are 3 receive antennas
           x 114 subcarriers, antenna-major (row = antenna * 114 + subcarrier), as the
           SenseFi reshape implies; columns are packets. ``(3, 114, T)`` is accepted too.
  others   ``__header__`` etc. from MATLAB; some releases also carry ``CSIphase``.
The values are amplitudes only (no phase, no complex CSI); SenseFi normalises them with
mean 42.3199 and std 4.9802. The 114 columns are the tones of an HT40 channel (-58..-2,
2..58), which is what the Atheros CSI Tool reports at 40 MHz; they are taken to be in
ascending order.

The files carry **no timestamps, RSSI, channel or MAC**: timestamps are synthesised at
``rate_hz`` (default :data:`NOMINAL_RATE_HZ`) from 0, and ``info.extra["timestamps"]`` says
``"synthesised"``. Non-finite amplitudes are kept (preprocessing repairs them) and counted
in ``dropped["nonfinite_values"]`` (values, not frames).

MAT v5 files are read with :func:`scipy.io.loadmat`; MAT v7.3 files (HDF5 with a 512-byte
MATLAB header) with h5py, whose arrays come back with the axes reversed (MATLAB is
column-major), so they are transposed back to MATLAB's shape first. Before either allocates,
the declared array shape and (v5) the decompressed size of every compressed variable are
checked against the decoded-byte limit (:mod:`csi_edge.limits`).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import scipy.io

from .._errors import EmptyRecordingError, FormatError
from ..band import LAYOUTS
from ..frames import CSIFrames, DropCounter, RadioInfo
from ..limits import DeclaredSizeError, check_declared, max_decoded_bytes

__all__ = ["ANTENNAS", "NOMINAL_RATE_HZ", "SUBCARRIERS", "VARIABLE", "read_ntufi_mat"]

NOMINAL_RATE_HZ = 500.0  # EfficientFi: 1.368 Mb/s / (342 values x 8 bit)
ANTENNAS = 3
SUBCARRIERS: tuple[int, ...] = LAYOUTS["ht-40"].tones  # 114 tones of a 40 MHz channel
VARIABLE = "CSIamp"
_ROWS = ANTENNAS * len(SUBCARRIERS)  # 342
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MI_COMPRESSED = 15  # MAT v5 data type of a zlib-compressed element
_MAT_CLASS_BYTES = {"double": 8, "single": 4, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2,
                    "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "logical": 1}


def _check_mat5_sizes(path: Path) -> None:
    """Walk a MAT v5 file's top-level elements and count the bytes they decode to, refusing
    the file as soon as the count passes the decoded-byte limit.

    scipy allocates a compressed element's content from the byte count inside it, which a
    zlib bomb sets to gigabytes behind a few hundred kilobytes. The compressed streams are
    inflated here in bounded steps and thrown away: at most the limit is ever decompressed,
    and nothing is kept.
    """
    limit = max_decoded_bytes()
    total = 0
    with path.open("rb") as fh:
        header = fh.read(128)
        order = {b"IM": "<", b"MI": ">"}.get(header[126:128])
        if len(header) < 128 or order is None:
            return  # not MAT v5: scipy says what it is
        while True:
            tag = fh.read(8)
            if len(tag) < 8:
                return
            mdtype, nbytes = struct.unpack(order + "II", tag)
            if mdtype != _MI_COMPRESSED:
                total += nbytes  # stored as is: bounded by the file itself
                fh.seek(nbytes, 1)
                continue
            inflate = zlib.decompressobj()
            left = nbytes
            while left > 0 and not inflate.eof:
                chunk = fh.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
                while chunk and not inflate.eof:
                    try:
                        out = inflate.decompress(chunk, 1 << 20)
                    except zlib.error as exc:
                        raise FormatError(path, f"corrupt compressed variable: {exc}") from exc
                    total += len(out)
                    if total > limit:
                        raise DeclaredSizeError(path, "the MAT file's compressed variables",
                                                total, limit, stopped=True)
                    chunk = inflate.unconsumed_tail
            fh.seek(left, 1)


def _load_variables(path: Path) -> tuple[dict[str, object], str]:
    """User variables of a MAT file and its version. Only ``CSIamp`` is read; the other
    variables are listed by name (value: their MATLAB class) for messages."""
    with path.open("rb") as fh:
        head = fh.read(520)
    if head[512:520] == _HDF5_SIGNATURE or head[:8] == _HDF5_SIGNATURE:
        out: dict[str, object] = {}
        try:
            with h5py.File(path, "r") as f:
                for name in f:
                    if name.startswith("#"):  # "#refs#", "#subsystem#": MATLAB internals
                        continue
                    obj = f[name]
                    if name == VARIABLE and isinstance(obj, h5py.Dataset):
                        # Checked before reading: a chunked dataset may declare any shape.
                        check_declared(path, f"variable {VARIABLE} {obj.shape} {obj.dtype}",
                                       obj.shape, obj.dtype.itemsize + 4)
                        out[name] = np.asarray(obj[()]).T
                    else:
                        cls = obj.attrs.get("MATLAB_class", b"?")
                        out[name] = cls.decode() if isinstance(cls, bytes) else str(cls)
        except OSError as exc:
            raise FormatError(path, f"cannot read MAT v7.3 (HDF5) file: {exc}") from exc
        return out, "7.3"
    _check_mat5_sizes(path)
    try:
        headers = scipy.io.whosmat(path)
        listed = {name: cls for name, _shape, cls in headers}
        for name, shape, cls in headers:
            if name == VARIABLE:  # its float32 copy too
                check_declared(path, f"variable {VARIABLE} {shape} {cls}", shape,
                               _MAT_CLASS_BYTES.get(cls, 8) + 4)
        if VARIABLE in listed:
            listed.update(scipy.io.loadmat(path, variable_names=[VARIABLE]))
    except NotImplementedError as exc:
        raise FormatError(path, f"MAT version not supported by scipy: {exc}") from exc
    except (ValueError, TypeError, OSError) as exc:
        raise FormatError(path, f"cannot read MAT file: {exc}") from exc
    return {k: v for k, v in listed.items() if not k.startswith("__")}, "5"


def _to_frames_first(path: Path, amp: np.ndarray) -> np.ndarray:
    """(342, T) or (3, 114, T) -> (T, 3, 114)."""
    n_sub = len(SUBCARRIERS)
    if amp.ndim == 2 and amp.shape[0] == _ROWS:
        return amp.reshape(ANTENNAS, n_sub, amp.shape[1]).transpose(2, 0, 1)
    if amp.ndim == 3 and amp.shape[:2] == (ANTENNAS, n_sub):
        return amp.transpose(2, 0, 1)
    hint = ""
    if amp.ndim == 2 and amp.shape[1] == _ROWS:
        hint = " (transposed? packets must be the last axis)"
    raise FormatError(
        path,
        f"{VARIABLE} has shape {tuple(amp.shape)}; expected ({_ROWS}, T) = {ANTENNAS} antennas "
        f"x {n_sub} subcarriers stacked, or ({ANTENNAS}, {n_sub}, T){hint}",
    )


def read_ntufi_mat(path: str | Path, rate_hz: float = NOMINAL_RATE_HZ) -> CSIFrames:
    """One NTU-Fi sample: ``csi`` (T, 3, 114) float32 amplitude, timestamps synthesised."""
    path = Path(path)
    if not (isinstance(rate_hz, int | float) and math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a positive number, got {rate_hz!r}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FormatError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise EmptyRecordingError(path, "empty file (0 bytes)")
    variables, version = _load_variables(path)
    if VARIABLE not in variables:
        found = ", ".join(sorted(variables)) or "none"
        raise FormatError(path, f"no {VARIABLE!r} variable (variables found: {found})")
    raw = variables[VARIABLE]
    if not isinstance(raw, np.ndarray) or raw.dtype.kind not in "fiu":
        kind = raw.dtype if isinstance(raw, np.ndarray) else raw
        raise FormatError(path, f"{VARIABLE} is {kind}, not a numeric array")
    csi = np.ascontiguousarray(_to_frames_first(path, raw), dtype=np.float32)
    if csi.shape[0] == 0:
        raise EmptyRecordingError(path, f"{VARIABLE} has shape {tuple(raw.shape)}: no packets")
    dropped = DropCounter()
    nonfinite = int(np.count_nonzero(~np.isfinite(csi)))
    if nonfinite:
        dropped["nonfinite_values"] += nonfinite
    info = RadioInfo(
        device="ntu-fi",
        subcarriers=SUBCARRIERS,
        chip=None,  # the files do not say; SenseFi names the Atheros CSI Tool platform
        bandwidth_mhz=40,
        rssi_is_real=False,
        extra={
            "timestamps": "synthesised",
            "rate_hz": float(rate_hz),
            "platform": "Atheros CSI Tool",
            "amplitude_only": True,
            "mat_version": version,
            "other_variables": sorted(k for k in variables if k != VARIABLE),
        },
    )
    return CSIFrames(
        timestamp=np.arange(csi.shape[0], dtype=np.float64) / float(rate_hz),
        csi=csi,
        info=info,
        format="ntu-fi-mat",
        source=str(path),
        rssi=None,
        seq=None,
        dropped=dropped,
    )
