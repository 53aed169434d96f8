"""Access points: state, the newest segment's CSI, rate control."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from csi_edge.presence import EMPTY_ROOM_DELAY_S, EMPTY_ROOM_S, MOTION_THRESHOLD_RANGE

from .predictions import PredictionOut

__all__ = ["APOut", "CSIOut", "CtlAccepted", "EmptyRoomIn", "MotionThresholdFitIn",
           "MotionThresholdIn", "MotionThresholdOut", "RateIn"]

# The activities that mean "nobody moves" in the shipped bundles' label maps (Fition's
# "nm", no movement) and in a user's own labels.
STILL_ACTIVITIES = ("nm", "empty")


class MotionThresholdOut(BaseModel):
    site: str
    ap: str
    threshold: float = Field(description="motion score (log2) at and above which a segment "
                                         "is motion, in place of the site's")
    how: str = Field(description="'set' (by hand) or 'fitted' (on labelled seconds)")
    fit: dict[str, Any] | None = Field(
        description="what the fit saw: still and moving seconds, still activities, the "
                    "false-positive rate and recall on those seconds at this threshold")
    updated: float


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
    motion_threshold: MotionThresholdOut | None = Field(
        default=None, description="the AP's own motion threshold (null: the site's, "
                                  "presence_threshold / presence_sensitivity)")


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


class EmptyRoomIn(BaseModel):
    empty_s: float = Field(default=30, ge=EMPTY_ROOM_S[0], le=EMPTY_ROOM_S[1], description=(
        "seconds during which the room is empty: the presence reference is measured on them "
        "and pinned (csi_edge.presence)"))
    delay_s: float = Field(default=0, ge=EMPTY_ROOM_DELAY_S[0], le=EMPTY_ROOM_DELAY_S[1],
                           description="seconds to wait first (leaving the room); the edge "
                                       "also passes over the ~5 s its statistic looks back")


class MotionThresholdIn(BaseModel):
    threshold: float = Field(ge=MOTION_THRESHOLD_RANGE[0], le=MOTION_THRESHOLD_RANGE[1],
                             description="motion score (log2 ratio to the AP's quiet "
                                         "reference) at and above which a segment is motion")


class MotionThresholdFitIn(BaseModel):
    still: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default=list(STILL_ACTIVITIES), min_length=1, max_length=16,
        description="labelled activities that mean nobody moves; every other labelled "
                    "activity is movement")
    max_false_positive_rate: float = Field(
        default=0.0, ge=0.0, le=0.5,
        description="share of the still seconds the threshold may flag as motion (0: none; "
                    "presence holds 30 s after each motion, so a few false seconds keep an "
                    "empty room occupied)")
    since: float | None = Field(default=None, ge=0,
                                description="only segments captured from this time on (Unix s;"
                                            " e.g. since the empty room was last measured)")


class CtlAccepted(BaseModel):
    topic: str
    command: dict[str, Any]
