"""Dependencies shared by the routes: the service's facade, a database session, the token."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.requests import HTTPConnection
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ..jobs import JobManager
from .facade import Cloud

__all__ = ["CloudDep", "DbSession", "Jobs", "WriteAccess", "get_cloud"]

_bearer = HTTPBearer(auto_error=False, description="the service's API token")


def get_cloud(connection: HTTPConnection) -> Cloud:
    """Over the service the lifespan started (HTTP requests and WebSockets alike)."""
    return Cloud(connection.app.state.service)


CloudDep = Annotated[Cloud, Depends(get_cloud)]


def get_session(cloud: CloudDep) -> Iterator[Session]:
    with cloud.session() as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]


def get_jobs(cloud: CloudDep) -> JobManager:
    if cloud.jobs is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "this service does not run training jobs")
    return cloud.jobs


Jobs = Annotated[JobManager, Depends(get_jobs)]


def require_token(cloud: CloudDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(_bearer)]) -> None:
    expected = cloud.settings.token.get_secret_value()
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                         expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})


WriteAccess = Depends(require_token)
