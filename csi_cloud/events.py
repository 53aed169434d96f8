"""Events: when an AP's activity or presence changes, with start and end times.

Built on the live predictions, after the smoothing (csi_cloud.smoothing):

- **activity**: the settled label (the filter's belief about a second given ``settle_s``
  seconds after it: csi_cloud.smoothing, "Settled labels"), or ``uncertain`` while it
  abstains; so an activity event is published ``settle_s`` after its start, and starts where
  the activity changed. Predictions without a label (presence only, a late segment) leave the
  episode as it is;
- **presence**: ``occupied`` or ``empty`` (csi_edge.presence); null presence (the edge still
  calibrating) leaves it as it is.

An event is an episode: it starts at the capture time of the first prediction with the new
value and ends where the next one starts (``end`` null while it lasts). Each change is
stored (table ``events``: the episode it ends gets its ``end``, a new row opens; an episode
left open by an earlier run of the service is closed by the next change of its AP), and
published on the live event streams (``/api/v1/events/ws``, ``/api/v1/events/stream``) and on
MQTT ``{prefix}/{site}/{ap}/event`` (Home Assistant's event entity).

:class:`LiveTrust` is the service's hook: :meth:`LiveTrust.observe` adds the smoothed fields
to a batch's predictions (in arrival order, on the ingest path) and notes the changes;
:meth:`LiveTrust.flush` stores and publishes them once the batch is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import func, insert, or_, select, update

from .db import Database, Event
from .live import LiveHub
from .model.temperature import uncalibrated
from .registry import ModelRegistry
from .smoothing import DEFAULT_SETTLE_S, Settled, Smoother, TrustParams

__all__ = ["EventTracker", "LiveTrust", "event_payload"]

log = logging.getLogger("csi_cloud.events")

KINDS = ("activity", "presence")


@dataclass
class _Episode:
    value: str
    start: float
    confidence: float | None


@dataclass
class EventTracker:
    """The current episode of each (site, AP, kind); :meth:`update` returns the changes."""

    current: dict[tuple[str, str, str], _Episode] = field(default_factory=dict)

    @staticmethod
    def _values(prediction: dict[str, Any]) -> dict[str, tuple[str, float | None]]:
        values: dict[str, tuple[str, float | None]] = {}
        if prediction.get("smoothed_activity"):
            label = "uncertain" if prediction.get("uncertain") else \
                prediction["smoothed_activity"]
            values["activity"] = (label, prediction.get("smoothed_confidence"))
        if prediction.get("presence") is not None:
            values["presence"] = ("occupied" if prediction["presence"] else "empty", None)
        return values

    def update(self, prediction: dict[str, Any], kinds: tuple[str, ...] = KINDS
               ) -> list[dict[str, Any]]:
        """The changes one prediction makes to the episodes of ``kinds``."""
        site, ap, t = prediction["site"], prediction["ap"], float(prediction["timestamp"])
        changes = []
        for kind, (value, confidence) in self._values(prediction).items():
            if kind not in kinds:
                continue
            key = (site, ap, kind)
            episode = self.current.get(key)
            if episode is not None and (episode.value == value or t < episode.start):
                if episode.value == value and confidence is not None:
                    # The episode's confidence: the highest the filter reached in it.
                    episode.confidence = max(episode.confidence or 0.0, confidence)
                continue
            previous = None if episode is None else {
                "value": episode.value, "start": episode.start, "end": t,
                "confidence": episode.confidence}
            self.current[key] = _Episode(value, t, confidence)
            changes.append({"site": site, "ap": ap, "kind": kind, "value": value, "start": t,
                            "end": None, "confidence": confidence,
                            "model": prediction.get("model"), "previous": previous})
        return changes


def _settled_prediction(settled: Settled) -> dict[str, Any]:
    """What the tracker reads of one settled second (its activity only)."""
    return {"site": settled.site, "ap": settled.ap, "model": settled.model,
            "timestamp": settled.timestamp, "smoothed_activity": settled.activity,
            "smoothed_confidence": settled.confidence, "uncertain": settled.uncertain}


def event_payload(change: dict[str, Any], event_id: int | None) -> dict[str, Any]:
    """What the live streams and MQTT carry for one change (``event_type``: Home Assistant's
    MQTT event entity reads it)."""
    return {"id": event_id, "event_type": change["kind"],
            **{k: change[k] for k in ("site", "ap", "kind", "value", "start", "end",
                                      "confidence", "model", "previous")}}


class LiveTrust:
    """Smoothing, abstention and events for the service (see the module docstring)."""

    def __init__(self, registry: ModelRegistry, db: Database, prefix: str,
                 settle_s: float = DEFAULT_SETTLE_S) -> None:
        self.registry = registry
        self.db = db
        self.prefix = prefix
        self.hub = LiveHub()
        self.smoother = Smoother(self._params_of, settle_s)
        self._smooth_lock = threading.Lock()  # observe (ingest thread) vs release (the loop)
        self.tracker = EventTracker()
        self.pending: list[dict[str, Any]] = []
        self._pending_lock = threading.Lock()  # observe runs in a worker thread, flush not
        self._lock = asyncio.Lock()

    def _params_of(self, model_id: str) -> tuple[TrustParams, float] | None:
        try:
            model = self.registry.get(model_id)
        except KeyError:
            return None
        return (TrustParams.from_calibration(model.manifest.calibration),
                model.manifest.input_spec.segment_s)

    def _raw_confidence(self, prediction: dict[str, Any]) -> float | None:
        if prediction.get("activity_confidence_raw") is not None:  # the service's own
            return float(prediction["activity_confidence_raw"])
        probs = (prediction.get("probabilities") or {}).get("activity") or {}
        if not probs or not prediction.get("model"):
            return None
        try:
            model = self.registry.get(prediction["model"])
        except KeyError:
            return None
        if len(model.lengths.lengths) > 1:
            # Its live output combines several readings (csi_cloud.model.lengths): no one
            # temperature undoes that; only the service that read them knew the raw figure.
            return None
        temperature = model.temperature
        if temperature == 1.0:
            return prediction.get("activity_confidence")
        raw = uncalibrated(np.array([list(probs.values())]), temperature)[0]
        return round(float(raw.max()), 5)

    def observe(self, predictions: list[dict[str, Any]]) -> None:
        """Add ``activity_confidence_raw``, ``smoothed_activity``, ``smoothed_confidence``
        and ``uncertain`` to each prediction dict (in place, in order) and note the events."""
        for prediction in predictions:
            prediction["activity_confidence_raw"] = self._raw_confidence(prediction)
            with self._smooth_lock:
                prediction.update(self.smoother.update(prediction))
                changes = self._settled_changes()
                # Activity comes settled (above); presence from the prediction, at once.
                changes += self.tracker.update(prediction, kinds=("presence",))
            if changes:
                with self._pending_lock:
                    self.pending.extend(changes)

    def _settled_changes(self) -> list[dict[str, Any]]:
        return [c for settled in self.smoother.drain()
                for c in self.tracker.update(_settled_prediction(settled))]

    def release(self, *, everything: bool = False) -> int:
        """Settle the seconds of the streams that ended without a next prediction (silent
        for their ``max_gap_s``; ``everything``: all of them, the service stops) and note
        their changes for :meth:`flush`. Returns how many changes."""
        with self._smooth_lock:
            if everything:
                self.smoother.release_all()
            else:
                self.smoother.release_quiet()
            changes = self._settled_changes()
        if changes:
            with self._pending_lock:
                self.pending.extend(changes)
        return len(changes)

    def drop(self, site: str, ap: str) -> None:
        """Discard what waits to settle for one AP (its partition moved to this worker:
        another one told the seconds since)."""
        with self._smooth_lock:
            self.smoother.drop(site, ap)

    async def flush(self, mqtt: Any = None) -> list[dict[str, Any]]:
        """Store the changes noted so far, then publish them (live streams, MQTT ``event``,
        QoS 1, not retained). Returns what was published."""
        async with self._lock:  # stores one at a time, in order
            with self._pending_lock:
                changes, self.pending = self.pending, []
            if not changes:
                return []
            try:
                ids: list[int | None] = list(await asyncio.to_thread(self._store, changes))
            except Exception:  # events are derived; a failed store must not stop ingest
                log.exception("storing %d event(s) failed", len(changes))
                ids = [None] * len(changes)
        payloads = [event_payload(c, i) for c, i in zip(changes, ids, strict=True)]
        self.hub.publish(payloads)
        if mqtt is not None:
            for p in payloads:
                mqtt._client.publish(f"{self.prefix}/{p['site']}/{p['ap']}/event",
                                     json.dumps(p), qos=1, retain=False)
        return payloads

    def _store(self, changes: list[dict[str, Any]]) -> list[int]:
        ids = []
        with self.db.session.begin() as s:
            for c in changes:
                closing: dict[str, Any] = {"end": c["start"]}
                if c["previous"] is not None and c["previous"]["confidence"] is not None:
                    closing["confidence"] = c["previous"]["confidence"]
                same = (Event.site == c["site"], Event.ap == c["ap"], Event.kind == c["kind"])
                # The episode it ends: the open one, or, for a change that arrives late
                # (below), the one that was closed after it began.
                s.execute(update(Event).where(
                    *same, Event.start <= c["start"],
                    or_(Event.end.is_(None), Event.end > c["start"])).values(**closing))
                # A change that arrives after a later one of the same AP (the worker that
                # held the AP before a hand-over settles its last seconds while the next one
                # already writes): it ended where that later one began, not still open.
                later = s.execute(select(func.min(Event.start)).where(
                    *same, Event.start > c["start"])).scalar()
                if later is not None:
                    c["end"] = later  # (what is published says so too)
                row = s.execute(insert(Event).values(
                    site=c["site"], ap=c["ap"], kind=c["kind"], value=c["value"],
                    start=c["start"], end=later, confidence=c["confidence"],
                    model=c["model"]).returning(Event.id)).scalar_one()
                ids.append(int(row))
        return ids
