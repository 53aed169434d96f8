"""The records one accepted segment becomes, shared by ingest (which makes them), the
recorder and the store (which write them) and the ``/predict`` route.

They sit below all of those, so the store does not import the ingest that feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csi_edge.bundle import SegmentCodes

from .model.compression import CloudModel

__all__ = ["DecodedRecord", "PresenceRecord"]


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """One accepted segment, decoded."""

    site: str
    ap: str
    epoch: int
    seq: int
    timestamp_ms: int
    level: int
    quality: float
    model: CloudModel
    codes: SegmentCodes
    code_bytes: bytes
    received: float
    z_q: np.ndarray | None = None  # (D, T)
    profile: np.ndarray | None = None  # (P * C,), P profile blocks
    reconstruction: np.ndarray | None = None  # (L, A, S) standardised log amplitude
    # An idle segment (IDLE message): ``codes``/``code_bytes`` are the codes it stands for, a
    # copy of the stream's last coded segment (CloudModel.idle_codes), so storage and a
    # restarted worker treat it like any other segment.
    idle: bool = False
    motion: float | None = None  # the edge's motion score (csi_edge.presence), if it sent one


@dataclass(frozen=True, slots=True)
class PresenceRecord:
    """One accepted segment of a presence-only message: no model, no codes, a motion score."""

    site: str
    ap: str
    epoch: int
    seq: int
    timestamp_ms: int
    quality: float
    motion: float | None
    received: float
    level: int = 0
