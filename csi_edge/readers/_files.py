"""Reading a recording file's bytes with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from .._errors import FormatError

__all__ = ["read_file_bytes"]


def read_file_bytes(path: Path, what: str) -> bytes:
    """The whole file; FormatError naming it when it cannot be read or has 0 bytes."""
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise FormatError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not buf:
        raise FormatError(path, f"empty file (0 bytes), not {what}")
    return buf
