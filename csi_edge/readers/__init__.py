"""Readers for real CSI formats behind one interface: ``read_recording(path) -> CSIFrames``.

Formats are recognised by content where the file says what it is (pcap magic, HDF5
signature, ``CSI_DATA`` lines, MAT header, a zip archive named ``.npz``) and by suffix
otherwise (Intel 5300 ``.dat``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .._errors import FormatError, UnsupportedFormatError
from ..frames import CSIFrames

__all__ = ["FORMATS", "detect_format", "read_recording"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy files
_PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")


def _read_nexmon(path: Path, **options: object) -> CSIFrames:
    from .nexmon import read_nexmon_pcap

    return read_nexmon_pcap(path, **options)  # type: ignore[arg-type]


def _read_intel(path: Path, **options: object) -> CSIFrames:
    from .intel5300 import read_intel5300_dat

    return read_intel5300_dat(path, **options)


def _read_esp32(path: Path, **options: object) -> CSIFrames:
    from .esp32 import read_esp32_csv

    return read_esp32_csv(path, **options)  # type: ignore[arg-type]


def _read_ntufi(path: Path, **options: object) -> CSIFrames:
    from .ntufi import read_ntufi_mat

    return read_ntufi_mat(path, **options)  # type: ignore[arg-type]


def _read_espectre(path: Path, **options: object) -> CSIFrames:
    from .espectre import read_espectre_npz

    return read_espectre_npz(path, **options)


def _read_hdf5(path: Path, **options: object) -> CSIFrames:
    from ..recording import read_recording_file

    return read_recording_file(path, **options)


FORMATS: dict[str, Callable[..., CSIFrames]] = {
    "nexmon-pcap": _read_nexmon,
    "intel5300-dat": _read_intel,
    "esp32-csv": _read_esp32,
    "ntu-fi-mat": _read_ntufi,
    "espectre-npz": _read_espectre,
    "hdf5": _read_hdf5,
}
SUFFIXES = {".pcap": "nexmon-pcap", ".dat": "intel5300-dat", ".csv": "esp32-csv",
            ".mat": "ntu-fi-mat", ".npz": "espectre-npz", ".h5": "hdf5", ".hdf5": "hdf5"}


def detect_format(path: str | Path) -> str:
    """The format name of a file, from its first bytes, else its suffix."""
    path = Path(path)
    if path.is_dir():
        raise FormatError(path, "is a folder, not a recording file")
    try:
        with path.open("rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise FormatError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not head:
        raise FormatError(path, "empty file (0 bytes)")
    if head[:4] in _PCAP_MAGICS:
        return "nexmon-pcap"
    if head[:8] == _HDF5_SIGNATURE:
        return "hdf5"
    if head.startswith(b"MATLAB"):
        return "ntu-fi-mat"
    if b"CSI_DATA" in head:
        return "esp32-csv"
    suffix = path.suffix.lower()
    if head[:4] == _ZIP_MAGIC and suffix == ".npz":
        return "espectre-npz"
    if suffix == ".dat":
        return "intel5300-dat"
    if suffix in SUFFIXES:
        raise FormatError(
            path, f"suffix {suffix!r} says {SUFFIXES[suffix]} but the content does not "
            f"(starts with {head[:8].hex()})"
        )
    raise UnsupportedFormatError(
        path, f"unrecognised format (suffix {suffix or 'none'!r}, starts with {head[:8].hex()}); "
        f"supported: {', '.join(FORMATS)}"
    )


def read_recording(path: str | Path, format: str | None = None, **options: object) -> CSIFrames:
    """Read one recording of any supported format into :class:`CSIFrames`."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise UnsupportedFormatError(
            path, f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}"
        )
    return FORMATS[fmt](path, **options)
