"""The frame container every reader yields: timestamped CSI of one stream, with its metadata.

Shapes: ``csi`` is ``(frames, antennas, subcarriers)``; complex64 where the source gives
I/Q, float32 amplitude where it gives amplitude only (NTU-Fi, project recordings).
Columns follow ``info.subcarriers`` (subcarrier numbers relative to the receiver's centre).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = ["CSIFrames", "DropCounter", "RadioInfo"]


class DropCounter(Counter[str]):
    """Frames or records left out, by reason. Every reader and stage reports into one.

    Zero counts are never stored, so the keys are exactly the reasons that happened.
    """

    def __setitem__(self, reason: str, count: int) -> None:
        if count:
            super().__setitem__(reason, count)
        elif reason in self:
            del self[reason]

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.items()) if v}


@dataclass(frozen=True, slots=True)
class RadioInfo:
    """What the hardware told us about the stream. ``None`` where the format does not say."""

    device: str  # reader kind: "nexmon", "intel5300", "esp32", "ntu-fi", "recording"
    subcarriers: tuple[int, ...]  # subcarrier number of each column, relative to the centre
    chip: str | None = None
    channel: int | None = None
    bandwidth_mhz: int | None = None  # receiver bandwidth
    chanspec: int | None = None
    core: int | None = None
    transmitter: str | None = None  # MAC of the transmitter kept, "aa:bb:..."
    rssi_is_real: bool = False  # False where the format carries a constant (Fition pcaps)
    extra: dict[str, object] = field(default_factory=dict)

    def with_subcarriers(self, subcarriers: tuple[int, ...]) -> RadioInfo:
        return replace(self, subcarriers=tuple(int(s) for s in subcarriers))


@dataclass(slots=True)
class CSIFrames:
    """Frames of one stream (one transmitter, one channel layout), in capture order."""

    timestamp: np.ndarray  # (N,) float64, seconds (epoch where the source gives it)
    csi: np.ndarray  # (N, A, S) complex64 or float32 amplitude
    info: RadioInfo
    format: str  # "nexmon-pcap", "nexmon-udp", "intel5300-dat", "esp32-csv", "ntu-fi-mat", "hdf5"
    source: str = ""  # file path or endpoint
    rssi: np.ndarray | None = None  # (N,) float32, only where the hardware measured it
    seq: np.ndarray | None = None  # (N,) int64 sequence numbers where the format has them
    dropped: DropCounter = field(default_factory=DropCounter)

    def __post_init__(self) -> None:
        if self.csi.ndim != 3:
            raise ValueError(f"csi must be (frames, antennas, subcarriers), got {self.csi.shape}")
        if self.timestamp.shape != (self.csi.shape[0],):
            raise ValueError(
                f"timestamp shape {self.timestamp.shape} does not match {self.csi.shape[0]} frames"
            )
        if len(self.info.subcarriers) != self.csi.shape[2]:
            raise ValueError(
                f"{len(self.info.subcarriers)} subcarrier numbers for {self.csi.shape[2]} columns"
            )

    def __len__(self) -> int:
        return int(self.csi.shape[0])

    @property
    def antennas(self) -> int:
        return int(self.csi.shape[1])

    @property
    def is_complex(self) -> bool:
        return bool(np.iscomplexobj(self.csi))

    def amplitude(self) -> np.ndarray:
        """(N, A, S) float32."""
        if self.is_complex:
            amplitude: np.ndarray = np.abs(self.csi).astype(np.float32, copy=False)
            return amplitude
        return self.csi.astype(np.float32, copy=False)

    @property
    def duration_s(self) -> float:
        return float(self.timestamp[-1] - self.timestamp[0]) if len(self) > 1 else 0.0

    @property
    def rate_hz(self) -> float:
        """Measured packet rate: frames per second over the span of the stream."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def max_gap_s(self) -> float:
        return float(np.max(np.diff(self.timestamp))) if len(self) > 1 else 0.0

    def take(self, index: np.ndarray) -> CSIFrames:
        """A new container with the frames selected by a boolean mask or index array."""
        return replace(
            self,
            timestamp=self.timestamp[index],
            csi=self.csi[index],
            rssi=None if self.rssi is None else self.rssi[index],
            seq=None if self.seq is None else self.seq[index],
            dropped=DropCounter(self.dropped),
        )

    def select_subcarriers(self, columns: np.ndarray) -> CSIFrames:
        """Keep the given column positions (in that order)."""
        columns = np.asarray(columns, dtype=np.int64)
        subcarriers = tuple(self.info.subcarriers[c] for c in columns)
        return replace(
            self,
            csi=np.ascontiguousarray(self.csi[:, :, columns]),
            info=self.info.with_subcarriers(subcarriers),
            dropped=DropCounter(self.dropped),
        )
