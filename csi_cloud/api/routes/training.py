"""Training jobs: train a new bundle from a registered dataset or the labelled recordings,
in a separate process, one job at a time (see :mod:`csi_cloud.jobs`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status

from ...jobs import JobRequestError
from ..deps import Jobs, WriteAccess
from ..schemas import JobRequest, JobState, Page, TrainingJobOut

router = APIRouter(prefix="/training-jobs", tags=["training"])


@router.post("", response_model=TrainingJobOut, status_code=status.HTTP_202_ACCEPTED,
             dependencies=[WriteAccess], summary="Queue a training job")
def create_job(body: JobRequest, jobs: Jobs) -> TrainingJobOut:
    try:
        job = jobs.submit(body)
    except JobRequestError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return TrainingJobOut(**job)


@router.get("", response_model=Page[TrainingJobOut], summary="Training jobs, newest first")
def list_jobs(
    jobs: Jobs,
    state: Annotated[JobState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[TrainingJobOut]:
    data = [TrainingJobOut(**j) for j in jobs.jobs(state, limit)]
    return Page[TrainingJobOut](data=data, count=len(data))


@router.get("/{job_id}", response_model=TrainingJobOut, summary="One training job")
def get_job(job_id: Annotated[str, Path(max_length=36)], jobs: Jobs) -> TrainingJobOut:
    job = jobs.get(job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no training job {job_id!r}")
    return TrainingJobOut(**job)
