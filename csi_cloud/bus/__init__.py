"""The scale-out bus: segments from a NATS JetStream cluster, partitioned by AP.

- :mod:`~csi_cloud.bus.subjects`: topic -> subject, the partition mapping, consumer names;
- :mod:`~csi_cloud.bus.placement`: live workers and which partitions each should hold;
- :mod:`~csi_cloud.bus.jetstream`: the JetStream API calls nats-py lacks (priority groups);
- :mod:`~csi_cloud.bus.consumer`: :class:`NatsBus`, one per cloud worker;
- :mod:`~csi_cloud.bus.natsconf`: nats-server configuration of a cluster node.

docs/scaling.md describes the design and its measured behaviour.
"""

from .consumer import BusConfigError, NatsBus, SegmentSink
from .placement import Membership, assign
from .subjects import MQTT_STREAM, SegmentSubjects, partition_of

__all__ = ["MQTT_STREAM", "BusConfigError", "Membership", "NatsBus", "SegmentSink",
           "SegmentSubjects", "assign", "partition_of"]
