"""Identities: who the active model can name, and enrollment of a new person.

``POST /identities`` labels the given ranges of recorded streams with the person's name (like
``POST /labels``) and queues an ``enroll`` job: the cloud-side identity layer of the base
model gets one more class, fit on the codes the APs sent during those ranges (see
:mod:`csi_cloud.model.heads`). The result is a derived bundle with a new id that shares the
base model's edge part, so APs keep streaming without a model switch; with ``activate`` (the
default) it serves their payloads as soon as the job succeeds.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, status

from ...db import AP, Label
from ...jobs import JobRequestError
from ..deps import CloudDep, DbSession, Jobs, WriteAccess
from ..schemas import EnrollIn, IdentitiesOut, JobRequest, TrainingJobOut

router = APIRouter(prefix="/identities", tags=["identities"])


@router.get("", response_model=IdentitiesOut, summary="The identities the active model knows")
def list_identities(cloud: CloudDep) -> IdentitiesOut:
    model = cloud.model(cloud.active_model)
    stats: dict[str, Any] = model.manifest.calibration.get("identity") or {}
    return IdentitiesOut(model=model.id, model_name=model.manifest.name,
                         identities=list(model.manifest.labels.get("identity") or []),
                         open_set=stats.get("threshold") is not None,
                         threshold=stats.get("threshold"),
                         enrollable="feature_mean" in stats)


@router.post("", response_model=TrainingJobOut, status_code=status.HTTP_202_ACCEPTED,
             dependencies=[WriteAccess],
             summary="Enroll a person from labelled ranges of recorded streams (a job)")
def enroll(body: EnrollIn, session: DbSession, cloud: CloudDep, jobs: Jobs) -> TrainingJobOut:
    for r in body.ranges:
        if session.get(AP, (r.site, r.ap)) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no access point {r.site}/{r.ap}")
    request = JobRequest(mode="enroll", dataset="recordings", identity=body.name,
                         ranges=body.ranges, base_model=body.base_model,
                         activate=body.activate, seed=body.seed)
    try:
        jobs.resolve(request)  # refuse before anything is stored
    except JobRequestError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    now = time.time()
    for r in body.ranges:
        session.add(Label(site=r.site, ap=r.ap, start=r.start, end=r.end, activity=None,
                          identity=body.name, created=now))
        cloud.label_recordings(r.site, r.ap, r.start, r.end, None, body.name)
    session.commit()
    try:
        job = jobs.submit(request)
    except JobRequestError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    return TrainingJobOut(**job)
