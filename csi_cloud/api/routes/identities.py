"""Identities: who the active model can name, and enrollment of a new person.

``POST /identities`` labels the given ranges of recorded streams with the person's name (like
``POST /labels``) and queues an ``enroll`` job: the cloud-side identity layer of the base
model gets one more class, fit on the codes the APs sent during those ranges (see
:mod:`csi_cloud.model.heads`). The result is a derived bundle with a new id that shares the
base model's edge part, so APs keep streaming without a model switch; with ``activate`` (the
default) it serves their payloads as soon as the job succeeds.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field

from ...db import AP, Label
from ...jobs import JobRequest, JobRequestError, StreamRange
from ..deps import DbSession, Service, WriteAccess
from .training import TrainingJobOut, _jobs

router = APIRouter(prefix="/identities", tags=["identities"])
log = logging.getLogger("csi_cloud.api.identities")


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


@router.get("", response_model=IdentitiesOut, summary="The identities the active model knows")
def list_identities(service: Service) -> IdentitiesOut:
    model = service.registry.get(service.active_model)
    stats: dict[str, Any] = model.manifest.calibration.get("identity") or {}
    return IdentitiesOut(model=model.id, model_name=model.manifest.name,
                         identities=list(model.manifest.labels.get("identity") or []),
                         open_set=stats.get("threshold") is not None,
                         threshold=stats.get("threshold"),
                         enrollable="feature_mean" in stats)


@router.post("", response_model=TrainingJobOut, status_code=status.HTTP_202_ACCEPTED,
             dependencies=[WriteAccess],
             summary="Enroll a person from labelled ranges of recorded streams (a job)")
def enroll(body: EnrollIn, session: DbSession, service: Service) -> TrainingJobOut:
    for r in body.ranges:
        if session.get(AP, (r.site, r.ap)) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no access point {r.site}/{r.ap}")
    request = JobRequest(mode="enroll", dataset="recordings", identity=body.name,
                         ranges=body.ranges, base_model=body.base_model,
                         activate=body.activate, seed=body.seed)
    jobs = _jobs(service)
    try:
        jobs.resolve(request)  # refuse before anything is stored
    except JobRequestError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    now = time.time()
    label_range = getattr(service.recorder, "label_range", None)
    for r in body.ranges:
        session.add(Label(site=r.site, ap=r.ap, start=r.start, end=r.end, activity=None,
                          identity=body.name, created=now))
        if label_range is not None:
            try:
                label_range(r.site, r.ap, r.start, r.end, None, body.name)
            except Exception:  # the database row and the job stand; recordings best effort
                log.exception("labelling the recordings of %s/%s failed", r.site, r.ap)
    session.commit()
    try:
        job = jobs.submit(request)
    except JobRequestError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return TrainingJobOut(**job)
