"""The cloud worker: MQTT ingest -> micro-batches -> decode + classify -> store -> publish.

One :class:`CloudService` per process, started in the FastAPI lifespan: its lifecycle, the
batching, the per-AP status and the active model. The MQTT client is csi_cloud.mqtt_link, the
SQL csi_cloud.persistence. Segments are acknowledged only after their batch is stored, so a
worker that dies mid-batch gets them again from the broker (duplicates are recognised by epoch
and sequence number). Status messages (retained) update each AP's state.

Nothing one message does stops ingest: a handler error is logged once with the bad value,
counted and skipped. A batch the database
refuses is retried with backoff; while the database is unreachable it is retried for as long
as it takes (nothing acknowledged, nothing lost; ``/readyz`` says why), and a batch refused
for its content is split by AP and what still fails is dead-lettered (kept in
``dead_letters``, counted, listed by the API, acknowledged). Database work runs on its own
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from csi_edge.presence import PresenceConfig

from .db import APPresence, Database
from .events import LiveTrust
from .ingest import BatchResult, Ingestor
from .live import LiveHub
from .metrics import Metrics
from .model.heads import UNKNOWN
from .mqtt_link import SHOWN as _SHOWN
from .mqtt_link import MqttLink, NotConnectedError
from .mqtt_link import shown as _shown
from .persistence import Persistence, codes_of, is_transient
from .registry import ModelRegistry
from .settings import CloudSettings

__all__ = ["CloudService", "NotConnectedError", "is_transient"]

_RELEASE_EVERY_S = 10  # freed heap memory goes back to the system at most this often

log = logging.getLogger("csi_cloud.service")

_ACTIVE_MODEL = "active_model"
_STATUS_TEXT_MAX = 300  # characters of an AP's error text kept in its status
_LOGGED_MAX = 4096  # distinct problems remembered for "log once"

_Item = tuple[str, str, bytes, float, Callable[[], None] | None]


class CloudService:
    def __init__(self, settings: CloudSettings, *, recorder: Any = None) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models)
        self.db = Database(settings.db, api_pool_size=settings.api_db_pool_size,
                           api_max_overflow=settings.api_db_max_overflow,
                           api_pool_timeout_s=settings.api_db_pool_timeout_s,
                           busy_timeout_s=settings.db_timeout_s)
        self.ingestor = Ingestor(self.registry, settings.max_payload_bytes,
                                 presence=PresenceConfig(settings.presence_threshold,
                                                         settings.presence_sensitivity,
                                                         settings.presence_hold_s),
                                 max_aps=settings.max_aps, live_lengths=settings.live_lengths)
        self.persistence = Persistence(self.db, self.ingestor, self.registry)
        self.metrics = Metrics()
        self.hub = LiveHub(on_drop=self.metrics.live_dropped.inc)
        self.trust = LiveTrust(self.registry, self.db, settings.prefix,
                               settings.events_settle_s)  # smoothing, events
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
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.link = MqttLink(settings, self.metrics, self.log_once, self.submit, self._on_status)
        self.bus: Any = None  # csi_cloud.bus.NatsBus when segments come from NATS
        self.started = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._storing: asyncio.Task[None] | None = None  # the latest batch's store
        self._ap_status: dict[tuple[str, str], dict[str, Any]] = {}
        # APs with discovery configs, and whether those include the model's entities.
        self._announced: dict[tuple[str, str], bool] = {}
        self._switch_sent: dict[tuple[str, str], int] = {}  # the epoch told to switch
        self.batches = 0
        self._released_at_batch = 0
        # Threads of their own: ingest (the per-AP state: one at a time), stores (in batch
        # order), status writes (in arrival order), other database reads, and /predict (so an
        # upload cannot hold up live ingest).
        self._ingest_pool = ThreadPoolExecutor(1, thread_name_prefix="ingest")
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="store")
        self._status_writer = ThreadPoolExecutor(1, thread_name_prefix="status")
        self._db_pool = ThreadPoolExecutor(2, thread_name_prefix="db")
        self.predict_pool = ThreadPoolExecutor(2, thread_name_prefix="predict")
        self._active_setting: str | None = None  # the stored active model (cached)
        self._pending_status: dict[tuple[str, str], dict[str, Any]] = {}
        self._status_seen: dict[tuple[str, str], tuple[float, float]] = {}  # (when, due in s)
        self._availability: dict[tuple[str, str], bool] = {}  # the verdict last published
        self._logged: OrderedDict[str, None] = OrderedDict()
        self._stuck: str | None = None  # why stores fail right now
        self._status_failing: str | None = None
        self._status_retry: set[tuple[str, str]] = set()  # status writes to try again
        self._thresholds_lock = threading.Lock()  # refresh_motion_thresholds, one at a time
        self._waiting_since: float | None = None  # the queue has not been empty since
        self._processing = False  # the batch loop holds a batch
        self.dead_lettered = 0
        self.duplicates_refused = 0  # segments another worker had stored (not stored again)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if not len(self.registry):
            raise RuntimeError(f"no usable model bundle in {self.settings.models} "
                               f"({self.registry.problems or 'folder empty'})")
        loop = asyncio.get_running_loop()
        self._active_setting = await loop.run_in_executor(self._db_pool, self.db.get_setting,
                                                          _ACTIVE_MODEL)
        self.registry.serve(self.active_model)
        await loop.run_in_executor(self._db_pool, self._restore)
        await loop.run_in_executor(self._db_pool, self.refresh_motion_thresholds)
        # Load what the first prediction needs before taking traffic (first-prediction
        # latency; the memory is there from the start, not grown under the first load).
        await loop.run_in_executor(self._ingest_pool, self.ingestor.warm)
        # Models and libraries are loaded: keep the collector from re-scanning them (full
        # collections of those objects were the worst latency spikes under load).
        gc.collect()
        gc.freeze()
        # Fewer young-generation collections: ingest allocates many short-lived objects.
        gc.set_threshold(50_000, 20, 20)
        self.jobs.start(asyncio.get_running_loop())  # training jobs
        self._tasks.append(asyncio.create_task(self._batch_loop(), name="ingest batches"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        if self.settings.broker_address() is not None:
            self._tasks.append(asyncio.create_task(self.link.run(), name="mqtt"))
        if self.settings.bus_servers():  # segments from a NATS JetStream cluster
            from .bus import NatsBus

            self.bus = NatsBus.from_settings(self.settings, self)
            await self.bus.start()

    async def stop(self) -> None:
        """Drain what was received, then stop every part; each step is bounded so a stuck
        part cannot keep the process from exiting (what is not acknowledged is resent)."""
        if self.bus is not None:
            # Nothing new; what was delivered is stored and acknowledged; the others take over.
            await self.bus.pause()
        # Until the batch loop has taken every queued message AND finished the batch it holds
        # (cancelled mid-batch, that batch and the one being stored would be left
        # unacknowledged: resent, but the bus could not hand their partitions over at once).
        deadline = time.monotonic() + 5
        while (not self.queue.empty() or self._processing) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._storing is not None:
            await asyncio.wait({self._storing}, timeout=10)
        with contextlib.suppress(Exception):  # derived; never in the way of stopping
            # The last seconds of each AP's activity timeline, settled with what came after.
            if self.trust.release(everything=True):
                await asyncio.wait_for(self.trust.flush(self.mqtt), 5)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._storing is not None:
            # Still retrying (the database is away): cancelled, so the batch is not
            # acknowledged (nor dead-lettered) and the broker delivers it again.
            self._storing.cancel()
            await asyncio.wait({self._storing}, timeout=2)
        if self.bus is not None:
            await self.bus.close()  # acknowledgements out, partitions handed over (bounded)
        for pool in (self._status_writer, self._db_pool, self.predict_pool, self._ingest_pool,
                     self._store_pool):
            pool.shutdown(wait=False, cancel_futures=True)
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
    def mqtt(self) -> Any:
        """The connected MQTT client (None while there is none)."""
        return self.link.client

    @property
    def ready(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """What keeps this worker from working right now (``/readyz`` reports it)."""
        out = []
        if self.mqtt is None and self.settings.broker_address() is not None:
            out.append("mqtt: not connected to the broker")
        if self.bus is not None and not self.bus.ready:
            out.append("bus: not consuming from the NATS cluster")
        if self._stuck is not None:
            out.append(self._stuck)
        since = self._waiting_since
        if since is not None and not self.queue.empty() and time.monotonic() - since > 30:
            out.append(f"ingest: {self.queue.qsize()} message(s) waiting, the queue not "
                       f"taken for {time.monotonic() - since:.0f} s")
        if self._status_failing is not None:
            out.append(self._status_failing)
        return out

    def log_once(self, key: str, message: str, *args: Any, exc: BaseException | None = None
                 ) -> None:
        """Log a problem the first time it is seen (by ``key``), later ones at debug level:
        a flood of bad messages cannot flood the log."""
        if key in self._logged:
            log.debug(message, *args)
            return
        self._logged[key] = None
        while len(self._logged) > _LOGGED_MAX:
            self._logged.popitem(last=False)
        log.warning(message + " (logged once)", *args, exc_info=exc)

    def refresh_motion_thresholds(self, session: Session | None = None) -> None:
        """The APs' own motion thresholds from the database into the ingestor: at start and
        every 5 s (ingest's connections), and at once after this worker's API changed one
        (read on the API's ``session``). One refresh at a time: a read that began before the
        API's write cannot be applied after the API's own read."""
        with self._thresholds_lock:
            if session is None:
                thresholds = self.db.motion_thresholds()
            else:
                thresholds = {(r.site, r.ap): r.threshold
                              for r in session.scalars(select(APPresence))}
            self.ingestor.set_motion_thresholds(thresholds)

    def _restore(self, keep: Callable[[str, str], bool] | None = None) -> int:
        """Per-AP state and context from the database (persistence.restore), and each AP's
        stored status, overdue from now on if no status comes (a retained one normally does
        at once)."""
        restored = self.persistence.restore(keep)
        for key, status in restored:
            if keep is not None:
                self.trust.drop(*key)
            if status is not None:
                self._ap_status[key] = status
                self._status_seen[key] = (time.monotonic(), self._due(status))
        return len(restored)

    def reload_aps(self, keep: Callable[[str, str], bool]) -> int:
        """Forget what this worker holds for the APs ``keep(site, ap)`` selects and read their
        state and context back from the database: their partition just moved to this worker,
        and another one may have handled them meanwhile. Call it in a thread, while none of
        these APs' segments are being processed (csi_cloud.bus does)."""
        return self._restore(keep)

    # -- models -----------------------------------------------------------------------------

    @property
    def active_model(self) -> str:
        """The active bundle; the stored choice is cached (read at start, after activate and
        every few seconds off the event loop), so this never queries the database."""
        stored = self._active_setting
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
        loop = asyncio.get_running_loop()
        for site, ap in await loop.run_in_executor(self._db_pool, self.persistence.known_aps):
            current = (self._ap_status.get((site, ap)) or {}).get("model")
            if isinstance(current, str) and self.registry.same_edge(current, model.id):
                continue  # a bundle derived in the cloud: the AP's encoder stays as it is
            if self._compatible(site, ap, model.id):
                await self.send_ctl(site, ap, self._switch_command(model.id))
                announced.append(f"{site}/{ap}")
        # Stored last: a failed announcement leaves the previous model active.
        await loop.run_in_executor(self._db_pool, self.db.set_setting, _ACTIVE_MODEL, model.id)
        self._active_setting = model.id
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

    # -- control ----------------------------------------------------------------------------

    async def send_ctl(self, site: str, ap: str, command: dict[str, Any]) -> None:
        await self.link.send_ctl(site, ap, command)

    # -- ingest -----------------------------------------------------------------------------

    def submit(self, site: str, ap: str, payload: bytes, received: float,
               ack: Callable[[], None] | None = None) -> None:
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        self.queue.put_nowait((site, ap, payload, received, ack))
        self.metrics.queue.set(self.queue.qsize())

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        limit = self.settings.batch_max_segments
        wait_s = self.settings.batch_max_wait_ms / 1000
        while True:
            batch = [await self.queue.get()]
            self._processing = True
            deadline = loop.time() + wait_s
            while len(batch) < limit:
                while len(batch) < limit and not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                remaining = deadline - loop.time()
                if remaining <= 0 or len(batch) >= limit:
                    break
                await asyncio.sleep(min(remaining, 0.002))
            self.metrics.queue.set(self.queue.qsize())
            # What is still queued came while this batch was collected.
            self._waiting_since = None if self.queue.empty() else time.monotonic()
            try:
                await self._process(batch)
            except Exception as exc:  # a bug must not stop ingest: the batch is kept aside
                self.metrics.handler_errors.labels("ingest").inc()
                self.log_once(f"ingest:{type(exc).__name__}", "ingest batch of %d message(s) "
                              "failed: %s", len(batch), _shown(exc), exc=exc)
                await self._dead_letter(batch, f"ingest: {type(exc).__name__}: {exc}")
                for *_, ack in batch:
                    if ack is not None:
                        ack()
            finally:
                self._processing = False
        # (the store of the last batch may still run; stop() awaits it)

    async def _process(self, batch: list[_Item]) -> None:
        """Decode and classify this batch; store it while the next one is classified.

        Ingest stays strictly sequential (it holds the per-AP state); stores run one at a time
        in batch order, each after the previous one, overlapping the next batch's ingest.
        """
        t0 = time.perf_counter()
        items = [(site, ap, payload, received) for site, ap, payload, received, _ in batch]
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._ingest_pool, self.ingestor.process, items)
        events = [p.as_dict() for p in result.predictions]
        if events:
            await asyncio.to_thread(self.trust.observe, events)
        previous = self._storing
        self._storing = asyncio.create_task(self._finish(batch, result, events, previous, t0))
        if previous is not None:
            await previous  # at most one store waiting behind the running one

    async def _finish(self, batch: list[_Item], result: BatchResult,
                      events: list[dict[str, Any]], previous: asyncio.Task[None] | None,
                      t0: float) -> None:
        if previous is not None:
            await asyncio.shield(previous)
        loop = asyncio.get_running_loop()
        if self.recorder is not None and result.segments:
            await loop.run_in_executor(self._store_pool, self._record, result)
        try:
            stored = await self._store_or_dead_letter(batch, result, events)
        except Exception as exc:  # a bug in the above: never stop ingest; the batch is kept
            self.metrics.handler_errors.labels("store").inc()
            self.log_once(f"finish:{type(exc).__name__}", "storing a batch of %d message(s) "
                          "failed: %s", len(batch), _shown(exc), exc=exc)
            await self._dead_letter(batch, f"{type(exc).__name__}: {exc}")
            stored = []
        now = time.time()
        for *_, received, ack in batch:
            self.metrics.latency.observe(max(0.0, now - received))
            if ack is not None:
                ack()  # stored or dead-lettered: either way kept
        self.batches += 1
        self.metrics.batch.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.recording_dropped.set(getattr(self.recorder, "dropped_segments", 0))
        self.metrics.messages.inc(len(batch))
        self.metrics.segments.inc(len(result.segments))
        self.metrics.predictions.inc(len(stored))
        self.metrics.idle_segments.inc(sum(1 for r in result.segments if r.idle))
        self.metrics.unknown_identities.inc(sum(1 for p in stored
                                                if p["identity"] == UNKNOWN))
        for site, ap, reason, detail in result.rejected:
            self.metrics.rejected.labels(reason).inc()
            self.log_once(f"reject:{reason}:{site[:80]}/{ap[:80]}",
                          "%s/%s: payload rejected (%s): %s", _shown(site)[:90],
                          _shown(ap)[:90], reason, detail[:_SHOWN])
        if stored:
            self.hub.publish(stored)
            self.link.publish_predictions(stored)
        await self.trust.flush(self.mqtt)

    def _record(self, result: BatchResult) -> None:
        try:
            self.recorder.append(result.segments)
        except Exception:  # recordings are best effort; predictions still count
            log.exception("recording %d segment(s) failed", len(result.segments))

    async def _retry_store(self, what: str, fn: Callable[[], object], attempts: int
                           ) -> BaseException | None:
        """Run ``fn`` (a database write) on the store thread until it succeeds: for as long as
        the database is unreachable (backoff up to ``store_retry_max_s``, so ingest resumes
        within that once it is back), ``attempts`` times when it refuses the statement. None
        once stored, else the last error."""
        loop = asyncio.get_running_loop()
        delay, failures, since = 0.05, 0, None
        while True:
            try:
                await loop.run_in_executor(self._store_pool, fn)
            except Exception as exc:
                self.metrics.store_failures.inc()
                if since is None:
                    since = time.time()
                    log.error("storing %s failed (%s): %s; retrying", what,
                              "database unavailable" if is_transient(exc) else "refused",
                              _shown(exc)[:_SHOWN])
                self._stuck = (f"database: storing {what} has failed for "
                               f"{time.time() - since:.0f} s: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:_SHOWN] if str(exc) else ''}")
                self.metrics.stuck.set(1)
                if not is_transient(exc):
                    failures += 1
                    if failures >= attempts:
                        self._stuck = None
                        self.metrics.stuck.set(0)
                        return exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.store_retry_max_s)
                continue
            if since is not None:
                log.info("stored %s after %.1f s of failures", what, time.time() - since)
            self._stuck = None
            self.metrics.stuck.set(0)
            return None

    async def _store_or_dead_letter(self, batch: list[_Item], result: BatchResult,
                                    events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store the batch (retrying); if the database refuses it, store it AP by AP and
        dead-letter the messages of the APs it still refuses. The events stored: not those
        whose segments were stored already, by another worker (counted, not published again)."""
        codes = codes_of(events, result)
        touched = {(p["site"], p["ap"]) for p in events}
        touched |= {(site, ap) for site, ap, *_ in result.rejected
                    if (site, ap) in self.ingestor.aps}
        refused: list[dict[str, Any]] = []

        def store(events: list[dict[str, Any]], codes: list[bytes | None],
                  touched: set[tuple[str, str]]) -> None:
            refused.extend(self.persistence.store(events, codes, touched))

        error = await self._retry_store(
            f"a batch of {len(batch)} message(s)",
            lambda: store(events, codes, touched), self.settings.store_attempts)
        if error is None:
            return self._not_refused(events, refused)
        log.error("the database refuses a batch of %d message(s) (%s): storing it AP by AP",
                  len(batch), _shown(error)[:_SHOWN])
        stored: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        for key in sorted(touched | {(site, ap) for site, ap, *_ in batch}):
            mine = [i for i, e in enumerate(events) if (e["site"], e["ap"]) == key]
            group_events = [events[i] for i in mine]
            group_codes = [codes[i] for i in mine]
            group_touched = {key} & touched
            error = await self._retry_store(
                f"{key[0]}/{key[1]}'s segments",
                partial(store, group_events, group_codes, group_touched), 1)
            if error is None:
                stored.extend(group_events)
                continue
            messages = [item for item in batch if (item[0], item[1]) == key]
            await self._dead_letter(messages, f"{type(error).__name__}: {error}")
            by_epoch: dict[int, list[int]] = {}
            for e in group_events:
                by_epoch.setdefault(e["epoch"], []).append(e["seq"])
            for epoch, seqs in by_epoch.items():  # awaited again: a resend is accepted
                await loop.run_in_executor(self._ingest_pool, self.ingestor.unsee, key[0],
                                           key[1], epoch, seqs)
        stored.sort(key=lambda e: (e["received"], e["seq"]))
        return self._not_refused(stored, refused)

    def _not_refused(self, events: list[dict[str, Any]], refused: list[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
        if not refused:
            return events
        self.duplicates_refused += len(refused)
        self.metrics.duplicates_refused.inc(len(refused))
        self.log_once("duplicates_refused", "%d segment(s) of %s/%s were stored already, by "
                      "another worker: not stored again (csi_duplicates_refused_total counts "
                      "all)", len(refused), _shown(refused[0]["site"])[:90],
                      _shown(refused[0]["ap"])[:90])
        ids = {id(e) for e in refused}
        return [e for e in events if id(e) not in ids]

    async def _dead_letter(self, messages: list[_Item], error: str) -> None:
        """Keep messages that cannot be stored, with the error (retried while the database is
        unreachable: they are acknowledged only once kept)."""
        if not messages:
            return
        rows = [{"site": site[:256], "ap": ap[:256],
                 "payload": payload[: self.settings.max_payload_bytes], "size": len(payload),
                 "error": error[:2000], "received": received, "created": time.time()}
                for site, ap, payload, received, _ in messages]
        failed = await self._retry_store(f"{len(rows)} dead letter(s)",
                                         lambda: self.persistence.write_dead_letters(rows), 3)
        self.dead_lettered += len(rows)
        self.metrics.dead_letters.inc(len(rows))
        for site, ap, payload, _, _ in messages:
            log.error("%s/%s: message dead-lettered (%s): %s", _shown(site)[:90],
                      _shown(ap)[:90], error[:_SHOWN], _shown(payload[:64]))
        if failed is not None:
            log.error("dead letters could not be kept either (%s): %d message(s) dropped",
                      _shown(failed), len(rows))
            self.metrics.handler_errors.labels("dead_letter").inc()

    def _on_status(self, site: str, ap: str, status: dict[str, Any]) -> None:
        """An AP's (retained) status (mqtt_link checked the name and parsed it bounded): kept
        in memory; the database write goes to the status thread (latest per AP, in arrival
        order)."""
        key = (site, ap)
        if key not in self._ap_status and len(self._ap_status) >= self.settings.max_aps:
            self.metrics.status_rejected.labels("too_many_aps").inc()
            self.log_once("status-too-many", "status of %s/%s rejected: %d APs are tracked "
                          "already", site, ap, self.settings.max_aps)
            return
        for text_field in ("error", "state", "source"):  # copied into the API: bounded
            value = status.get(text_field)
            if isinstance(value, str) and len(value) > _STATUS_TEXT_MAX:
                status[text_field] = value[: _STATUS_TEXT_MAX - 1] + "…"
        self._ap_status[key] = status
        self._status_seen[key] = (time.monotonic(), self._due(status))
        self._publish_availability(site, ap, bool(status.get("online")))
        has_model = isinstance(status.get("model_name"), str)
        if self.settings.homeassistant and self._announced.get(key) != has_model:
            self._announced[key] = has_model
            self.link.announce(site, ap, status)
        self._queue_status(site, ap, status)
        # An AP that (re)started on another model than the active one is told to switch, once
        # per epoch, if the active model takes its kind of CSI.
        active = self.active_model
        epoch = status.get("epoch")
        if (status.get("online") and isinstance(status.get("model"), str)
                and not self.registry.same_edge(status["model"], active)
                and isinstance(epoch, int) and self._active_setting
                and self._switch_sent.get(key) != epoch
                and self._compatible(site, ap, active)):
            self._switch_sent[key] = epoch
            self._spawn(self._quiet(self.send_ctl(site, ap, self._switch_command(active))))

    def _due(self, status: dict[str, Any]) -> float:
        """Seconds until the AP's next status: the ``status_interval_s`` it announced, or
        ``offline_after_s`` for an edge that does not say."""
        interval = status.get("status_interval_s")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and \
                0 < interval < 86_400:
            return float(interval)
        return self.settings.offline_after_s

    def _queue_status(self, site: str, ap: str, status: dict[str, Any]) -> None:
        """Write the AP's latest status on the status thread; statuses arriving faster than
        they are written replace each other (at most one waiting per AP)."""
        key = (site, ap)
        scheduled = key in self._pending_status
        self._pending_status[key] = status
        if scheduled:
            return
        future = self._status_writer.submit(self._flush_status, key)
        self._spawn(self._watch_status(key, future))

    def _spawn(self, coro: Any) -> None:
        """A background task, referenced until it is done (the loop keeps only weak ones)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch_status(self, key: tuple[str, str], future: Future[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self.settings.status_timeout_s)
        except Exception as exc:  # TimeoutError too: the thread goes on; the loop does not
            self.metrics.handler_errors.labels("status").inc()
            self._status_retry.add(key)  # the housekeeping writes the latest one again
            self._status_failing = (f"database: writing {key[0]}/{key[1]}'s status failed: "
                                    f"{type(exc).__name__}: {_shown(str(exc))[:_SHOWN]}")
            self.log_once(f"status-write:{type(exc).__name__}", "writing the status of %s/%s "
                          "failed: %s", key[0], key[1], _shown(exc))
        else:
            self._status_failing = None

    def _flush_status(self, key: tuple[str, str]) -> None:
        status = self._pending_status.pop(key, None)
        if status is not None:
            self.persistence.write_status(*key, status)

    async def _housekeeping(self) -> None:
        """Every second: APs whose status is overdue are marked offline; every few seconds the
        stored active model is read again (another worker may have changed it)."""
        loop = asyncio.get_running_loop()
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            try:
                self._mark_offline()
                if await loop.run_in_executor(self._ingest_pool, self.trust.release):
                    await self.trust.flush(self.mqtt)  # an AP went silent: its last seconds
                retry, self._status_retry = self._status_retry, set()
                for key in retry:
                    if key in self._ap_status:
                        self._queue_status(*key, self._ap_status[key])
                if ticks % _RELEASE_EVERY_S == 0 and self.batches != self._released_at_batch:
                    self._released_at_batch = self.batches
                    await loop.run_in_executor(self._db_pool, release_memory)
                if ticks % 5 == 0:
                    stored = await asyncio.wait_for(loop.run_in_executor(
                        self._db_pool, self.db.get_setting, _ACTIVE_MODEL),
                        self.settings.status_timeout_s)
                    if stored is not None:
                        self._active_setting = stored
                    # Another worker's API may have set an AP's threshold.
                    await asyncio.wait_for(loop.run_in_executor(
                        self._db_pool, self.refresh_motion_thresholds),
                        self.settings.status_timeout_s)
            except Exception as exc:
                self.metrics.handler_errors.labels("housekeeping").inc()
                self.log_once(f"housekeeping:{type(exc).__name__}", "housekeeping failed: %s",
                              _shown(exc))

    def _mark_offline(self) -> None:
        now = time.monotonic()
        for key, (seen, due) in list(self._status_seen.items()):
            age = now - seen
            status = self._ap_status.get(key) or {}
            if not status.get("online") or age <= due + self.settings.offline_after_s:
                continue
            status = {**status, "online": False, "state": "offline",
                      "offline_reason": f"no status for {age:.0f} s (one every {due:g} s "
                                        "expected)"}
            self._ap_status[key] = status
            log.warning("%s/%s: no status for %.0f s: marked offline", *key, age)
            self._queue_status(*key, status)
            self._publish_availability(*key, False)

    def _publish_availability(self, site: str, ap: str, online: bool) -> None:
        """The cloud's verdict on an AP, retained on ``{prefix}/{site}/{ap}/availability``
        (``online``/``offline``; Home Assistant reads it next to the AP's status), published
        when it changes."""
        key = (site, ap)
        client = self.mqtt
        if client is None or self._availability.get(key) == online:
            return
        self._availability[key] = online
        client._client.publish(f"{self.settings.prefix}/{site}/{ap}/availability",
                               b"online" if online else b"offline", qos=1, retain=True)

    @staticmethod
    async def _quiet(coro: Any) -> None:
        with contextlib.suppress(Exception):
            await coro

    # -- views ------------------------------------------------------------------------------

    def ap_rates(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for (site, ap), state in list(self.ingestor.aps.items()):
            status = self._ap_status.get((site, ap)) or {}
            out.append({"site": site, "ap": ap, "payload_bytes_per_s": state.bytes_per_s(now),
                        "online": bool(status.get("online"))})
        return out


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; nothing
    elsewhere). A burst of large batches (their arrays and tensors are freed at the end of
    each) leaves free memory in the allocator's arenas, which glibc keeps mapped otherwise:
    the process's RSS would stay at its busiest moment."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
