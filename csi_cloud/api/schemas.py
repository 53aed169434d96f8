"""Request and response bodies, per resource."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field, computed_field

__all__ = ["APOut", "CSIOut", "CtlAccepted", "DeadLetterOut", "Health", "ModelOut", "Page",
           "PredictionOut", "RateIn"]

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    count: int


class PredictionOut(BaseModel):
    site: str
    ap: str
    epoch: int
    seq: int
    timestamp: float = Field(description="capture time of the segment start (Unix s)")
    received: float = Field(description="when the cloud received the segment (Unix s)")
    model: str | None = Field(description="the bundle that classified the segment; null for "
                                          "a presence-only AP (no bundle on the edge)")
    rate_level: int
    quality: float = Field(description="fraction of the segment backed by real frames")
    context_present: int = Field(description="segments of the context that arrived")
    context_size: int
    activity: str | None = Field(description="the most likely activity; null for a "
                                             "presence-only AP")
    activity_confidence: float | None
    identity: str | None = Field(description="the enrolled person, \"unknown\" past the "
                                            "model's open-set threshold, or null without an "
                                            "identity head")
    identity_confidence: float | None = Field(description="probability of the most likely "
                                                          "enrolled person")
    probabilities: dict[str, dict[str, float]]
    idle: bool | None = Field(
        default=None, description="true: the AP sent an idle marker for this segment (nothing "
                                  "moved) and the cloud repeated its last coded segment; set on "
                                  "live predictions (stream, pred topic, an AP's latest), null "
                                  "on stored ones (the database does not keep it)")
    motion_score: float | None = Field(
        default=None, description="the edge's motion score: log2 of the segment's CSI "
                                  "variability over the AP's quiet reference (0: as still as "
                                  "the room usually is when quiet; 1: twice as variable), "
                                  "calibrated on the AP from its own quiet periods; null while "
                                  "the edge calibrates or when it sends none (docs/presence.md)")
    motion: bool | None = Field(
        default=None, description="motion_score reached the motion threshold (the cloud's "
                                  "presence_threshold / presence_sensitivity); null without a "
                                  "score")
    presence: bool | None = Field(
        default=None, description="the AP's area is occupied: a motion segment within the last "
                                  "presence_hold_s seconds (hysteresis: on at the first motion "
                                  "segment, off after the hold); null until the AP's first "
                                  "scored segment")
    activity_confidence_raw: float | None = Field(
        default=None, description="activity_confidence before the bundle's temperature "
                                  "scaling (the same where the bundle has none); "
                                  "activity_confidence is the calibrated one")
    smoothed_activity: str | None = Field(
        default=None, description="the activity after the AP's HMM filter over its per-second "
                                  "probabilities (docs/trust.md); null for a presence-only AP "
                                  "or a segment that arrived after newer ones")
    smoothed_confidence: float | None = Field(
        default=None, description="the filter's belief in smoothed_activity")
    uncertain: bool | None = Field(
        default=None, description="true: smoothed_confidence is below the bundle's calibrated "
                                  "abstention threshold; do not act on the activity")

    # mypy does not type decorators over @property (mypy#1362); pydantic documents this ignore.
    @computed_field(description="fraction of the context window with no segment (lost, or "  # type: ignore[prop-decorator]
                                "before the stream began); the classifier masks those slots")
    @property
    def missing_fraction(self) -> float:
        return round(1.0 - self.context_present / max(self.context_size, 1), 4)


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


class ModelOut(BaseModel):
    id: str
    name: str
    created: str
    active: bool
    input_spec: dict[str, Any]
    levels: list[dict[str, Any]]
    labels: dict[str, list[str] | None]
    metrics: dict[str, Any]
    training: dict[str, Any]
    edge_id: str = Field(description="the bundle whose edge part this one runs on, and whose "
                                     "id prefix its payloads carry (itself unless derived in "
                                     "the cloud)")
    parent: str | None = Field(description="the bundle this one was derived from in the cloud")


class RateIn(BaseModel):
    level: int = Field(ge=0, le=3, description="rate level 0 (fewest bytes) .. 3")


class CtlAccepted(BaseModel):
    topic: str
    command: dict[str, Any]


class Activated(BaseModel):
    id: str
    announced_to: list[str]


class Health(BaseModel):
    status: str
    models: int
    mqtt_connected: bool
    database: bool
    uptime_s: float
    problems: list[str] = Field(default_factory=list, description="what keeps the worker from "
                                "working right now (docs/troubleshooting.md); empty when ready")
    dead_letters: int = Field(0, description="messages dead-lettered since the process started")


class DeadLetterOut(BaseModel):
    """A segment message that could not be stored: kept, with why (docs/troubleshooting.md)."""

    id: int
    site: str = Field(description="as the message's topic gave it (may be an invalid name)")
    ap: str
    error: str = Field(description="why the database refused it")
    received: float = Field(description="when the message arrived (Unix s)")
    created: float = Field(description="when it was dead-lettered (Unix s)")
    size: int = Field(description="payload bytes as received")
    payload: str = Field(description="the payload (base64), at most max_payload_bytes")
