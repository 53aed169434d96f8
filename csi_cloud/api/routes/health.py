"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import Service
from ..schemas import Health

router = APIRouter(tags=["health"])


def _health(service: Service) -> Health:
    problems = service.problems()
    try:
        database = service.db.ping()
    except Exception as exc:  # any driver error means not ready
        database = False
        problems.append(f"database: not reachable: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
    if not len(service.registry):
        problems.append("models: no usable bundle")
    return Health(status="ok" if not problems else "degraded", models=len(service.registry),
                  mqtt_connected=service.mqtt is not None, database=database,
                  uptime_s=round(time.time() - service.started, 1), problems=problems,
                  dead_letters=service.dead_lettered)


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz(service: Service) -> Health:
    return _health(service)


@router.get("/readyz", response_model=Health,
            summary="Connected to the broker and database, and nothing stuck",
            responses={503: {"description": "not ready: ``problems`` says why"}})
def readyz(service: Service) -> Health:
    health = _health(service)
    if health.problems:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, health.model_dump())
    return health


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def metrics(service: Service) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
