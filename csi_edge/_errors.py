"""Domain exceptions. Each names the offending value and chains the cause."""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CSIError",
    "EmptyRecordingError",
    "FormatError",
    "MalformedPacketError",
    "NoRecordingsError",
    "SpecMismatchError",
    "UnsupportedFormatError",
]


class CSIError(Exception):
    """Base class of every error this project raises on purpose."""


class FormatError(CSIError):
    """A file cannot be read as the format it claims (or was detected as)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedFormatError(FormatError):
    """No reader recognises the file."""


class EmptyRecordingError(FormatError):
    """A file was parsed but holds no usable CSI frame."""


class NoRecordingsError(CSIError):
    """A folder holds no file any reader or dataset recognises."""

    def __init__(self, folder: str | Path, problem: str) -> None:
        self.folder = str(folder)
        super().__init__(f"{self.folder}: {problem}")


class MalformedPacketError(CSIError):
    """One packet or record is not valid; the stream it came from goes on."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class SpecMismatchError(CSIError):
    """A CSI stream does not fit an input spec (subcarriers, antennas, rate)."""
