"""The HTTP API of the cloud service (FastAPI), under ``/api/v1``."""

from .app import create_app

__all__ = ["create_app"]
