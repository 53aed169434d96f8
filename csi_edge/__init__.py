"""csi_edge: the AP-side agent. CSI sources, preprocessing, encoder, wire format, publishing."""

from ._errors import (
    CSIError,
    EmptyRecordingError,
    FormatError,
    MalformedPacketError,
    NoRecordingsError,
    SpecMismatchError,
    UnsupportedFormatError,
)
from .frames import CSIFrames, DropCounter, RadioInfo
from .readers import detect_format, read_recording

__all__ = [
    "CSIError",
    "CSIFrames",
    "DropCounter",
    "EmptyRecordingError",
    "FormatError",
    "MalformedPacketError",
    "NoRecordingsError",
    "RadioInfo",
    "SpecMismatchError",
    "UnsupportedFormatError",
    "detect_format",
    "read_recording",
]
