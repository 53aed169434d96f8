"""Labels: activity / identity over a time range of an AP's stream, for retraining.

A label is stored in the database (the record of what was said) and added to the AP's
recording files that overlap it (what the ``recordings`` dataset trains on), through the
service's recorder when it has one.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import select

from ...db import AP, Label
from ...registry import UnknownModelError
from ..deps import CloudDep, DbSession, WriteAccess
from ..schemas import LabelIn, LabelOut, Page

router = APIRouter(prefix="/labels", tags=["labels"])


def _known(cloud: CloudDep, model_id: str | None, activity: str | None,
           identity: str | None) -> bool:
    if model_id is None:
        return False
    try:
        labels = cloud.model(model_id).manifest.labels
    except UnknownModelError:
        return False
    return ((activity is None or activity in (labels.get("activity") or []))
            and (identity is None or identity in (labels.get("identity") or [])))


def _out(row: Label, cloud: CloudDep, model_id: str | None, **extra: Any) -> LabelOut:
    return LabelOut(id=row.id, site=row.site, ap=row.ap, start=row.start, end=row.end,
                    activity=row.activity, identity=row.identity, created=row.created,
                    known=_known(cloud, model_id, row.activity, row.identity), model=model_id,
                    **extra)


@router.post("", response_model=LabelOut, status_code=status.HTTP_201_CREATED,
             dependencies=[WriteAccess],
             summary="Label a time range of an AP's stream (stored, and added to its recordings)")
def create_label(body: LabelIn, session: DbSession, cloud: CloudDep) -> LabelOut:
    problem = body.problem()
    if problem is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)
    ap = session.get(AP, (body.site, body.ap))
    if ap is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no access point {body.site}/{body.ap}")
    row = Label(site=body.site, ap=body.ap, start=body.start, end=body.end,
                activity=body.activity, identity=body.identity, created=time.time())
    session.add(row)
    session.commit()
    result = cloud.label_recordings(body.site, body.ap, body.start, body.end, body.activity,
                                    body.identity)
    recordings = len(getattr(result, "files", []) or []) if result is not None else None
    pending = bool(getattr(result, "pending", False)) if result is not None else None
    return _out(row, cloud, ap.model, recordings=recordings, pending=pending)


@router.get("", response_model=Page[LabelOut], summary="Labels, newest first")
def list_labels(
    session: DbSession,
    cloud: CloudDep,
    site: Annotated[str | None, Query(max_length=64)] = None,
    ap: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Page[LabelOut]:
    query = select(Label)
    if site is not None:
        query = query.where(Label.site == site)
    if ap is not None:
        query = query.where(Label.ap == ap)
    rows = session.scalars(query.order_by(Label.id.desc()).limit(limit)).all()
    models: dict[tuple[str, str], str | None] = {}
    data = []
    for row in rows:
        key = (row.site, row.ap)
        if key not in models:
            found = session.get(AP, key)
            models[key] = found.model if found is not None else None
        data.append(_out(row, cloud, models[key]))
    return Page[LabelOut](data=data, count=len(data))
