"""Bounded JSON for small control-plane messages (status, ctl) from the network.

``json.loads`` on a few kilobytes of ``[`` raises ``RecursionError`` (not ``ValueError``), and a
large message costs memory before anything looks at it. Every JSON message that arrives over
MQTT goes through :func:`loads_bounded` first: the size is checked before parsing and the
nesting depth is counted in one linear scan (outside string literals) before the recursive
parser runs, so the only error a caller has to handle is :class:`BadMessageError`.
"""

from __future__ import annotations

import json
from typing import Any

from ._errors import CSIError

__all__ = ["MAX_MESSAGE_BYTES", "MAX_MESSAGE_DEPTH", "BadMessageError", "loads_bounded"]

MAX_MESSAGE_BYTES = 16_384
MAX_MESSAGE_DEPTH = 16


class BadMessageError(CSIError):
    """A JSON message that is too large, too deep or not JSON; the message quotes its start."""

    def __init__(self, problem: str, data: bytes | str) -> None:
        head = data[:60]
        super().__init__(f"{problem}: {head!r}{'…' if len(data) > 60 else ''}")
        self.problem = problem


def _depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads_bounded(data: bytes | bytearray | str, *, max_bytes: int = MAX_MESSAGE_BYTES,
                  max_depth: int = MAX_MESSAGE_DEPTH) -> Any:
    """``json.loads(data)`` for at most ``max_bytes`` bytes nested at most ``max_depth`` deep."""
    raw = bytes(data) if isinstance(data, bytes | bytearray) else data.encode()
    if len(raw) > max_bytes:
        raise BadMessageError(f"message of {len(raw)} bytes (limit {max_bytes})", raw)
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise BadMessageError(f"not UTF-8 ({exc.reason} at byte {exc.start})", raw) from exc
    depth = _depth(text)
    if depth > max_depth:
        raise BadMessageError(f"JSON nested {depth} deep (limit {max_depth})", raw)
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and numbers past int's digit limit
        raise BadMessageError(f"not JSON ({exc})", raw) from exc
