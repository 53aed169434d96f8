"""Activity and presence events."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EventOut"]


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    site: str
    ap: str
    kind: Literal["activity", "presence"]
    value: str = Field(description="activity: the smoothed activity or \"uncertain\"; "
                                   "presence: \"occupied\" or \"empty\"")
    start: float = Field(description="capture time of its first prediction (Unix s)")
    end: float | None = Field(description="when the next episode of the AP began; null while "
                                          "it lasts")
    confidence: float | None = Field(description="activity: the highest smoothed confidence "
                                                 "in the episode (so far); null for presence")
    model: str | None
