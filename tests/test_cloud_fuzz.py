"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis):
every path and method, with no token, a wrong token and the right one; no request may get a
5xx. The one 5xx the API documents, 503 from a write endpoint with no broker to publish on
(and /readyz while not ready), is allowed where it is documented."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

from csi_cloud.api.app import create_app  # noqa: E402
from csi_cloud.settings import CloudSettings  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "fuzz-token-0123456789abcdef"
HEADERS: list[dict[str, str] | None] = [None, {"Authorization": "Bearer wrong-0123456789ab"},
                                        {"Authorization": f"Bearer {TOKEN}"}]
# A write that needs the broker says so with a 503; nothing else may be a 5xx.
NEEDS_BROKER = {("POST", "/api/v1/aps/{site}/{ap}/rate"),
                ("POST", "/api/v1/aps/{site}/{ap}/presence/calibration"),
                ("DELETE", "/api/v1/aps/{site}/{ap}/presence/calibration"),
                ("POST", "/api/v1/models/{model_id}/activate")}


def _app() -> Any:
    tmp = Path(tempfile.mkdtemp(prefix="csi-fuzz-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # after the app's lifespan ends
    return create_app(CloudSettings(
        broker=None, dev=True, token=TOKEN, db=f"sqlite:///{tmp}/db.sqlite",
        models=ROOT / "models", recordings=tmp / "rec", jobs_dir=tmp / "jobs",
        max_upload_bytes=256 * 1024))


# Loaded at collection (schemathesis' lazy fixture loader does not work with pytest 9); the
# app's lifespan starts with the first request and ends when the test process exits.
schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


def test_schema_covers_every_route() -> None:
    paths = set(schema.raw_schema["paths"])
    assert {"/api/v1/predict", "/api/v1/aps/{site}/{ap}/rate", "/api/v1/models",
            "/api/v1/models/{model_id}/edge", "/api/v1/predictions", "/healthz",
            "/metrics"} <= paths


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@pytest.mark.e2e
def test_no_server_errors(case: Any) -> None:
    from schemathesis.checks import not_a_server_error

    kwargs: dict[str, Any] = {}
    if case.path.endswith("/stream"):
        # An event stream never ends; what came before is checked. Long enough for a busy
        # machine to start the response (no start within it is an error, not a cut).
        kwargs["timeout"] = 0.5
    for headers in HEADERS:
        response = case.call(headers=headers, **kwargs)
        if response.status_code == 503 and (case.method.upper(), case.path) in NEEDS_BROKER:
            assert headers is not None and TOKEN in headers["Authorization"]
            assert "MQTT" in response.json()["detail"]
            continue
        case.validate_response(response, checks=[not_a_server_error])
