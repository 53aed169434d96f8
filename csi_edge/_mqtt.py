"""MQTT helpers of the edge: honest packet sizes and reconnect backoff."""

from __future__ import annotations

import random

__all__ = ["PUBACK_BYTES", "Backoff", "publish_packet_bytes"]

# PUBACK (MQTT 3.1.1, and MQTT 5 with reason "success" and no properties): fixed header 2 +
# packet id 2.
PUBACK_BYTES = 4


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n >>= 7
        size += 1
    return size


def publish_packet_bytes(topic: str, payload_bytes: int, qos: int = 1, v5: bool = True) -> int:
    """Bytes of one MQTT PUBLISH packet on the wire (TCP/IP headers not included).

    Fixed header (1 + remaining-length varint) + topic (2 + UTF-8 length) + packet id (2, QoS
    > 0) + property length (1, no properties; MQTT 5 only) + payload.
    """
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if v5 else 0) + payload_bytes
    return 1 + _varint_len(remaining) + remaining


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(base, min(cap, base*2^n))."""

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = max(cap_s, base_s)
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return self._rng.uniform(self.base_s, ceiling)

    def reset(self) -> None:
        self.attempt = 0
