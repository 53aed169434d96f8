"""Dependencies shared by the routes: the service, the database session, the write token."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from ..service import CloudService

__all__ = ["DbSession", "Service", "WriteAccess", "get_service"]

_bearer = HTTPBearer(auto_error=False, description="the service's API token")


def get_service(request: Request) -> CloudService:
    return request.app.state.service  # type: ignore[no-any-return]


Service = Annotated[CloudService, Depends(get_service)]


def get_session(service: Service) -> Iterator[Session]:
    """A session on the API's own connection pool (never ingest's)."""
    with service.db.api_session() as session:
        yield session


DbSession = Annotated[Session, Depends(get_session)]


def require_token(service: Service,
                  credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(_bearer)]) -> None:
    expected = service.settings.token.get_secret_value()
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                         expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})


WriteAccess = Depends(require_token)
