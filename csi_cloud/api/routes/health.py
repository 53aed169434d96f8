"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import CloudDep
from ..schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz(cloud: CloudDep) -> Health:
    return cloud.health()


@router.get("/readyz", response_model=Health,
            summary="Connected to the broker and database, and nothing stuck",
            responses={503: {"description": "not ready: ``problems`` says why"}})
def readyz(cloud: CloudDep) -> Health:
    health = cloud.health()
    if health.problems:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, health.model_dump())
    return health


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def metrics(cloud: CloudDep) -> Response:
    return Response(cloud.metrics(), media_type=CONTENT_TYPE_LATEST)
