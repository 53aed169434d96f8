"""The dashboard: static HTML, JavaScript and CSS served by the cloud at ``/``.

Three views: rooms (a card per AP and an event timeline, for people), calibration (record
labelled examples, adapt, activate) and the engineer's console (codes, bytes, heatmap, rate).

No build step and nothing from other origins: the page reads the service's own API
(``/api/v1/aps``, ``/api/v1/predictions``, the live WebSocket or SSE stream, ``/csi``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

__all__ = ["ASSETS", "FOLDER", "router"]

FOLDER = Path(__file__).resolve().parent
# URL path -> (file in this folder, media type)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/people.js": ("people.js", "text/javascript; charset=utf-8"),
    "/calibrate.js": ("calibrate.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
# Everything from this origin; the WebSocket too (CSP 3 'self' covers ws: of the same host).
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

router = APIRouter(tags=["dashboard"], include_in_schema=False)


def _route(name: str, media_type: str):  # type: ignore[no-untyped-def]
    def serve() -> FileResponse:
        return FileResponse(FOLDER / name, media_type=media_type,
                            headers={"Cache-Control": "no-cache",
                                     "Content-Security-Policy": _CSP,
                                     "X-Content-Type-Options": "nosniff"})

    serve.__name__ = f"dashboard_{name.replace('.', '_')}"
    return serve


for _path, (_name, _type) in ASSETS.items():
    router.add_api_route(_path, _route(_name, _type), methods=["GET", "HEAD"])
