"""Access points: state, the newest segment's CSI, rate control."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .predictions import PredictionOut

__all__ = ["APOut", "CSIOut", "CtlAccepted", "RateIn"]


class APOut(BaseModel):
    site: str
    ap: str
    online: bool
    model: str | None
    rate_level: int | None
    source: str | None
    first_seen: float
    last_seen: float | None
    epoch: int | None
    last_seq: int | None
    gaps: int = Field(description="sequence gaps seen (each one or more lost segments)")
    missing_segments: int
    counters: dict[str, Any]
    status: dict[str, Any] | None = Field(description="the AP's last status message")
    prediction: PredictionOut | None


class CSIOut(BaseModel):
    site: str
    ap: str
    epoch: int
    seq: int
    timestamp: float = Field(description="capture time of the segment start (Unix s)")
    model: str
    model_name: str
    rate_level: int
    domain: str = Field(description="what the values are: 'log1p_amplitude' is log(1 + |H|), "
                                    "the model's input features with its standardisation undone")
    subcarriers: list[int] = Field(description="subcarrier number of each column")
    antennas: int
    antenna: int = Field(description="the antenna (feature plane) these values are of")
    frames: int = Field(description="rows: grid points of the segment, oldest first")
    rate_hz: float = Field(description="grid rate of the rows")
    min: float
    max: float
    values: list[list[float]] = Field(description="frames rows of one value per subcarrier, "
                                                  "rounded to 3 decimals")


class RateIn(BaseModel):
    level: int = Field(ge=0, le=3, description="rate level 0 (fewest bytes) .. 3")


class CtlAccepted(BaseModel):
    topic: str
    command: dict[str, Any]
