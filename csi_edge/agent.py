"""The edge agent: source -> preprocess -> encode -> spool -> MQTT, one task pair per AP.

Per stream (one access point), two tasks share a :class:`~csi_edge.spool.SegmentSpool`:

- the **producer** reads the source, preprocesses with the same code as training, encodes each
  finished segment with the bundle's int8 encoder, entropy codes it and commits it to the
  spool. It never waits for the network.
- the **connection** keeps one MQTT 5 session per AP (its own Last Will), publishes the spool
  oldest first with QoS 1, deletes what the broker acknowledged, and reconnects with
  exponential backoff and jitter. It also publishes the retained status and obeys ``ctl``.

Segments of a message are consecutive (same epoch, level and model, consecutive sequence
numbers and start times); a live message waits for the level's ``segments_per_message``, a
backlog goes out in larger messages.

Idle (csi_edge.motion): with a bundle that has an idle calibration, a segment whose motion
statistic stays below the threshold (after ``enter_after`` still segments in a row) is queued
without codes and sent in an IDLE message of up to ``idle_segments_per_message`` segments; the
first moving segment is coded at the configured level again and flushes the idle message at
once (it is no longer the message still filling).

Sequence numbers count encoded segments (idle ones too), so a gap seen by the cloud is a lost
segment; a pause of the source shows as a jump in start time instead.

Motion (csi_edge.presence): a :class:`~csi_edge.presence.MotionMeter` sees every frame and
scores every segment, coded or idle; the score travels as one byte per segment (wire flag
MOTION). Presence only (``presence_only``): no bundle, no encoder; the stream is cut into 1 s
segments on its own measured rate and band, and each segment is queued with its motion score
and no codes (model id 00 00 00). A ``switch_model`` command can still give it a bundle that
fits; ``set_rate`` has no levels to set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import CSIError, SpecMismatchError
from ._mqtt import PUBACK_BYTES, Backoff, publish_packet_bytes
from .bundle import EdgeEncoder, encode_segment_codes
from .codec import (
    NO_MODEL_ID,
    NO_MODEL_SEGMENT_MS,
    Payload,
    SegmentRecord,
    encode_payload,
    motion_byte,
    motion_from_byte,
)
from .frames import CSIFrames, DropCounter
from .motion import STATISTICS, IdleConfig, IdleGate, motion_statistic
from .preprocess import InputSpec, Preprocessor, Segment
from .presence import MotionMeter, presence_spec
from .rollout import RolloutError, fetch_bundle, model_url
from .settings import BrokerAddress, EdgeSettings, StreamSettings
from .sources import FrameSource, ProblemLog, open_source
from .spool import QueuedSegment, SegmentSpool

__all__ = ["EdgeAgent", "EncoderCache", "StreamAgent", "StreamCounters", "group_messages",
           "run_edge"]

log = logging.getLogger("csi_edge.agent")

_U32 = 1 << 32
_STOP_MARGIN_S = 5.0  # after the drain time: offline status and disconnect


@dataclass
class StreamCounters:
    """What a stream has done since the process started (reported in the status)."""

    frames_in: int = 0
    frames_dropped: DropCounter = field(default_factory=DropCounter)
    segments_encoded: int = 0
    segments_sent: int = 0
    segments_dropped_spool_full: int = 0
    messages_sent: int = 0
    payload_bytes: int = 0  # wire-format payloads acknowledged (header, codes, CRC)
    wire_bytes: int = 0  # MQTT PUBLISH packets of segments sent, plus their PUBACKs
    status_wire_bytes: int = 0  # status PUBLISH packets
    republished_segments: int = 0  # sent again after a connection loss
    reconnects: int = 0
    ctl_received: int = 0
    ctl_rejected: int = 0
    model_switches: int = 0
    model_switch_failures: int = 0
    encoder_s: float = 0.0
    encoder_calls: int = 0
    segments_idle: int = 0  # queued as idle markers (no codes)
    idle_segments_sent: int = 0
    idle_messages_sent: int = 0
    idle_payload_bytes: int = 0  # the part of payload_bytes spent on idle messages

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("frames_dropped",)}
        out["frames_dropped"] = self.frames_dropped.as_dict()
        out["encoder_ms_per_segment"] = (1000 * self.encoder_s / self.segments_encoded
                                         if self.segments_encoded else None)
        return out


def group_messages(rows: Sequence[QueuedSegment], *, per_message: Callable[[bytes, int], int],
                   segment_ms: Callable[[bytes], int], limit: int,
                   idle_per_message: int = 10) -> list[list[QueuedSegment]]:
    """Split queued segments (oldest first) into messages of consecutive segments.

    A message ends where epoch, level, model, idleness or the presence of a motion byte change
    (an IDLE message holds idle segments only), where sequence numbers or start times are not
    consecutive, or at
    ``max(per_message(model, level), limit)`` segments (``max(idle_per_message, limit)`` for
    idle ones).
    """
    groups: list[list[QueuedSegment]] = []
    for row in rows:
        if groups:
            group = groups[-1]
            head, last = group[0], group[-1]
            size = idle_per_message if row.idle else per_message(row.model_id, row.level)
            if (row.epoch == head.epoch and row.level == head.level
                    and row.model_id == head.model_id and row.idle == head.idle
                    and (row.motion is None) == (head.motion is None)
                    and row.seq == (last.seq + 1) % _U32
                    and row.timestamp_ms == head.timestamp_ms + len(group)
                    * segment_ms(row.model_id)
                    and len(group) < max(size, limit)):
                group.append(row)
                continue
        groups.append([row])
    return groups


class EncoderCache:
    """One :class:`EdgeEncoder` per bundle folder, shared by every stream of the process."""

    def __init__(self) -> None:
        self._by_folder: dict[Path, EdgeEncoder] = {}

    def get(self, folder: Path) -> EdgeEncoder:
        key = folder.resolve()
        if key not in self._by_folder:
            self._by_folder[key] = EdgeEncoder(key)
        return self._by_folder[key]

    def by_model_id(self, model_id: bytes) -> EdgeEncoder | None:
        for encoder in self._by_folder.values():
            if encoder.model_id == model_id:
                return encoder
        return None


class _DoneSendingError(Exception):
    """The connection has nothing more to do."""


class StreamAgent:
    """One access point's stream: its source, spool, MQTT session, status and control."""

    def __init__(self, stream: StreamSettings, settings: EdgeSettings,
                 encoders: EncoderCache) -> None:
        self.stream = stream
        self.settings = settings
        self.encoders = encoders
        self.name = f"{stream.site}/{stream.ap}"
        base = f"{settings.prefix}/{stream.site}/{stream.ap}"
        self.topic_seg = f"{base}/seg"
        self.topic_status = f"{base}/status"
        self.topic_ctl = f"{base}/ctl"
        self.counters = StreamCounters()
        self.problems = ProblemLog(self.name)
        self.presence_only = (stream.presence_only if stream.presence_only is not None
                              else settings.presence_only)
        # None: presence only (no bundle; see the module docstring).
        self.encoder: EdgeEncoder | None = None if self.presence_only else \
            encoders.get(stream.model or settings.model)
        self.level = 0 if self.encoder is None else self.encoder.manifest.level(
            stream.level if stream.level is not None else settings.level).level
        self.source: FrameSource = open_source(
            stream.source, speed=settings.speed_factor, loop=settings.loop,
            timestamps=settings.timestamps, udp_warmup=settings.udp_warmup)
        self.spool: SegmentSpool | None = None
        self.epoch = 0
        self.seq = 0
        self.state = "starting"
        self.error: str | None = None
        self.started = time.time()
        # Presence only: the segmenter is made from the first frames (their band and rate).
        self._pre: Preprocessor | None = None if self.encoder is None else \
            Preprocessor(self.encoder.spec)
        self._gate = None if self.encoder is None else self._idle_gate(self.encoder)
        self.motion: MotionMeter | None = MotionMeter() \
            if settings.motion or self.encoder is None else None
        self._last_index: int | None = None
        self._base_ms: int | None = None
        self._pending_encoder: EdgeEncoder | None = None
        self._last_info: tuple[Any, int] | None = None
        self._wake = asyncio.Event()
        self._source_done = False
        self._stopping = False
        self._drain_deadline = float("inf")
        self._rates_at = (time.monotonic(), 0, 0)
        self._connected = False
        self._stop_requested = asyncio.Event()
        self._v5 = settings.mqtt_protocol == "5"

    # -- start-up checks ------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a source the model cannot take, naming both (raises SpecMismatchError)."""
        if self.encoder is None:  # presence only takes any CSI; a replay must be readable
            first = getattr(self.source, "open_first", None)
            if first is not None:
                first()
            return
        spec = self.encoder.spec
        kind = self.source.kind
        model = f"model {self.encoder.manifest.name!r} ({_describe(spec)})"
        if kind is not None and kind not in (spec.source_kind, "recording"):
            raise SpecMismatchError(f"{model} cannot take source {self.stream.source!r}: it "
                                    f"gives {kind} CSI, the model needs {spec.source_kind}")
        first = getattr(self.source, "open_first", None)
        if first is not None:
            frames: CSIFrames = first()
            try:
                spec.check(frames.info, frames.antennas)
            except SpecMismatchError as exc:
                raise SpecMismatchError(
                    f"{model} cannot take source {self.stream.source!r} "
                    f"({frames.info.device}, {len(frames.info.subcarriers)} subcarriers, "
                    f"{frames.antennas} antenna(s)): {exc}") from exc

    def open_spool(self) -> None:
        name = f"{self.stream.site}__{self.stream.ap}.sqlite"
        self.spool = SegmentSpool(self.settings.spool_dir / name,
                                  self.settings.spool_max_segments, self.settings.spool_sync)
        self.epoch = self.spool.next_epoch()
        if len(self.spool):
            log.info("%s: %d segment(s) from an earlier run wait in the spool", self.name,
                     len(self.spool))

    # -- the run ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stream until the source ends (and the spool is sent) or ``stop`` is set."""
        if self.spool is None:
            self.open_spool()
        producer = asyncio.create_task(self._produce(), name=f"{self.name} producer")
        connection = asyncio.create_task(self._connection(), name=f"{self.name} connection")
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({producer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper.done():
                self._begin_stop()
                producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            self._source_done = True
            self._wake.set()
            if not self._stopping:
                # Source ended: send the rest, unless asked to stop meanwhile.
                await asyncio.wait({connection, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper.done():
                    self._begin_stop()
            # Bounded: sending, the offline status and the disconnect get the drain time and a
            # margin; a connection still stuck after that (a broker that never answers) is cut.
            if self._stopping:
                left = max(0.0, self._drain_deadline - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(connection), left + _STOP_MARGIN_S)
                if not connection.done():
                    log.warning("%s: connection did not close in time; cutting it", self.name)
            else:
                await connection
        finally:
            stopper.cancel()
            for task in (producer, connection):
                task.cancel()
            if self.spool is not None:
                self.spool.close()

    def _begin_stop(self) -> None:
        self._stopping = True
        self._drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        self._stop_requested.set()
        self._wake.set()

    async def _produce(self) -> None:
        self.state = "streaming"
        try:
            async for frames in self.source.frames():
                self._take(frames)
        except CSIError as exc:
            self.state, self.error = "error", str(exc)
            log.error("%s: source stopped: %s", self.name, exc)
            return
        finally:
            self._sync_drops()
        if self.state == "streaming":
            self.state = "source_ended"
        log.info("%s: source ended after %d frames, %d segments", self.name,
                 self.counters.frames_in, self.counters.segments_encoded)

    def _take(self, frames: CSIFrames) -> None:
        self.counters.frames_in += len(frames)
        if self._pending_encoder is not None:
            self._switch(self._pending_encoder)
        if self.motion is not None:
            try:
                self.motion.push(frames)
            except ValueError as exc:  # no band found in this layout: no score for it
                self.problems.report("motion_unavailable", str(exc))
        if self._pre is None:
            try:
                self._pre = Preprocessor(presence_spec(frames))
            except (ValueError, SpecMismatchError) as exc:
                self.counters.frames_dropped["no_presence_spec"] += len(frames)
                self.problems.report("no_presence_spec", str(exc))
                return
        try:
            segments = self._pre.push(frames)
        except SpecMismatchError as exc:
            self.counters.frames_dropped["layout_mismatch"] += len(frames)
            self.problems.report("layout_mismatch", str(exc))
            return
        finally:
            self._sync_drops()
        self._last_info = (frames.info, frames.antennas)
        if segments:
            self._encode(segments)

    def _sync_drops(self) -> None:
        counters = [self.source.dropped] + ([self._pre.dropped] if self._pre is not None else [])
        for counter in counters:
            for reason, count in counter.items():
                self.counters.frames_dropped[reason] += count
                if reason not in self.source.problems.first and reason != "tail_grid_points":
                    self.problems.report(reason, f"{count} frame(s) so far")
            counter.clear()

    def _idle_gate(self, encoder: EdgeEncoder) -> IdleGate | None:
        """The bundle's idle gate (its threshold replaced by ``idle_threshold`` when set), or
        None (idle off, or a bundle without calibration and no threshold set)."""
        if not self.settings.idle:
            return None
        try:
            config = IdleConfig.from_calibration(encoder.manifest.calibration)
        except ValueError as exc:
            self.problems.report("bad_idle_calibration", str(exc))
            config = None
        threshold = self.settings.idle_threshold
        if threshold is not None:
            config = (replace(config, threshold=threshold) if config is not None
                      else IdleConfig(STATISTICS[0], threshold, enter_after=1))
        return IdleGate(config) if config is not None else None

    def _still(self, segments: list[Segment]) -> list[bool]:
        """Which segments go out idle (the gate sees every segment, in order)."""
        gate = self._gate
        if gate is None:
            return [False] * len(segments)
        out = []
        for segment in segments:
            if self._last_index is not None and segment.index != self._last_index + 1:
                gate.reset()  # a gap: the cloud's last segment is not the one before this
            self._last_index = segment.index
            out.append(gate.update(motion_statistic(segment.data, gate.config.statistic)))
        return out

    def _motion_bytes(self, segments: list[Segment], segment_s: float) -> list[int | None]:
        """Each segment's motion byte (0: no score yet); None each without a meter."""
        if self.motion is None:
            return [None] * len(segments)
        return [motion_byte(self.motion.score(s.start_time, s.start_time + segment_s))
                for s in segments]

    def _encode(self, segments: list[Segment]) -> None:
        encoder = self.encoder
        if encoder is None:
            self._queue_presence(segments)
            return
        spec = encoder.spec
        segment_ms = round(spec.segment_s * 1000)
        if self._base_ms is None:
            self._base_ms = round(segments[0].start_time * 1000) - segments[0].index * segment_ms
        motion = self._motion_bytes(segments, spec.segment_s)
        t0 = time.perf_counter()
        idle = self._still(segments)
        coded = [s for s, i in zip(segments, idle, strict=True) if not i]
        blobs: list[bytes] = []
        if coded:
            symbols, profile = encoder.encode(np.stack([s.data for s in coded]))
            blobs = [encode_segment_codes(encoder.codes(sym, prof, self.level),
                                          encoder.manifest, encoder.tables)
                     for sym, prof in zip(symbols, profile, strict=True)]
            self.counters.encoder_calls += 1
        self.counters.encoder_s += time.perf_counter() - t0
        coded_blobs = iter(blobs)
        rows = []
        for segment, is_idle, score in zip(segments, idle, motion, strict=True):
            rows.append(QueuedSegment(
                epoch=self.epoch, seq=self.seq, level=self.level, model_id=encoder.model_id,
                timestamp_ms=self._base_ms + segment.index * segment_ms,
                quality=round(segment.quality * 255) / 255,
                codes=b"" if is_idle else next(coded_blobs), idle=is_idle, motion=score))
            self.seq = (self.seq + 1) % _U32
        self.counters.segments_idle += sum(idle)
        self._queue(rows)

    def _queue_presence(self, segments: list[Segment]) -> None:
        """Presence only: each segment with its motion score and no codes."""
        assert self._pre is not None
        segment_s = self._pre.spec.segment_s
        if self._base_ms is None:
            self._base_ms = round(segments[0].start_time * 1000) \
                - segments[0].index * NO_MODEL_SEGMENT_MS
        rows = []
        for segment, score in zip(segments, self._motion_bytes(segments, segment_s),
                                  strict=True):
            rows.append(QueuedSegment(
                epoch=self.epoch, seq=self.seq, level=0, model_id=NO_MODEL_ID,
                timestamp_ms=self._base_ms + segment.index * NO_MODEL_SEGMENT_MS,
                quality=round(segment.quality * 255) / 255, codes=b"", motion=score))
            self.seq = (self.seq + 1) % _U32
        self._queue(rows)

    def _queue(self, rows: list[QueuedSegment]) -> None:
        assert self.spool is not None
        dropped = self.spool.put(rows)
        self.counters.segments_encoded += len(rows)
        if dropped:
            self.counters.segments_dropped_spool_full += dropped
            self.problems.report("spool_full", f"bound {self.spool.max_segments} segments "
                                               "reached; dropping the oldest")
        self._wake.set()

    # -- MQTT ---------------------------------------------------------------------------------

    async def _connection(self) -> None:
        import aiomqtt

        broker: BrokerAddress = self.settings.broker_address()
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        tls = None
        if broker.tls:
            tls = aiomqtt.TLSParameters(ca_certs=str(self.settings.ca_file)
                                        if self.settings.ca_file else None)
        will = aiomqtt.Will(self.topic_status,
                            json.dumps(self._status(online=False), separators=(",", ":")),
                            qos=1, retain=True)
        v5 = self.settings.mqtt_protocol == "5"
        protocol = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
        # The spool, not a broker session, holds what is unsent: always start clean.
        clean: dict[str, Any] = {"clean_start": True} if v5 else {"clean_session": True}
        while not self._finished():
            try:
                async with aiomqtt.Client(
                    broker.host, broker.port, username=broker.username, password=broker.password,
                    identifier=f"{self.settings.client_id_prefix}-{self.stream.site}-"
                               f"{self.stream.ap}",
                    protocol=protocol, **clean,
                    keepalive=self.settings.keepalive_s, will=will, tls_params=tls,
                    timeout=10,
                ) as client:
                    self._connected = True
                    backoff.reset()
                    log.info("%s: connected to %s", self.name, broker)
                    await client.subscribe(self.topic_ctl, qos=1)
                    await self._publish_status(client)
                    await self._serve(client)
                    await self._publish_status(client, online=False)
                return
            except aiomqtt.MqttError as exc:
                was_connected, self._connected = self._connected, False
                if self._finished():
                    return
                delay = backoff.next_delay()
                if self._stopping:
                    delay = min(delay, max(0.0, self._drain_deadline - time.monotonic()))
                self.counters.reconnects += 1
                log.warning("%s: broker %s %s (%s); retrying in %.1f s with %d segment(s) "
                            "queued", self.name, broker,
                            "lost" if was_connected else "unreachable", exc, delay,
                            len(self.spool or ()))
                if self._stopping:
                    await asyncio.sleep(delay)  # already capped at the drain deadline
                else:
                    # A stop request must not wait out a long backoff begun before it.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_requested.wait(), delay)
            finally:
                self._connected = False

    def _finished(self) -> bool:
        if not self._source_done:
            return False
        if self._stopping and time.monotonic() >= self._drain_deadline:
            return True
        return self.spool is None or len(self.spool) == 0

    async def _serve(self, client: Any) -> None:
        tasks = [asyncio.create_task(self._send(client)),
                 asyncio.create_task(self._listen(client)),
                 asyncio.create_task(self._status_loop(client))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, _DoneSendingError):
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, client: Any) -> None:
        assert self.spool is not None
        settings = self.settings
        while True:
            if self._finished():
                raise _DoneSendingError
            rows = self.spool.peek(settings.inflight * settings.backlog_segments_per_message)
            k_live = self._per_message(rows[0].model_id, rows[0].level) if rows else 1
            backlog = len(self.spool) > 2 * k_live
            groups = group_messages(
                rows, per_message=self._per_message, segment_ms=self._segment_ms,
                limit=settings.backlog_segments_per_message if backlog else 1,
                idle_per_message=settings.idle_segments_per_message)
            if groups and not self._source_done and len(groups[-1]) < self._group_size(
                    groups[-1][0]):
                tail = groups[-1][0]
                hold_ms = (self._group_size(tail) + 1) * self._segment_ms(tail.model_id)
                if time.time() * 1000 - tail.queued_ms < hold_ms:
                    groups.pop()  # a live message still filling
            if not groups:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.25)
                continue
            groups = groups[: settings.inflight]
            await asyncio.gather(*(self._publish_group(client, g) for g in groups))
            self.spool.remove(r.id for g in groups for r in g)

    async def _publish_group(self, client: Any, group: list[QueuedSegment]) -> None:
        head = group[0]
        motion = head.motion is not None
        data = encode_payload(Payload(
            level=head.level, model_id=head.model_id, epoch=head.epoch, first_seq=head.seq,
            timestamp_ms=head.timestamp_ms,
            segments=tuple(SegmentRecord(r.quality, r.codes, motion_from_byte(r.motion)
                                         if r.motion is not None else None) for r in group),
            idle=head.idle, motion=motion))
        wire = publish_packet_bytes(self.topic_seg, len(data), qos=1, v5=self._v5) + PUBACK_BYTES
        try:
            await client.publish(self.topic_seg, data, qos=1)
        except Exception:
            # Bytes that left before the connection broke still crossed the network.
            self.counters.wire_bytes += wire - PUBACK_BYTES
            self.counters.republished_segments += len(group)
            raise
        self.counters.messages_sent += 1
        self.counters.segments_sent += len(group)
        self.counters.payload_bytes += len(data)
        self.counters.wire_bytes += wire
        if head.idle:
            self.counters.idle_messages_sent += 1
            self.counters.idle_segments_sent += len(group)
            self.counters.idle_payload_bytes += len(data)

    def _manifest_of(self, model_id: bytes) -> Any:
        """The manifest of a queued segment's bundle; None for a presence-only stream that
        still holds segments of a bundle it no longer runs (an earlier run's backlog)."""
        encoder = self.encoders.by_model_id(model_id) or self.encoder
        return None if encoder is None else encoder.manifest

    def _per_message(self, model_id: bytes, level: int) -> int:
        manifest = None if model_id == NO_MODEL_ID else self._manifest_of(model_id)
        if manifest is None:  # presence only (or such a backlog: one segment a message)
            return self.settings.presence_segments_per_message if model_id == NO_MODEL_ID \
                else 1
        return manifest.level(level).segments_per_message

    def _group_size(self, head: QueuedSegment) -> int:
        """Segments a live message of ``head``'s kind waits for."""
        if head.idle:
            return self.settings.idle_segments_per_message
        return self._per_message(head.model_id, head.level)

    def _segment_ms(self, model_id: bytes) -> int:
        manifest = None if model_id == NO_MODEL_ID else self._manifest_of(model_id)
        if manifest is None:
            return NO_MODEL_SEGMENT_MS
        return round(manifest.input_spec.segment_s * 1000)

    async def _status_loop(self, client: Any) -> None:
        while True:
            await asyncio.sleep(self.settings.status_interval_s)
            await self._publish_status(client)

    async def _publish_status(self, client: Any, online: bool = True) -> None:
        body = json.dumps(self._status(online=online), separators=(",", ":")).encode()
        await client.publish(self.topic_status, body, qos=1, retain=True)
        self.counters.status_wire_bytes += (publish_packet_bytes(self.topic_status, len(body),
                                                                 v5=self._v5)
                                            + PUBACK_BYTES)

    def _status(self, online: bool = True) -> dict[str, Any]:
        now = time.monotonic()
        then, payload0, wire0 = self._rates_at
        span = max(now - then, 1e-9)
        c = self.counters
        rates = {"payload_bytes_per_s": (c.payload_bytes - payload0) / span,
                 "wire_bytes_per_s": (c.wire_bytes - wire0) / span, "window_s": span}
        if online:
            self._rates_at = (now, c.payload_bytes, c.wire_bytes)
        manifest = None if self.encoder is None else self.encoder.manifest
        counters = c.as_dict()
        counters["segments_buffered"] = len(self.spool) if self.spool is not None else 0
        return {
            "online": online,
            "state": self.state if online else "offline",
            "site": self.stream.site,
            "ap": self.stream.ap,
            "model": None if manifest is None else manifest.id,
            "model_name": None if manifest is None else manifest.name,
            "mode": "presence-only" if manifest is None else "model",
            "rate_level": self.level,
            "motion": None if self.motion is None else self.motion.status(),
            "idle": None if self._gate is None else {
                "threshold": self._gate.config.threshold,
                "statistic": self._gate.config.statistic,
                "enter_after": self._gate.config.enter_after,
                "active": self._gate.idle},
            "source": self.stream.source,
            "epoch": self.epoch,
            "next_seq": self.seq,
            "time": time.time(),
            "uptime_s": time.time() - self.started,
            "counters": counters,
            "rates": rates if online else None,
            "problems": {**self.source.problems.first, **self.problems.first},
            "error": self.error,
        }

    # -- control ------------------------------------------------------------------------------

    async def _listen(self, client: Any) -> None:
        async for message in client.messages:
            self.counters.ctl_received += 1
            try:
                await self._control(message.payload)
            except (ValueError, CSIError) as exc:
                self.counters.ctl_rejected += 1
                log.warning("%s: ctl message rejected: %s", self.name, exc)
                self.error = f"ctl rejected: {exc}"
            await self._publish_status(client)

    async def _control(self, raw: Any) -> None:
        """Apply one ``ctl`` message: ``{"action": "set_rate", "level": N}`` or
        ``{"action": "switch_model", "model_id": ID[, "url": URL]}``."""
        try:
            command = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not JSON: {bytes(raw)[:80]!r}") from exc
        if not isinstance(command, dict):
            raise ValueError(f"not a JSON object: {command!r:.80}")
        action = command.get("action")
        if action == "set_rate":
            level = command.get("level")
            if not isinstance(level, int) or isinstance(level, bool):
                raise ValueError(f"set_rate level {level!r} is not an integer")
            if self.encoder is None:
                raise ValueError(f"set_rate level {level}: a presence-only stream has no rate "
                                 "levels")
            self.level = self.encoder.manifest.level(level).level
            log.info("%s: rate level %d from the next segment", self.name, self.level)
        elif action == "switch_model":
            await self._switch_model(command)
        else:
            raise ValueError(f"unknown action {action!r} (set_rate, switch_model)")

    async def _switch_model(self, command: dict[str, Any]) -> None:
        model_id = command.get("model_id")
        if not isinstance(model_id, str):
            raise ValueError(f"switch_model model_id {model_id!r} is not a string")
        if self.encoder is not None and model_id == self.encoder.manifest.id:
            return
        url = command.get("url")
        if url is None:
            if not self.settings.cloud_url:
                raise ValueError("switch_model without url and no cloud_url configured")
            url = model_url(self.settings.cloud_url, model_id)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"switch_model url {url!r} is not http(s)")
        try:
            folder = await asyncio.to_thread(fetch_bundle, url, model_id,
                                             self.settings.models_dir,
                                             max_bytes=self.settings.fetch_max_bytes)
            encoder = await asyncio.to_thread(self.encoders.get, folder)
            self._check_fits(encoder)
        except (CSIError, OSError) as exc:
            self.counters.model_switch_failures += 1
            keeping = "presence only" if self.encoder is None else \
                f"model {self.encoder.manifest.id[:12]}…"
            raise RolloutError(f"keeping {keeping}: {exc}") from exc
        self._pending_encoder = encoder
        log.info("%s: switching to model %s (%s) at the next segment", self.name,
                 model_id[:12], encoder.manifest.name)

    def _check_fits(self, encoder: EdgeEncoder) -> None:
        spec = encoder.spec
        kind = self.source.kind
        if kind is not None and kind not in (spec.source_kind, "recording"):
            raise SpecMismatchError(f"model {encoder.manifest.name!r} needs "
                                    f"{spec.source_kind} CSI, this source gives {kind}")
        if self._last_info is not None:
            spec.check(*self._last_info)

    def _switch(self, encoder: EdgeEncoder) -> None:
        self._pending_encoder = None
        old = self.encoder
        self.encoder = encoder
        if old is None or encoder.spec != old.spec:
            self._pre = Preprocessor(encoder.spec)
            self._base_ms = None
            self._last_index = None
        # The new bundle's calibration (or none); the cloud's last segment is of the old model.
        self._gate = self._idle_gate(encoder)
        self.level = min(self.level, len(encoder.manifest.levels) - 1)
        self.counters.model_switches += 1
        log.info("%s: now on model %s", self.name, encoder.manifest.id[:12])


def _describe(spec: InputSpec) -> str:
    return (f"{spec.source_kind}, {len(spec.subcarriers)} subcarriers of {spec.band or 'a band'}, "
            f"{spec.antennas} antenna(s), {spec.nominal_rate_hz:g} Hz")


class EdgeAgent:
    """Every stream of one ``csi edge`` process."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.encoders = EncoderCache()
        self.streams = [StreamAgent(s, settings, self.encoders) for s in settings.all_streams()]
        self.stop = asyncio.Event()

    def check(self) -> None:
        for stream in self.streams:
            stream.check()

    async def run(self) -> int:
        """Run until every source ended and was sent, or until :meth:`request_stop`."""
        for stream in self.streams:
            stream.open_spool()
        results = await asyncio.gather(*(s.run(self.stop) for s in self.streams),
                                       return_exceptions=True)
        failed = 0
        for stream, result in zip(self.streams, results, strict=True):
            if isinstance(result, BaseException):
                failed += 1
                log.error("%s: stopped by %r", stream.name, result)
            elif stream.state == "error":
                failed += 1
        return 1 if failed else 0

    def request_stop(self) -> None:
        self.stop.set()


def run_edge(settings: EdgeSettings) -> int:
    """Check every stream, then run the agent until done or SIGINT/SIGTERM; the exit code."""

    async def main() -> int:
        agent = EdgeAgent(settings)
        agent.check()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, agent.request_stop)
        return await agent.run()

    return asyncio.run(main())
