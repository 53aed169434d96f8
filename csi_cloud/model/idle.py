"""Idle rooms cost less: calibrating the edge's idle threshold and measuring what it saves.

While nothing moves, the edge sends idle markers (csi_edge.codec flag IDLE: no codes, at most
a quality byte a segment, none when every segment of the message is whole, in messages of up
to 10) instead of codes; the cloud predicts each idle segment from a copy of
the stream's last coded segment (:meth:`CloudModel.idle_codes`). What that costs in accuracy
depends on how still "below the threshold" really is, so the threshold is chosen on data:

- :func:`calibrate_idle` tries thresholds (quantiles of the motion statistic on the training
  segments) and hysteresis lengths, simulates exactly the edge's :class:`IdleGate` on the
  validation recordings, and keeps the setting that idles the most segments while the
  activity accuracy of every rate level stays within ``budget`` of idle off (one prediction
  per segment, as the service emits them). Test recordings are never looked at.
- :func:`evaluate_idle` replays recordings through real wire payloads (csi_edge.codec) with
  idle on and off at one configured level: payload bytes per second on the still activity
  (``nm``) and on the others, accuracy with and without, and the idle share per activity.

Each recording is replayed as its own stream (a fresh edge: its first segments are always
coded), which is pessimistic for Fition's 10 s recordings; the steady-state cost of a long
still period is reported beside it (``idle_steady_bytes_per_s``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from csi_edge.bundle import EdgeEncoder, SegmentCodes, encode_message_codes
from csi_edge.codec import (
    Payload,
    SegmentRecord,
    encode_payload,
    idle_payload_size,
    message_groups,
)
from csi_edge.motion import STATISTICS, IdleConfig, IdleGate, motion_statistic

from .compression import CloudModel
from .data import SegmentData, segment_windows
from .window import Windows

__all__ = ["DEFAULT_BUDGET", "IDLE_PER_MESSAGE", "calibrate_idle", "evaluate_idle",
           "idle_mask", "motion_statistics"]

DEFAULT_BUDGET = 0.005  # activity accuracy (fraction) idling may cost on validation data
IDLE_PER_MESSAGE = 10  # csi_edge.settings idle_segments_per_message default
_QUANTILES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
_ENTER_AFTER = (1, 2)


def motion_statistics(data: SegmentData, statistic: str = STATISTICS[0]) -> np.ndarray:
    """The edge's motion statistic of every segment of ``data`` (M,)."""
    return np.array([motion_statistic(x, statistic) for x in data.x])


def idle_mask(data: SegmentData, recordings: np.ndarray, stats: np.ndarray,
              config: IdleConfig | None) -> np.ndarray:
    """(M,) bool: the segments the edge's :class:`IdleGate` sends idle, each recording
    streamed on its own (a gap in the slots resets the gate, as in the agent)."""
    out = np.zeros(len(data.x), bool)
    if config is None:
        return out
    for r in np.asarray(recordings).tolist():
        gate = IdleGate(config)
        start, count = int(data.start[r]), int(data.count[r])
        previous = None
        for row in range(start, start + count):
            slot = int(data.slot[row])
            if previous is not None and slot != previous + 1:
                gate.reset()
            previous = slot
            out[row] = gate.update(float(stats[row]))
    return out


def _held_codes(model: CloudModel, data: SegmentData, recordings: np.ndarray,
                codes: list[SegmentCodes | None], idle: np.ndarray, level: int
                ) -> list[SegmentCodes | None]:
    """Codes the cloud uses per segment: coded ones as sent, idle ones repeat the stream's
    last coded segment (CloudModel.idle_codes)."""
    out = list(codes)
    for r in np.asarray(recordings).tolist():
        start, count = int(data.start[r]), int(data.count[r])
        last: SegmentCodes | None = None
        for row in range(start, start + count):
            if idle[row]:
                out[row] = model.idle_codes(level, last)
            else:
                last = out[row]
    return out


def _accuracy(model: CloudModel, data: SegmentData, recordings: np.ndarray,
              z_q: dict[int, np.ndarray], profile: dict[int, np.ndarray], level: int
              ) -> dict[str, float | None]:
    """Activity (and identity) accuracy over every segment's prediction and over the
    recordings' last segments (what ``evaluate_bundle`` reports)."""
    n = model.net.cfg.context_segments
    win, owners, last = segment_windows(data, recordings, n)
    keys = list(z_q)
    index = {row: i for i, row in enumerate(keys)}
    rows = np.array([[index[int(g)] if g >= 0 else -1 for g in w] for w in win])
    pred = model.classify(Windows.gather(rows, np.stack([z_q[k] for k in keys]),
                                         np.stack([profile[k] for k in keys]), level))
    p_act, p_id = pred.activity, pred.identity
    act_ok = p_act.argmax(1) == data.activity[owners]
    out: dict[str, float | None] = {
        "activity_accuracy_segments": round(float(act_ok.mean()), 4),
        "activity_accuracy_recordings": round(float(act_ok[last].mean()), 4),
        "identity_accuracy_segments": None, "identity_accuracy_recordings": None}
    known = data.identity[owners] >= 0
    if p_id is not None and known.any():
        id_ok = p_id.argmax(1) == data.identity[owners]
        out["identity_accuracy_segments"] = round(float(id_ok[known].mean()), 4)
        out["identity_accuracy_recordings"] = round(float(id_ok[known & last].mean()), 4)
    return out


def _latents(model: CloudModel, rows: np.ndarray, codes: list[SegmentCodes | None]
             ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    picked = [codes[int(r)] for r in rows]
    z_q, profile = model.decode_latent([c for c in picked if c is not None])
    return ({int(r): z for r, z in zip(rows, z_q, strict=True)},
            {int(r): p for r, p in zip(rows, profile, strict=True)})


def calibrate_idle(data: SegmentData, train_recs: np.ndarray, val_recs: np.ndarray,
                   model: CloudModel | None = None, *, budget: float = DEFAULT_BUDGET,
                   statistic: str = STATISTICS[0],
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The bundle's idle calibration (``manifest.calibration["idle"]``).

    Thresholds are quantiles of the motion statistic over the training segments; for each
    (threshold, enter_after) the validation recordings are replayed through the idle gate at
    every rate level (the bundle's float encoder gives the codes), and the setting that idles
    the most validation segments with an activity accuracy loss <= ``budget`` at every level
    wins. ``model`` is the bundle's CloudModel: without it the accuracy cost cannot be
    measured, so it is required.
    """
    if model is None:
        raise ValueError("calibrate_idle needs the bundle's CloudModel (model=None given): the "
                         "threshold is chosen by what idling costs in accuracy")
    if not 0 <= budget < 1:
        raise ValueError(f"budget {budget!r} is not an accuracy fraction in [0, 1)")
    val_recs = np.asarray(val_recs)
    stats = motion_statistics(data, statistic)
    train_rows = np.flatnonzero(np.isin(data.recording, train_recs))
    val_rows = np.flatnonzero(np.isin(data.recording, val_recs))
    symbols, profile = model.encode(data.x[val_rows])
    sent: dict[int, list[SegmentCodes | None]] = {}
    baseline: dict[int, float] = {}
    for spec in model.manifest.levels:
        codes: list[SegmentCodes | None] = [None] * len(data.x)
        for i, row in enumerate(val_rows.tolist()):
            codes[row] = SegmentCodes(spec.level, symbols[i, : spec.groups],
                                      model.manifest.level_profile(profile[i], spec.level))
        sent[spec.level] = codes
        z, p = _latents(model, val_rows, codes)
        baseline[spec.level] = float(_accuracy(model, data, val_recs, z, p, spec.level)
                                     ["activity_accuracy_segments"] or 0.0)
    candidates = []
    best: dict[str, Any] | None = None
    for threshold in sorted({round(float(np.quantile(stats[train_rows], q)), 6)
                             for q in _QUANTILES}):
        for enter_after in _ENTER_AFTER:
            config = IdleConfig(statistic, threshold, enter_after)
            idle = idle_mask(data, val_recs, stats, config)
            losses = {}
            for spec in model.manifest.levels:
                held = _held_codes(model, data, val_recs, sent[spec.level], idle, spec.level)
                z, p = _latents(model, val_rows, held)
                acc = _accuracy(model, data, val_recs, z, p, spec.level)
                losses[spec.level] = round(baseline[spec.level]
                                           - float(acc["activity_accuracy_segments"] or 0.0), 4)
            row = {"threshold": threshold, "enter_after": enter_after,
                   "idle_fraction": round(float(idle[val_rows].mean()), 4),
                   "max_accuracy_loss": max(losses.values()), "accuracy_loss": losses}
            candidates.append(row)
            if log:
                log(f"idle threshold {threshold:.4f} enter_after {enter_after}: "
                    f"{row['idle_fraction']:.1%} idle, accuracy loss {losses}")
            if row["max_accuracy_loss"] <= budget and (
                    best is None or row["idle_fraction"] > best["idle_fraction"]):
                best = row
    if best is None:  # nothing fits the budget: the most conservative setting
        best = min(candidates, key=lambda c: (c["max_accuracy_loss"], -c["idle_fraction"]))
    return {
        "statistic": statistic,
        "threshold": best["threshold"],
        "enter_after": best["enter_after"],
        "budget": budget,
        "val_idle_fraction": best["idle_fraction"],
        "val_accuracy_loss": best["accuracy_loss"],
        "val_baseline_accuracy": {k: round(v, 4) for k, v in baseline.items()},
        "within_budget": best["max_accuracy_loss"] <= budget,
        "method": "largest validation idle share with per-segment activity accuracy loss <= "
                  "budget at every level; candidates: training quantiles x enter_after",
    }


def _config(idle: IdleConfig | Mapping[str, Any] | None) -> IdleConfig | None:
    if idle is None or isinstance(idle, IdleConfig):
        return idle
    return IdleConfig.from_calibration({"idle": idle})


def evaluate_idle(model: CloudModel, edge: EdgeEncoder, data: SegmentData,
                  recordings: np.ndarray, *, level: int,
                  idle: IdleConfig | Mapping[str, Any] | None = None,
                  idle_per_message: int = IDLE_PER_MESSAGE,
                  still_activity: str = "nm") -> dict[str, Any]:
    """Idle on vs off at one configured level, through real payloads.

    Each recording is one stream: the int8 edge encoder codes its segments, the idle gate
    (``idle``, default the bundle's calibration) picks idle ones, payloads are built as the
    agent groups them (coded segments ``segments_per_message`` at a time, idle ones up to
    ``idle_per_message``; a change of kind or a gap ends a message), the cloud model
    decompresses them (idle ones repeat the last coded segment) and classifies every segment's
    context.
    """
    config = _config(idle if idle is not None else model.manifest.calibration.get("idle"))
    if config is None:
        raise ValueError(f"bundle {model.manifest.name!r} has no idle calibration and no "
                         "idle settings were given")
    recordings = np.asarray(recordings)
    spec = model.manifest.level(level)
    rows = np.flatnonzero(np.isin(data.recording, recordings))
    stats = motion_statistics(data, config.statistic)
    symbols, profile = edge.encode(data.x[rows])
    position = {int(r): i for i, r in enumerate(rows)}
    segment_s = model.manifest.input_spec.segment_s
    names = model.manifest.labels["activity"] or []
    still = names.index(still_activity) if still_activity in names else -1
    out: dict[str, Any] = {"level": level, "segments_per_message": spec.segments_per_message,
                           "idle_per_message": idle_per_message,
                           "idle": {"statistic": config.statistic,
                                    "threshold": config.threshold,
                                    "enter_after": config.enter_after}}
    for mode, gate_config in (("off", None), ("on", config)):
        idle_rows = idle_mask(data, recordings, stats, gate_config)
        z_q: dict[int, np.ndarray] = {}
        prof: dict[int, np.ndarray] = {}
        nbytes = {"still": 0, "moving": 0}
        nsegs = {"still": 0, "moving": 0}
        for r in recordings.tolist():
            kind = "still" if data.activity[r] == still else "moving"
            start, count = int(data.start[r]), int(data.count[r])
            last: SegmentCodes | None = None
            part = slice(start, start + count)
            for group in ([start + i for i in g] for g in message_groups(
                    data.slot[part].tolist(), spec.segments_per_message,
                    idle=idle_rows[part].tolist(), idle_per_message=idle_per_message)):
                is_idle = bool(idle_rows[group[0]])
                stream = b"" if is_idle else encode_message_codes(
                    [edge.codes(symbols[position[g]], profile[position[g]], level)
                     for g in group], edge.manifest, edge.tables)
                payload = encode_payload(Payload(level, edge.model_id, 1,
                                                 int(data.slot[group[0]]), 0,
                                                 tuple(SegmentRecord(
                                                     1.0 if data.quality is None
                                                     else float(data.quality[g]))
                                                     for g in group),
                                                 idle=is_idle, codes=stream))
                nbytes[kind] += len(payload)
                nsegs[kind] += len(group)
                for g, seg in zip(group, model.decompress(payload, last=last), strict=True):
                    z_q[g], prof[g] = seg.z_q, seg.profile
                    if not is_idle:
                        last = seg.codes
        acc = _accuracy(model, data, recordings, z_q, prof, level)
        per_activity = {}
        for a, name in enumerate(names):
            mask = np.isin(data.recording[rows], np.flatnonzero(data.activity == a))
            if mask.any():
                per_activity[name] = round(float(idle_rows[rows][mask].mean()), 4)
        out[mode] = {
            "still_bytes_per_s": round(nbytes["still"] / max(nsegs["still"], 1) / segment_s, 2),
            "moving_bytes_per_s": round(nbytes["moving"] / max(nsegs["moving"], 1) / segment_s,
                                        2),
            "bytes_per_s": round(sum(nbytes.values()) / len(rows) / segment_s, 2),
            "idle_fraction": round(float(idle_rows[rows].mean()), 4),
            "idle_fraction_per_activity": per_activity,
            **acc,
        }
    on, off = out["on"], out["off"]
    out["still_reduction"] = round(off["still_bytes_per_s"] / max(on["still_bytes_per_s"],
                                                                  1e-9), 2)
    out["activity_accuracy_loss_segments"] = round(
        off["activity_accuracy_segments"] - on["activity_accuracy_segments"], 4)
    out["activity_accuracy_loss_recordings"] = round(
        off["activity_accuracy_recordings"] - on["activity_accuracy_recordings"], 4)
    # A long still period of whole segments (no motion byte: the edge's own setting).
    out["idle_steady_bytes_per_s"] = round(idle_payload_size(idle_per_message,
                                                             full_quality=True)
                                           / (idle_per_message * segment_s), 2)
    return out


