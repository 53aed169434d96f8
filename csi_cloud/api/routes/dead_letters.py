"""Dead letters: segment messages the database refused (after retries), kept with the error.

A batch is retried while the database is unreachable; one it refuses for its content is
stored AP by AP, and the messages of an AP still refused land here (acknowledged, so they
never block the others). docs/troubleshooting.md says what to do with them.
"""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from ...db import DeadLetter
from ..deps import DbSession
from ..schemas import DeadLetterOut, Page

__all__ = ["router"]

router = APIRouter(tags=["dead letters"])


@router.get("/dead-letters", response_model=Page[DeadLetterOut],
            summary="Messages that could not be stored, newest first")
def list_dead_letters(
    session: DbSession,
    site: Annotated[str | None, Query(max_length=256)] = None,
    ap: Annotated[str | None, Query(max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Page[DeadLetterOut]:
    query = select(DeadLetter)
    if site is not None:
        query = query.where(DeadLetter.site == site)
    if ap is not None:
        query = query.where(DeadLetter.ap == ap)
    rows = session.scalars(query.order_by(DeadLetter.id.desc()).limit(limit)).all()
    data = [DeadLetterOut(id=r.id, site=r.site, ap=r.ap, error=r.error, received=r.received,
                          created=r.created, size=r.size,
                          payload=base64.b64encode(r.payload).decode())
            for r in rows]
    return Page[DeadLetterOut](data=data, count=len(data))
