"""Segments from a NATS JetStream cluster, partitioned by AP, each partition on one worker.

The contract with the service (:class:`SegmentSink`) is the one MQTT ingest has: every segment
is handed over with an ``ack`` that the service calls once the segment's batch is stored, and
only then is it acknowledged to JetStream (at-least-once; a segment delivered twice is
recognised by its epoch and sequence number).

How a worker gets its partitions:

- one durable pull consumer per partition on the MQTT message stream, in priority group
  :data:`~csi_cloud.bus.subjects.PRIORITY_GROUP` with the ``pinned_client`` policy: the server
  gives one pull request a pin id and from then on delivers that partition only to requests
  carrying the id; a worker that sends no pull request for ``pin_ttl_s`` loses the pin, and the
  next waiting request gets a new one;
- the workers announce themselves once a second (:mod:`csi_cloud.bus.placement`); each bids
  (pull requests without a pin id) only for the partitions the common assignment gives it, and
  hands back the others: it stops pulling, lets what it holds be stored and acknowledged, then
  unpins the consumer, so the new worker starts exactly where it stopped;
- when a worker receives the first segment of a partition under a new pin, it first waits for
  its own earlier deliveries of that partition to be stored, then reloads the state and context
  of the partition's APs from the database (another worker may have handled them meanwhile),
  and only then hands the segments over. Where segments the previous worker had received were
  still unacknowledged at the pin change and do not come here (that worker stored them late),
  it reads the APs back once more when it stops waiting for them, so that their contexts hold
  what was stored meanwhile.

The acknowledgement wait (``ack_wait_s``) is shorter than the pin's time to live, so when a
worker dies, the segments it had received but not stored are due for redelivery by the time
another worker is pinned, and JetStream delivers redeliveries first: that worker gets the
partition's segments in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from csi_edge._mqtt import Backoff

from ..settings import CloudSettings
from .jetstream import JetStreamError, api, nanoseconds, pull_request
from .placement import Membership, assign
from .subjects import MQTT_STREAM, PRIORITY_GROUP, SegmentSubjects, partition_of

__all__ = ["BusConfigError", "NatsBus", "SegmentSink"]

log = logging.getLogger("csi_cloud.bus")


def _log_failure(task: asyncio.Task[None]) -> None:
    """Done callback of a background task: its exception is logged, not left unread."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s failed", task.get_name(), exc_info=exc)


_HEARTBEAT_S = 1.0
_TICK_S = 0.2
_PULL_EXPIRES_S = 1.0
_PULL_BATCH = 256


class BusConfigError(RuntimeError):
    """The NATS cluster is not set up as the workers need it (the message says what to fix)."""


class SegmentSink(Protocol):
    """What the bus hands segments to (the cloud service)."""

    def submit(self, site: str, ap: str, payload: bytes, received: float,
               ack: Callable[[], None] | None = None) -> None: ...

    def reload_aps(self, keep: Callable[[str, str], bool]) -> int: ...


@dataclass
class _Partition:
    index: int
    consumer: str
    state: str = "idle"  # idle | bidding | gaining | held | releasing
    pin: str | None = None
    request: str | None = None  # reply subject of the newest pull request
    deadline: float = 0.0  # monotonic: the newest pull request counts as finished
    not_before: float = 0.0  # monotonic: no pull request before (no responders)
    inflight: int = 0  # handed to the service, not yet acknowledged
    release_deadline: float = 0.0
    sequence: int = 0
    delivered: int = 0
    gains: int = 0
    sub: Any = None
    # After a gain (_await_older): the deliveries outstanding at the pin change not yet
    # received here, the stream sequences of those received, and every segment received
    # meanwhile, held back (by stream sequence) until the outstanding ones are all here.
    awaiting: int = 0
    awaiting_until: float = 0.0
    snapshot_seq: int = 0
    outstanding_seen: set[int] = field(default_factory=set)
    # A gain's hold (not a jump's): if it ends without every outstanding delivery come here,
    # the partition's APs are read back from the database again before the held segments
    # are handed over (another worker stored the missing ones meanwhile, or will resend
    # them). ``reads``: reads of the APs under way or waiting for ``read_lock`` (one at a
    # time); while there is one, every segment waits. ``read_done``: when the last ended
    # (monotonic).
    reload_after_hold: bool = False
    reads: int = 0
    read_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    read_done: float = 0.0
    # The consumer sequence of the newest delivery under this pin: a jump means deliveries
    # were lost on the way (a consumer leader that died, a connection that broke).
    last_delivery: int | None = None
    held_back: dict[int, tuple[str, str, bytes, float, str]] = field(default_factory=dict)


@dataclass
class BusStats:
    delivered: int = 0
    acknowledged: int = 0
    gains: int = 0
    losses: int = 0  # pins taken away (ttl, leader change) while held
    releases: int = 0
    reloaded_aps: int = 0
    reordered: int = 0  # segments held back until older ones were redelivered
    lost_deliveries: int = 0  # deliveries that never came (redelivered after the ack wait)
    bad_subjects: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)


class NatsBus:
    """Consume segments for one cloud worker; see the module docstring."""

    def __init__(self, servers: list[str], sink: SegmentSink, *, name: str,
                 subjects: SegmentSubjects, pin_ttl_s: float = 6.0, ack_wait_s: float = 5.0,
                 max_inflight: int = 2048) -> None:
        if ack_wait_s >= pin_ttl_s:
            raise ValueError(f"ack wait {ack_wait_s} s must be shorter than the pin time to "
                             f"live {pin_ttl_s} s (segments would reach a new worker out of "
                             "order after a failover)")
        if pin_ttl_s < 3 * _PULL_EXPIRES_S:
            raise ValueError(f"pin time to live {pin_ttl_s} s: at least "
                             f"{3 * _PULL_EXPIRES_S} s (a pinned worker pulls every "
                             f"{_PULL_EXPIRES_S} s)")
        self.servers = servers
        self.sink = sink
        self.name = name
        self.subjects = subjects
        self.pin_ttl_s = pin_ttl_s
        self.ack_wait_s = ack_wait_s
        self.max_inflight = max_inflight
        self.membership = Membership(name, secrets.token_hex(6), timeout_s=pin_ttl_s)
        self.partitions = [_Partition(p, subjects.consumer(p))
                           for p in range(subjects.partitions)]
        self.stats = BusStats()
        self.nc: Any = None
        self.ready = False
        self.inflight = 0
        self._paused = False
        self._inbox = ""
        self._acks: list[str] = []
        self._ack_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = 0.0

    @classmethod
    def from_settings(cls, settings: CloudSettings, sink: SegmentSink) -> NatsBus:
        servers = settings.bus_servers()
        if not servers:
            raise ValueError(f"bus {settings.bus!r} is not a NATS server list")
        return cls(servers, sink, name=settings.client_id,
                   subjects=SegmentSubjects(settings.prefix, settings.bus_partitions),
                   pin_ttl_s=settings.bus_pin_ttl_s, ack_wait_s=settings.bus_ack_wait_s,
                   max_inflight=settings.bus_max_inflight)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and consume in the background (retrying until the cluster is there)."""
        self._tasks.append(asyncio.create_task(self._run(), name="nats bus"))

    async def pause(self) -> None:
        """Stop pulling and tell the others this worker is leaving: what was delivered is
        still stored and acknowledged, and each held partition is unpinned as soon as its
        segments are (the control loop's "releasing"). Announced now, not at :meth:`close`:
        the others bid at once, so their waiting pull requests are pinned the moment a
        partition is unpinned, instead of after the whole service has stopped (a clean stop
        would otherwise hand over later than a crash, which the pin's time to live bounds)."""
        self._paused = True
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self._heartbeat()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Send the outstanding acknowledgements, hand every held partition over (unpin, and
        tell the others this worker is leaving), close the connection. Bounded."""
        self._paused = True
        deadline = time.monotonic() + timeout_s
        nc = self.nc
        try:
            if nc is not None and nc.is_connected:
                await self._send_acks()
                await self._heartbeat()
                # Every held partition, also one with segments delivered but not stored: they
                # are not acknowledged, so JetStream redelivers them to the next holder, which
                # waits for them before newer ones (_await_older); one this process still
                # stores late is refused by the store (csi_cloud.persistence). Keeping such a
                # partition pinned would hold its APs for the pin's time to live instead.
                for part in self.partitions:
                    if part.state in ("held", "gaining", "releasing"):
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(self._unpin(part),
                                                   max(0.1, deadline - time.monotonic()))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.flush(), max(0.1, deadline - time.monotonic()))
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), max(0.1, deadline - time.monotonic()))
            self.ready = False

    def held(self) -> list[int]:
        return [p.index for p in self.partitions if p.state in ("held", "gaining", "releasing")]

    # -- connection -----------------------------------------------------------------------

    async def _run(self) -> None:
        import nats

        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                self.nc = await nats.connect(
                    servers=self.servers, name=f"csi-cloud {self.name}", connect_timeout=3,
                    reconnect_time_wait=0.5, max_reconnect_attempts=-1,
                    allow_reconnect=True, error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected)
                break
            except Exception as exc:  # no server reachable yet
                delay = backoff.next_delay()
                log.warning("NATS %s unreachable (%s); retrying in %.1f s",
                            ",".join(self._redacted()), exc, delay)
                await asyncio.sleep(delay)
        log.info("connected to NATS %s as worker %s", self.nc.connected_url.netloc
                 .rpartition("@")[2], self.name)
        first = time.monotonic()
        while True:
            try:
                await self._setup()
                break
            except (BusConfigError, JetStreamError, TimeoutError) as exc:
                delay = backoff.next_delay()
                # The MQTT stream appears once this worker's MQTT client has connected: only
                # an error if that takes long.
                level = logging.INFO if time.monotonic() - first < 10 else logging.ERROR
                log.log(level, "NATS bus not ready: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
            except Exception as exc:  # e.g. no responders while the cluster elects leaders
                delay = backoff.next_delay()
                log.warning("NATS bus set-up: %r; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
        self.ready = True
        self._started = time.monotonic()
        self._tasks.append(asyncio.create_task(self._acker(), name="nats acks"))
        await self._control()

    def _redacted(self) -> list[str]:
        return [s.rpartition("@")[2] for s in self.servers]

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS: %r", exc)

    async def _on_disconnected(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            log.warning("NATS connection lost; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected to %s", self.nc.connected_url.netloc.rpartition("@")[2])

    async def _setup(self) -> None:
        nc = self.nc
        await self._check_mapping()
        try:
            await api(nc, f"STREAM.INFO.{MQTT_STREAM}")
        except JetStreamError as exc:
            if exc.err_code == 10059:  # stream not found
                raise BusConfigError(
                    f"stream {MQTT_STREAM} does not exist yet: the NATS server creates it when "
                    "the first MQTT client connects (this worker's MQTT client, broker=...); "
                    "is MQTT enabled on the cluster?") from exc
            raise
        for part in self.partitions:
            await self._ensure_consumer(part)
        self._inbox = nc.new_inbox()
        for part in self.partitions:
            if part.sub is not None:  # set up by an earlier attempt
                await part.sub.unsubscribe()
            part.sub = await nc.subscribe(f"{self._inbox}.{part.index}.*",
                                          cb=self._handler(part), pending_msgs_limit=-1,
                                          pending_bytes_limit=-1)
        await nc.subscribe(self.subjects.heartbeats, cb=self._on_heartbeat)
        await nc.flush()

    async def _check_mapping(self) -> None:
        """Publish probes on the unmapped segment subject and see where the account's mapping
        puts them: the partitions must be the ones :func:`partition_of` computes."""
        nc = self.nc
        arrived: dict[str, int] = {}
        unmapped: list[str] = []
        done = asyncio.Event()
        probes = [f"p{k}" for k in range(8)]

        async def mapped(msg: Any) -> None:
            parts = msg.subject.split(".")
            arrived[parts[-1]] = int(parts[-3])
            if len(arrived) == len(probes):
                done.set()

        async def raw(msg: Any) -> None:
            unmapped.append(msg.subject)
            done.set()

        subs = [await nc.subscribe(self.subjects.probe_mapped, cb=mapped),
                await nc.subscribe(self.subjects.probe_unmapped, cb=raw)]
        try:
            await nc.flush()
            for ap in probes:
                await nc.publish(self.subjects.probe(ap), b"")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 3.0)
        finally:
            for sub in subs:
                await sub.unsubscribe()
        source, destination = self.subjects.mapping()
        if unmapped:
            raise BusConfigError(f"the NATS account does not map segment subjects: add the "
                                 f"mapping {source!r} -> {destination!r} to every server "
                                 "(python -m csi_cloud.bus.natsconf)")
        expected = {ap: partition_of("_probe", ap, self.subjects.partitions) for ap in probes}
        if arrived != expected:
            raise BusConfigError(
                f"the servers' segment mapping does not give the partitions of "
                f"bus_partitions={self.subjects.partitions} (probes went to {arrived}, expected "
                f"{expected}): the mapping must be {source!r} -> {destination!r}")

    async def _ensure_consumer(self, part: _Partition) -> None:
        config = {
            "durable_name": part.consumer,
            "description": "csi-pipeline segments of one partition; pinned to one worker",
            "filter_subject": self.subjects.filter(part.index),
            "deliver_policy": "all",
            "ack_policy": "explicit",
            "ack_wait": nanoseconds(self.ack_wait_s),
            "max_deliver": -1,
            "max_ack_pending": max(1024, 2 * self.max_inflight),
            "max_waiting": 512,
            "priority_groups": [PRIORITY_GROUP],
            "priority_policy": "pinned_client",
            "priority_timeout": nanoseconds(self.pin_ttl_s),
        }
        subject = f"CONSUMER.CREATE.{MQTT_STREAM}.{part.consumer}"
        try:
            await api(self.nc, subject, {"stream_name": MQTT_STREAM, "config": config})
        except JetStreamError as exc:
            if exc.err_code != 10148:  # "consumer already exists" with another config
                raise
            await api(self.nc, subject, {"stream_name": MQTT_STREAM, "config": config,
                                         "action": "update"})

    # -- membership and placement ----------------------------------------------------------

    async def _heartbeat(self) -> None:
        # A stopping worker says so in every heartbeat: one without it would count it in again.
        body = {"name": self.name, "nonce": self.membership.nonce, "held": self.held(),
                "leaving": self._paused}
        await self.nc.publish(self.subjects.heartbeats, json.dumps(body).encode())

    async def _on_heartbeat(self, msg: Any) -> None:
        try:
            body = json.loads(msg.data)
            clashes = self.membership.clashes
            self.membership.heard(str(body["name"]), str(body["nonce"]),
                                  [int(p) for p in body.get("held", [])],
                                  leaving=bool(body.get("leaving")))
        except (ValueError, KeyError, TypeError):
            return
        if self.membership.clashes > clashes and self.membership.clashes % 30 == 1:
            log.error("another worker also calls itself %r: give each worker its own "
                      "client id (--client-id)", self.name)

    async def _control(self) -> None:
        while True:
            try:
                await self._control_loop()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the worker from pulling
                log.exception("bus control loop failed; restarting it")
                await asyncio.sleep(1)

    async def _control_loop(self) -> None:
        last_heartbeat = 0.0
        while True:
            now = time.monotonic()
            if self.nc.is_connected and now - last_heartbeat >= _HEARTBEAT_S:
                last_heartbeat = now
                with contextlib.suppress(Exception):
                    await self._heartbeat()
            # Bid only once the other workers have been heard from.
            mine = assign(self.subjects.partitions, self.membership.live()).get(self.name,
                                                                                frozenset())
            settled = now - self._started > 1.5 * _HEARTBEAT_S
            for part in self.partitions:
                wanted = part.index in mine and settled and not self._paused
                if part.state in ("held", "gaining") and not wanted and settled:
                    part.state = "releasing"
                    part.release_deadline = now + 2 * self.ack_wait_s
                    log.info("partition %d: handing over", part.index)
                elif part.state == "idle" and wanted:
                    part.state = "bidding"
                    log.debug("partition %d: bidding", part.index)
                elif part.state == "bidding" and not wanted:
                    part.state = "idle"
                self._settle_awaiting(part, now)
                if part.state == "releasing":
                    await self._maybe_release(part, now)
                if self._wants_pull(part):
                    await self._pull(part, now)
            await asyncio.sleep(_TICK_S)

    def _wants_pull(self, part: _Partition) -> bool:
        """Whether the control loop sends the partition pull requests: while bidding or
        holding it, and while handing it over as long as older segments are awaited (they
        are redelivered to this pin) or its APs are being read (a pull request is what keeps
        the pin until the held segments are handed to ingest)."""
        if self._paused:
            return False
        return part.state in ("bidding", "held", "gaining") or (
            part.state == "releasing" and (part.awaiting > 0 or part.reads > 0))

    def _settle_awaiting(self, part: _Partition, now: float) -> None:
        """Segments held back for older ones being redelivered: handed over in stream order
        once the older ones are overdue. A stopping worker no longer pulls, so the older ones
        will not come to it: it drops what it holds back at once, unacknowledged, and the
        next worker gets the lot again, in order (handing it over here would put the newer
        ones ahead of the older).

        After a gain, older segments that did not come were most likely stored by the
        previous worker after this one read the partition's APs back (a hand-over forced
        while that worker was behind): their contexts are read back once more first, while
        every segment of the partition is still held, so the next predictions see them. The
        read runs as a task of its own: the control loop goes on pulling meanwhile (a pull
        request is what keeps every pin). Segments still held once no hold and no read is
        left (the task that read last was not the one to hand them over) go on now."""
        if part.reads:
            return
        if part.awaiting <= 0:
            if part.held_back:
                self._release_held_back(part)
            return
        if self._paused:
            log.info("partition %d: stopping; %d segment(s) held back for older ones left to "
                     "the next worker", part.index, len(part.held_back))
            self._drop_held_back(part)
        elif now > part.awaiting_until:
            log.info("partition %d: %d older segment(s) not redelivered in time; going "
                     "on", part.index, part.awaiting)
            # (a gain's read that ended after the deadline already saw what was stored)
            if part.reload_after_hold and part.read_done < part.awaiting_until:
                # Given up on as for any hold; every segment waits for the read instead (a
                # jump during it starts a hold of its own).
                part.reload_after_hold, part.awaiting, part.outstanding_seen = False, 0, set()
                part.reads += 1  # counted now: every segment waits from here on
                task = asyncio.get_running_loop().create_task(
                    self._reload_then_release(part), name=f"reload partition {part.index}")
                task.add_done_callback(_log_failure)
                self._tasks = [t for t in self._tasks if not t.done()] + [task]
                return
            self._release_held_back(part)

    async def _reload_then_release(self, part: _Partition) -> None:
        """The read after a gain's hold (its count taken by the caller), then the held
        segments handed over; unless another read is pending (a gain's, after the pin was
        lost and won back: its first segment then hands them over) or a jump's hold began
        during the read (:meth:`_hold`: the control loop settles it). Only the current
        pin's segments are ever held (a lost pin or a gain drops the rest), and
        :meth:`_release_held_back` hands nothing over on a partition no longer held. A
        held segment redelivered during a long read replaces its held copy (same stream
        sequence); one redelivered after the hand-over is recognised as seen."""
        await self._reload(part, "after the hold", counted=True)
        if part.reads or part.awaiting > 0:
            return
        self._release_held_back(part)

    async def _reload(self, part: _Partition, when: str, *, counted: bool = False) -> int:
        """Read the partition's APs back from the database (in a thread), one read of a
        partition at a time: its segments are held meanwhile (:attr:`_Partition.reads`).
        ``counted``: the caller has already counted this read. Returns how many APs."""
        index, n = part.index, self.subjects.partitions
        if not counted:
            part.reads += 1
        try:
            async with part.read_lock:
                return await asyncio.to_thread(
                    self.sink.reload_aps, lambda site, ap: partition_of(site, ap, n) == index)
        except Exception:
            log.exception("partition %d: reloading its APs %s failed; going on with what "
                          "this worker holds", index, when)
            return 0
        finally:
            part.reads -= 1
            part.read_done = time.monotonic()

    async def _maybe_release(self, part: _Partition, now: float) -> None:
        pulling = part.request is not None and now < part.deadline
        # Segments held back for older ones being redelivered are this pin's too: they are
        # handed to ingest (and stored) before the partition is handed over.
        if (pulling or part.inflight > 0 or part.awaiting > 0 or part.reads) and \
                now < part.release_deadline:
            return
        if part.held_back:  # forced: not acknowledged, so redelivered to the next worker
            log.warning("partition %d: handing over with %d segment(s) still held back",
                        part.index, len(part.held_back))
            self._drop_held_back(part)
        if part.inflight:
            log.warning("partition %d: %d segment(s) not stored after %.0f s; handing over "
                        "anyway (they are redelivered)", part.index, part.inflight,
                        self.ack_wait_s)
        await self._send_acks()
        with contextlib.suppress(Exception):
            await self._unpin(part)
        self._event("release", part)
        part.state, part.pin = "idle", None
        self.stats.releases += 1

    async def _unpin(self, part: _Partition) -> None:
        """Unpin the consumer if this worker's pin is still the current one (so the waiting
        bid of the partition's new worker is served at once, not after the time to live)."""
        info = await api(self.nc, f"CONSUMER.INFO.{MQTT_STREAM}.{part.consumer}")
        groups = {g.get("group"): g for g in info.get("priority_groups") or []}
        if part.pin and groups.get(PRIORITY_GROUP, {}).get("pinned_client_id") == part.pin:
            await api(self.nc, f"CONSUMER.UNPIN.{MQTT_STREAM}.{part.consumer}",
                      {"group": PRIORITY_GROUP})

    # -- pulling ----------------------------------------------------------------------------

    async def _pull(self, part: _Partition, now: float) -> None:
        if (part.request is not None and now < part.deadline) or now < part.not_before:
            return
        if not self.nc.is_connected:
            return
        active = sum(1 for p in self.partitions if p.state in ("held", "gaining"))
        room = (self.max_inflight - self.inflight) // max(1, active)
        # A held partition is pulled even when the worker is full (batch 1): a pull request
        # is what keeps the pin.
        batch = max(1, min(_PULL_BATCH, room))
        pin = part.pin if part.state in ("held", "gaining", "releasing") else None
        part.sequence += 1
        part.request = f"{self._inbox}.{part.index}.{part.sequence}"
        part.deadline = now + _PULL_EXPIRES_S + 0.25
        part.delivered = 0
        try:
            await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{MQTT_STREAM}.{part.consumer}",
                                  pull_request(batch, _PULL_EXPIRES_S, PRIORITY_GROUP, pin),
                                  reply=part.request)
        except Exception as exc:  # reconnecting: the next tick tries again
            log.debug("pull request for partition %d: %r", part.index, exc)
            part.request = None

    def _handler(self, part: _Partition) -> Callable[[Any], Any]:
        async def on_message(msg: Any) -> None:
            await self._on_message(part, msg)
        return on_message

    async def _on_message(self, part: _Partition, msg: Any) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None:
            self._on_status(part, msg.subject, status, headers)
            return
        pin = headers.get("Nats-Pin-Id")
        if pin and pin != part.pin:
            await self._gain(part, pin)
        self.stats.delivered += 1
        part.delivered += 1
        parsed = self.subjects.parse(msg.subject)
        if parsed is None or parsed[0] != part.index:
            self.stats.bad_subjects += 1
            log.warning("partition %d: unexpected subject %r; acknowledged and dropped",
                        part.index, msg.subject)
            self._acks.append(msg.reply)
            self._ack_wakeup.set()
            return
        _, site, ap = parsed
        item = (site, ap, msg.data, time.time(), msg.reply)
        meta = msg.metadata  # parsed from the ack subject on each access: once here
        sequence = int(meta.sequence.stream)
        self._check_lost(part, int(meta.sequence.consumer), sequence)
        if part.awaiting > 0 or part.reads:
            # Held back, whatever its delivery count says: the server may give a delivery made
            # to a worker that died a count of 1 again, so only the stream sequence tells an
            # older segment (at most the consumer's last delivered one at the pin change)
            # from a newer one.
            # (a held segment redelivered is not an older one come: a hold begun while others
            # were held, during a read, counts only what is not here yet)
            if part.awaiting > 0 and sequence <= part.snapshot_seq and \
                    sequence not in part.outstanding_seen and sequence not in part.held_back:
                part.outstanding_seen.add(sequence)
                part.awaiting -= 1
            part.held_back[sequence] = item  # a second copy: the newer delivery's ack subject
            if part.awaiting <= 0 and not part.reads:
                self._release_held_back(part)
            return
        self._submit(part, item)

    def _check_lost(self, part: _Partition, delivery: int, sequence: int) -> None:
        """Under one pin the consumer numbers its deliveries 1, 2, 3, ...: a jump means
        deliveries were lost on the way (sent by a consumer leader that then died, or into a
        connection that broke) while the pin stayed. JetStream redelivers them after the ack
        wait, after newer segments; so, as after a pin change, every segment from this one on
        is held until they have come (each has a stream sequence below this one's) and handed
        over in stream order."""
        last, part.last_delivery = part.last_delivery, max(delivery, part.last_delivery or 0)
        if last is None or delivery <= last + 1:
            return
        lost = delivery - last - 1
        self.stats.lost_deliveries += lost
        log.info("partition %d: %d delivery(ies) lost on the way; newer segments wait for "
                 "their redelivery (at most %.1f s)", part.index, lost, 0.9 * self.ack_wait_s)
        # They were sent before this one, so are due before it would be redelivered.
        self._hold(part, lost, sequence - 1, time.monotonic() + 0.9 * self.ack_wait_s)

    def _hold(self, part: _Partition, count: int, older_than: int, until: float) -> None:
        """Hold every segment of the partition until ``count`` more deliveries with a stream
        sequence of at most ``older_than`` have come (each counted once), or until ``until``
        (monotonic); then hand the held ones over in stream order (:meth:`_on_message`,
        :meth:`_release_held_back`). A hold under way is extended."""
        if part.awaiting <= 0:
            if not part.reads:  # what waits for a read under way is this pin's: kept
                self._drop_held_back(part)
            part.snapshot_seq = older_than
            part.awaiting_until = until
        part.awaiting += count
        part.snapshot_seq = max(part.snapshot_seq, older_than)

    def _submit(self, part: _Partition, item: tuple[str, str, bytes, float, str]) -> None:
        site, ap, data, received, reply = item
        part.inflight += 1
        self.inflight += 1
        self.sink.submit(site, ap, data, received, self._acker_for(part, reply))

    def _release_held_back(self, part: _Partition) -> None:
        """Hand the held segments over in stream order: each AP's oldest first."""
        held = part.held_back
        self._drop_held_back(part)
        if part.state not in ("held", "gaining", "releasing"):
            return  # no longer this worker's: not acknowledged, redelivered to the next one
        self.stats.reordered += len(held)
        for sequence in sorted(held):
            self._submit(part, held[sequence])

    @staticmethod
    def _drop_held_back(part: _Partition) -> None:
        part.held_back, part.outstanding_seen, part.awaiting = {}, set(), 0
        part.reload_after_hold = False

    def _on_status(self, part: _Partition, subject: str, status: str,
                   headers: dict[str, str]) -> None:
        if status == "100":  # idle heartbeat: the request is still open
            return
        if status != "408":
            log.debug("partition %d (%s): status %s %s", part.index, part.state, status,
                      headers.get("Description", ""))
        if subject == part.request:
            part.request = None
        if status == "423":  # our pin id is no longer the consumer's (ttl, leader change)
            if part.state in ("held", "gaining", "releasing"):
                log.warning("partition %d: pin lost (%s)", part.index,
                            headers.get("Description", "wrong pin id"))
                self._event("lost", part)
                self.stats.losses += 1
            part.pin = None
            part.last_delivery = None
            part.state = "bidding" if part.state in ("held", "gaining") else "idle"
            # Not handed over, not acknowledged: redelivered to the partition's new worker.
            self._drop_held_back(part)
        elif status == "503":  # no responders: the consumer is electing a leader
            part.not_before = time.monotonic() + 0.5
        elif status == "409" and "Leadership" not in headers.get("Description", ""):
            log.debug("partition %d: pull %s %s", part.index, status,
                      headers.get("Description", ""))

    async def _gain(self, part: _Partition, pin: str) -> None:
        """First segment under a new pin: this worker's own earlier deliveries of the
        partition are stored first, then its APs' state and context are read back."""
        part.state, part.pin = "gaining", pin
        part.last_delivery = None  # the deliveries before this pin went to another worker
        first = time.monotonic()  # when this pin's first segment came
        deadline = first + self.ack_wait_s
        while part.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        await self._await_older(part, first)
        part.reload_after_hold = part.awaiting > 0
        count = await self._reload(part, "at the gain")
        index = part.index
        if part.pin == pin and part.state == "gaining":
            part.state = "held"
        part.gains += 1
        self.stats.gains += 1
        self.stats.reloaded_aps += count
        self._event("gain", part, aps=count, reload_s=round(time.monotonic() - t0, 3))
        log.info("partition %d: now on this worker; %d AP(s) reloaded in %.2f s", index, count,
                 time.monotonic() - t0)

    async def _await_older(self, part: _Partition, first: float) -> None:
        """Hold the partition's segments until every delivery outstanding at the pin change
        has reached this worker, then hand them over in stream order, so each AP's segments
        reach ingest oldest first.

        Outstanding now (``num_ack_pending``; this worker's own earlier deliveries are stored
        and acknowledged by now): deliveries made to a worker that died, or lost with a
        consumer leader, which JetStream redelivers here once their ack wait is over, and
        those already made to this pin (the segment that revealed it, what is queued behind it,
        what is still on the wire). All of them have a stream sequence of at most the
        consumer's last delivered one; each counts once when it arrives (:meth:`_on_message`).
        Neither the delivery count (a delivery to a worker that died may come again with a
        count of 1) nor what is queued here (redeliveries queue too) tells the older segments
        apart. The hold ends at the latest ``0.8 * ack_wait`` after the pin's first segment
        came: past ``ack_wait`` the held segments themselves would be redelivered. The dead
        worker's deliveries are due by the pin change (the pin outlives the ack wait)."""
        try:
            await self._send_acks()
            await self.nc.flush(timeout=2)
            info = await api(self.nc, f"CONSUMER.INFO.{MQTT_STREAM}.{part.consumer}",
                             timeout_s=2)
        except Exception as exc:  # no answer: go on without waiting
            log.debug("partition %d: consumer info: %r", part.index, exc)
            return
        outstanding = int(info.get("num_ack_pending", 0))
        if outstanding > 0:
            self._drop_held_back(part)  # a hold of the previous pin: not this one's segments
            self._hold(part, outstanding,
                       int((info.get("delivered") or {}).get("stream_seq", 0)),
                       first + 0.8 * self.ack_wait_s)
            log.info("partition %d: %d segment(s) outstanding at the pin change; every segment "
                     "waits for them (at most %.1f s more)", part.index, outstanding,
                     max(0.0, part.awaiting_until - time.monotonic()))

    def _event(self, kind: str, part: _Partition, **extra: Any) -> None:
        self.stats.events.append({"t": time.time(), "event": kind, "partition": part.index,
                                  **extra})
        del self.stats.events[:-1000]

    # -- acknowledgements -------------------------------------------------------------------

    def _acker_for(self, part: _Partition, reply: str) -> Callable[[], None]:
        def ack() -> None:
            part.inflight -= 1
            self.inflight -= 1
            self._acks.append(reply)
            self._ack_wakeup.set()
        return ack

    async def _acker(self) -> None:
        while True:
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            await self._send_acks()

    async def _send_acks(self) -> None:
        replies, self._acks = self._acks, []
        for reply in replies:
            try:
                await self.nc.publish(reply, b"+ACK")
            except Exception as exc:  # not acknowledged: redelivered and recognised
                log.debug("ack: %r", exc)
        self.stats.acknowledged += len(replies)
