"""MQTT helpers of the edge: honest packet sizes, topic aliases and reconnect backoff."""

from __future__ import annotations

import functools
import random
from typing import Any

__all__ = ["PUBACK_BYTES", "AliasingClient", "Backoff", "TopicAliases", "publish_packet_bytes"]

# PUBACK (MQTT 3.1.1, and MQTT 5 with reason "success" and no properties): fixed header 2 +
# packet id 2.
PUBACK_BYTES = 4
# The Topic Alias property of a PUBLISH: identifier 0x23 + two-byte integer.
_ALIAS_PROPERTY_BYTES = 3


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n >>= 7
        size += 1
    return size


def publish_packet_bytes(topic: str, payload_bytes: int, qos: int = 1, v5: bool = True,
                         alias: bool = False) -> int:
    """Bytes of one MQTT PUBLISH packet on the wire (TCP/IP headers not included).

    Fixed header (1 + remaining-length varint) + topic (2 + UTF-8 length; "" once an alias
    stands for it) + packet id (2, QoS > 0) + properties (MQTT 5 only: 1 byte of length, plus
    3 for a Topic Alias) + payload.
    """
    properties = (1 + (_ALIAS_PROPERTY_BYTES if alias else 0)) if v5 else 0
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + properties + payload_bytes
    return 1 + _varint_len(remaining) + remaining


class TopicAliases:
    """MQTT 5 topic aliases (client to broker) of one connection.

    Topics get aliases 1..``maximum`` in order of :meth:`reserve`, then of first use (the edge
    reserves its segment topics first: they are published most). The first PUBLISH of a topic
    carries the topic and its alias, every later one the alias and an empty topic: on a topic
    like ``csi/v1/site/ap/seg`` that saves its length less 3 bytes per message. ``maximum`` is
    the broker's Topic Alias Maximum from CONNACK (absent: 0, no aliases, MQTT 5 section
    3.2.2.3.8); a new connection starts a new table. Packets leave in the order of paho's
    ``publish`` calls, so the one that teaches an alias precedes every one that uses it.
    """

    def __init__(self, maximum: int) -> None:
        if not 0 <= maximum <= 65535:
            raise ValueError(f"topic alias maximum {maximum!r} is not in 0..65535")
        self.maximum = maximum
        self._aliases: dict[str, int] = {}
        self._taught: set[str] = set()

    def __len__(self) -> int:
        return len(self._aliases)

    def reserve(self, topics: list[str]) -> None:
        """Give ``topics`` the next free aliases, before any other topic is published."""
        for topic in topics:
            if topic not in self._aliases and len(self._aliases) < self.maximum:
                self._aliases[topic] = len(self._aliases) + 1

    def use(self, topic: str) -> tuple[str, int | None]:
        """The topic to put in the next PUBLISH of ``topic`` ("" once the broker knows its
        alias) and the alias to send with it (None: every alias is taken)."""
        self.reserve([topic])
        alias = self._aliases.get(topic)
        if alias is None:
            return topic, None
        if topic in self._taught:
            return "", alias
        self._taught.add(topic)
        return topic, alias

    def publish_args(self, topic: str) -> tuple[str, Any, bool]:
        """(topic, paho ``Properties`` or None, whether an alias is sent) for one PUBLISH."""
        sent, alias = self.use(topic)
        if alias is None:
            return sent, None, False
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: unannotated
        properties.TopicAlias = alias
        return sent, properties, True


@functools.cache
def _aiomqtt_client() -> type:
    import aiomqtt

    class _AliasingClient(aiomqtt.Client):
        """aiomqtt's client that keeps the broker's CONNACK properties.

        aiomqtt drops them; the edge needs Topic Alias Maximum. ``_on_connect`` is the
        callback aiomqtt gives paho-mqtt; if a later aiomqtt renames it, ``connack`` stays
        None and the edge sends no aliases (never more than the broker allows).
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.connack: Any = None
            super().__init__(*args, **kwargs)

        def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                        properties: Any = None) -> None:
            self.connack = properties
            super()._on_connect(client, userdata, flags, reason_code, properties)

        @property
        def topic_alias_maximum(self) -> int:
            """The broker's Topic Alias Maximum (0: absent, MQTT 3.1.1, or not seen)."""
            value = getattr(self.connack, "TopicAliasMaximum", 0) if self.connack else 0
            return int(value) if isinstance(value, int) else 0

    return _AliasingClient


def AliasingClient(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class, made lazily
    """An ``aiomqtt.Client`` that also exposes ``topic_alias_maximum`` (aiomqtt is imported
    only when a connection is made)."""
    return _aiomqtt_client()(*args, **kwargs)


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
