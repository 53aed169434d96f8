"""Predictions: one per classified segment, or one for a stored run of idle segments."""

from __future__ import annotations

from pydantic import BaseModel, Field, computed_field, field_validator

__all__ = ["PredictionOut"]


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
                                  "on stored ones (the database does not keep it; a stored row "
                                  "with segments > 1 is an idle run)")
    segments: int = Field(
        default=1, ge=1, description="consecutive segments this prediction stands for: seq .. "
                                     "seq + segments - 1, captured from timestamp on, one "
                                     "segment length (the bundle's segment_s) apart. 1, except "
                                     "for a stored run of idle segments of one message, for "
                                     "which the classifier and its filter said the same; its "
                                     "quality is the run's lowest, motion_score its highest, "
                                     "motion and presence true if true for any segment of it")
    motion_score: float | None = Field(
        default=None, description="the edge's motion score: log2 of the segment's CSI "
                                  "variability over the AP's quiet reference (0: as still as "
                                  "the room usually is when quiet; 1: twice as variable), "
                                  "calibrated on the AP from its own quiet periods; null while "
                                  "the edge calibrates or when it sends none (docs/presence.md)")
    motion: bool | None = Field(
        default=None, description="motion_score reached the motion threshold (the AP's own "
                                  "where one was set or fitted, else the cloud's "
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
                                  "activity_confidence is the calibrated one, except where "
                                  "the bundle pools its context readings (docs/trust.md): its "
                                  "pool is fitted for the smoothing filter, and "
                                  "smoothed_confidence is the calibrated figure")
    smoothed_activity: str | None = Field(
        default=None, description="the activity after the AP's HMM filter over its per-second "
                                  "probabilities (docs/trust.md); null for a presence-only AP "
                                  "or a segment that arrived after newer ones")
    smoothed_confidence: float | None = Field(
        default=None, description="the filter's belief in smoothed_activity")
    uncertain: bool | None = Field(
        default=None, description="true: smoothed_confidence is below the bundle's calibrated "
                                  "abstention threshold; do not act on the activity")

    @field_validator("segments", mode="before")
    @classmethod
    def _one_segment(cls, value: object) -> object:
        return 1 if value is None else value  # a stored row of one segment has null

    # mypy does not type decorators over @property (mypy#1362); pydantic documents this ignore.
    @computed_field(description="fraction of the context window with no segment (lost, or "  # type: ignore[prop-decorator]
                                "before the stream began); the classifier masks those slots")
    @property
    def missing_fraction(self) -> float:
        return round(1.0 - self.context_present / max(self.context_size, 1), 4)
