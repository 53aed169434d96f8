"""Access points: state, latest prediction, rate control, presence calibration, the AP's own
motion threshold."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import AfterValidator
from sqlalchemy import select
from sqlalchemy.orm import Session

from csi_edge.names import check_name
from csi_edge.presence import ThresholdFitError, fit_motion_threshold

from ...db import AP, APPresence, Prediction
from ...service import NotConnectedError
from ..deps import CloudDep, DbSession, WriteAccess
from ..schemas import (
    APOut,
    CSIOut,
    CtlAccepted,
    EmptyRoomIn,
    MotionThresholdFitIn,
    MotionThresholdIn,
    MotionThresholdOut,
    Page,
    PredictionOut,
    RateIn,
)

router = APIRouter(prefix="/aps", tags=["aps"])

# Site and AP names follow the one rule of csi_edge.names (as on the broker, the edge and in
# the database): anything else (``$SYS``, ``.``, ``..``, 65 characters) is a 422 that quotes
# the value, never a lookup. Valid names need no escaping in a URL.
SiteName = Annotated[str, Path(description="site name (csi_edge.names)"),
                     AfterValidator(lambda value: check_name(value, "site"))]
APName = Annotated[str, Path(description="access point name (csi_edge.names)"),
                   AfterValidator(lambda value: check_name(value, "ap"))]


def ap_out(row: AP, cloud: CloudDep, own: APPresence | None = None) -> APOut:
    counters = dict(row.counters or {})
    bytes_per_s = cloud.payload_rate(row.site, row.ap)
    rate = {"payload_bytes_per_s": round(bytes_per_s, 2)} if bytes_per_s is not None else {}
    return APOut(
        site=row.site, ap=row.ap, online=row.online, model=row.model, rate_level=row.rate_level,
        source=row.source, first_seen=row.first_seen, last_seen=row.last_seen, epoch=row.epoch,
        last_seq=row.last_seq, gaps=int(counters.get("gaps", 0)),
        missing_segments=int(counters.get("missing_segments", 0)),
        counters={**counters, **rate},
        status=row.status,
        prediction=PredictionOut.model_validate(row.prediction) if row.prediction else None,
        motion_threshold=_threshold_out(own) if own is not None else None)


def _threshold_out(row: APPresence) -> MotionThresholdOut:
    return MotionThresholdOut(site=row.site, ap=row.ap, threshold=row.threshold, how=row.how,
                              fit=row.fit, updated=row.updated)


@router.get("", response_model=Page[APOut], summary="Every access point the service knows")
def list_aps(session: DbSession, cloud: CloudDep) -> Page[APOut]:
    rows = session.scalars(select(AP).order_by(AP.site, AP.ap)).all()
    own = {(r.site, r.ap): r for r in session.scalars(select(APPresence))}
    data = [ap_out(r, cloud, own.get((r.site, r.ap))) for r in rows]
    return Page[APOut](data=data, count=len(data))


def _get_ap(session: Session, site: str, ap: str) -> AP:
    row = session.get(AP, (site, ap))
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no access point {site}/{ap}")
    return row


@router.get("/{site}/{ap}", response_model=APOut, summary="One access point")
def get_ap(site: SiteName, ap: APName, session: DbSession, cloud: CloudDep) -> APOut:
    return ap_out(_get_ap(session, site, ap), cloud, session.get(APPresence, (site, ap)))


@router.get("/{site}/{ap}/prediction", response_model=PredictionOut | None,
            summary="The AP's latest stored prediction (null before the first; an idle "
                    "run with its segments)")
def get_prediction(site: SiteName, ap: APName, session: DbSession) -> PredictionOut | None:
    _get_ap(session, site, ap)
    row = session.scalars(select(Prediction).where(Prediction.site == site, Prediction.ap == ap)
                          .order_by(Prediction.id.desc()).limit(1)).first()
    return PredictionOut.model_validate(row, from_attributes=True) if row else None


@router.get("/{site}/{ap}/csi", response_model=CSIOut,
            summary="The AP's newest segment reconstructed by its model (for a CSI view)",
            responses={404: {"description": "unknown AP, or no segment received yet"},
                       422: {"description": "no such antenna"}})
def get_csi(site: SiteName, ap: APName, cloud: CloudDep,
            antenna: Annotated[int, Query(ge=0, le=63)] = 0) -> CSIOut:
    """Runs the decoder (torch) on one segment: a sync route, so in the thread pool."""
    record = cloud.last_record(site, ap)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"no segment from {site}/{ap} since the service started")
    model = record.model
    _, _, recon = model.reconstruct([record.codes])
    frames, planes, width = recon.shape[1:]
    if antenna >= planes:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"antenna {antenna} not in 0..{planes - 1}")
    # Undo the encoder's standardisation: back to the features the model was given.
    encoder = model.net.encoder
    flat = recon[0].reshape(frames, -1) * float(encoder.scale) + encoder.mean.numpy()
    values = np.nan_to_num(flat.reshape(frames, planes, width)[:, antenna, :]).astype(float)
    spec = model.manifest.input_spec
    domain = ("log1p_amplitude" if spec.features == "amplitude" and spec.normalisation == "log"
              else f"{spec.features}, normalisation {spec.normalisation}")
    subcarriers = list(spec.subcarriers) if len(spec.subcarriers) == width else \
        list(range(width))
    return CSIOut(site=site, ap=ap, epoch=record.epoch, seq=record.seq,
                  timestamp=record.timestamp_ms / 1000, model=model.id,
                  model_name=model.manifest.name, rate_level=record.level, domain=domain,
                  subcarriers=subcarriers, antennas=planes, antenna=antenna, frames=frames,
                  rate_hz=spec.nominal_rate_hz, min=round(float(values.min()), 3),
                  max=round(float(values.max()), 3), values=np.round(values, 3).tolist())


@router.post("/{site}/{ap}/rate", response_model=CtlAccepted,
             status_code=status.HTTP_202_ACCEPTED, dependencies=[WriteAccess],
             summary="Change the AP's rate level (published on its ctl topic)")
async def set_rate(site: SiteName, ap: APName, body: RateIn, cloud: CloudDep) -> CtlAccepted:
    return await _send(cloud, site, ap, {"action": "set_rate", "level": body.level})


@router.post("/{site}/{ap}/presence/calibration", response_model=CtlAccepted,
             status_code=status.HTTP_202_ACCEPTED, dependencies=[WriteAccess],
             summary="Measure the empty room: presence pinned to empty_s seconds of it")
async def measure_empty_room(site: SiteName, ap: APName, body: EmptyRoomIn,
                             cloud: CloudDep) -> CtlAccepted:
    """The room must be empty from ``delay_s`` seconds from now for about ``empty_s`` + 5
    seconds (the edge passes over the seconds its statistic looks back). The AP's status
    shows ``motion.mode`` "measuring" with ``measuring_left`` segments, then "pinned" with
    the new ``reference``; the edge keeps it across restarts."""
    return await _send(cloud, site, ap, {"action": "calibrate_presence",
                                         "empty_s": body.empty_s, "delay_s": body.delay_s})


@router.delete("/{site}/{ap}/presence/calibration", response_model=CtlAccepted,
               status_code=status.HTTP_202_ACCEPTED, dependencies=[WriteAccess],
               summary="Back to the automatic presence reference")
async def release_empty_room(site: SiteName, ap: APName, cloud: CloudDep) -> CtlAccepted:
    return await _send(cloud, site, ap, {"action": "calibrate_presence", "auto": True})


@router.put("/{site}/{ap}/presence/threshold", response_model=MotionThresholdOut,
            dependencies=[WriteAccess],
            summary="Give the AP a motion threshold of its own (in place of the site's)")
def set_motion_threshold(site: SiteName, ap: APName, body: MotionThresholdIn,
                         session: DbSession, cloud: CloudDep) -> MotionThresholdOut:
    _get_ap(session, site, ap)
    return _keep_threshold(session, cloud, site, ap, body.threshold, "set", None)


@router.post("/{site}/{ap}/presence/threshold/fit", response_model=MotionThresholdOut,
             dependencies=[WriteAccess],
             summary="Fit the AP's motion threshold on its labelled seconds",
             responses={404: {"description": "unknown AP"},
                        409: {"description": "too few labelled seconds with a motion score, "
                                             "or still ones no threshold keeps within the "
                                             "rate"}})
def fit_threshold(site: SiteName, ap: APName, body: MotionThresholdFitIn, session: DbSession,
                  cloud: CloudDep) -> MotionThresholdOut:
    """The lowest threshold (steps of 1/16) that flags at most ``max_false_positive_rate``
    of the seconds labelled with a ``still`` activity, from the motion scores stored for the
    AP's labelled ranges that start from ``since`` on (csi_edge.presence.fit_motion_threshold).
    Label at least ``MIN_FIT_SECONDS`` (10) s still and as many of movement first (``POST
    /labels``; the dashboard's calibration records them); where the room reads empty while
    people move, measure the empty room before and fit with ``since`` after it."""
    _get_ap(session, site, ap)
    still = set(body.still)
    quiet, moving, seen = cloud.labelled_motion_scores(session, site, ap, still, body.since)
    try:
        fitted = fit_motion_threshold(quiet, moving, body.max_false_positive_rate)
    except ThresholdFitError as exc:
        labelled = ", ".join(f"{k} {v} s" for k, v in sorted(seen.items())) or "none"
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"{site}/{ap}: {exc} (still activities {sorted(still)}; labelled "
                            f"seconds with a motion score: {labelled})") from exc
    fit = {**fitted.as_dict(), "still": sorted(still), "labelled": seen,
           "max_false_positive_rate": body.max_false_positive_rate}
    return _keep_threshold(session, cloud, site, ap, fitted.threshold, "fitted", fit)


@router.delete("/{site}/{ap}/presence/threshold", status_code=status.HTTP_204_NO_CONTENT,
               dependencies=[WriteAccess],
               summary="Back to the site's motion threshold")
def clear_motion_threshold(site: SiteName, ap: APName, session: DbSession,
                           cloud: CloudDep) -> None:
    _get_ap(session, site, ap)
    row = session.get(APPresence, (site, ap))
    if row is not None:
        session.delete(row)
        session.commit()
    cloud.refresh_motion_thresholds(session)


def _keep_threshold(session: Session, cloud: CloudDep, site: str, ap: str, threshold: float,
                    how: str, fit: dict[str, object] | None) -> MotionThresholdOut:
    """Store the AP's threshold and apply it from its next segment on."""
    row = session.merge(APPresence(site=site, ap=ap, threshold=threshold, how=how, fit=fit,
                                   updated=time.time()))
    session.commit()
    cloud.refresh_motion_thresholds(session)
    return _threshold_out(row)


async def _send(cloud: CloudDep, site: str, ap: str, command: dict[str, object]) -> CtlAccepted:
    """Publish ``command`` on the AP's ``ctl`` topic; 503 without a broker."""
    try:
        topic = await cloud.send_ctl(site, ap, command)
    except NotConnectedError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    return CtlAccepted(topic=topic, command=command)
