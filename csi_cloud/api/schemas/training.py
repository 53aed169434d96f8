"""Training jobs (the request models are the job manager's own: csi_cloud.jobs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ...jobs import JobRequest, StreamRange

__all__ = ["JobRequest", "JobState", "StreamRange", "TrainingJobOut"]

JobState = Literal["queued", "running", "succeeded", "failed"]


class TrainingJobOut(BaseModel):
    id: str
    state: JobState
    created: float
    started: float | None
    finished: float | None
    request: dict[str, Any] = Field(description="the request, with the base model resolved")
    progress: float = Field(description="0..1")
    log: str = Field(description="the last lines of the training log")
    metrics: dict[str, Any] | None
    bundle: str | None = Field(description="id of the bundle the job produced")
    error: str | None
