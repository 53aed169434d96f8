"""Activity and presence events (csi_cloud.events): history, and live as WebSocket and
Server-Sent Events. Reads, like the other reads, need no token."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, WebSocket
from fastapi.responses import StreamingResponse
from sqlalchemy import or_, select

from ...db import Event
from ..deps import CloudDep, DbSession
from ..schemas import EventOut, Page
from ..streams import SSE_RESPONSES, serve_sse, serve_websocket

__all__ = ["router"]

router = APIRouter(tags=["events"])


@router.get("/events", response_model=Page[EventOut],
            summary="Activity and presence episodes, newest first")
def list_events(
    session: DbSession,
    site: Annotated[str | None, Query(max_length=64)] = None,
    ap: Annotated[str | None, Query(max_length=64)] = None,
    kind: Annotated[Literal["activity", "presence"] | None, Query()] = None,
    since: Annotated[float | None, Query(
        description="episodes still going on at or after this time (Unix s): ended at or "
                    "after it, or not ended")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Page[EventOut]:
    query = select(Event)
    if site is not None:
        query = query.where(Event.site == site)
    if ap is not None:
        query = query.where(Event.ap == ap)
    if kind is not None:
        query = query.where(Event.kind == kind)
    if since is not None:
        query = query.where(or_(Event.end.is_(None), Event.end >= since))
    rows = session.scalars(query.order_by(Event.start.desc(), Event.id.desc())
                           .limit(limit)).all()
    data = [EventOut.model_validate(r) for r in rows]
    return Page[EventOut](data=data, count=len(data))


@router.websocket("/events/ws")
async def events_ws(websocket: WebSocket, cloud: CloudDep, site: str | None = None,
                    ap: str | None = None) -> None:
    """Each new event as one JSON text message (optionally of one site / AP)."""
    await serve_websocket(websocket, cloud.live("events"), site, ap)


@router.get("/events/stream", summary="Live events as Server-Sent Events (event: event)",
            response_class=StreamingResponse, responses=SSE_RESPONSES)
async def events_sse(request: Request, cloud: CloudDep,
                     site: Annotated[str | None, Query(max_length=64)] = None,
                     ap: Annotated[str | None, Query(max_length=64)] = None
                     ) -> StreamingResponse:
    return serve_sse(request, cloud.live("events"), site, ap, "event")
