"""Activity and presence events (csi_cloud.events): history, and live as WebSocket and
Server-Sent Events. Reads, like the other reads, need no token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import or_, select

from ...db import Event
from ..deps import DbSession
from ..schemas import Page

__all__ = ["EventOut", "router"]

router = APIRouter(tags=["events"])


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    site: str
    ap: str
    kind: Literal["activity", "presence"]
    value: str = Field(description="activity: the smoothed activity or \"uncertain\"; "
                                   "presence: \"occupied\" or \"empty\"")
    start: float = Field(description="capture time of its first prediction (Unix s)")
    end: float | None = Field(description="when the next episode of the AP began; null while "
                                          "it lasts")
    confidence: float | None = Field(description="activity: the highest smoothed confidence "
                                                 "in the episode (so far); null for presence")
    model: str | None


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
async def events_ws(websocket: WebSocket, site: str | None = None,
                    ap: str | None = None) -> None:
    """Each new event as one JSON text message (optionally of one site / AP)."""
    hub = websocket.app.state.service.trust.hub
    await websocket.accept()
    async with hub.subscribe(site, ap) as sub:
        receiver = asyncio.create_task(_drain(websocket))
        try:
            while not receiver.done():
                getter = asyncio.create_task(sub.queue.get())
                done, _ = await asyncio.wait({getter, receiver},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                await websocket.send_text(json.dumps(getter.result()))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            receiver.cancel()


async def _drain(websocket: WebSocket) -> None:
    try:
        while True:
            await websocket.receive_text()
    except (WebSocketDisconnect, RuntimeError):
        return


@router.get("/events/stream", summary="Live events as Server-Sent Events (event: event)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def events_sse(request: Request,
                     site: Annotated[str | None, Query(max_length=64)] = None,
                     ap: Annotated[str | None, Query(max_length=64)] = None
                     ) -> StreamingResponse:
    hub = request.app.state.service.trust.hub

    async def stream() -> AsyncIterator[bytes]:
        async with hub.subscribe(site, ap) as sub:
            yield b": connected\n\n"
            while not await request.is_disconnected():
                try:
                    event: dict[str, Any] = await asyncio.wait_for(sub.queue.get(), timeout=15)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield f"event: event\ndata: {json.dumps(event)}\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
