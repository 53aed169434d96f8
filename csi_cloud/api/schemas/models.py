"""Model bundles."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["Activated", "ModelOut"]


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


class Activated(BaseModel):
    id: str
    announced_to: list[str]
