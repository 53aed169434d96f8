"""What the HTTP API asks of the running service: a few queries and commands.

The routes talk to :class:`Cloud` only; it is the one place in the API that knows the parts of
:class:`~csi_cloud.service.CloudService` (its ingestor, registry, database, recorder, jobs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from prometheus_client import generate_latest
from sqlalchemy import select
from sqlalchemy.orm import Session

from csi_edge.bundle import BundleManifest
from csi_edge.codec import NO_MODEL_SEGMENT_MS

from ..db import Label, Prediction
from ..ingest import BatchResult, Ingestor
from ..jobs import JobManager
from ..live import LiveHub
from ..model.compression import CloudModel
from ..records import DecodedRecord
from ..registry import UnknownModelError
from ..service import CloudService, NotConnectedError
from ..settings import CloudSettings
from .schemas import Health

__all__ = ["UPLOAD_AP", "UPLOAD_SITE", "Cloud"]

log = logging.getLogger("csi_cloud.api")

UPLOAD_SITE = UPLOAD_AP = "upload"  # the pseudo AP of /predict's segments
# How far before a label a stored idle run can start and still reach into it: a run is one
# message's segments, at most 255 (the wire's count) of a few seconds each.
_LONGEST_RUN_S = 1200.0

IngestorT = TypeVar("IngestorT", bound=Ingestor)


class Cloud:
    """Queries and commands over one :class:`CloudService`."""

    def __init__(self, service: CloudService) -> None:
        self._service = service

    @property
    def settings(self) -> CloudSettings:
        return self._service.settings

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session on the API's own connection pool (never ingest's)."""
        with self._service.db.api_session() as session:
            yield session

    # -- access points ----------------------------------------------------------------------

    def payload_rate(self, site: str, ap: str) -> float | None:
        """Payload bytes per second of an AP this worker ingests (None: not this worker's)."""
        state = self._service.ingestor.aps.get((site, ap))
        return state.bytes_per_s(time.time()) if state is not None else None

    def last_record(self, site: str, ap: str) -> DecodedRecord | None:
        """The AP's newest decoded segment since this worker started."""
        state = self._service.ingestor.aps.get((site, ap))
        return state.last_record if state is not None else None

    async def send_ctl(self, site: str, ap: str, command: dict[str, Any]) -> str:
        """Publish a command on the AP's ``ctl`` topic (NotConnectedError without a broker);
        the topic."""
        await self._service.send_ctl(site, ap, command)
        return f"{self.settings.prefix}/{site}/{ap}/ctl"

    def label_recordings(self, site: str, ap: str, start: float, end: float,
                         activity: str | None, identity: str | None) -> Any:
        """Add a label to the AP's recordings, best effort: the recorder's result, or None
        without a recorder or when it fails (logged)."""
        label_range = getattr(self._service.recorder, "label_range", None)
        if label_range is None:
            return None
        try:
            return label_range(site, ap, start, end, activity, identity)
        except Exception:  # the database row stands; recordings are best effort
            log.exception("labelling the recordings of %s/%s failed", site, ap)
            return None

    def refresh_motion_thresholds(self, session: Session) -> None:
        """Apply the APs' own motion thresholds, read on the API's ``session``, now (this
        worker; the others within 5 s). Best effort: what was stored stands, and this
        worker's housekeeping applies it within 5 s if this fails (logged)."""
        try:
            self._service.refresh_motion_thresholds(session)
        except Exception:
            log.exception("applying the stored motion thresholds failed (housekeeping retries)")

    def labelled_motion_scores(self, session: Session, site: str, ap: str, still: set[str],
                               since: float | None = None
                               ) -> tuple[list[float], list[float], dict[str, int]]:
        """The motion scores of the AP's stored segments that start within its activity
        labels (and not before ``since``): (still ones, moving ones, segments per labelled
        activity). Each segment of a stored idle run inside a label counts, with the run's
        score (its highest: the run keeps no other); a segment under two labels counts once,
        for the earlier label."""
        query = select(Label).where(Label.site == site, Label.ap == ap,
                                    Label.activity.is_not(None))
        if since is not None:
            query = query.where(Label.end > since)
        quiet: list[float] = []
        moving: list[float] = []
        seen: dict[str, int] = {}
        counted: set[tuple[int, int]] = set()  # (row id, segment of its run)
        lengths: dict[str | None, float] = {}
        for label in session.scalars(query.order_by(Label.start, Label.id)).all():
            start = label.start if since is None else max(label.start, since)
            rows = session.execute(
                select(Prediction.id, Prediction.timestamp, Prediction.segments,
                       Prediction.model, Prediction.motion_score).where(
                    Prediction.site == site, Prediction.ap == ap,
                    Prediction.motion_score.is_not(None),
                    Prediction.timestamp < label.end,
                    Prediction.timestamp >= start - _LONGEST_RUN_S)).all()
            activity = str(label.activity)
            into = quiet if activity in still else moving
            for row_id, timestamp, segments, model_id, score in rows:
                if model_id not in lengths:
                    lengths[model_id] = self._segment_s(model_id)
                for k in range(segments or 1):
                    if (start <= timestamp + k * lengths[model_id] < label.end
                            and (row_id, k) not in counted):
                        counted.add((row_id, k))
                        into.append(float(cast(float, score)))  # not null: the query
                        seen[activity] = seen.get(activity, 0) + 1
        return quiet, moving, seen

    def _segment_s(self, model_id: str | None) -> float:
        """Segment length of an AP's predictions: its bundle's, 1 s without one."""
        if model_id is None:
            return NO_MODEL_SEGMENT_MS / 1000
        try:
            return self.model(model_id).segment_ms / 1000
        except UnknownModelError:
            return NO_MODEL_SEGMENT_MS / 1000

    # -- models -----------------------------------------------------------------------------

    @property
    def active_model(self) -> str:
        return self._service.active_model

    def model(self, model_id: str) -> CloudModel:
        """A served bundle by id, id prefix or name (UnknownModelError)."""
        return self._service.registry.get(model_id)

    def manifests(self, refresh: bool = False) -> list[BundleManifest]:
        """Every served bundle, by name (``refresh``: look at the folder again first)."""
        if refresh:
            self._service.registry.refresh()
        return sorted(self._service.registry.manifests(), key=lambda m: m.name)

    def model_folder(self, model_id: str) -> Path:
        return self._service.registry.folder_of(model_id)

    async def activate(self, model_id: str) -> list[str]:
        """Make a bundle active and announce it to the APs; refused up front without a broker
        (CloudService.activate stores the new active model before it announces it, so failing
        on the first send would leave it changed)."""
        if self._service.mqtt is None:
            raise NotConnectedError("not connected to the MQTT broker: the activation could "
                                    "not be announced to the APs, so nothing was changed")
        return await self._service.activate(model_id)

    async def classify_apart(self, payloads: list[bytes], make: type[IngestorT]
                             ) -> tuple[BatchResult, IngestorT]:
        """Payloads through a fresh ingestor of type ``make`` under the pseudo AP
        ``upload/upload``: never the live per-AP state, and on the /predict threads, so an
        upload never holds up live ingest."""
        service = self._service

        def classify() -> tuple[BatchResult, IngestorT]:
            ingestor = make(service.registry, service.settings.max_payload_bytes)
            now = time.time()
            return ingestor.process([(UPLOAD_SITE, UPLOAD_AP, p, now) for p in payloads]), ingestor

        pool = getattr(service, "predict_pool", None)
        return await asyncio.get_running_loop().run_in_executor(pool, classify)

    # -- jobs, live streams, health ---------------------------------------------------------

    @property
    def jobs(self) -> JobManager | None:
        """The training job manager (None: this service runs no jobs)."""
        return getattr(self._service, "jobs", None)

    def live(self, kind: str) -> LiveHub:
        """The live hub of ``predictions`` or ``events``."""
        return self._service.hub if kind == "predictions" else self._service.trust.hub

    def health(self) -> Health:
        service = self._service
        problems = service.problems()
        try:
            database = service.db.ping()
        except Exception as exc:  # any driver error means not ready
            database = False
            problems.append(f"database: not reachable: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
        if not len(service.registry):
            problems.append("models: no usable bundle")
        return Health(status="ok" if not problems else "degraded", models=len(service.registry),
                      mqtt_connected=service.mqtt is not None, database=database,
                      uptime_s=round(time.time() - service.started, 1), problems=problems,
                      dead_letters=service.dead_lettered)

    def metrics(self) -> bytes:
        return generate_latest(self._service.metrics.registry)
