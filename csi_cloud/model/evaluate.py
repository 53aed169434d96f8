"""Evaluation of a bundle on labelled recordings, through the real bitstream.

For every rate level, each recording's segments are encoded by the edge encoder (int8 ONNX),
entropy coded and packed into wire payloads exactly as the edge sends them (``segments_per
_message`` consecutive segments per message; a gap starts a new message), then decompressed by
the cloud model from those bytes alone and classified over the last ``N`` decoded segments.
Two accuracies: per recording (one window ending at each recording's last segment, ``*_accuracy``)
and per second (``*_accuracy_per_second``: every prediction the service makes while the
recording streams, one per segment, windows that start mid-recording included, so the first
seconds are classified from a partial context exactly as the service does). Per second the
activity is scored three ways: the full context window alone (``activity_accuracy_per_second``),
the live reading a prediction's ``activity`` gives (``activity_accuracy_live_per_second``: the
window read at the bundle's context lengths, :meth:`CloudModel.classify_live`) and the
smoothed label the dashboard and the events show (``activity_accuracy_smoothed_per_second``:
the bundle's filter over the live readings, each recording streamed alone from a fresh start;
csi_cloud.smoothing). Recordings laid end to end, the way a person changes activity in
front of an AP, are scored by ``bench/trust.py``.
Payload bytes are ``len(payload)`` of those messages: header, codes and CRC.

Each level's cost against the unquantized path, in accuracy points with a 95% interval
(:func:`paired_cost`): the same windows are scored both ways, so the difference is paired, and
the interval resamples recordings (a test split of tens of recordings cannot resolve one point
of cost per recording: one recording of 62 is 1.6 points).

Reconstruction NMSE, in dB, on the standardised log amplitude ``x = (log1p|H| - m) / s``
(``m`` the per-subcarrier training mean, ``s`` one training scale):
``10 * log10( sum (x - x_hat)^2 / sum x^2 )`` over every segment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from csi_edge.bundle import EdgeEncoder, SegmentCodes
from csi_edge.codec import Payload, SegmentRecord, encode_payload, message_groups

from ..smoothing import TrustParams, filter_stream
from .compression import CloudModel, classify_windows
from .data import SegmentData, segment_windows, windows
from .window import Windows

__all__ = ["DecodedLevel", "EncodedSegments", "Evaluation", "decode_level", "encode_recordings",
           "evaluate_bundle", "macro_f1", "paired_cost"]


def macro_f1(true: np.ndarray, pred: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@dataclass
class Evaluation:
    """Per-level results plus the raw predictions (for confusion matrices; ``identity`` is
    None for a bundle without identities)."""

    summary: dict[str, Any]  # JSON: the evaluation report's numbers
    predictions: dict[int | str, dict[str, np.ndarray | None]]


def _classification(p_act: np.ndarray, p_id: np.ndarray | None, act_true: np.ndarray,
                    id_true: np.ndarray, n_act: int, n_id: int) -> dict[str, float | None]:
    act_pred = p_act.argmax(axis=1)
    out: dict[str, float | None] = {
        "activity_accuracy": float((act_pred == act_true).mean()),
        "activity_macro_f1": macro_f1(act_true, act_pred, n_act),
        "identity_accuracy": None,
        "identity_macro_f1": None,
    }
    known = id_true >= 0
    if p_id is not None and known.any():
        id_pred = p_id.argmax(axis=1)
        out["identity_accuracy"] = float((id_pred[known] == id_true[known]).mean())
        out["identity_macro_f1"] = macro_f1(id_true[known], id_pred[known], n_id)
    return out


def _per_second(p_act: np.ndarray, p_id: np.ndarray | None, act_true: np.ndarray,
                id_true: np.ndarray) -> dict[str, float | None]:
    """Accuracy over every prediction the service makes (one per arrived segment)."""
    out: dict[str, float | None] = {
        "activity_accuracy_per_second": float((p_act.argmax(1) == act_true).mean()),
        "identity_accuracy_per_second": None}
    known = id_true >= 0
    if p_id is not None and known.any():
        out["identity_accuracy_per_second"] = float(
            (p_id[known].argmax(1) == id_true[known]).mean())
    return out


def _live_per_second(model: CloudModel, wins: Windows, full: np.ndarray, owner: np.ndarray,
                     truth: np.ndarray) -> dict[str, float]:
    """Accuracy of the live reading and of the smoothed label over every window of recordings
    streamed one by one (``owner`` (W,): each window's recording, in streaming order; ``full``
    (W, A): the full windows' uncalibrated activity probabilities). One filter step a
    window: a segment lost inside a recording is a step, not the service's ``stay ** gap``
    (csi_cloud.smoothing.Smoother), as in the calibration's own fit (csi_cloud.model.trust)."""
    live, _ = model.live_activity(wins, full)
    starts = np.r_[True, owner[1:] != owner[:-1]]
    smoothed = filter_stream(live, TrustParams.from_calibration(model.manifest.calibration)
                             .stay, starts)
    return {"activity_accuracy_live_per_second": float((live.argmax(1) == truth).mean()),
            "activity_accuracy_smoothed_per_second": float(
                (smoothed.argmax(1) == truth).mean())}


@dataclass
class EncodedSegments:
    """The edge encoder's codes for every segment of some recordings (one pass, all levels)."""

    recordings: np.ndarray  # (R,) recording numbers, in the order given
    rows: np.ndarray  # (M,) rows of ``data.x`` (data order)
    symbols: np.ndarray  # (M, G, T) latent symbols
    profile: np.ndarray  # (M, P * Kmax) profile codes
    index: np.ndarray  # (len(data.x),) row of data.x -> position in ``rows``, -1 if absent


@dataclass
class DecodedLevel:
    """What the cloud decoded from one rate level's wire payloads, per segment of ``rows``."""

    level: int
    z_q: np.ndarray  # (M, D, T)
    profile: np.ndarray  # (M, P * C)
    reconstruction: np.ndarray  # (M, L, A, S) standardised log amplitude
    payload_bytes: int  # every payload's length: header, codes and CRC
    index: np.ndarray  # as EncodedSegments.index

    def windows(self, win: np.ndarray) -> Windows:
        """Windows of data rows (W, N), -1 = missing -> the classifier's inputs."""
        return Windows.gather(np.where(win >= 0, self.index[np.maximum(win, 0)], -1),
                              self.z_q, self.profile, self.level)


def encode_recordings(edge: EdgeEncoder | CloudModel, data: SegmentData,
                      recordings: np.ndarray) -> EncodedSegments:
    """Encode every segment of ``recordings`` once; each level sends a prefix of the codes."""
    rows = np.flatnonzero(np.isin(data.recording, recordings))
    symbols, profile = edge.encode(data.x[rows])
    index = np.full(len(data.x), -1, dtype=np.int64)
    index[rows] = np.arange(len(rows))
    return EncodedSegments(recordings, rows, symbols, profile, index)


def decode_level(model: CloudModel, edge: EdgeEncoder | CloudModel, data: SegmentData,
                 encoded: EncodedSegments, level: int) -> DecodedLevel:
    """Pack one level's codes into wire payloads as the edge sends them (``segments_per_message``
    consecutive segments per message, a gap starts a new one) and decode them from the bytes
    alone, as the cloud does; raises if a decoded code differs from the encoded one."""
    spec = model.manifest.level(level)
    cfg = model.net.cfg
    n = len(encoded.rows)
    t_lat = int(model.manifest.quantizer["latent_steps"])
    z_q = np.zeros((n, cfg.latent_channels, t_lat), np.float32)
    prof = np.zeros((n, cfg.profile_width), np.float32)
    recon = np.zeros((n, *data.x.shape[1:]), np.float32)
    total_bytes = 0
    symbols, profile = encoded.symbols, encoded.profile
    decoded_codes: list[SegmentCodes] = []
    decoded_rows: list[int] = []
    for r in encoded.recordings.tolist():
        start, count = int(data.start[r]), int(data.count[r])
        slots = data.slot[start : start + count]
        for group in message_groups(slots.tolist(), spec.segments_per_message):
            idx = [int(encoded.index[start + int(g)]) for g in group]
            payload = encode_payload(Payload(
                spec.level, edge.model_id, 1, int(slots[group[0]]), 0,
                # Each segment's own quality, as the edge sends it (whole segments: no byte).
                tuple(SegmentRecord(1.0 if data.quality is None
                                    else float(data.quality[start + int(g)])) for g in group),
                codes=_message_codes(edge, [(symbols[i], profile[i]) for i in idx], spec.level),
            ))
            total_bytes += len(payload)
            _, codes = model.decode_codes(payload)  # from the bytes alone, as the cloud does
            for i, c in zip(idx, codes, strict=True):
                if not np.array_equal(c.latent, symbols[i, : spec.groups]):
                    raise AssertionError("decoded codes differ from the encoded codes")
            decoded_codes += codes
            decoded_rows += idx
    # The network part of decompress, batched (the same computation, far fewer calls).
    for lo in range(0, len(decoded_codes), 512):
        chunk = decoded_codes[lo : lo + 512]
        rows = decoded_rows[lo : lo + 512]
        z_q[rows], prof[rows], recon[rows] = model.reconstruct(chunk)
    return DecodedLevel(spec.level, z_q, prof, recon, total_bytes, encoded.index)


def _encoder_ms(edge: EdgeEncoder, segment: np.ndarray, level: int, repeat: int = 200) -> float:
    for _ in range(20):
        edge.compress_codes(segment, level)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        edge.compress_codes(segment, level)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def evaluate_bundle(model: CloudModel, edge: EdgeEncoder | CloudModel, data: SegmentData,
                    recordings: np.ndarray, *, dataset: str = "") -> Evaluation:
    """Metrics per rate level through the real payloads, plus the unquantized network.

    ``edge`` is the int8 edge encoder (what APs run) or, for comparison, the cloud model's
    float encoder; the latency column is measured for the int8 encoder only.
    """
    manifest = model.manifest
    n_ctx = model.net.cfg.context_segments
    n_act = len(manifest.labels["activity"] or [])
    n_id = len(manifest.labels["identity"] or [])
    segment_s = manifest.input_spec.segment_s
    encoded = encode_recordings(edge, data, recordings)
    rows = encoded.rows
    standardised = model.standardise(data.x[rows])
    native = float(np.mean(data.native_bytes_per_s[recordings]))

    levels: list[dict[str, object]] = []
    predictions: dict[int | str, dict[str, np.ndarray | None]] = {}
    for spec in manifest.levels:
        decoded = decode_level(model, edge, data, encoded, spec.level)
        total_bytes, recon = decoded.payload_bytes, decoded.reconstruction
        win, owners = windows(data, recordings, n_ctx)
        last = model.classify(decoded.windows(win))
        p_act, p_id = last.activity, last.identity
        cls = _classification(p_act, p_id, data.activity[owners], data.identity[owners],
                              n_act, n_id)
        every, every_owner, _ = segment_windows(data, recordings, n_ctx)
        wins = decoded.windows(every)
        # Uncalibrated: the temperature does not move the argmax, and the live reading
        # calibrates each length itself.
        each = model.classify(wins, calibrated=False)
        cls.update(_per_second(each.activity, each.identity, data.activity[every_owner],
                               data.identity[every_owner]))
        cls.update(_live_per_second(model, wins, each.activity, every_owner,
                                    data.activity[every_owner]))
        err = float(np.sum((recon - standardised) ** 2))
        energy = float(np.sum(standardised**2))
        bytes_per_s = total_bytes / (len(rows) * segment_s)
        levels.append({
            "level": spec.level,
            "payload_bytes_per_s": round(bytes_per_s, 2),
            "payload_bytes_per_segment": round(total_bytes / len(rows), 2),
            "segments_per_message": spec.segments_per_message,
            "added_latency_s": round((spec.segments_per_message - 1) * segment_s, 2),
            "compression_ratio": round(native / bytes_per_s, 1),
            **cls,
            "nmse_db": round(10 * np.log10(err / energy), 2),
            "encoder_ms_per_segment": (round(_encoder_ms(edge, data.x[rows[:1]], spec.level), 4)
                                       if isinstance(edge, EdgeEncoder) else None),
        })
        predictions[spec.level] = {
            "activity": p_act.argmax(1), "activity_true": data.activity[owners],
            "identity": None if p_id is None else p_id.argmax(1),
            "identity_true": data.identity[owners], "owner": owners,
            "activity_per_second": each.activity.argmax(1),
            "identity_per_second": None if each.identity is None else each.identity.argmax(1),
            "owner_per_second": every_owner}
        predictions[f"recon{spec.level}"] = {"x": standardised[:60], "x_hat": recon[:60]}

    unq, predictions["unquantized"] = _unquantized(model, data, recordings, n_act, n_id)
    for spec, row in zip(manifest.levels, levels, strict=True):
        row.update(_costs(predictions["unquantized"], predictions[spec.level], data))
    summary = {
        "model": manifest.id,
        "name": manifest.name,
        "dataset": dataset,
        "examples": len(recordings),
        "segments": len(rows),
        "segment_s": segment_s,
        "native_bytes_per_s": round(native, 1),
        "unquantized": unq,
        "levels": levels,
    }
    return Evaluation(summary, predictions)


def _message_codes(edge: EdgeEncoder | CloudModel, segments: list[tuple[np.ndarray, np.ndarray]],
                   level: int) -> bytes:
    """One message's stream of these segments' (symbols, profile codes) at ``level``."""
    from csi_edge.bundle import encode_message_codes

    spec = edge.manifest.level(level)
    return encode_message_codes(
        [SegmentCodes(level, symbols[: spec.groups], edge.manifest.level_profile(profile, level))
         for symbols, profile in segments], edge.manifest, edge.tables)


def paired_cost(base: np.ndarray, other: np.ndarray, owner: np.ndarray, *, draws: int = 2000,
                seed: int = 0) -> tuple[float, list[float]]:
    """Accuracy points ``other`` loses against ``base`` on the same windows (bool (W,) each:
    prediction right), and its 95% interval from a bootstrap over recordings (``owner`` (W,)):
    a recording's windows are drawn together, since they overlap and err together."""
    if len(base) != len(other) or len(base) != len(owner) or not len(base):
        raise ValueError(f"paired_cost needs equal, non-empty windows, not {len(base)}, "
                         f"{len(other)} and {len(owner)} owners")
    _, recording = np.unique(owner, return_inverse=True)
    lost = np.bincount(recording, base.astype(np.float64) - other.astype(np.float64))
    count = np.bincount(recording).astype(np.float64)
    pick = np.random.default_rng(seed).integers(0, len(count), (draws, len(count)))
    boot = 100 * lost[pick].sum(axis=1) / count[pick].sum(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return round(100 * float(lost.sum() / count.sum()), 2), [round(float(low), 2),
                                                             round(float(high), 2)]


def _costs(base: dict[str, np.ndarray | None], level: dict[str, np.ndarray | None],
           data: SegmentData) -> dict[str, object]:
    """A level's activity and identity cost against the unquantized path, per recording and
    per second (:func:`paired_cost`; identity on recordings with a known identity)."""
    out: dict[str, object] = {}
    for task, truth in (("activity", data.activity), ("identity", data.identity)):
        for suffix in ("", "_per_second"):
            owner = level[f"owner{suffix}"]
            pred, pred_base = level[f"{task}{suffix}"], base[f"{task}{suffix}"]
            assert owner is not None
            known = truth[owner] >= 0
            if pred is None or pred_base is None or not known.any():
                continue
            true = truth[owner][known]
            points, ci = paired_cost(pred_base[known] == true, pred[known] == true,
                                     owner[known])
            out[f"{task}_cost_points{suffix}"] = points
            out[f"{task}_cost{suffix}_ci95"] = ci
    return out


@torch.no_grad()
def _unquantized(model: CloudModel, data: SegmentData, recordings: np.ndarray, n_act: int,
                 n_id: int) -> tuple[dict[str, object], dict[str, np.ndarray | None]]:
    """The network with its quantizer bypassed: every channel, continuous latent and profile."""
    net = model.net.eval()
    n = net.cfg.context_segments
    rows = np.flatnonzero(np.isin(data.recording, recordings))
    index = np.full(len(data.x), -1)
    index[rows] = np.arange(len(rows))
    x = torch.from_numpy(data.x[rows])
    z, profile = net.encoder(x)
    z_c = net.bypass(z)
    dynamics, _ = net.encoder.standardise(x)
    full = dynamics + net.profile_frames(profile)
    full_hat = net.decoder(z_c) + net.profile_frames(profile)
    nmse = 10 * np.log10(float(((full_hat - full) ** 2).sum() / (full**2).sum()))
    latent, prof = z_c.numpy(), profile.numpy()

    def predict(win: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        rows = np.where(win >= 0, index[np.maximum(win, 0)], -1)
        p_act, p_id, _ = classify_windows(
            net, Windows.gather(rows, latent, prof, net.cfg.levels))
        return p_act, p_id

    win, owners = windows(data, recordings, n)
    p_act, p_id = predict(win)
    cls = _classification(p_act, p_id, data.activity[owners], data.identity[owners],
                          n_act, n_id)
    every, every_owner, _ = segment_windows(data, recordings, n)
    p_act_e, p_id_e = predict(every)
    cls.update(_per_second(p_act_e, p_id_e, data.activity[every_owner],
                           data.identity[every_owner]))
    return ({"payload_bytes_per_s": None, "payload_bytes_per_segment": None,
             "compression_ratio": None, **cls, "nmse_db": round(nmse, 2),
             "encoder_ms_per_segment": None},
            {"activity": p_act.argmax(1), "identity": None if p_id is None else p_id.argmax(1),
             "owner": owners, "activity_per_second": p_act_e.argmax(1),
             "identity_per_second": None if p_id_e is None else p_id_e.argmax(1),
             "owner_per_second": every_owner})
