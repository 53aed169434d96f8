"""Accuracy when segments are lost between the access point and the cloud.

Radio links and brokers drop data, and the cloud must still answer. Each segment of a test
recording is lost independently with probability ``p`` (seeded, ``draws`` draws per rate). The
prediction for a recording is what the cloud would show at the end of its stream: the context
of ``N`` slots ending at the last segment that arrived, with lost slots masked out of the
classifier (``present`` False), never filled in. A recording of which nothing arrived gets no
answer and counts as wrong. Segments go through the real bitstream exactly as in
:func:`~csi_cloud.model.evaluate.evaluate_bundle` (int8 edge encoder, entropy-coded wire
payloads, ``CloudModel.decompress``); loss is applied to decoded segments, so the message
grouping of a level does not change which segments are lost.

Every draw uses one uniform number per segment for all rates and levels (a segment lost at
``p`` is lost at every higher rate): the curves are monotone in the loss pattern and the
differences between rates and levels are not blurred by independent sampling noise.

Besides that per-recording accuracy (one answer per recording, as ``csi evaluate``), the
accuracy over every prediction the service makes (one per arrived segment, the window it
closes) is reported as ``activity_accuracy_per_segment``: ten times as many answers, so a
less noisy measure of how much the loss costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csi_edge import SpecMismatchError
from csi_edge.bundle import Bundle, EdgeEncoder

from ..datasets import index_dataset
from .compression import CloudModel
from .data import SegmentData, load_segments, rows_by_slot
from .evaluate import decode_level, encode_recordings
from .window import slot_rows

__all__ = ["arrived_windows", "check_rates", "evaluate_segment_loss", "load_folder",
           "lossy_windows", "parse_rates"]


def check_rates(rates: Sequence[float]) -> list[float]:
    """Loss probabilities must lie in [0, 1): at 1 nothing arrives and nothing is predicted."""
    out = []
    for rate in rates:
        value = float(rate)
        if not 0.0 <= value < 1.0:  # also refuses NaN
            raise ValueError(f"segment loss rate {rate!r} is not in [0, 1)")
        out.append(value)
    if not out:
        raise ValueError("no segment loss rate given")
    return out


def parse_rates(text: str) -> list[float]:
    """``"0,0.1,0.3"`` -> [0.0, 0.1, 0.3]; names the first bad value in the error."""
    rates = []
    for part in text.split(","):
        item = part.strip()
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"segment loss rate {item!r} is not a number") from None
        if not 0.0 <= value < 1.0:
            raise ValueError(f"segment loss rate {item!r} is not in [0, 1)")
        rates.append(value)
    return check_rates(rates)


def lossy_windows(data: SegmentData, recordings: np.ndarray, context: int,
                  arrived: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The window each recording's last arrived segment closes.

    ``arrived`` (len(data.x),) bool: which segments reached the cloud. Returns rows of
    ``data.x`` (W, N) (-1 = missing: lost, absent from the capture or before the stream began)
    and, for each recording, its window number or -1 when none of its segments arrived.
    """
    rows: list[np.ndarray] = []
    which = np.full(len(recordings), -1)
    for k, r in enumerate(recordings.tolist()):
        start, count = int(data.start[r]), int(data.count[r])
        got = np.flatnonzero(arrived[start : start + count]) + start
        if got.size == 0:
            continue
        which[k] = len(rows)
        rows.append(slot_rows(rows_by_slot(data, r, got), int(data.slot[got[-1]]), context))
    win = np.stack(rows) if rows else np.zeros((0, context), dtype=np.int64)
    return win, which


def arrived_windows(data: SegmentData, recordings: np.ndarray, context: int,
                    arrived: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The window every arrived segment closes (the service predicts each one as it comes):
    rows of ``data.x`` (W, N) (-1 = missing) and each window's recording (W,)."""
    rows: list[np.ndarray] = []
    owners: list[int] = []
    for r in recordings.tolist():
        start, count = int(data.start[r]), int(data.count[r])
        got = np.flatnonzero(arrived[start : start + count]) + start
        lookup = rows_by_slot(data, r, got)
        for end in data.slot[got].tolist():
            rows.append(slot_rows(lookup, end, context))
            owners.append(r)
    win = np.stack(rows) if rows else np.zeros((0, context), dtype=np.int64)
    return win, np.array(owners, dtype=np.int64)


def _accuracy(pred: np.ndarray | None, which: np.ndarray, true: np.ndarray) -> float | None:
    """Share of labelled recordings predicted right; unanswered ones count as wrong."""
    known = true >= 0
    if pred is None or not known.any():
        return None
    answered = which >= 0
    right = np.zeros(len(true), bool)
    right[answered] = pred[which[answered]] == true[answered]
    return float(right[known].mean())


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None for v in values):
        return None, None
    arr = np.asarray(values, dtype=float)
    return round(float(arr.mean()), 4), round(float(arr.std()), 4)


def evaluate_segment_loss(model: CloudModel, edge: EdgeEncoder | CloudModel, data: SegmentData,
                          recordings: np.ndarray, rates: Sequence[float], *,
                          levels: Sequence[int] | None = None, draws: int = 10,
                          seed: int = 0) -> dict[str, Any]:
    """Activity and identity accuracy under i.i.d. segment loss, per rate level and loss rate.

    ``levels`` defaults to every level of the bundle. Per (level, rate): accuracy mean and
    standard deviation over ``draws``, the mean share of the context window with no segment
    (``missing_fraction``, 1 for an unanswered recording), the share of segments lost and of
    recordings left without an answer. At rate 0 the accuracy is exactly ``evaluate_bundle``'s.
    """
    rates = check_rates(rates)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, not {draws}")
    recordings = np.asarray(recordings, dtype=np.int64)
    manifest = model.manifest
    levels = [spec.level for spec in manifest.levels] if levels is None else list(levels)
    n_ctx = model.net.cfg.context_segments
    act_true = data.activity[recordings]
    id_true = data.identity[recordings]
    encoded = encode_recordings(edge, data, recordings)
    decoded = {lv: decode_level(model, edge, data, encoded, lv) for lv in levels}
    # One loss pattern per draw, shared by every rate and level (see the module docstring).
    gen = np.random.default_rng(seed)
    uniforms = gen.random((draws, len(data.x)))
    in_test = np.zeros(len(data.x), bool)
    in_test[encoded.rows] = True
    # results[level][rate index] -> lists over draws
    keys = ("activity", "identity", "missing", "lost", "unanswered", "activity_segments")
    acc: dict[int, list[dict[str, list[float | None]]]] = {
        lv: [{k: [] for k in keys} for _ in rates] for lv in levels}
    for d in range(draws):
        for j, rate in enumerate(rates):
            arrived = in_test & (uniforms[d] >= rate)
            win, which = lossy_windows(data, recordings, n_ctx, arrived)
            every, owners = arrived_windows(data, recordings, n_ctx, arrived)
            answered = which >= 0
            missing = np.ones(len(recordings))
            missing[answered] = 1.0 - (win[which[answered]] >= 0).mean(axis=1)
            lost = 1.0 - arrived[encoded.rows].mean()
            for lv in levels:
                act_pred = id_pred = None
                if len(win):
                    pred = model.classify(decoded[lv].windows(win))
                    act_pred = pred.activity.argmax(1)
                    id_pred = None if pred.identity is None else pred.identity.argmax(1)
                else:  # nothing arrived at all: every recording unanswered
                    act_pred = np.zeros(0, np.int64)
                    id_pred = np.zeros(0, np.int64) if manifest.labels["identity"] else None
                per_segment = None
                if len(every):
                    p_every = model.classify(decoded[lv].windows(every)).activity
                    per_segment = float((p_every.argmax(1) == data.activity[owners]).mean())
                cell = acc[lv][j]
                cell["activity_segments"].append(per_segment)
                cell["activity"].append(_accuracy(act_pred, which, act_true))
                cell["identity"].append(_accuracy(id_pred, which, id_true))
                cell["missing"].append(float(missing.mean()))
                cell["lost"].append(float(lost))
                cell["unanswered"].append(float((~answered).mean()))
    out_levels = []
    for lv in levels:
        rows = []
        for j, rate in enumerate(rates):
            cell = acc[lv][j]
            act_mean, act_std = _stats(cell["activity"])
            id_mean, id_std = _stats(cell["identity"])
            seg_mean, seg_std = _stats(cell["activity_segments"])
            rows.append({
                "rate": rate,
                "activity_accuracy": act_mean,
                "activity_accuracy_std": act_std,
                "activity_accuracy_per_segment": seg_mean,
                "activity_accuracy_per_segment_std": seg_std,
                "identity_accuracy": id_mean,
                "identity_accuracy_std": id_std,
                "missing_fraction": _stats(cell["missing"])[0],
                "segments_lost": _stats(cell["lost"])[0],
                "unanswered": _stats(cell["unanswered"])[0],
            })
        out_levels.append({"level": lv, "rates": rows})
    return {
        "model": manifest.id,
        "name": manifest.name,
        "examples": len(recordings),
        "segments": len(encoded.rows),
        "context_segments": n_ctx,
        "loss": "each segment lost independently; window ends at the last arrived segment",
        "draws": draws,
        "seed": seed,
        "rates": rates,
        "levels": out_levels,
    }


def load_folder(bundle: Path | Bundle, dataset: str, data_dir: Path) -> SegmentData:
    """Every recording of a dataset folder, preprocessed with the bundle's input spec.

    Refuses (SpecMismatchError) a folder whose CSI or activities the bundle does not fit, with
    the same checks as ``pipeline.evaluate_folder``.
    """
    from csi_edge import read_recording

    manifest = Bundle.load(bundle).manifest
    examples = list(index_dataset(dataset, data_dir))
    if not examples:
        raise ValueError(f"no recording of dataset {dataset!r} under {data_dir}")
    spec = manifest.input_spec
    frames = read_recording(examples[0].path)
    try:
        spec.check(frames.info, frames.antennas)
    except SpecMismatchError as exc:
        raise SpecMismatchError(
            f"bundle {manifest.name!r} expects {spec.source_kind} CSI with "
            f"{len(spec.subcarriers)} subcarriers x {spec.antennas} antennas ({spec.band}); "
            f"dataset {dataset!r} at {data_dir} does not fit: {exc}") from exc
    activities = manifest.labels["activity"] or []
    unknown = sorted({e.activity for e in examples} - set(activities))
    if unknown:
        raise SpecMismatchError(f"dataset {dataset!r} has activities {unknown} that bundle "
                                f"{manifest.name!r} does not know ({activities})")
    return load_segments(examples, spec, activities, manifest.labels["identity"] or [])
