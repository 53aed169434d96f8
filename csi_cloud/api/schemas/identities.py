"""Identities: who the active model can name, and enrollment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ...jobs import StreamRange

__all__ = ["EnrollIn", "IdentitiesOut"]


class IdentitiesOut(BaseModel):
    model: str = Field(description="the active model's id")
    model_name: str
    identities: list[str]
    open_set: bool = Field(description="the model answers 'unknown' below its threshold")
    threshold: float | None = Field(description="open-set threshold on the highest identity "
                                                "probability")
    enrollable: bool = Field(description="the model keeps the statistics enrollment needs")


class EnrollIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$",
                      description="the new person's name")
    ranges: list[StreamRange] = Field(min_length=1, max_length=1000,
                                      description="time ranges of recorded AP streams where "
                                                  "the person (alone) is in the room")
    base_model: str | None = Field(default=None, max_length=64,
                                   description="bundle id, id prefix or name [the active one]")
    activate: bool = Field(default=True, description="serve the new bundle when it is ready")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
