"""Liveness and readiness."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["Health"]


class Health(BaseModel):
    status: str
    models: int
    mqtt_connected: bool
    database: bool
    uptime_s: float
    problems: list[str] = Field(default_factory=list, description="what keeps the worker from "
                                "working right now (docs/troubleshooting.md); empty when ready")
    dead_letters: int = Field(0, description="messages dead-lettered since the process started")
