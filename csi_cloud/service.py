"""The cloud worker: MQTT ingest -> micro-batches -> decode + classify -> store -> publish.

One :class:`CloudService` per process, started in the FastAPI lifespan. Segment messages come
from an MQTT 5 shared subscription (``$share/{group}/{prefix}/+/+/seg``) on a persistent
session (clean start off, session expiry), and are acknowledged only after their batch is
stored, so a worker that dies mid-batch gets them again from the broker (duplicates are
recognised by epoch and sequence number). Status messages (retained) update each AP's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from csi_edge._errors import CSIError
from csi_edge._mqtt import Backoff
from csi_edge.bundle import decode_segment_codes
from csi_edge.presence import PresenceConfig
from csi_edge.settings import topic_name

from .db import AP, Database, Prediction
from .events import LiveTrust
from .ingest import BatchResult, DecodedRecord, Ingestor
from .live import LiveHub
from .metrics import Metrics
from .model.heads import UNKNOWN
from .registry import ModelRegistry
from .settings import CloudSettings

__all__ = ["CloudService", "NotConnectedError"]

log = logging.getLogger("csi_cloud.service")

_ACTIVE_MODEL = "active_model"


class NotConnectedError(RuntimeError):
    """The worker has no MQTT connection right now."""


class CloudService:
    def __init__(self, settings: CloudSettings, *, recorder: Any = None) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models)
        self.db = Database(settings.db)
        self.ingestor = Ingestor(self.registry, settings.max_payload_bytes,
                                 presence=PresenceConfig(settings.presence_threshold,
                                                         settings.presence_sensitivity,
                                                         settings.presence_hold_s))
        self.hub = LiveHub()
        self.trust = LiveTrust(self.registry, self.db, settings.prefix)  # smoothing, events
        self.metrics = Metrics()
        self.metrics.track_aps(self.ap_rates)
        # -- recordings and training jobs (csi_cloud.storage, csi_cloud.jobs) --
        if recorder is None and settings.record:
            from .recorder import RecorderProcess

            recorder = RecorderProcess(settings.recordings, models=settings.models,
                                       reconstruction=settings.record_reconstruction,
                                       max_bytes=settings.recording_max_bytes,
                                       max_s=settings.recording_max_s,
                                       flush_s=settings.recording_flush_s)
        self.recorder = recorder
        from .jobs import JobManager

        self.jobs = JobManager(settings, self.db, self.registry,
                               active_model=lambda: self.active_model, activate=self.activate)
        # -- end recordings and training jobs --
        self.queue: asyncio.Queue[tuple[str, str, bytes, float, Callable[[], None] | None]] = \
            asyncio.Queue()
        self.mqtt: Any = None
        self.bus: Any = None  # csi_cloud.bus.NatsBus when segments come from NATS
        self.started = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._storing: asyncio.Task[None] | None = None  # the latest batch's store
        self._ap_status: dict[tuple[str, str], dict[str, Any]] = {}
        self._db_aps: set[tuple[str, str]] = set()  # AP rows known to exist
        # APs with discovery configs, and whether those include the model's entities.
        self._announced: dict[tuple[str, str], bool] = {}
        self._switch_sent: set[tuple[str, str, int]] = set()
        self.batches = 0
        self._status_writer = ThreadPoolExecutor(1, thread_name_prefix="status")

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if not len(self.registry):
            raise RuntimeError(f"no usable model bundle in {self.settings.models} "
                               f"({self.registry.problems or 'folder empty'})")
        self.registry.serve(self.active_model)
        await asyncio.to_thread(self._restore_states)
        # Models and libraries are loaded: keep the collector from re-scanning them (full
        # collections of those objects were the worst latency spikes under load).
        gc.collect()
        gc.freeze()
        # Fewer young-generation collections: ingest allocates many short-lived objects.
        gc.set_threshold(50_000, 20, 20)
        self.jobs.start(asyncio.get_running_loop())  # training jobs
        self._tasks.append(asyncio.create_task(self._batch_loop(), name="ingest batches"))
        if self.settings.broker_address() is not None:
            self._tasks.append(asyncio.create_task(self._mqtt_loop(), name="mqtt"))
        if self.settings.bus_servers():  # segments from a NATS JetStream cluster
            from .bus import NatsBus

            self.bus = NatsBus.from_settings(self.settings, self)
            await self.bus.start()

    async def stop(self) -> None:
        """Drain what was received, then stop every part; each step is bounded so a stuck
        part cannot keep the process from exiting (what is not acknowledged is resent)."""
        if self.bus is not None:
            self.bus.pause()  # nothing new; what was delivered is stored and acknowledged
        deadline = time.monotonic() + 5
        while not self.queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._storing is not None:
            await asyncio.wait({self._storing}, timeout=10)
        if self.bus is not None:
            await self.bus.close()  # acknowledgements out, partitions handed over (bounded)
        self._status_writer.shutdown(wait=False, cancel_futures=True)
        for name, step, limit in (("training jobs", self.jobs.stop, 15.0),
                                  ("recorder", getattr(self.recorder, "close", None), 30.0)):
            if step is None:
                continue
            try:
                await asyncio.wait_for(asyncio.to_thread(step), limit)
            except TimeoutError:
                log.error("stopping the %s took over %.0f s; going on", name, limit)
        self.db.close()

    @property
    def ready(self) -> bool:
        return (self.mqtt is not None or self.settings.broker_address() is None) and \
            (self.bus is None or self.bus.ready)

    def _restore_states(self) -> None:
        """Epoch and last sequence number per AP from the database, so segments the broker
        delivers again after a restart are recognised as duplicates."""
        with self.db.session() as s:
            for row in s.scalars(select(AP)):
                self._restore_row(s, row)

    def reload_aps(self, keep: Callable[[str, str], bool]) -> int:
        """Forget what this worker holds for the APs ``keep(site, ap)`` selects and read their
        state and context back from the database: their partition just moved to this worker,
        and another one may have handled them meanwhile. Call it in a thread, while none of
        these APs' segments are being processed (csi_cloud.bus does)."""
        with self.db.session() as s:
            rows = [row for row in s.scalars(select(AP)) if keep(row.site, row.ap)]
            for row in rows:
                self.ingestor.forget(row.site, row.ap)
                self._restore_row(s, row)
        return len(rows)

    def _restore_row(self, s: Any, row: AP) -> None:
        self._restore_context(s, row)
        self._db_aps.add((row.site, row.ap))
        state = self.ingestor.state(row.site, row.ap)
        state.epoch, state.last_seq = row.epoch, row.last_seq
        state.model, state.rate_level = row.model, row.rate_level
        counters = dict(row.counters or {})
        state.rejected.update(counters.pop("rejected", {}) or {})
        state.counters.update({k: v for k, v in counters.items() if isinstance(v, int)})
        if isinstance(row.status, dict):
            self._ap_status[(row.site, row.ap)] = row.status
        if row.epoch is not None and row.last_seq is not None:
            # What is stored, not the row's last_seq (written from the state, which may hold
            # the next batch, not yet stored), is what was seen; and the gaps are awaited: a
            # resent or late segment is not taken for a duplicate.
            stored = s.scalars(select(Prediction.seq).where(
                Prediction.site == row.site, Prediction.ap == row.ap,
                Prediction.epoch == row.epoch, Prediction.seq > row.last_seq - 4096)).all()
            self.ingestor.restore_seen(row.site, row.ap, list(stored))

    def _restore_context(self, s: Any, row: AP) -> None:
        """The AP's last context from the codes stored with its predictions, so a restarted
        worker predicts exactly as if it had never stopped."""
        if row.epoch is None or row.model is None:
            return
        try:
            model = self.registry.get(row.model)
        except KeyError:
            return
        n = model.net.cfg.context_segments
        rows = s.execute(select(Prediction.seq, Prediction.timestamp, Prediction.rate_level,
                                Prediction.quality, Prediction.codes, Prediction.received)
                         .where(Prediction.site == row.site, Prediction.ap == row.ap,
                                Prediction.epoch == row.epoch, Prediction.model == model.id)
                         .order_by(Prediction.id.desc()).limit(n)).all()
        records = []
        for seq, timestamp, level, quality, codes, received in reversed(rows):
            if codes is None:
                continue
            try:
                decoded = decode_segment_codes(codes, level, model.manifest, model.tables)
            except (CSIError, ValueError):
                continue
            records.append(DecodedRecord(row.site, row.ap, row.epoch, seq,
                                         round(timestamp * 1000), level, quality, model,
                                         decoded, codes, received))
        if records:
            self.ingestor.restore_context(records)

    # -- models -----------------------------------------------------------------------------

    @property
    def active_model(self) -> str:
        stored = self.db.get_setting(_ACTIVE_MODEL)
        if stored in self.registry.ids():
            return stored
        if self.settings.default_model:
            return self.registry.get(self.settings.default_model).id
        return sorted(self.registry.manifests(), key=lambda m: m.name)[0].id

    async def activate(self, model_id: str) -> list[str]:
        """Make a bundle the active one and announce it on every compatible AP's ``ctl``."""
        model = self.registry.get(model_id)
        if self.mqtt is None:
            raise NotConnectedError("not connected to the MQTT broker: nothing was changed")
        announced = []
        for site, ap in await asyncio.to_thread(self._known_aps):
            current = (self._ap_status.get((site, ap)) or {}).get("model")
            if isinstance(current, str) and self.registry.same_edge(current, model.id):
                continue  # a bundle derived in the cloud: the AP's encoder stays as it is
            if self._compatible(site, ap, model.id):
                await self.send_ctl(site, ap, self._switch_command(model.id))
                announced.append(f"{site}/{ap}")
        # Stored last: a failed announcement leaves the previous model active.
        await asyncio.to_thread(self.db.set_setting, _ACTIVE_MODEL, model.id)
        self.registry.serve(model.id)
        return announced

    def _switch_command(self, model_id: str) -> dict[str, Any]:
        base = self.settings.base_url
        return {"action": "switch_model", "model_id": model_id,
                "url": f"{base}/api/v1/models/{model_id}/edge"}

    def _compatible(self, site: str, ap: str, model_id: str) -> bool:
        status = self._ap_status.get((site, ap)) or {}
        current = status.get("model")
        if not current:
            return True
        try:
            old = self.registry.get(current).manifest.input_spec
        except KeyError:
            return True
        new = self.registry.get(model_id).manifest.input_spec
        return old.source_kind == new.source_kind

    def _known_aps(self) -> list[tuple[str, str]]:
        with self.db.session() as s:
            return [(a.site, a.ap) for a in s.scalars(select(AP))]

    # -- control ----------------------------------------------------------------------------

    async def send_ctl(self, site: str, ap: str, command: dict[str, Any]) -> None:
        topic_name(site, "site")
        topic_name(ap, "ap")
        if self.mqtt is None:
            raise NotConnectedError("not connected to the MQTT broker")
        await self.mqtt.publish(f"{self.settings.prefix}/{site}/{ap}/ctl",
                                json.dumps(command), qos=1)

    # -- ingest -----------------------------------------------------------------------------

    def submit(self, site: str, ap: str, payload: bytes, received: float,
               ack: Callable[[], None] | None = None) -> None:
        self.queue.put_nowait((site, ap, payload, received, ack))
        self.metrics.queue.set(self.queue.qsize())

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.settings.batch_max_segments
        wait_s = self.settings.batch_max_wait_ms / 1000
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + wait_s
            while len(batch) < limit:
                while len(batch) < limit and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                remaining = deadline - loop.time()
                if remaining <= 0 or len(batch) >= limit:
                    break
                await asyncio.sleep(min(remaining, 0.002))
            self.metrics.queue.set(self.queue.qsize())
            try:
                await self._process(batch)
            except Exception:  # a bug must not stop ingest; the batch stays unacknowledged
                log.exception("ingest batch of %d message(s) failed", len(batch))
        # (the store of the last batch may still run; stop() awaits it)

    async def _process(self, batch: list[tuple[str, str, bytes, float,
                                               Callable[[], None] | None]]) -> None:
        """Decode and classify this batch; store it while the next one is classified.

        Ingest stays strictly sequential (it holds the per-AP state); stores run one at a time
        in batch order, each after the previous one, overlapping the next batch's ingest.
        """
        t0 = time.perf_counter()
        items = [(site, ap, payload, received) for site, ap, payload, received, _ in batch]
        result = await asyncio.to_thread(self.ingestor.process, items)
        events = [p.as_dict() for p in result.predictions]
        if events:
            await asyncio.to_thread(self.trust.observe, events)
        previous = self._storing
        self._storing = asyncio.create_task(self._finish(batch, result, events, previous, t0))
        if previous is not None:
            await previous  # at most one store waiting behind the running one

    async def _finish(self, batch: list[tuple[str, str, bytes, float,
                                              Callable[[], None] | None]],
                      result: BatchResult, events: list[dict[str, Any]],
                      previous: asyncio.Task[None] | None, t0: float) -> None:
        if previous is not None:
            await asyncio.shield(previous)
        try:
            await asyncio.to_thread(self._store, result, events)
        except Exception:  # not acknowledged: the broker delivers the batch again
            log.exception("storing a batch of %d message(s) failed", len(batch))
            return
        now = time.time()
        for *_, received, ack in batch:
            self.metrics.latency.observe(max(0.0, now - received))
            if ack is not None:
                ack()
        self.batches += 1
        self.metrics.batch.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.recording_dropped.set(getattr(self.recorder, "dropped_segments", 0))
        self.metrics.messages.inc(len(batch))
        self.metrics.segments.inc(len(result.segments))
        self.metrics.predictions.inc(len(result.predictions))
        self.metrics.idle_segments.inc(sum(1 for r in result.segments if r.idle))
        self.metrics.unknown_identities.inc(sum(1 for p in result.predictions
                                                if p.identity == UNKNOWN))
        for _, _, reason, _ in result.rejected:
            self.metrics.rejected.labels(reason).inc()
        if events:
            self.hub.publish(events)
            self._publish_predictions(events)
        await self.trust.flush(self.mqtt)

    def _store(self, result: BatchResult, events: list[dict[str, Any]]) -> None:
        """Predictions and AP state of one batch in one transaction, with bulk statements
        (ORM objects per row cost more than the model itself at a thousand APs)."""
        if self.recorder is not None and result.segments:
            try:
                self.recorder.append(result.segments)
            except Exception:  # recordings are best effort; predictions still count
                log.exception("recording %d segment(s) failed", len(result.segments))
        touched = {(p["site"], p["ap"]) for p in events}
        touched |= {(site, ap) for site, ap, *_ in result.rejected
                    if (site, ap) in self.ingestor.aps}
        if not touched:
            return
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for event in events:
            latest[(event["site"], event["ap"])] = event
        for attempt in (1, 2):
            try:
                with self.db.session.begin() as s:
                    self._write_batch(s, events, self._codes_of(events, result), touched,
                                      latest)
                return
            except IntegrityError:
                # Another writer (the status thread, another worker) created one of the new
                # AP rows first: they exist now, so the second attempt updates them.
                self._db_aps -= touched
                if attempt == 2:
                    raise

    @staticmethod
    def _codes_of(events: list[dict[str, Any]], result: BatchResult) -> list[bytes | None]:
        by_key = {(r.site, r.ap, r.epoch, r.seq): r.code_bytes for r in result.segments}
        return [by_key.get((e["site"], e["ap"], e["epoch"], e["seq"])) for e in events]

    def _write_batch(self, s: Any, events: list[dict[str, Any]], codes: list[bytes | None],
                     touched: set[tuple[str, str]],
                     latest: dict[tuple[str, str], dict[str, Any]]) -> None:
        if events:
            s.execute(insert(Prediction),
                      [{**{k: v for k, v in e.items() if k != "model_name"}, "codes": c}
                       for e, c in zip(events, codes, strict=True)])
        unknown = touched - self._db_aps
        if unknown:
            existing = {tuple(r) for r in s.execute(
                select(AP.site, AP.ap).where(tuple_(AP.site, AP.ap).in_(sorted(unknown))))}
            new = unknown - existing
            if new:
                now = time.time()
                s.execute(insert(AP), [{"site": site, "ap": ap, "first_seen": now,
                                        "online": False, "counters": {}}
                                       for site, ap in sorted(new)])
            self._db_aps |= unknown
        updates = []
        for site, ap in touched:
            state = self.ingestor.aps[(site, ap)]
            row: dict[str, Any] = {
                "site": site, "ap": ap, "last_seen": state.last_seen, "epoch": state.epoch,
                "last_seq": state.last_seq,
                "counters": {**dict(state.counters), "rejected": dict(state.rejected)}}
            if state.model:
                row["model"] = state.model
            if state.rate_level is not None:
                row["rate_level"] = state.rate_level
            if (site, ap) in latest:
                row["prediction"] = latest[(site, ap)]
            updates.append(row)
        # Bulk UPDATE by primary key, grouped by the set of columns each row sets.
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in updates:
            by_keys.setdefault(tuple(sorted(row)), []).append(row)
        for rows in by_keys.values():
            s.execute(update(AP), rows)

    def _publish_predictions(self, events: list[dict[str, Any]]) -> None:
        """The latest prediction of each AP in the batch, retained, QoS 1. Handed to paho
        without awaiting each PUBACK (paho keeps them in flight and retries); awaiting
        thousands of acknowledgements a second through aiomqtt costs more than the model."""
        client = self.mqtt
        if client is None:
            return
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for event in events:
            latest[(event["site"], event["ap"])] = event
        for (site, ap), event in latest.items():
            client._client.publish(f"{self.settings.prefix}/{site}/{ap}/pred",
                                   json.dumps(event), qos=1, retain=True)

    # -- MQTT -------------------------------------------------------------------------------

    async def _mqtt_loop(self) -> None:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        settings = self.settings
        broker = settings.broker_address()
        assert broker is not None
        backoff = Backoff(0.5, 30.0)
        # Every site, or this worker's shard of sites (Mosquitto hands shared-subscription
        # messages out round robin, which would split an AP's context between workers).
        seg_filters = [f"{settings.prefix}/{site}/+/seg" for site in settings.sites] or \
            [f"{settings.prefix}/+/+/seg"]
        if settings.shared_subscription:
            seg_filters = [f"$share/{settings.share_group}/{f}" for f in seg_filters]
        if settings.bus_servers():
            seg_filters = []  # segments come from the NATS bus (csi_cloud.bus)
        v5 = settings.mqtt_protocol == "5"
        status_filter = f"{settings.prefix}/+/+/status"
        while True:
            props: Properties | None = None
            session: dict[str, Any] = {"clean_session": False}  # MQTT 3.1.1: kept until ended
            if v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = settings.session_expiry_s
                session = {"clean_start": False}
            tls = None
            if broker.tls:
                tls = aiomqtt.TLSParameters(ca_certs=str(settings.ca_file)
                                            if settings.ca_file else None)
            client = aiomqtt.Client(
                broker.host, broker.port, username=broker.username, password=broker.password,
                identifier=settings.client_id,
                protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
                properties=props, keepalive=30, tls_params=tls, timeout=10, **session,
                max_inflight_messages=1000)
            # Acknowledge a segment only once its batch is stored (at-least-once end to end):
            # aiomqtt has no switch for it, paho does.
            client._client.manual_ack_set(True)
            try:
                async with client:
                    self.mqtt = client
                    backoff.reset()
                    log.info("connected to %s as %s", broker, settings.client_id)
                    for seg_filter in seg_filters:
                        await client.subscribe(seg_filter, qos=1)
                    await client.subscribe(status_filter, qos=1)
                    async for message in client.messages:
                        self._on_message(client, message)
            except aiomqtt.MqttError as exc:
                delay = backoff.next_delay()
                log.warning("broker %s: %s; retrying in %.1f s", broker, exc, delay)
                self.mqtt = None
                await asyncio.sleep(delay)
            finally:
                self.mqtt = None

    def _on_message(self, client: Any, message: Any) -> None:
        topic = message.topic.value
        parts = topic.split("/")
        prefix_levels = len(self.settings.prefix.split("/"))
        received = time.time()

        def ack(mid: int = message.mid, qos: int = message.qos) -> None:
            if qos > 0:
                with contextlib.suppress(Exception):  # a closed connection: broker resends
                    client._client.ack(mid, qos)

        if len(parts) != prefix_levels + 3:
            ack()
            return
        site, ap, kind = parts[-3:]
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else \
            str(message.payload or "").encode()
        if kind == "seg":
            self.submit(site, ap, bytes(payload), received, ack)
        elif kind == "status":
            ack()
            self._on_status(site, ap, bytes(payload))
        else:
            ack()

    def _on_status(self, site: str, ap: str, payload: bytes) -> None:
        try:
            status = json.loads(payload) if payload else None
        except ValueError:
            log.warning("%s/%s: status is not JSON: %r", site, ap, payload[:80])
            return
        if not isinstance(status, dict):
            return
        self._ap_status[(site, ap)] = status
        has_model = isinstance(status.get("model_name"), str)
        if self.settings.homeassistant and self._announced.get((site, ap)) != has_model:
            self._announced[(site, ap)] = has_model
            self._announce(site, ap, status)
        # One writer thread keeps status updates in arrival order.
        asyncio.get_running_loop().run_in_executor(self._status_writer, self._store_status, site,
                                                   ap, status)
        # An AP that (re)started on another model than the active one is told to switch, once
        # per epoch, if the active model takes its kind of CSI.
        active = self.active_model
        epoch = status.get("epoch")
        if (status.get("online") and isinstance(status.get("model"), str)
                and not self.registry.same_edge(status["model"], active)
                and isinstance(epoch, int) and self.db.get_setting(_ACTIVE_MODEL)
                and (site, ap, epoch) not in self._switch_sent
                and self._compatible(site, ap, active)):
            self._switch_sent.add((site, ap, epoch))
            asyncio.get_running_loop().create_task(
                self._quiet(self.send_ctl(site, ap, self._switch_command(active))))

    def _announce(self, site: str, ap: str, status: dict[str, Any]) -> None:
        """Home Assistant discovery configs for a newly seen AP (retained, QoS 1)."""
        from .homeassistant import discovery_configs

        client = self.mqtt
        if client is None:
            return
        name = status.get("model_name") if isinstance(status.get("model_name"), str) else None
        for topic, config in discovery_configs(
                self.settings.prefix, site, ap, model_name=name,
                discovery_prefix=self.settings.homeassistant_prefix).items():
            # An empty retained payload removes the entity (and the retained config).
            client._client.publish(topic, b"" if config is None else json.dumps(config), qos=1,
                                   retain=True)

    @staticmethod
    async def _quiet(coro: Any) -> None:
        with contextlib.suppress(Exception):
            await coro

    def _store_status(self, site: str, ap: str, status: dict[str, Any]) -> None:
        try:
            self._write_status(site, ap, status)
        except IntegrityError:  # the ingest batch created the row meanwhile
            self._write_status(site, ap, status)

    def _write_status(self, site: str, ap: str, status: dict[str, Any]) -> None:
        with self.db.session.begin() as s:
            row = s.get(AP, (site, ap)) or AP(site=site, ap=ap, first_seen=time.time())
            row.online = bool(status.get("online"))
            row.status = status
            row.source = status.get("source") if isinstance(status.get("source"), str) else None
            if isinstance(status.get("model"), str):
                row.model = status["model"]
            if isinstance(status.get("rate_level"), int):
                row.rate_level = status["rate_level"]
            s.merge(row)

    # -- views ------------------------------------------------------------------------------

    def ap_rates(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for (site, ap), state in list(self.ingestor.aps.items()):
            status = self._ap_status.get((site, ap)) or {}
            out.append({"site": site, "ap": ap, "payload_bytes_per_s": state.bytes_per_s(now),
                        "online": bool(status.get("online"))})
        return out
