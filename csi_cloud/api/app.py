"""The FastAPI application: one :class:`CloudService` started in the lifespan."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import dashboard
from ..service import CloudService
from ..settings import CloudSettings
from .routes import (
    aps,
    dead_letters,
    events,
    health,
    identities,
    labels,
    models,
    predict,
    predictions,
    training,
)

__all__ = ["API_PREFIX", "DOCS_ASSETS", "create_app"]

API_PREFIX = "/api/v1"
DOCS_ASSETS = "/docs-assets"  # Swagger UI and ReDoc files
# Paths whose bodies may be as large as an upload; every other body is a small JSON document.
_UPLOAD_PATHS = ("/api/v1/predict",)


def create_app(settings: CloudSettings, service: CloudService | None = None) -> FastAPI:
    settings.check_token()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service or CloudService(settings)
        app.state.service = svc
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    # /docs and /redoc load Swagger UI and ReDoc from fastapi-offline's package files, not
    # from a CDN: they work on a site without internet access. No validator badge either
    # (Swagger UI would send the schema to validator.swagger.io).
    app = FastAPIOffline(title="csi-pipeline cloud", version="1", lifespan=lifespan,
                         static_url=DOCS_ASSETS, swagger_ui_parameters={"validatorUrl": None},
                         description="Live activity and identity predictions from compressed "
                                     "WiFi CSI streamed by access points over MQTT.")

    def limit_for(path: str) -> int:
        return settings.max_upload_bytes if path in _UPLOAD_PATHS else settings.max_request_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(PoolTimeoutError, _database_busy)
    app.add_exception_handler(OperationalError, _database_busy)

    api = APIRouter(prefix=API_PREFIX)
    for module in (aps, predictions, models, health, dead_letters, predict, labels, training,
                   identities, events):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(health.router)  # /healthz, /readyz, /metrics at the root too
    app.include_router(dashboard.router)  # the operator page at / (csi_cloud/dashboard)
    return app


class BodyLimit:
    """Refuse request bodies over a per-path limit with 413, whether or not they declare a
    Content-Length: a chunked body is counted as it is read and cut off at the limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(send, limit, length.decode(errors="replace"))
            return
        seen = 0
        started = rejected = False

        async def counted_receive() -> Message:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not started:
                    # Answer now, while the app is still reading; it then sees a disconnect
                    # and whatever it answers is dropped.
                    rejected = True
                    await _too_large(send, limit, f"over {limit}")
                    return {"type": "http.disconnect"}
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception:
            if not rejected:
                raise


async def _too_large(send: Send, limit: int, length: str) -> None:
    body = json.dumps({"detail": f"request body of {length} bytes is over the limit of "
                                 f"{limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: a bad value quoted back in an error is shown as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def _database_busy(request: Request, exc: Exception) -> JSONResponse:
    """The API's connection pool is exhausted (a read flood) or the database is unreachable:
    try again shortly (ingest has its own pool and is not affected)."""
    what = ("the API's database connections are all in use" if isinstance(exc, PoolTimeoutError)
            else "the database is unavailable")
    return JSONResponse({"detail": f"{what}; retry shortly"}, status_code=503,
                        headers={"Retry-After": "1"})


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)
