"""The FastAPI application: one :class:`CloudService` started in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from ..service import CloudService
from ..settings import CloudSettings
from .routes import aps, health, models, predictions

__all__ = ["API_PREFIX", "create_app"]

API_PREFIX = "/api/v1"
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

    app = FastAPI(title="csi-pipeline cloud", version="1", lifespan=lifespan,
                  description="Live activity and identity predictions from compressed WiFi CSI "
                              "streamed by access points over MQTT.")

    @app.middleware("http")
    async def limit_body(request: Request,
                         call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        limit = (settings.max_upload_bytes if request.url.path in _UPLOAD_PATHS
                 else settings.max_request_bytes)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse({"detail": f"request body of {length} bytes is over the "
                                           f"limit of {limit} bytes"}, status_code=413)
        return await call_next(request)

    api = APIRouter(prefix=API_PREFIX)
    for module in (aps, predictions, models, health):
        api.include_router(module.router)
    for name in ("predict", "labels", "training"):
        try:
            module = __import__(f"csi_cloud.api.routes.{name}", fromlist=["router"])
        except ModuleNotFoundError:
            continue
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(health.router)  # /healthz, /readyz, /metrics at the root too
    return app
