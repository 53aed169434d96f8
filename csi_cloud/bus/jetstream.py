"""The few JetStream API calls the bus needs that nats-py (2.16) does not offer.

nats-py has no fields for consumer priority groups (ADR-42): ``priority_groups``,
``priority_policy`` and ``priority_timeout`` on the consumer, ``group`` and ``id`` on a pull
request, and no call for ``$JS.API.CONSUMER.UNPIN``. These are plain JSON requests on the
documented API subjects, sent here with the core client.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JetStreamError", "api", "pull_request"]

_NS = 1_000_000_000


class JetStreamError(RuntimeError):
    """A JetStream API call answered with an error."""

    def __init__(self, subject: str, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{subject}: {description} (code {code}, error {err_code})")
        self.subject = subject
        self.code = code
        self.err_code = err_code
        self.description = description


async def api(nc: Any, subject: str, body: dict[str, Any] | None = None,
              timeout_s: float = 5.0) -> dict[str, Any]:
    """Request ``$JS.API.<subject>`` and return the answer; raise :class:`JetStreamError`."""
    full = f"$JS.API.{subject}"
    reply = await nc.request(full, json.dumps(body).encode() if body is not None else b"",
                             timeout=timeout_s)
    answer: dict[str, Any] = json.loads(reply.data) if reply.data else {}
    error = answer.get("error")
    if error:
        raise JetStreamError(full, int(error.get("code", 0)), int(error.get("err_code", 0)),
                             str(error.get("description", "")))
    return answer


def pull_request(batch: int, expires_s: float, group: str, pin: str | None = None) -> bytes:
    """Body of a pull request (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``) in a
    priority group; ``pin``: the pin id this client holds."""
    body: dict[str, Any] = {"batch": batch, "expires": int(expires_s * _NS), "group": group}
    if pin:
        body["id"] = pin
    return json.dumps(body, separators=(",", ":")).encode()


def nanoseconds(seconds: float) -> int:
    return int(seconds * _NS)
