"""Cloud workers on a NATS cluster, and what tests and benchmarks check them against.

- :class:`Worker`: ``csi cloud --bus nats://...`` as a process (its MQTT client on one node's
  listener, the bus on every node);
- :class:`Heartbeats`: the workers' own announcements (which partitions each holds), read
  from the cluster by a plain NATS client;
- :func:`stored_predictions` and :func:`reference`: every prediction row in the database, and
  what one worker computes offline over the same stored codes, in sequence order (the
  single-worker reference).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from _harness import Cloud

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["Heartbeats", "Worker", "reference", "stored_predictions"]


class Worker(Cloud):
    """One cloud worker process on the cluster (tests/_harness.py's :class:`Cloud`)."""

    def __init__(self, name: str, bus: str, mqtt: str, db: str, folder: Path,
                 env: dict[str, str] | None = None, log_level: str = "INFO") -> None:
        super().__init__(mqtt, db, folder, name, ("--bus", bus),
                         env={"CSI_CLOUD_JOBS_DIR": str(folder / f"jobs-{name}"),
                              "CSI_CLOUD_RECORD": "false",
                              **(env or {})},
                         recordings=folder / f"recordings-{name}", log_level=log_level)
        self.name = name
        self.log = folder / f"worker-{name}.log"

    def refused(self) -> int:
        """Segments this process predicted but did not store, another worker having stored
        them (csi_duplicates_refused_total)."""
        import httpx

        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("csi_duplicates_refused_total "):
                return int(float(line.split()[1]))
        raise AssertionError("no csi_duplicates_refused_total in the worker's metrics")


class Heartbeats:
    """The latest announcement of every worker (held partitions), from a background thread."""

    def __init__(self, servers: str, subject: str = "_CSI.csi.v1.workers") -> None:
        self.servers = servers.split(",")
        self.subject = subject
        self.latest: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Heartbeats:
        self._thread.start()
        assert self._ready.wait(15), "not subscribed to the heartbeats within 15 s"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    async def _run(self) -> None:
        import nats

        nc = await nats.connect(servers=self.servers, reconnect_time_wait=0.3,
                                max_reconnect_attempts=-1)

        async def on(msg: Any) -> None:
            body = json.loads(msg.data)
            self.latest[body["name"]] = {**body, "seen": time.monotonic()}

        await nc.subscribe(self.subject, cb=on)
        await nc.flush()
        self._ready.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
        await nc.close()

    def held(self, max_age_s: float = 3.0) -> dict[str, list[int]]:
        now = time.monotonic()
        return {name: list(body["held"]) for name, body in self.latest.items()
                if now - body["seen"] <= max_age_s and not body.get("leaving")}


def stored_predictions(db: str) -> list[dict[str, Any]]:
    """Every prediction row (the columns a comparison needs), in insertion order."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db)
    try:
        with engine.connect() as con:
            rows = con.execute(text(
                "SELECT id, site, ap, epoch, seq, timestamp, received, model, rate_level, "
                "quality, context_present, activity, activity_confidence, identity, codes "
                "FROM predictions ORDER BY id")).mappings().all()
    finally:
        engine.dispose()
    return [dict(r) for r in rows]


def reference(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """What one worker computes over the stored codes, each AP's segments in sequence order
    (one row per segment: duplicates are left out)."""
    from csi_cloud.ingest import Ingestor
    from csi_cloud.registry import ModelRegistry
    from csi_edge.codec import Payload, SegmentRecord, encode_payload

    registry = ModelRegistry(ROOT / "models")
    ingestor = Ingestor(registry)
    by_ap: dict[tuple[str, str], dict[tuple[int, int], dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        by_ap[(row["site"], row["ap"])].setdefault((row["epoch"], row["seq"]), row)
    out = {}
    for (site, ap), segments in by_ap.items():
        batch = []
        for (epoch, seq), row in sorted(segments.items()):
            model = registry.get(row["model"])
            payload = encode_payload(Payload(
                row["rate_level"], model.model_id, epoch, seq, round(row["timestamp"] * 1000),
                (SegmentRecord(row["quality"]),), codes=bytes(row["codes"])))
            batch.append((site, ap, payload, row["received"]))
        for p in ingestor.process(batch).predictions:
            out[(site, ap, p.epoch, p.seq)] = {
                "activity": p.activity, "identity": p.identity,
                "activity_confidence": p.activity_confidence,
                "context_present": p.context_present}
    return out
