"""A live hub (csi_cloud.live) served as a WebSocket or as Server-Sent Events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from ..live import LiveHub

__all__ = ["SSE_RESPONSES", "serve_sse", "serve_websocket"]

SSE_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


async def serve_websocket(websocket: WebSocket, hub: LiveHub, site: str | None,
                          ap: str | None) -> None:
    """Each new event as one JSON text message, until the client goes."""
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


def serve_sse(request: Request, hub: LiveHub, site: str | None, ap: str | None,
              name: str) -> StreamingResponse:
    """Each new event as an SSE event ``name``, with a keep-alive comment every 15 s."""

    async def stream() -> AsyncIterator[bytes]:
        async with hub.subscribe(site, ap) as sub:
            yield b": connected\n\n"
            while not await request.is_disconnected():
                try:
                    event = await asyncio.wait_for(sub.queue.get(), timeout=15)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield f"event: {name}\ndata: {json.dumps(event)}\n\n".encode()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
