"""Labels: activity / identity over a time range of an AP's stream."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from csi_edge.names import check_name

__all__ = ["LabelIn", "LabelOut"]

# The one naming rule of sites and APs (csi_edge.names), as in the per-AP routes.
SiteName = Annotated[str, AfterValidator(lambda value: check_name(value, "site"))]
APName = Annotated[str, AfterValidator(lambda value: check_name(value, "ap"))]
Text = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: SiteName
    ap: APName
    # Checked in the route, not here: a validation error echoes its input, and a NaN in the
    # error response cannot be rendered as JSON (a 500 instead of a 422).
    start: float = Field(description="range start (Unix s, finite, >= 0)")
    end: float = Field(description="range end, exclusive (Unix s, finite, > start)")
    activity: Text | None = None
    identity: Text | None = None

    def problem(self) -> str | None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            return "start and end must be finite numbers"
        if self.start < 0:
            return "start must be >= 0 (Unix seconds)"
        if not self.start < self.end:
            return "start must be before end"
        if self.activity is None and self.identity is None:
            return "give an activity, an identity, or both"
        return None


class LabelOut(BaseModel):
    id: int
    site: str
    ap: str
    start: float
    end: float
    activity: str | None
    identity: str | None
    created: float
    known: bool = Field(description="every value given is in the label maps of the AP's model "
                                    "(false for new names: usable for retraining only)")
    model: str | None = Field(description="the AP's model id, whose label maps were checked")
    recordings: int | None = Field(default=None, description="recording files the label was "
                                                             "added to (POST only)")
    pending: bool | None = Field(default=None, description="also kept for recording files "
                                                           "the AP opens later (POST only)")
