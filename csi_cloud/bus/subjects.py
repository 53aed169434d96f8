"""Segment subjects on a NATS cluster: how an edge's MQTT topic becomes a partitioned subject.

An edge publishes a segment on the MQTT topic ``{prefix}/{site}/{ap}/seg``. The NATS server's
MQTT listener turns the topic into a subject (``/`` becomes ``.``, a ``.`` inside a level
becomes ``//``), and the account's subject mapping (:meth:`SegmentSubjects.mapping`) rewrites
it before anything else sees it::

    csi.v1.{site}.{ap}.seg  ->  csi.v1.seg.{partition}.{site}.{ap}

where ``partition`` is the server's ``partition(n, 1, 2)``: FNV-1a (32 bit) of the site and
AP tokens, concatenated, modulo ``n`` (:func:`partition_of` computes the same number here, and
the worker checks it against the server at start). A QoS 1 publish is stored, before the
server sends the PUBACK, in the MQTT message stream :data:`MQTT_STREAM` under
``$MQTT.msgs.`` + that subject; each partition has one durable consumer on that stream
(:meth:`SegmentSubjects.consumer`), filtered on its partition (:meth:`SegmentSubjects.filter`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MQTT_STREAM", "PRIORITY_GROUP", "SegmentSubjects", "level_token", "partition_of",
           "token_level"]

MQTT_STREAM = "$MQTT_msgs"
"""The stream the NATS server keeps QoS 1 MQTT messages in (interest retention): a message
stays until every consumer whose filter matches it has acknowledged it."""
_STORED = "$MQTT.msgs."
PRIORITY_GROUP = "workers"
"""Priority group of the partition consumers (pinned_client policy)."""
PROBE_SITE = "_probe"  # not a valid site name (csi_edge.names): never a real AP's


def level_token(level: str) -> str:
    """A topic level as the NATS MQTT listener writes it into a subject token."""
    return level.replace(".", "//")


def token_level(token: str) -> str:
    """The topic level back from a subject token."""
    return token.replace("//", ".")


def _fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h


def partition_of(site: str, ap: str, partitions: int) -> int:
    """The partition the server's mapping puts an AP's segments in."""
    return _fnv1a32((level_token(site) + level_token(ap)).encode()) % partitions


@dataclass(frozen=True)
class SegmentSubjects:
    """The subjects, mapping and consumer names for one topic prefix and partition count."""

    prefix: str = "csi/v1"
    partitions: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= 1024:
            raise ValueError(f"partitions {self.partitions} is not in 1..1024")

    @property
    def base(self) -> str:
        """The prefix as a subject (``csi/v1`` -> ``csi.v1``)."""
        return ".".join(level_token(level) for level in self.prefix.split("/"))

    def mapping(self) -> tuple[str, str]:
        """The account subject mapping (source, destination) the NATS servers need."""
        return (f"{self.base}.*.*.seg",
                f"{self.base}.seg.{{{{partition({self.partitions},1,2)}}}}"
                ".{{wildcard(1)}}.{{wildcard(2)}}")

    def consumer(self, partition: int) -> str:
        """Durable name of a partition's consumer (prefix ``csi/v1`` -> ``csi-v1-seg-3``)."""
        name = self.prefix.replace("/", "-").replace(".", "_")
        return f"{name}-seg-{partition}"

    def filter(self, partition: int) -> str:
        return f"{_STORED}{self.base}.seg.{partition}.*.*"

    def parse(self, subject: str) -> tuple[int, str, str] | None:
        """(partition, site, ap) of a stored segment's subject; None if it is not one."""
        head = f"{_STORED}{self.base}.seg."
        if not subject.startswith(head):
            return None
        parts = subject[len(head):].split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        return int(parts[0]), token_level(parts[1]), token_level(parts[2])

    @property
    def heartbeats(self) -> str:
        """Core subject the workers announce themselves and their partitions on."""
        return f"_CSI.{self.base}.workers"

    def probe(self, ap: str) -> str:
        """Core subject of a mapping probe (a site name no edge can have)."""
        return f"{self.base}.{PROBE_SITE}.{level_token(ap)}.seg"

    @property
    def probe_mapped(self) -> str:
        """Where probes arrive once mapped."""
        return f"{self.base}.seg.*.{PROBE_SITE}.*"

    @property
    def probe_unmapped(self) -> str:
        """Where probes arrive when the account has no mapping."""
        return f"{self.base}.{PROBE_SITE}.*.seg"
