"""Dead letters: segment messages the database refused."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["DeadLetterOut"]


class DeadLetterOut(BaseModel):
    """A segment message that could not be stored: kept, with why (docs/troubleshooting.md)."""

    id: int
    site: str = Field(description="as the message's topic gave it (may be an invalid name)")
    ap: str
    error: str = Field(description="why the database refused it")
    received: float = Field(description="when the message arrived (Unix s)")
    created: float = Field(description="when it was dead-lettered (Unix s)")
    size: int = Field(description="payload bytes as received")
    payload: str = Field(description="the payload (base64), at most max_payload_bytes")
