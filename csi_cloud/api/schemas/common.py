"""What every listing shares."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel

__all__ = ["Page"]


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    data: list[T]
    count: int
