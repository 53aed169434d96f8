"""Labels: activity / identity over a time range of an AP's stream, for retraining.

A label is stored in the database (the record of what was said) and added to the AP's
recording files that overlap it (what the ``recordings`` dataset trains on), through the
service's recorder when it has one.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select

from csi_edge.names import check_name

from ...db import AP, Label
from ...registry import UnknownModelError
from ..deps import DbSession, Service, WriteAccess
from ..schemas import Page

router = APIRouter(prefix="/labels", tags=["labels"])
log = logging.getLogger("csi_cloud.api.labels")

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


def _known(service: Service, model_id: str | None, activity: str | None,
           identity: str | None) -> bool:
    if model_id is None:
        return False
    try:
        labels = service.registry.get(model_id).manifest.labels
    except UnknownModelError:
        return False
    return ((activity is None or activity in (labels.get("activity") or []))
            and (identity is None or identity in (labels.get("identity") or [])))


def _out(row: Label, service: Service, model_id: str | None, **extra: Any) -> LabelOut:
    return LabelOut(id=row.id, site=row.site, ap=row.ap, start=row.start, end=row.end,
                    activity=row.activity, identity=row.identity, created=row.created,
                    known=_known(service, model_id, row.activity, row.identity), model=model_id,
                    **extra)


@router.post("", response_model=LabelOut, status_code=status.HTTP_201_CREATED,
             dependencies=[WriteAccess],
             summary="Label a time range of an AP's stream (stored, and added to its recordings)")
def create_label(body: LabelIn, session: DbSession, service: Service) -> LabelOut:
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
    recordings = pending = None
    label_range = getattr(service.recorder, "label_range", None)
    if label_range is not None:
        try:
            result = label_range(body.site, body.ap, body.start, body.end, body.activity,
                                 body.identity)
        except Exception:  # the database row stands; recordings are best effort
            log.exception("adding label %d to the recordings of %s/%s failed", row.id,
                          body.site, body.ap)
        else:
            recordings = len(getattr(result, "files", []) or [])
            pending = bool(getattr(result, "pending", False))
    return _out(row, service, ap.model, recordings=recordings, pending=pending)


@router.get("", response_model=Page[LabelOut], summary="Labels, newest first")
def list_labels(
    session: DbSession,
    service: Service,
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
        data.append(_out(row, service, models[key]))
    return Page[LabelOut](data=data, count=len(data))
