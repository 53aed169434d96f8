"""Fan-out of live predictions to WebSocket and Server-Sent-Events clients.

Each subscriber has a bounded queue; a client too slow to keep up loses its oldest events
(counted in ``dropped``) rather than slowing ingest down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

__all__ = ["LiveHub", "Subscription"]


class Subscription:
    def __init__(self, site: str | None, ap: str | None, size: int,
                 on_drop: Callable[[], None] | None = None) -> None:
        self.site = site
        self.ap = ap
        self.on_drop = on_drop
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(size)
        self.dropped = 0

    def wants(self, event: dict[str, Any]) -> bool:
        return ((self.site is None or event.get("site") == self.site)
                and (self.ap is None or event.get("ap") == self.ap))

    def offer(self, event: dict[str, Any]) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
        self.queue.put_nowait(event)


class LiveHub:
    def __init__(self, queue_size: int = 10_000,
                 on_drop: Callable[[], None] | None = None) -> None:
        """``on_drop``: called for each event a slow subscriber loses (a metric)."""
        self.queue_size = queue_size
        self.on_drop = on_drop
        self.subscribers: set[Subscription] = set()

    def publish(self, events: list[dict[str, Any]]) -> None:
        for sub in list(self.subscribers):
            for event in events:
                if sub.wants(event):
                    sub.offer(event)

    @asynccontextmanager
    async def subscribe(self, site: str | None = None,
                        ap: str | None = None) -> AsyncIterator[Subscription]:
        sub = Subscription(site, ap, self.queue_size, self.on_drop)
        self.subscribers.add(sub)
        try:
            yield sub
        finally:
            self.subscribers.discard(sub)
