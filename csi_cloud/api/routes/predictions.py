"""Prediction history and the live stream (WebSocket and Server-Sent Events)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from ...db import Prediction
from ..deps import CloudDep, DbSession
from ..schemas import Page, PredictionOut
from ..streams import SSE_RESPONSES, serve_sse, serve_websocket

router = APIRouter(tags=["predictions"])


@router.get("/predictions", response_model=Page[PredictionOut],
            summary="Predictions, newest first, filtered by AP and capture time",
            description="One per segment, except a run of idle segments of one message, "
                        "stored and listed as one prediction with its span (``segments``; "
                        "``since``/``until`` match its first segment's capture time). A run is "
                        "not expanded: a page of ``limit`` rows stays ``limit`` rows.")
def list_predictions(
    session: DbSession,
    site: Annotated[str | None, Query(max_length=64)] = None,
    ap: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[float | None, Query(description="capture time >= (Unix s)")] = None,
    until: Annotated[float | None, Query(description="capture time < (Unix s)")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Page[PredictionOut]:
    query = select(Prediction)
    if site is not None:
        query = query.where(Prediction.site == site)
    if ap is not None:
        query = query.where(Prediction.ap == ap)
    if since is not None:
        query = query.where(Prediction.timestamp >= since)
    if until is not None:
        query = query.where(Prediction.timestamp < until)
    rows = session.scalars(query.order_by(Prediction.timestamp.desc(), Prediction.id.desc())
                           .limit(limit)).all()
    data = [PredictionOut.model_validate(r, from_attributes=True) for r in rows]
    return Page[PredictionOut](data=data, count=len(data))


@router.websocket("/predictions/ws")
async def predictions_ws(websocket: WebSocket, cloud: CloudDep, site: str | None = None,
                         ap: str | None = None) -> None:
    """Each new prediction as one JSON text message (optionally of one site / AP)."""
    await serve_websocket(websocket, cloud.live("predictions"), site, ap)


@router.get("/predictions/stream", summary="Live predictions as Server-Sent Events",
            response_class=StreamingResponse, responses=SSE_RESPONSES)
async def predictions_sse(request: Request, cloud: CloudDep,
                          site: Annotated[str | None, Query(max_length=64)] = None,
                          ap: Annotated[str | None, Query(max_length=64)] = None
                          ) -> StreamingResponse:
    return serve_sse(request, cloud.live("predictions"), site, ap, "prediction")
