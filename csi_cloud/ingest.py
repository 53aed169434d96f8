"""Ingest: wire payloads from many APs -> checked, decoded segments -> per-AP context ->
joint classification, in micro-batches.

:meth:`Ingestor.process` takes a batch of ``(site, ap, payload, received)`` and returns what
happened to it: rejected payloads by reason, decoded segments (for recordings) and one
prediction per new segment. Per AP it keeps the epoch, the last sequence number (gaps and
duplicates are counted, never invented) and a rolling context of the last ``N`` segment slots;
a slot is the segment's start time on the stream's segment grid, so a pause of the source is
a run of missing slots, exactly as the offline evaluation builds its windows.

Presence and motion (csi_edge.presence): every segment that carries a motion score (wire flag
MOTION) gets ``motion_score``, ``motion`` and ``presence`` in its prediction, from a per-AP
:class:`~csi_edge.presence.PresenceTracker`. A presence-only message (model id 00 00 00, no
bundle on the edge) needs no model: its segments are tracked like any other (epoch, gaps,
duplicates) and predicted with presence and motion only (``activity`` and the model fields
null); they are not decoded, recorded or classified.

Not thread-safe: one batch at a time (the service runs it on one worker thread).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from csi_edge._errors import CSIError
from csi_edge.bundle import SegmentCodes, encode_segment_codes, payload_codes
from csi_edge.codec import NO_MODEL_SEGMENT_MS, Payload, PayloadError, decode_payload
from csi_edge.names import InvalidNameError, check_name
from csi_edge.presence import PresenceConfig, PresenceTracker

from .model.compression import CloudModel
from .model.openset import UNKNOWN
from .model.window import Windows, slot_rows
from .records import DecodedRecord, PresenceRecord
from .registry import ModelRegistry

__all__ = [
    "REJECT_REASONS",
    "APState",
    "BatchResult",
    "Ingestor",
    "PredictionRecord",
]

_U32 = 1 << 32
_MAX_AWAITED = 4096  # skipped sequence numbers remembered per AP, to accept them late
_RATE_WINDOW = 1024  # (time, bytes) entries kept per AP for its payload rate
REJECT_REASONS = ("too_large", "too_short", "crc_mismatch", "bad_version", "bad_flags",
                  "bad_count", "bad_varint", "truncated_segment", "trailing_bytes", "bad_idle",
                  "bad_no_model", "unknown_model", "bad_level", "bad_codes", "bad_topic",
                  "bad_name", "too_many_aps")
# Rejections that create no per-AP state (the name is bad, or no more APs are tracked).
_STATELESS = ("bad_topic", "bad_name", "too_many_aps")


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    site: str
    ap: str
    epoch: int
    seq: int
    timestamp: float  # capture time of the segment start, s
    received: float
    model: str | None  # None: presence only (no bundle)
    model_name: str | None
    rate_level: int
    quality: float
    context_present: int
    context_size: int
    activity: str | None  # None: presence only
    activity_confidence: float | None
    identity: str | None
    identity_confidence: float | None
    probabilities: dict[str, dict[str, float]]
    # The segment came as an idle marker (nothing moved). Not a column: the store keeps an
    # idle message's segments as runs (csi_cloud.persistence.rows_of).
    idle: bool = False
    # csi_edge.presence: the edge's score (log2 ratio to the AP's quiet reference), motion at
    # the threshold, presence held after the last motion; None when the edge sent no score.
    motion_score: float | None = None
    motion: bool | None = None
    presence: bool | None = None
    # activity_confidence before the temperature (of the context length read,
    # csi_cloud.model.lengths); None: presence only
    activity_confidence_raw: float | None = None

    @property
    def missing_fraction(self) -> float:
        """Fraction of the context window with no segment; those slots are masked."""
        return round(1.0 - self.context_present / max(self.context_size, 1), 4)

    def as_dict(self) -> dict[str, Any]:
        return {**{f: getattr(self, f) for f in self.__dataclass_fields__},
                "missing_fraction": self.missing_fraction}


@dataclass
class APState:
    """What the cloud tracks per access point (from its segments)."""

    site: str
    ap: str
    epoch: int | None = None
    last_seq: int | None = None
    base_ms: int | None = None
    latest_slot: int | None = None
    model: str | None = None
    rate_level: int | None = None
    context: dict[int, DecodedRecord] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    last_seen: float | None = None
    last_prediction: PredictionRecord | None = None
    last_record: DecodedRecord | None = None  # the newest segment (for a CSI view)
    # Sequence numbers skipped, still awaited, oldest first (insertion order: the oldest is
    # dropped in O(1) once more than _MAX_AWAITED are awaited).
    missing: OrderedDict[int, None] = field(default_factory=OrderedDict)
    bytes_window: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=_RATE_WINDOW))

    def bytes_per_s(self, now: float, window_s: float = 30.0) -> float:
        while self.bytes_window and now - self.bytes_window[0][0] > window_s:
            self.bytes_window.popleft()
        recent = list(self.bytes_window)
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1.0)
        return sum(n for _, n in recent) / span

    def summary(self, now: float) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "last_seq": self.last_seq,
            "model": self.model,
            "rate_level": self.rate_level,
            "last_seen": self.last_seen,
            "payload_bytes_per_s": round(self.bytes_per_s(now), 2),
            "counters": dict(self.counters),
            "rejected": dict(self.rejected),
        }


@dataclass
class BatchResult:
    predictions: list[PredictionRecord] = field(default_factory=list)
    segments: list[DecodedRecord] = field(default_factory=list)
    rejected: list[tuple[str, str, str, str]] = field(default_factory=list)  # site, ap, why, detail
    messages: int = 0


class Ingestor:
    def __init__(self, registry: ModelRegistry, max_payload_bytes: int = 16_384,
                 reconstruct: bool = False, presence: PresenceConfig | None = None,
                 max_aps: int = 10_000, live_lengths: bool = True) -> None:
        """``reconstruct``: also run the decoder (the classifier does not need it; recordings
        decode what they store themselves, off the latency path). ``presence``: the motion
        threshold, sensitivity and hold of every AP. ``max_aps``: APs tracked at most (memory
        stays bounded whatever names arrive); messages of further ones are rejected.
        ``live_lengths``: the activity reads the bundle's calibrated context lengths
        (csi_cloud.model.lengths); False: the full window only, a quarter of the classifier's
        CPU."""
        self.max_aps = max_aps
        self.live_lengths = live_lengths
        self.registry = registry
        self.presence_config = presence or PresenceConfig()
        self.presence: dict[tuple[str, str], PresenceTracker] = {}
        # APs with a motion threshold of their own (the API's, stored in the database).
        self.motion_thresholds: dict[tuple[str, str], float] = {}
        self.reconstruct = reconstruct
        self.max_payload_bytes = max_payload_bytes
        self.aps: dict[tuple[str, str], APState] = {}
        # Per AP: the edge-model prefix and codes of its newest decoded segment, which an idle
        # segment repeats.
        self._last_codes: dict[tuple[str, str], tuple[bytes, SegmentCodes]] = {}
        self.rejected: Counter[str] = Counter()
        self.lock = threading.Lock()

    def warm(self) -> None:
        """Run every bundle's classifier once (CloudModel.warm), on the thread that ingests:
        before the first batch, not during it. Keeps no state."""
        for model_id in self.registry.ids():
            self.registry.get(model_id).warm()

    def state(self, site: str, ap: str) -> APState:
        key = (site, ap)
        if key not in self.aps:
            with self.lock:
                self.aps.setdefault(key, APState(site, ap))
        return self.aps[key]

    def forget(self, site: str, ap: str) -> None:
        """Drop everything held for an AP (its state is about to be loaded afresh)."""
        with self.lock:
            self.aps.pop((site, ap), None)
        self._last_codes.pop((site, ap), None)

    def restore_seen(self, site: str, ap: str, stored: list[int]) -> None:
        """After the AP's state was read back: ``stored`` are the sequence numbers of its
        epoch on record (the recent ones). The newest of them is the newest seen (the AP's
        row may be ahead: it is written from the state, which may already hold the next
        batch, not yet stored), and those missing below it are awaited again, so they are
        still accepted when they arrive late."""
        state = self.state(site, ap)
        if state.last_seq is None or not stored:
            return
        newest = max(stored)
        state.last_seq = newest
        low = max(min(stored), newest - _MAX_AWAITED + 1)
        seen = set(stored)
        state.missing = OrderedDict.fromkeys(s for s in range(low, newest + 1) if s not in seen)

    def unsee(self, site: str, ap: str, epoch: int, seqs: list[int]) -> None:
        """Segments that were tracked but could not be stored (dead-lettered): awaited again,
        so the same segments are accepted if they are sent once more."""
        state = self.aps.get((site, ap))
        if state is None or state.epoch != epoch:
            return
        for seq in sorted(seqs):
            if seq != state.last_seq and seq not in state.missing:
                state.missing[seq] = None
                state.counters["missing_segments"] += 1
        while len(state.missing) > _MAX_AWAITED:
            state.missing.popitem(last=False)

    def _reject(self, result: BatchResult, site: str, ap: str, reason: str,
                detail: str) -> None:
        self.rejected[reason] += 1
        if (site, ap) in self.aps or reason not in _STATELESS:
            self.state(site, ap).rejected[reason] += 1
        result.rejected.append((site, ap, reason, detail))

    def _decode(self, result: BatchResult, site: str, ap: str, data: bytes,
                received: float) -> list[DecodedRecord | PresenceRecord]:
        try:
            payload: Payload = decode_payload(data, max_bytes=self.max_payload_bytes)
        except PayloadError as exc:
            self._reject(result, site, ap, exc.reason, exc.detail)
            return []
        if payload.presence_only:
            return [PresenceRecord(site, ap, payload.epoch, payload.seq(i),
                                   payload.start_ms(i, NO_MODEL_SEGMENT_MS), segment.quality,
                                   segment.motion, received)
                    for i, segment in enumerate(payload.segments)]
        model = self.registry.by_prefix(payload.model_id)
        if model is None:
            self._reject(result, site, ap, "unknown_model",
                         f"model id prefix {payload.model_id.hex()} is not served")
            return []
        if payload.level >= len(model.manifest.levels):
            self._reject(result, site, ap, "bad_level",
                         f"level {payload.level} not in {model.manifest.name}")
            return []
        if payload.idle:
            return [*self._idle_records(site, ap, payload, model, received)]
        try:
            decoded = payload_codes(payload, model.manifest, model.tables)
        except (CSIError, ValueError) as exc:
            self._reject(result, site, ap, "bad_codes",
                         f"{len(payload.segments)} segment(s), wire version "
                         f"{payload.version}: {exc}")
            return []
        records: list[DecodedRecord] = []
        for i, (segment, codes) in enumerate(zip(payload.segments, decoded, strict=True)):
            # What is stored is each segment's own stream: version 1 sent it, version 2's
            # message stream is cut back into one a segment.
            blob = segment.codes if payload.version == 1 else encode_segment_codes(
                codes, model.manifest, model.tables)
            records.append(DecodedRecord(
                site, ap, payload.epoch, payload.seq(i),
                payload.start_ms(i, model.segment_ms), payload.level, segment.quality, model,
                codes, blob, received, motion=segment.motion))
        self._last_codes[(site, ap)] = (model.model_id, records[-1].codes)
        return [*records]

    def _idle_records(self, site: str, ap: str, payload: Payload, model: CloudModel,
                      received: float) -> list[DecodedRecord]:
        """Segments of an IDLE message: each repeats the AP's last coded segment (or a still
        one with the mean profile if there is none), so each still gets a prediction."""
        last = self._last_codes.get((site, ap))
        held = last[1] if last is not None and last[0] == model.model_id else None
        codes = model.idle_codes(payload.level, held)
        blob = encode_segment_codes(codes, model.manifest, model.tables)
        counters = self.state(site, ap).counters
        counters["idle_messages"] += 1
        counters["idle_segments"] += len(payload.segments)
        counters["idle_without_reference"] += 0 if held is not None else len(payload.segments)
        return [DecodedRecord(site, ap, payload.epoch, payload.seq(i),
                              payload.start_ms(i, model.segment_ms), payload.level,
                              segment.quality, model, codes, blob, received, idle=True,
                              motion=segment.motion)
                for i, segment in enumerate(payload.segments)]

    def process(self, batch: list[tuple[str, str, bytes, float]]) -> BatchResult:
        """Check, decode, track and classify one batch of messages (arrival order)."""
        result = BatchResult(messages=len(batch))
        accepted: list[DecodedRecord] = []
        presence_only: list[PresenceRecord] = []
        for site, ap, data, received in batch:
            if (site, ap) not in self.aps:
                # Names by the one rule (csi_edge.names) before anything is kept for them.
                try:
                    check_name(site, "site")
                    check_name(ap, "ap")
                except InvalidNameError as exc:
                    self._reject(result, site, ap, "bad_name", str(exc))
                    continue
                if len(self.aps) >= self.max_aps:
                    self._reject(result, site, ap, "too_many_aps",
                                 f"{site}/{ap}: {self.max_aps} APs are tracked already")
                    continue
            records = self._decode(result, site, ap, data, received)
            if not records:
                continue
            state = self.state(site, ap)
            state.counters["messages"] += 1
            if data[0] >> 5 == 1:
                # Accepted, so byte 0's top bits are the wire version: an edge that still sends
                # version 1 (older, or told wire_version = 1) shows here.
                state.counters["wire_v1_messages"] += 1
            state.counters["payload_bytes"] += len(data)
            state.bytes_window.append((received, len(data)))
            state.last_seen = received
            for record in records:
                if self._track(state, record):
                    if isinstance(record, PresenceRecord):
                        presence_only.append(record)
                    else:
                        accepted.append(record)
        predictions = [self._presence_prediction(r) for r in presence_only]
        if not accepted:
            result.predictions = predictions
            return result
        # Reconstruct per model, in one batch each.
        by_model: dict[str, list[int]] = {}
        for i, record in enumerate(accepted):
            by_model.setdefault(record.model.id, []).append(i)
        decoded: list[DecodedRecord] = list(accepted)
        for indices in by_model.values():
            model = accepted[indices[0]].model
            codes = [accepted[i].codes for i in indices]
            if self.reconstruct:
                z_q, profile, recon = model.reconstruct(codes)
            else:
                (z_q, profile), recon = model.decode_latent(codes), None
            for j, i in enumerate(indices):
                r = accepted[i]
                decoded[i] = DecodedRecord(r.site, r.ap, r.epoch, r.seq, r.timestamp_ms, r.level,
                                           r.quality, r.model, r.codes, r.code_bytes,
                                           r.received, z_q[j], profile[j],
                                           None if recon is None else recon[j], idle=r.idle,
                                           motion=r.motion)
        result.segments = decoded
        result.predictions = predictions + self._classify(decoded)
        return result

    def _presence_of(self, site: str, ap: str, start_ms: int, segment_ms: int,
                     score: float | None) -> tuple[bool | None, bool | None]:
        """``(motion, presence)`` of one AP's segment, from its tracker."""
        tracker = self.presence.get((site, ap))
        if tracker is None:
            tracker = self.presence[(site, ap)] = PresenceTracker(self._presence_config(site, ap))
        return tracker.update(start_ms / 1000, (start_ms + segment_ms) / 1000, score)

    def _presence_config(self, site: str, ap: str) -> PresenceConfig:
        own = self.motion_thresholds.get((site, ap))
        return self.presence_config if own is None else \
            replace(self.presence_config, threshold=own, sensitivity=1.0)

    def set_motion_thresholds(self, thresholds: dict[tuple[str, str], float]) -> None:
        """The APs' own motion thresholds (every other AP: the site's); applied from each
        AP's next segment on, its presence hold kept. The same thresholds again (housekeeping
        reads them every 5 s) touch no tracker."""
        if thresholds == self.motion_thresholds:
            return
        self.motion_thresholds = dict(thresholds)
        for key, tracker in list(self.presence.items()):
            tracker.config = self._presence_config(*key)

    def _presence_prediction(self, record: PresenceRecord) -> PredictionRecord:
        """A presence-only segment's prediction: presence and motion, nothing a model says."""
        motion, presence = self._presence_of(record.site, record.ap, record.timestamp_ms,
                                             NO_MODEL_SEGMENT_MS, record.motion)
        prediction = PredictionRecord(
            site=record.site, ap=record.ap, epoch=record.epoch, seq=record.seq,
            timestamp=record.timestamp_ms / 1000, received=record.received, model=None,
            model_name=None, rate_level=0, quality=record.quality, context_present=0,
            context_size=0, activity=None, activity_confidence=None, identity=None,
            identity_confidence=None, probabilities={}, motion_score=record.motion,
            motion=motion, presence=presence)
        self._latest(prediction)
        return prediction

    def _latest(self, prediction: PredictionRecord) -> None:
        state = self.aps[(prediction.site, prediction.ap)]
        if state.last_prediction is None or (prediction.epoch, prediction.timestamp) >= (
                state.last_prediction.epoch, state.last_prediction.timestamp):
            state.last_prediction = prediction

    def restore_context(self, records: list[DecodedRecord]) -> None:
        """Put one AP's last segments (oldest first, one epoch) back into its context."""
        first = records[0]
        state = self.state(first.site, first.ap)
        model = first.model
        z_q, profile = model.decode_latent([r.codes for r in records])
        state.epoch = first.epoch
        state.base_ms = first.timestamp_ms
        state.context.clear()
        for r, z, p in zip(records, z_q, profile, strict=True):
            slot = (r.timestamp_ms - state.base_ms) // model.segment_ms
            state.context[slot] = DecodedRecord(r.site, r.ap, r.epoch, r.seq, r.timestamp_ms,
                                                r.level, r.quality, model, r.codes,
                                                r.code_bytes, r.received, z, p)
            state.latest_slot = slot if state.latest_slot is None else max(state.latest_slot,
                                                                           slot)
        self._last_codes[(first.site, first.ap)] = (model.model_id, records[-1].codes)

    def _track(self, state: APState, record: DecodedRecord | PresenceRecord) -> bool:
        """Epoch, gap and duplicate bookkeeping; False for a segment already seen."""
        c = state.counters
        if record.epoch != state.epoch:
            if state.epoch is not None:
                c["epoch_changes"] += 1
            state.epoch, state.last_seq = record.epoch, None
            state.base_ms, state.latest_slot = record.timestamp_ms, None
            state.context.clear()
            state.missing.clear()
        if state.base_ms is None:  # state restored after a restart: context starts afresh
            state.base_ms = record.timestamp_ms
        if state.last_seq is not None:
            step = (record.seq - state.last_seq) % _U32
            if step == 0:
                c["duplicates"] += 1
                return False
            if step > _U32 // 2:
                # Older than the newest seen: a segment skipped earlier arriving late (a broker
                # resends unacknowledged messages after newer ones), or one seen already.
                if record.seq in state.missing:
                    del state.missing[record.seq]
                    c["late"] += 1
                    c["missing_segments"] -= 1
                    self._note(state, record)
                    return True
                c["duplicates"] += 1
                return False
            if step > 1:
                c["gaps"] += 1
                if step - 1 <= _MAX_AWAITED:
                    c["missing_segments"] += step - 1
                    state.missing.update(((state.last_seq + k) % _U32, None)
                                         for k in range(1, step))
                    # Oldest first out: O(1) each, however the sequence numbers jump.
                    while len(state.missing) > _MAX_AWAITED:
                        state.missing.popitem(last=False)
                else:
                    # Beyond what is awaited: the numbering jumped (counted once, not as
                    # billions of missing segments, and nothing is enumerated).
                    c["seq_jumps"] += 1
        state.last_seq = record.seq
        self._note(state, record)
        return True

    @staticmethod
    def _note(state: APState, record: DecodedRecord | PresenceRecord) -> None:
        state.model = record.model.id if isinstance(record, DecodedRecord) else None
        state.rate_level = record.level
        state.counters["segments"] += 1

    def _classify(self, records: list[DecodedRecord]) -> list[PredictionRecord]:
        # Per model: its windows' rows (csi_cloud.model.window) into the segments they hold.
        groups: dict[str, _Windows] = {}
        for index, record in enumerate(records):
            state = self.aps[(record.site, record.ap)]
            model = record.model
            n = model.net.cfg.context_segments
            assert state.base_ms is not None
            slot = (record.timestamp_ms - state.base_ms) // model.segment_ms
            state.context[slot] = record
            if state.last_record is None or record.timestamp_ms >= state.last_record.timestamp_ms:
                state.last_record = record
            latest = slot if state.latest_slot is None else max(state.latest_slot, slot)
            state.latest_slot = latest
            for old in [s for s in state.context if s <= latest - n]:
                del state.context[old]
            # The window ending at this segment, with segments of the same edge encoder only.
            group = groups.setdefault(model.id, _Windows(model))
            group.add(index, record, {s: group.row(seg) for s, seg in state.context.items()
                                      if slot - n < s <= slot
                                      and seg.model.model_id == model.model_id}, slot, n)
        out: list[tuple[int, PredictionRecord]] = []
        for group in groups.values():
            out.extend(zip(group.positions, self._predict(group), strict=True))
        out.sort(key=lambda pair: pair[0])
        return [p for _, p in out]

    def _predict(self, group: _Windows) -> list[PredictionRecord]:
        model, windows = group.model, group.windows()
        prediction = (model.classify_live(windows) if self.live_lengths
                      else model.classify(windows))
        p_act, p_id, present = prediction.activity, prediction.identity, windows.present
        n = present.shape[1]
        labels = model.manifest.labels
        activities = labels["activity"] or []
        identities = labels["identity"] or []
        out = []
        for w, record in enumerate(group.records):
            a = int(p_act[w].argmax())
            probabilities = {"activity": {k: round(float(v), 5)
                                          for k, v in zip(activities, p_act[w], strict=True)}}
            identity = identity_conf = None
            if p_id is not None and identities:
                i = int(p_id[w].argmax())
                identity, identity_conf = identities[i], float(p_id[w, i])
                if prediction.unknown[w]:  # past the open-set threshold: nobody enrolled
                    identity = UNKNOWN
                probabilities["identity"] = {k: round(float(v), 5)
                                             for k, v in zip(identities, p_id[w], strict=True)}
            motion, presence = self._presence_of(record.site, record.ap, record.timestamp_ms,
                                                 model.segment_ms, record.motion)
            predicted = PredictionRecord(
                site=record.site, ap=record.ap, epoch=record.epoch, seq=record.seq,
                timestamp=record.timestamp_ms / 1000, received=record.received,
                model=model.id, model_name=model.manifest.name, rate_level=record.level,
                quality=record.quality, context_present=int(present[w].sum()), context_size=n,
                activity=activities[a], activity_confidence=float(p_act[w, a]),
                activity_confidence_raw=(round(float(prediction.activity_raw[w, a]), 5)
                                         if prediction.activity_raw is not None else None),
                identity=identity, identity_confidence=identity_conf,
                probabilities=probabilities, idle=record.idle, motion_score=record.motion,
                motion=motion, presence=presence)
            self._latest(predicted)
            out.append(predicted)
        return out


class _Windows:
    """One model's windows of a batch, as rows into the decoded segments they hold."""

    def __init__(self, model: CloudModel) -> None:
        self.model = model
        self.positions: list[int] = []  # each window's record's place in the batch
        self.records: list[DecodedRecord] = []  # each window's newest segment
        self.rows: list[np.ndarray] = []
        self.z_q: list[np.ndarray] = []  # per row: the segment's decoded latent and profile
        self.profile: list[np.ndarray] = []
        self._row: dict[int, int] = {}  # id(segment) -> row

    def row(self, segment: DecodedRecord) -> int:
        if id(segment) not in self._row:
            assert segment.z_q is not None and segment.profile is not None
            self._row[id(segment)] = len(self.z_q)
            self.z_q.append(segment.z_q)
            self.profile.append(segment.profile)
        return self._row[id(segment)]

    def add(self, position: int, record: DecodedRecord, rows_by_slot: dict[int, int],
            slot: int, n: int) -> None:
        self.row(record)  # a late segment may be older than its own window keeps
        self.positions.append(position)
        self.records.append(record)
        self.rows.append(slot_rows(rows_by_slot, slot, n))

    def windows(self) -> Windows:
        """The windows, each at the rate level of the segment it ends at."""
        return Windows.gather(np.stack(self.rows), np.stack(self.z_q), np.stack(self.profile),
                              np.array([r.level for r in self.records]))
