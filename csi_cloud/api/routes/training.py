"""Training jobs: train a new bundle from a registered dataset or the labelled recordings,
in a separate process, one job at a time (see :mod:`csi_cloud.jobs`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, Field

from ...jobs import JobManager, JobRequest, JobRequestError
from ..deps import Service, WriteAccess
from ..schemas import Page

router = APIRouter(prefix="/training-jobs", tags=["training"])

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


def _jobs(service: Service) -> JobManager:
    jobs = getattr(service, "jobs", None)
    if jobs is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "this service does not run training jobs")
    return jobs  # type: ignore[no-any-return]


@router.post("", response_model=TrainingJobOut, status_code=status.HTTP_202_ACCEPTED,
             dependencies=[WriteAccess], summary="Queue a training job")
def create_job(body: JobRequest, service: Service) -> TrainingJobOut:
    try:
        job = _jobs(service).submit(body)
    except JobRequestError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return TrainingJobOut(**job)


@router.get("", response_model=Page[TrainingJobOut], summary="Training jobs, newest first")
def list_jobs(
    service: Service,
    state: Annotated[JobState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[TrainingJobOut]:
    data = [TrainingJobOut(**j) for j in _jobs(service).jobs(state, limit)]
    return Page[TrainingJobOut](data=data, count=len(data))


@router.get("/{job_id}", response_model=TrainingJobOut, summary="One training job")
def get_job(job_id: Annotated[str, Path(max_length=36)], service: Service) -> TrainingJobOut:
    job = _jobs(service).get(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no training job {job_id!r}")
    return TrainingJobOut(**job)
