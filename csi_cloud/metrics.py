"""Prometheus metrics of one cloud worker (its own registry, so several apps can coexist)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]


class _APCollector(Collector):
    def __init__(self, snapshot: Callable[[], list[dict[str, Any]]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rate = GaugeMetricFamily("csi_ap_payload_bytes_per_second",
                                 "Wire-format payload bytes per second received from an AP "
                                 "(last 30 s)", labels=["site", "ap"])
        online = GaugeMetricFamily("csi_ap_online", "1 while the AP's status says online",
                                   labels=["site", "ap"])
        for ap in self.snapshot():
            rate.add_metric([ap["site"], ap["ap"]], ap["payload_bytes_per_s"])
            online.add_metric([ap["site"], ap["ap"]], 1.0 if ap["online"] else 0.0)
        yield rate
        yield online


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter("csi_messages", "Segment messages received", registry=r)
        self.segments = Counter("csi_segments", "Segments accepted", registry=r)
        self.rejected = Counter("csi_rejected", "Payloads rejected, by reason", ["reason"],
                                registry=r)
        self.predictions = Counter("csi_predictions", "Predictions made", registry=r)
        self.idle_segments = Counter("csi_idle_segments", "Segments that came as idle markers "
                                     "(predicted from the AP's last coded segment)", registry=r)
        self.unknown_identities = Counter("csi_unknown_identities", "Predictions whose person "
                                          "is past the open-set threshold", registry=r)
        self.latency = Histogram(
            "csi_decode_classify_seconds", "From a message's arrival to its predictions "
            "being available (queue + decode + classify + store)", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.batch = Histogram("csi_batch_seconds", "Processing time of one ingest batch",
                               registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                    0.5, 1, 2.5))
        self.batch_size = Histogram("csi_batch_messages", "Messages per ingest batch",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.queue = Gauge("csi_ingest_queue", "Messages waiting for a batch", registry=r)
        self.unacked = Gauge("csi_mqtt_unacknowledged", "QoS 1 messages received and not yet "
                             "acknowledged (at most mqtt_receive_maximum)", registry=r)
        self.recording_dropped = Gauge("csi_recording_dropped_segments",
                                       "Segments left out of the recordings: the recorder fell "
                                       "behind or writing them failed", registry=r)
        self.live_dropped = Counter("csi_live_dropped", "Live events dropped for slow clients",
                                    registry=r)
        self.handler_errors = Counter("csi_handler_errors", "Errors caught while handling a "
                                      "message, batch or status (skipped, logged once, ingest "
                                      "goes on), by where", ["where"], registry=r)
        self.status_rejected = Counter("csi_status_rejected", "AP status messages rejected, "
                                       "by reason", ["reason"], registry=r)
        self.store_failures = Counter("csi_store_failures", "Failed tries to store a batch "
                                      "(retried)", registry=r)
        self.dead_letters = Counter("csi_dead_letters", "Messages that could not be stored "
                                    "and were kept in dead_letters", registry=r)
        self.duplicates_refused = Counter(
            "csi_duplicates_refused", "Segments predicted but not stored because they were "
            "stored already, by another worker (its bus partition moved while it was behind)",
            registry=r)
        self.stuck = Gauge("csi_ingest_stuck", "1 while storing a batch keeps failing",
                           registry=r)

    def track_aps(self, snapshot: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry.register(_APCollector(snapshot))
