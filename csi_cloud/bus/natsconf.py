"""nats-server configuration for a csi-pipeline cluster node.

What a node needs: JetStream (file storage), the cluster routes, the MQTT listener with its
streams replicated on ``replicas`` nodes (the PUBACK an edge gets is then a quorum write), and
the account subject mapping that partitions segment subjects by AP
(:meth:`csi_cloud.bus.subjects.SegmentSubjects.mapping`).

``python -m csi_cloud.bus.natsconf --partitions 16`` prints the mapping block for a config.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from .subjects import SegmentSubjects

__all__ = ["NodeConfig", "mapping_block"]


def mapping_block(subjects: SegmentSubjects) -> str:
    source, destination = subjects.mapping()
    return f"mappings {{\n  {json.dumps(source)}: {json.dumps(destination)}\n}}\n"


@dataclass
class NodeConfig:
    """One node of a cluster on explicit host:port listeners."""

    name: str
    listen: str  # HOST:PORT of NATS clients
    mqtt: str  # HOST:PORT of the MQTT listener
    store_dir: str
    cluster_listen: str | None = None  # HOST:PORT of routes; None: a single node
    routes: Sequence[str] = ()  # HOST:PORT of every node's cluster listener
    http: str | None = None  # monitoring HOST:PORT
    cluster_name: str = "csi"
    replicas: int = 3
    subjects: SegmentSubjects = field(default_factory=SegmentSubjects)
    max_file_store: str = "4GB"
    extra: str = ""  # more configuration lines (authorization ...)

    def render(self) -> str:
        lines = [f"server_name: {self.name}", f"listen: {self.listen}"]
        if self.http:
            lines.append(f"http: {self.http}")
        lines.append(f"jetstream {{ store_dir: {json.dumps(self.store_dir)}, "
                     f"max_memory_store: 64MB, max_file_store: {self.max_file_store} }}")
        if self.cluster_listen:
            routes = ", ".join(f"nats-route://{r}" for r in self.routes)
            lines.append(f"cluster {{ name: {self.cluster_name}, listen: {self.cluster_listen}, "
                         f"routes: [{routes}] }}")
        replicas = self.replicas if self.cluster_listen else 1
        # stream_replicas: the MQTT message stream (where a QoS 1 publish is stored before its
        # PUBACK) and the session and retained-message streams live on this many nodes.
        lines.append(f"mqtt {{ listen: {self.mqtt}, stream_replicas: {replicas} }}")
        return "\n".join(lines) + "\n" + mapping_block(self.subjects) + self.extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="print the subject mapping of a NATS account")
    parser.add_argument("--prefix", default="csi/v1")
    parser.add_argument("--partitions", type=int, default=16)
    args = parser.parse_args(argv)
    print(mapping_block(SegmentSubjects(args.prefix, args.partitions)), end="")


if __name__ == "__main__":
    main()
