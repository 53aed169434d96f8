"""Prediction history and the live stream (WebSocket and Server-Sent Events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from ...db import Prediction
from ..deps import DbSession
from ..schemas import Page, PredictionOut
from .aps import prediction_out

router = APIRouter(tags=["predictions"])


@router.get("/predictions", response_model=Page[PredictionOut],
            summary="Predictions, newest first, filtered by AP and capture time")
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
    data = [p for p in (prediction_out(r) for r in rows) if p is not None]
    return Page[PredictionOut](data=data, count=len(data))


@router.websocket("/predictions/ws")
async def predictions_ws(websocket: WebSocket, site: str | None = None,
                         ap: str | None = None) -> None:
    """Each new prediction as one JSON text message (optionally of one site / AP)."""
    service = websocket.app.state.service
    await websocket.accept()
    async with service.hub.subscribe(site, ap) as sub:
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


@router.get("/predictions/stream", summary="Live predictions as Server-Sent Events",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def predictions_sse(request: Request,
                          site: Annotated[str | None, Query(max_length=64)] = None,
                          ap: Annotated[str | None, Query(max_length=64)] = None
                          ) -> StreamingResponse:
    hub = request.app.state.service.hub

    async def events() -> AsyncIterator[bytes]:
        async with hub.subscribe(site, ap) as sub:
            yield b": connected\n\n"
            while not await request.is_disconnected():
                try:
                    event = await asyncio.wait_for(sub.queue.get(), timeout=15)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield f"event: prediction\ndata: {json.dumps(event)}\n\n".encode()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

