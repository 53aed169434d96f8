"""The edge agent: source -> preprocess -> encode -> spool -> MQTT, one task pair per AP.

Per stream (one access point), a **producer** task reads the source, preprocesses with the same
code as training, encodes each finished segment with the bundle's int8 encoder, entropy codes
it and commits it to the stream's :class:`~csi_edge.spool.SegmentSpool`. It never waits for the
network.

A :class:`BrokerSession` is one MQTT 5 connection: it publishes each of its streams' spools
oldest first with QoS 1, deletes what the broker acknowledged, reconnects with exponential
backoff and jitter, publishes the retained status and obeys ``ctl``. The broker ties a client
id to its MQTT user (``use_username_as_clientid``, docs/security.md), so a process logged in
with a user name keeps ONE connection, client id = that user name, for all its streams; without
a user name each stream has its own connection, client id ``{client_id_prefix}-{site}-{ap}``.
A connection that carries one stream has that stream's offline status as its Last Will.

Failures are never silent: a stream whose producer fails (the source dies, the encoder
raises, the spool cannot be written) or whose connection fails in an unexpected way is marked
``"state": "error"`` with the reason (bounded) in ``error``, its status is published at once,
and the whole process stops (what is queued is sent for ``drain_timeout_s``) and exits with
code 1, for its supervisor to restart it. A bad ``ctl`` command is rejected, counted and
reported; it never stops a stream.

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
import math
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import CSIError, SpecMismatchError
from ._mqtt import PUBACK_BYTES, AliasingClient, Backoff, TopicAliases, publish_packet_bytes
from .bundle import (
    BundleError,
    EdgeEncoder,
    SegmentCodes,
    decode_segment_codes,
    encode_message_codes,
    encode_segment_codes,
)
from .codec import (
    NO_MODEL_ID,
    NO_MODEL_SEGMENT_MS,
    Payload,
    SegmentRecord,
    encode_payload,
    message_groups,
    motion_byte,
    motion_from_byte,
)
from .entropy import EntropyDecodeError
from .frames import CSIFrames, DropCounter
from .messages import loads_bounded
from .motion import STATISTICS, IdleConfig, IdleGate, motion_statistic
from .preprocess import InputSpec, Preprocessor, Segment
from .presence import (
    EMPTY_ROOM_DELAY_S,
    EMPTY_ROOM_S,
    PRESENCE_SEGMENT_S,
    MotionMeter,
    presence_spec,
)
from .rollout import (
    RolloutError,
    check_runs,
    check_under_base,
    cloud_lists,
    fetch_bundle,
    model_url,
)
from .settings import BrokerAddress, EdgeSettings, StreamSettings
from .sources import FrameSource, ProblemLog, open_source
from .spool import QueuedSegment, SegmentSpool, SpoolError, spool_path

__all__ = ["BrokerSession", "EdgeAgent", "EncoderCache", "StreamAgent", "StreamCounters",
           "bounded_text", "group_messages", "run_edge"]

log = logging.getLogger("csi_edge.agent")

_U32 = 1 << 32
_STOP_MARGIN_S = 5.0  # after the drain time: offline status and disconnect
_RECENT_CODES = 1024  # segments whose codes are kept for their message (StreamAgent._payload)
ERROR_TEXT_MAX = 300  # characters of an error copied into the retained status
# A presence reference measured on the empty room and the layout it was measured on, kept in
# the spool across restarts.
PINNED_REFERENCE_KEY = "presence_reference"
PINNED_LAYOUT_KEY = "presence_reference_layout"


def bounded_text(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class StreamCounters:
    """What a stream has done since the process started (reported in the status)."""

    frames_in: int = 0
    frames_dropped: DropCounter = field(default_factory=DropCounter)
    segments_encoded: int = 0
    segments_sent: int = 0
    segments_dropped_spool_full: int = 0  # the oldest, past spool_max_segments
    segments_dropped_disk_full: int = 0  # the oldest, to keep going on a full disk
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
    positions = message_groups(
        [row.seq for row in rows],
        [max(per_message(row.model_id, row.level), limit) for row in rows],
        idle=[row.idle for row in rows], idle_per_message=max(idle_per_message, limit),
        keys=[(row.epoch, row.level, row.model_id, row.motion is None) for row in rows],
        timestamps_ms=[row.timestamp_ms for row in rows],
        segment_ms=[segment_ms(row.model_id) for row in rows])
    return [[rows[i] for i in group] for group in positions]


class EncoderCache:
    """One :class:`EdgeEncoder` per bundle folder, shared by every stream of the process."""

    def __init__(self) -> None:
        self._by_folder: dict[Path, EdgeEncoder] = {}

    def get(self, folder: Path, *, probe: bool = False) -> EdgeEncoder:
        """The encoder of ``folder`` (:class:`BundleError` naming it when it does not load;
        with ``probe``, also when it cannot code a segment, see rollout.check_runs)."""
        key = folder.resolve()
        if key not in self._by_folder:
            try:
                encoder = EdgeEncoder(key)
            except BundleError:
                raise
            except Exception as exc:  # ONNX Runtime's own errors for a file it cannot load
                raise BundleError(f"bundle {str(folder)!r}: the encoder does not load: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}") from exc
            if probe:
                try:
                    check_runs(encoder)
                except RolloutError as exc:
                    raise BundleError(f"bundle {str(folder)!r}: {exc}") from exc
            self._by_folder[key] = encoder
        return self._by_folder[key]

    def by_model_id(self, model_id: bytes) -> EdgeEncoder | None:
        for encoder in self._by_folder.values():
            if encoder.model_id == model_id:
                return encoder
        return None


class _DoneSendingError(Exception):
    """The connection has nothing more to do."""


class StreamAgent:
    """One access point's stream: its source, spool, status and control (the connection is a
    :class:`BrokerSession`'s)."""

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
            encoders.get(stream.model or settings.model, probe=True)
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
        self._pinned_kept: float | None = None  # the pinned reference the spool holds
        self._measure_deadline = 0.0  # monotonic time an empty-room measurement gives up
        self._last_index: int | None = None
        self._play = 0  # the recording of a replay (FileSource.plays) the segments are of
        self._base_ms: int | None = None
        self._pending_encoder: EdgeEncoder | None = None
        # The codes of the segments this run encoded, by (epoch, seq, level, model id), for
        # the message that sends them to code them as one stream without decoding their
        # queued streams again; only the newest few messages' worth (a backlog from an
        # earlier run, or one longer than this, is decoded from the queue instead).
        self._recent_codes: OrderedDict[tuple[int, int, int, bytes],
                                        tuple[bytes, SegmentCodes]] = OrderedDict()
        self._last_info: tuple[Any, int] | None = None
        self._wake = asyncio.Event()
        self._source_done = False
        self._stopping = False
        self._drain_deadline = float("inf")
        self._rates_at = (time.monotonic(), 0, 0)
        self._status_due = asyncio.Event()  # publish the status now, not at the interval
        self._ctl_lock = asyncio.Lock()  # one command at a time, in order
        self._ctl_tasks: set[asyncio.Task[None]] = set()
        self.offline_sent = False  # the final (offline) status went out
        self._client: Any = None  # the connection serving this stream, while it does
        self._aliases = TopicAliases(0)  # that connection's topic aliases
        self._status_key_sent: tuple[Any, ...] | None = None  # what the last status said
        self._status_sent_at = float("-inf")  # monotonic time of the last status
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
        self.spool = SegmentSpool(
            spool_path(self.settings.spool_dir, self.stream.site, self.stream.ap),
            self.settings.spool_max_segments, self.settings.spool_sync,
            wal_limit_bytes=self.settings.spool_wal_limit_bytes,
            min_free_bytes=self.settings.spool_min_free_bytes)
        self.epoch = self.spool.next_epoch()
        if len(self.spool):
            log.info("%s: %d segment(s) from an earlier run wait in the spool", self.name,
                     len(self.spool))
        pinned = self.spool.setting(PINNED_REFERENCE_KEY)
        layout = self.spool.setting(PINNED_LAYOUT_KEY)
        if pinned is not None and self.motion is not None:
            self.motion.calibration.pin(pinned, None if layout is None else int(layout))
            log.info("%s: presence measured on the empty room earlier (reference %.3f)",
                     self.name, pinned)
        self._pinned_kept = pinned

    # -- the producer -------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self.state == "error"

    def fail(self, what: str, exc: BaseException | str) -> None:
        """Mark the stream failed: the reason goes into the status (bounded), at once."""
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        if not self.failed:
            self.state = "error"
            self.error = bounded_text(f"{what}: {detail}")
        self._status_due.set()

    def begin_stop(self, deadline: float) -> None:
        """Send what is queued until ``deadline`` (monotonic), then finish."""
        if not self._stopping:
            self._stopping = True
            self._drain_deadline = deadline
        self._source_done = True
        self._wake.set()

    def finished(self) -> bool:
        """Nothing more to send: the source is done and the spool empty (or the drain time of
        a stop is over)."""
        if not self._source_done:
            return False
        if self._stopping and time.monotonic() >= self._drain_deadline:
            return True
        return self.spool is None or len(self.spool) == 0

    async def produce(self) -> None:
        """Read, encode and queue until the source ends, fails or the task is cancelled.

        Never raises (but CancelledError): a failure is recorded with :meth:`fail`.
        """
        if self.spool is None:
            self.open_spool()
        self.state = "streaming"
        try:
            async for frames in self.source.frames():
                self._take(frames)
        except CSIError as exc:
            log.error("%s: source stopped: %s", self.name, exc)
            self.fail("source stopped", str(exc))
        except Exception as exc:  # the encoder, the spool, a reader: never a silent stop
            log.exception("%s: stream failed", self.name)
            self.fail("stream failed", exc)
        else:
            if self.state == "streaming":
                self.state = "source_ended"
            log.info("%s: source ended after %d frames, %d segments", self.name,
                     self.counters.frames_in, self.counters.segments_encoded)
        finally:
            with contextlib.suppress(Exception):
                self._sync_drops()
            self._source_done = True
            self._wake.set()

    def _take(self, frames: CSIFrames) -> None:
        self.counters.frames_in += len(frames)
        if self.settings.loop_new_epoch:
            plays = getattr(self.source, "plays", 0)
            if plays != self._play:
                self._new_play(plays)
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

    def _new_play(self, plays: int) -> None:
        """A replay starts its next recording (the next file, or the first again when a loop
        starts over): a new epoch, so the cloud starts a fresh context instead of classifying
        its first seconds with the end of the last one (two recordings, or a recording's end
        and start, are not one continuous scene)."""
        self._play = plays
        assert self.spool is not None
        self.epoch = self.spool.next_epoch()
        self.seq = 0
        self._base_ms = None
        self._last_index = None
        if self._pre is not None:  # the held-back frames of the last pass go with it
            self._pre = Preprocessor(self._pre.spec)
        if self._gate is not None:
            self._gate.reset()

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
        meter = self.motion
        out: list[int | None] = [motion_byte(meter.score(s.start_time, s.start_time + segment_s))
                                 for s in segments]
        self._keep_pinned()
        return out

    def _keep_pinned(self) -> None:
        """Store a reference measured on the empty room (or its release) in the spool, so a
        restarted edge keeps it; a spool that cannot store it is reported, not fatal. Also
        give up a measurement that did not complete in time, and report a pin dropped for
        another stream layout."""
        if self.motion is None:
            return
        calibration = self.motion.calibration
        if calibration.mode == "measuring" and time.monotonic() > self._measure_deadline:
            calibration.cancel_measurement()
            self.problems.report("presence_measurement_expired",
                                 "the empty-room measurement got too few segments in time (a "
                                 "stalled source?); the reference stays what it was")
        if calibration.released_because is not None:
            self.problems.report("presence_calibration_dropped", calibration.released_because)
            calibration.released_because = None
        pinned = calibration.pinned
        if pinned == self._pinned_kept or self.spool is None:
            return
        try:
            self.spool.set_setting(PINNED_LAYOUT_KEY, calibration.pinned_layout)
            self.spool.set_setting(PINNED_REFERENCE_KEY, pinned)
        except SpoolError as exc:
            self.problems.report("presence_calibration_not_kept", str(exc))
            return
        self._pinned_kept = pinned
        if pinned is not None:
            log.info("%s: presence measured on the empty room (reference %.3f)", self.name,
                     pinned)

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
        codes: list[SegmentCodes] = []
        if coded:
            symbols, profile = encoder.encode(np.stack([s.data for s in coded]))
            codes = [encoder.codes(sym, prof, self.level)
                     for sym, prof in zip(symbols, profile, strict=True)]
            blobs = [encode_segment_codes(c, encoder.manifest, encoder.tables) for c in codes]
            self.counters.encoder_calls += 1
        self.counters.encoder_s += time.perf_counter() - t0
        coded_blobs, coded_codes = iter(blobs), iter(codes)
        rows = []
        for segment, is_idle, score in zip(segments, idle, motion, strict=True):
            blob = b"" if is_idle else next(coded_blobs)
            if not is_idle:
                self._recent_codes[(self.epoch, self.seq, self.level, encoder.model_id)] = (
                    blob, next(coded_codes))
            rows.append(QueuedSegment(
                epoch=self.epoch, seq=self.seq, level=self.level, model_id=encoder.model_id,
                timestamp_ms=self._base_ms + segment.index * segment_ms,
                quality=round(segment.quality * 255) / 255,
                codes=blob, idle=is_idle, motion=score))
            self.seq = (self.seq + 1) % _U32
        while len(self._recent_codes) > _RECENT_CODES:
            self._recent_codes.popitem(last=False)
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
        """Commit encoded segments to the spool, counting what it drops to make room."""
        assert self.spool is not None
        spool = self.spool
        bound, disk = spool.dropped, spool.dropped_disk_full
        spool.put(rows)
        if spool.dropped > bound:
            self.counters.segments_dropped_spool_full += spool.dropped - bound
            self.problems.report("spool_full", f"bound {spool.max_segments} segments "
                                               "reached; dropping the oldest")
        if spool.dropped_disk_full > disk:
            self.counters.segments_dropped_disk_full += spool.dropped_disk_full - disk
            self.problems.report("disk_full", f"free space under {spool.min_free_bytes} "
                                              f"bytes at {spool.path.parent}; dropping the "
                                              "oldest")
        self.counters.segments_encoded += len(rows)
        self._wake.set()

    # -- on a connection (BrokerSession) ------------------------------------------------------

    def will(self) -> Any:
        """The Last Will of a connection that carries only this stream."""
        import aiomqtt

        return aiomqtt.Will(self.topic_status,
                            json.dumps(self._status(online=False), separators=(",", ":")),
                            qos=1, retain=True)

    async def serve(self, client: Any, aliases: TopicAliases | None = None) -> None:
        """On a fresh connection: status, then send until finished, then the offline status.
        ``aliases``: the connection's topic aliases (None: none). Raises the connection's error
        (aiomqtt.MqttError) when it breaks."""
        if self.closed():
            return
        self.offline_sent = False
        self._client = client
        self._aliases = aliases if aliases is not None else TopicAliases(0)
        if not self.finished():
            await self._publish_status(client)
            status = asyncio.create_task(self._status_loop(client), name=f"{self.name} status")
            send = asyncio.create_task(self._send(client), name=f"{self.name} send")
            try:
                done, _ = await asyncio.wait({status, send},
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None and not isinstance(exc, _DoneSendingError):
                        raise exc
            finally:
                for task in (status, send):
                    task.cancel()
                await asyncio.gather(status, send, return_exceptions=True)
                self._client = None
        await self._publish_status(client, online=False)
        self.offline_sent = True

    def closed(self) -> bool:
        """Finished, and its final status is out (or the drain time of a stop is over)."""
        if not self.finished():
            return False
        return self.offline_sent or (self._stopping
                                     and time.monotonic() >= self._drain_deadline)

    def on_ctl(self, payload: Any) -> None:
        """Handle one ``ctl`` message in its own task (a model download must not hold up the
        connection), one at a time per stream."""
        task = asyncio.get_running_loop().create_task(self._on_ctl(payload),
                                                      name=f"{self.name} ctl")
        self._ctl_tasks.add(task)
        task.add_done_callback(self._ctl_tasks.discard)

    async def _on_ctl(self, payload: Any) -> None:
        self.counters.ctl_received += 1
        async with self._ctl_lock:
            try:
                await self._control(payload)
            except Exception as exc:  # any bad command is refused; none stops the stream
                self.counters.ctl_rejected += 1
                text = bounded_text(str(exc))
                log.warning("%s: ctl message rejected: %s", self.name, text)
                if not self.failed:
                    self.error = f"ctl rejected: {text}"
            # Each command's outcome in a status of its own (the status loop's would merge
            # several); a broken connection publishes it at the next connect instead.
            client = self._client
            if client is None:
                self._status_due.set()
            else:
                try:
                    await self._publish_status(client)
                except Exception:  # aiomqtt.MqttError: the connection is going away
                    self._status_due.set()

    def cancel_ctl(self) -> None:
        for task in self._ctl_tasks:
            task.cancel()

    async def _send(self, client: Any) -> None:
        assert self.spool is not None
        settings = self.settings
        while True:
            if self.finished():
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
            ids = [r.id for g in groups for r in g]
            self.spool.hold(ids)
            try:
                await asyncio.gather(*(self._publish_group(client, g) for g in groups))
            except BaseException:
                self.spool.release(ids)
                raise
            self.spool.remove(ids)

    def _payload(self, group: list[QueuedSegment]) -> bytes:
        """The message of a group of queued segments. Wire version 2 codes the group's
        segments as one stream: the queue keeps each segment's own stream, and the group is
        coded again from the codes kept when this run encoded them (:meth:`_codes_of`; rows
        of an earlier run are decoded from their queued streams). Segments of a bundle this
        process no longer holds (an earlier run's backlog) go out as version 1, each with its
        own stream."""
        head = group[0]
        motion = head.motion is not None
        scores = [motion_from_byte(r.motion) if r.motion is not None else None for r in group]
        coded = not head.idle and head.model_id != NO_MODEL_ID
        # Idle and presence-only messages carry no codes to code again. Every encoder this
        # process runs, the current one included, comes from the shared cache.
        encoder = self.encoders.by_model_id(head.model_id) if coded else None
        version = self.settings.wire_version if encoder is not None or not coded else 1
        stream = b""
        if version == 2 and encoder is not None:
            t0 = time.perf_counter()
            try:
                codes = [self._codes_of(r, encoder) for r in group]
                stream = encode_message_codes(codes, encoder.manifest, encoder.tables)
            except (EntropyDecodeError, ValueError) as exc:
                # A queued row that does not decode (a damaged spool file) must not block the
                # queue: it goes out as it is, and the cloud rejects it as bad_codes.
                log.warning("%s: queued segments %d.. do not decode (%s); sent as wire "
                            "version 1", self.name, head.seq, exc)
                version = 1
            # Coding is the encoder's work too: encoder_ms_per_segment counts it.
            self.counters.encoder_s += time.perf_counter() - t0
        return encode_payload(Payload(
            level=head.level, model_id=head.model_id, epoch=head.epoch, first_seq=head.seq,
            timestamp_ms=head.timestamp_ms,
            segments=tuple(SegmentRecord(r.quality, r.codes if version == 1 else b"", score)
                           for r, score in zip(group, scores, strict=True)),
            idle=head.idle, motion=motion, codes=stream, version=version))

    def _codes_of(self, row: QueuedSegment, encoder: EdgeEncoder) -> SegmentCodes:
        """A queued segment's codes: kept from when this run encoded it (the same queued
        stream: a row left from long ago under a reused epoch is not mistaken for it), else
        decoded from its queued stream."""
        kept = self._recent_codes.get((row.epoch, row.seq, row.level, row.model_id))
        if kept is not None and kept[0] == row.codes:
            return kept[1]
        return decode_segment_codes(row.codes, row.level, encoder.manifest, encoder.tables)

    async def _publish_group(self, client: Any, group: list[QueuedSegment]) -> None:
        head = group[0]
        data = self._payload(group)
        topic, properties, aliased = self._aliases.publish_args(self.topic_seg)
        wire = publish_packet_bytes(topic, len(data), qos=1, v5=self._v5,
                                    alias=aliased) + PUBACK_BYTES
        try:
            await client.publish(topic, data, qos=1, properties=properties)
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
        return int(manifest.level(level).segments_per_message)

    def _group_size(self, head: QueuedSegment) -> int:
        """Segments a live message of ``head``'s kind waits for."""
        if head.idle:
            return self.settings.idle_segments_per_message
        return self._per_message(head.model_id, head.level)

    def _segment_ms(self, model_id: bytes) -> int:
        manifest = None if model_id == NO_MODEL_ID else self._manifest_of(model_id)
        if manifest is None:
            return NO_MODEL_SEGMENT_MS
        return round(float(manifest.input_spec.segment_s) * 1000)

    def status_due(self, now: float) -> str | None:
        """Why a status must go out now (``"change"``, ``"heartbeat"``), or None.

        A status goes out when what it says changes (:meth:`_status_key`), and otherwise once
        every ``status_heartbeat_s``: each one costs about 1 kB, as much as a minute of
        level-0 segments; counters and rates ride along with the next one."""
        if self._status_key() != self._status_key_sent:
            return "change"
        if now - self._status_sent_at >= self.settings.status_heartbeat_s:
            return "heartbeat"
        return None

    def _status_key(self) -> tuple[Any, ...]:
        """What a reader of the status must learn at once when it changes. Counters, rates,
        times, ``next_seq``, the motion meter's last score and whether idle is active change
        all the time and wait for the heartbeat (segments carry idleness and motion)."""
        gate = self._gate
        problems = {**self.source.problems.first, **self.problems.first}
        return (self.state, None if self.encoder is None else self.encoder.manifest.id,
                self.level, self.epoch, self.error, tuple(sorted(problems)),
                None if gate is None else (gate.config.threshold, gate.config.statistic,
                                           gate.config.enter_after),
                None if self.motion is None else (self.motion.calibration.mode,
                                                  self.motion.calibration.pinned,
                                                  self.motion.calibration.measuring_left),
                self.stream.source)

    async def _status_loop(self, client: Any) -> None:
        settings = self.settings
        while True:
            left = self._status_sent_at + settings.status_heartbeat_s - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_due.wait(),
                                       max(0.0, min(settings.status_check_s, left)))
            asked = self._status_due.is_set()
            self._status_due.clear()
            self._keep_pinned()  # also where no segment comes: a stalled measurement ends
            if asked or self.status_due(time.monotonic()) is not None:
                await self._publish_status(client)

    async def _publish_status(self, client: Any, online: bool = True) -> None:
        key = self._status_key()
        body = json.dumps(self._status(online=online), separators=(",", ":")).encode()
        topic, properties, aliased = self._aliases.publish_args(self.topic_status)
        await client.publish(topic, body, qos=1, retain=True, properties=properties)
        self._status_key_sent = key
        self._status_sent_at = time.monotonic()
        self.counters.status_wire_bytes += (publish_packet_bytes(topic, len(body), v5=self._v5,
                                                                 alias=aliased)
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
            "state": self.state if online or self.failed else "offline",
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
            "problems": {k: bounded_text(v) for k, v in
                         {**self.source.problems.first, **self.problems.first}.items()},
            "error": self.error,
            # The longest time between two status messages while online: a reader that hears
            # nothing for longer can tell the AP is gone even where no Last Will says so.
            "status_interval_s": self.settings.status_heartbeat_s,
        }

    # -- control ------------------------------------------------------------------------------

    async def _control(self, raw: Any) -> None:
        """Apply one ``ctl`` message: ``{"action": "set_rate", "level": N}``,
        ``{"action": "switch_model", "model_id": ID[, "url": URL]}`` or
        ``{"action": "calibrate_presence", "empty_s": S}`` / ``..., "auto": true}``."""
        if not isinstance(raw, bytes | bytearray | str):
            raise ValueError(f"payload of type {type(raw).__name__} is not JSON")
        command = loads_bounded(raw)  # size and depth checked before parsing
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
        elif action == "calibrate_presence":
            self._calibrate_presence(command)
        else:
            raise ValueError(f"unknown action {action!r} (set_rate, switch_model, "
                             "calibrate_presence)")

    def _calibrate_presence(self, command: dict[str, Any]) -> None:
        """``{"empty_s": S[, "delay_s": D]}``: after D seconds (0), the next S seconds are
        the empty room's (presence pinned to them); ``{"auto": true}``: back to the
        automatic reference (a measurement under way is dropped)."""
        if self.motion is None:
            raise ValueError("calibrate_presence: this stream has no motion meter (motion off)")
        calibration = self.motion.calibration
        if command.get("auto") is True:
            calibration.release()
            self._keep_pinned()
            log.info("%s: presence back to the automatic reference", self.name)
            return
        seconds = {}
        for key, (low, high), default in (("empty_s", EMPTY_ROOM_S, None),
                                          ("delay_s", EMPTY_ROOM_DELAY_S, 0.0)):
            value = command.get(key, default)
            if not isinstance(value, int | float) or isinstance(value, bool) \
                    or not low <= value <= high:
                raise ValueError(f"calibrate_presence {key} {value!r:.40} is not a number of "
                                 f"seconds in [{low:g}, {high:g}] (or send auto: true)")
            seconds[key] = float(value)
        segment_s = PRESENCE_SEGMENT_S if self.encoder is None else self.encoder.spec.segment_s
        config = calibration.config
        # Segments whose statistic still reads frames from before the command (or from the
        # delay) are passed over.
        lookback_s = config.lookback_s
        segments = max(1, math.ceil(seconds["empty_s"] / segment_s - 1e-9))
        skip = math.ceil((seconds["delay_s"] + lookback_s) / segment_s - 1e-9)
        if segments > config.horizon_segments or skip > config.horizon_segments:
            raise ValueError(f"calibrate_presence empty_s {seconds['empty_s']:g}: more than "
                             f"the {config.horizon_segments} segments of {segment_s:g} s the "
                             "motion reference keeps")
        calibration.measure_empty(segments, skip)
        # Twice the time it needs, and a minute: a source that stalls does not leave it open.
        self._measure_deadline = time.monotonic() + 2 * (skip + segments) * segment_s + 60
        log.info("%s: measuring the empty room for %g s after %g s", self.name,
                 seconds["empty_s"], seconds["delay_s"] + lookback_s)

    async def _switch_model(self, command: dict[str, Any]) -> None:
        """Switch only to a bundle the cloud at ``cloud_url`` lists under the commanded id,
        fetched from under that URL, verified, and seen to run (rollout's checks)."""
        model_id = command.get("model_id")
        if not isinstance(model_id, str):
            raise ValueError(f"switch_model model_id {model_id!r:.80} is not a string")
        if self.encoder is not None and model_id == self.encoder.manifest.id:
            return
        base = self.settings.cloud_url
        try:
            if not base:
                raise RolloutError("no cloud_url configured: models are fetched from the "
                                   "cloud only")
            url = command.get("url")
            url = check_under_base(model_url(base, model_id) if url is None else url, base)
            await asyncio.to_thread(cloud_lists, base, model_id)
            folder = await asyncio.to_thread(fetch_bundle, url, model_id,
                                             self.settings.models_dir,
                                             max_bytes=self.settings.fetch_max_bytes)
            encoder = await asyncio.to_thread(self.encoders.get, folder, probe=True)
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


class BrokerSession:
    """One MQTT connection and the streams it carries (see the module docstring)."""

    def __init__(self, streams: list[StreamAgent], settings: EdgeSettings,
                 client_id: str) -> None:
        self.streams = streams
        self.settings = settings
        self.client_id = client_id
        self.name = client_id
        self.reconnects = 0
        self._stop_requested = asyncio.Event()
        self._by_ctl = {s.topic_ctl: s for s in streams}

    def request_stop(self) -> None:
        """Wake a reconnect backoff: the drain deadline is near."""
        self._stop_requested.set()

    def finished(self) -> bool:
        """Every stream sent what it had and its final status (or ran out of drain time)."""
        return all(s.closed() for s in self.streams)

    async def run(self) -> None:
        """Connect, serve every stream until all are finished, reconnect on a broken
        connection. Raises anything but a broker/network error (aiomqtt.MqttError)."""
        import aiomqtt

        settings = self.settings
        broker: BrokerAddress = settings.broker_address()
        backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        tls = None
        if broker.tls:
            tls = aiomqtt.TLSParameters(ca_certs=str(settings.ca_file)
                                        if settings.ca_file else None)
        v5 = settings.mqtt_protocol == "5"
        protocol = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
        # The spool, not a broker session, holds what is unsent: always start clean.
        clean: dict[str, Any] = {"clean_start": True} if v5 else {"clean_session": True}
        connected = False
        while not self.finished():
            # A one-stream connection's Last Will is that stream's offline status (taken at
            # each connect, so it carries the latest counters).
            will = self.streams[0].will() if len(self.streams) == 1 else None
            try:
                async with AliasingClient(
                    broker.host, broker.port, username=broker.username, password=broker.password,
                    identifier=self.client_id, protocol=protocol, **clean,
                    keepalive=settings.keepalive_s, will=will, tls_params=tls, timeout=10,
                ) as client:
                    connected = True
                    backoff.reset()
                    log.info("%s: connected to %s as %r (%d stream(s))", self.name, broker,
                             self.client_id, len(self.streams))
                    await client.subscribe([(s.topic_ctl, 1) for s in self.streams])
                    aliases = TopicAliases(client.topic_alias_maximum
                                           if v5 and settings.topic_aliases else 0)
                    aliases.reserve([s.topic_seg for s in self.streams])  # sent most
                    log.info("%s: %d topic alias(es) of the broker's %d in use", self.name,
                             min(aliases.maximum, 2 * len(self.streams)), aliases.maximum)
                    await self._serve(client, aliases)
                return
            except aiomqtt.MqttError as exc:
                was_connected, connected = connected, False
                if self.finished():
                    return
                stopping = any(s._stopping for s in self.streams)
                deadline = min(s._drain_deadline for s in self.streams)
                delay = backoff.next_delay()
                if stopping:
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                self.reconnects += 1
                for stream in self.streams:
                    stream.counters.reconnects += 1
                queued = sum(len(s.spool or ()) for s in self.streams)
                log.warning("%s: broker %s %s (%s); retrying in %.1f s with %d segment(s) "
                            "queued", self.name, broker,
                            "lost" if was_connected else "unreachable", exc, delay, queued)
                if stopping:
                    await asyncio.sleep(delay)  # already capped at the drain deadline
                else:
                    # A stop request must not wait out a long backoff begun before it.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_requested.wait(), delay)

    async def _serve(self, client: Any, aliases: TopicAliases) -> None:
        listen = asyncio.create_task(self._listen(client), name=f"{self.name} ctl")
        serving = [asyncio.create_task(s.serve(client, aliases), name=f"{s.name} serve")
                   for s in self.streams]
        try:
            pending: set[asyncio.Task[None]] = {listen, *serving}
            while any(not t.done() for t in serving):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        raise exc
                    if task is listen:  # the message stream ended: the connection is gone
                        import aiomqtt

                        raise aiomqtt.MqttError("the broker closed the connection")
        finally:
            for task in (listen, *serving):
                task.cancel()
            await asyncio.gather(listen, *serving, return_exceptions=True)

    async def _listen(self, client: Any) -> None:
        async for message in client.messages:
            stream = self._by_ctl.get(message.topic.value)
            if stream is not None:
                stream.on_ctl(message.payload)


class EdgeAgent:
    """Every stream of one ``csi edge`` process, and the connections that carry them."""

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.encoders = EncoderCache()
        self.streams = [StreamAgent(s, settings, self.encoders) for s in settings.all_streams()]
        username = settings.broker_address().username
        if username:
            # The broker ties the client id to the user: one connection for every stream.
            self.sessions = [BrokerSession(self.streams, settings, client_id=username)]
        else:
            self.sessions = [BrokerSession(
                [s], settings, client_id=f"{settings.client_id_prefix}-{s.stream.site}-"
                                         f"{s.stream.ap}") for s in self.streams]
        self.stop = asyncio.Event()

    def check(self) -> None:
        for stream in self.streams:
            stream.check()

    async def run(self) -> int:
        """Run until every source ended and was sent, a stream failed, or :meth:`request_stop`.
        The exit code: 0, or 1 when a stream failed."""
        for stream in self.streams:
            stream.open_spool()
        producers = {asyncio.create_task(s.produce(), name=f"{s.name} producer"): s
                     for s in self.streams}
        sessions = {asyncio.create_task(c.run(), name=f"{c.name} connection"): c
                    for c in self.sessions}
        stopper = asyncio.create_task(self.stop.wait())
        try:
            pending: set[asyncio.Task[Any]] = {*producers, *sessions, stopper}
            while not stopper.done() and any(not t.done() for t in sessions):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task in sessions:
                        self._session_ended(sessions[task], task)
                    elif task in producers and producers[task].failed:
                        log.error("%s: stream failed; stopping every stream (exit code 1)",
                                  producers[task].name)
                        self.stop.set()
            await self._drain(producers, sessions)
        finally:
            stopper.cancel()
            for task in (*producers, *sessions):
                task.cancel()
            for stream in self.streams:
                stream.cancel_ctl()
                if stream.spool is not None:
                    stream.spool.close()
        return 1 if any(s.failed for s in self.streams) else 0

    def _session_ended(self, session: BrokerSession, task: asyncio.Task[Any]) -> None:
        exc = task.exception()
        if exc is not None:
            log.error("%s: connection failed: %r", session.name, exc)
            for stream in session.streams:
                stream.fail("connection failed", exc)
            self.stop.set()

    async def _drain(self, producers: dict[asyncio.Task[Any], StreamAgent],
                     sessions: dict[asyncio.Task[Any], BrokerSession]) -> None:
        """Stop reading, send what is queued until the drain deadline, then cut."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        for task in producers:
            task.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        for stream in self.streams:
            stream.begin_stop(deadline)
        for session in self.sessions:
            session.request_stop()
        running = [t for t in sessions if not t.done()]
        if running:
            left = max(0.0, deadline - time.monotonic()) + _STOP_MARGIN_S
            done, late = await asyncio.wait(running, timeout=left)
            for task in late:
                log.warning("%s: connection did not close in time; cutting it",
                            sessions[task].name)
                task.cancel()
            for task in done:
                self._session_ended(sessions[task], task)

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
