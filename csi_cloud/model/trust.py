"""Per-second activity probabilities as the live service produces them, and the fit of the
live-output calibration (temperature, HMM self-transition, abstention threshold) on them.

Two ways a set of labelled recordings streams (both through the real bitstream: int8 edge
codes packed into wire payloads and decoded from the bytes, csi_cloud.model.evaluate):

- ``separate``: each recording is its own stream (its own AP epoch): the model's context and
  the filter start afresh with it (the model report's per-second figure);
- ``joined``: the recordings follow one another on one AP's segment grid, in a random order,
  as a person changes activity in front of one AP: the model's context window and the filter
  run across the changes, and every second is labelled by the recording it belongs to.

:func:`fit_activity_calibration` fits, on recordings the bundle was not trained on, the
temperatures of the window read at each candidate length (NLL of the per-second windows of
joined streams, every rate level pooled), the lengths the live output reads and how it
combines them (csi_cloud.model.lengths: the most confident reading, or a weighted pool whose
weights are fitted with the filter's ``stay``, :func:`fit_pool`) together with the filter's
``stay`` (best filtered accuracy on joined streams), and the abstention threshold (the lowest
whose answered seconds reach ``target`` accuracy on those joined streams).
:func:`calibrate_folder` writes the result into a bundle's manifest (the id is recomputed).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize

from csi_edge.bundle import Bundle, EdgeEncoder, write_manifest

from ..smoothing import EVIDENCE_FLOOR, STAY_GRID, filter_stream, fit_stay, fit_threshold
from .compression import CloudModel
from .data import SegmentData
from .evaluate import decode_level, encode_recordings
from .lengths import ContextLengths, candidate_lengths
from .report import refresh_header
from .temperature import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    mean_nll,
)
from .window import slot_rows

__all__ = ["LiveStreams", "calibrate_folder", "fit_activity_calibration", "fit_lengths",
           "fit_pool", "fit_pool_weights", "live_streams",
           "stream_layout"]

Mode = Literal["separate", "joined"]
DEFAULT_TARGET = 0.8


@dataclass
class LiveStreams:
    """Every second of some streams at one rate level: uncalibrated probabilities (N, K) of
    the full context window, true activity (N,), the stream each second belongs to (N,),
    whether a new stream starts at it (N,), its recording (N,), and the uncalibrated
    probabilities of the same windows read at shorter lengths (``readings[k]``, the last
    ``k`` slots; csi_cloud.model.lengths)."""

    level: int
    p_raw: np.ndarray
    labels: np.ndarray
    stream: np.ndarray
    starts: np.ndarray
    recording: np.ndarray
    readings: dict[int, np.ndarray] = field(default_factory=dict)

    def live(self, lengths: ContextLengths, *, calibrated: bool = True) -> np.ndarray:
        """The live output's probabilities (N, K) of a bundle reading ``lengths`` (the
        service's :meth:`CloudModel.classify_live` on the same windows)."""
        live, raw = lengths.read([*(self.readings[k] for k in lengths.lengths[:-1]),
                                  self.p_raw])
        return live if calibrated else raw

    def position(self) -> np.ndarray:
        """Per second (N,), how many of its recording's segments came before it in its
        stream (0 at the recording's first): in ``joined`` streams, the seconds since the
        activity may have changed."""
        first = np.r_[True, (self.recording[1:] != self.recording[:-1])
                      | (self.stream[1:] != self.stream[:-1])]
        index = np.arange(len(first))
        return index - np.maximum.accumulate(np.where(first, index, 0))

    def streams(self, p: np.ndarray | None = None
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Per stream: (probabilities, labels, None) for csi_cloud.smoothing.fit_stay."""
        p = self.p_raw if p is None else p
        return [(p[self.stream == s], self.labels[self.stream == s], None)
                for s in np.unique(self.stream)]


def stream_layout(data: SegmentData, recordings: np.ndarray, context: int, mode: Mode,
                  rng: np.random.Generator | None = None, streams: int = 1
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows (W, context) of data rows (-1 missing), one per segment in streaming order,
    and per window its recording, its stream and whether it starts the stream.

    ``joined``: the recordings, shuffled by ``rng``, are dealt into ``streams`` streams, each
    laid end to end on one segment grid (each recording's slots after the previous one's)."""
    recordings = np.asarray(recordings)
    if mode == "separate":
        groups = [[int(r)] for r in recordings.tolist()]
    else:
        order = (rng or np.random.default_rng(0)).permutation(recordings).tolist()
        groups = [order[i::streams] for i in range(streams)]
    wins, owners, stream_of, starts = [], [], [], []
    for s, group in enumerate(groups):
        lookup: dict[int, int] = {}
        ends: list[tuple[int, int]] = []
        offset = 0
        for r in group:
            start, count = int(data.start[r]), int(data.count[r])
            slots = data.slot[start : start + count] + offset
            lookup.update(zip(slots.tolist(), range(start, start + count), strict=True))
            ends += [(int(slot), r) for slot in slots]
            offset += int(data.slots[r])
        for i, (end, r) in enumerate(ends):
            wins.append(slot_rows(lookup, end, context))
            owners.append(r)
            stream_of.append(s)
            starts.append(i == 0)
    return (np.stack(wins), np.array(owners), np.array(stream_of), np.array(starts))


def live_streams(model: CloudModel, edge: EdgeEncoder | CloudModel, data: SegmentData,
                 recordings: np.ndarray, mode: Mode, *, levels: list[int] | None = None,
                 seed: int = 0, streams: int = 1, lengths: Sequence[int] | None = None
                 ) -> list[LiveStreams]:
    """The per-second uncalibrated probabilities of ``recordings`` streamed ``mode``-wise, at
    each rate level of ``levels`` (default all), of the full window and of the window read at
    each shorter length of ``lengths`` (default: the bundle's live lengths)."""
    n = model.net.cfg.context_segments
    shorter = sorted({int(k) for k in (model.lengths.lengths if lengths is None else lengths)}
                     - {n})
    encoded = encode_recordings(edge, data, recordings)
    win, owners, stream, starts = stream_layout(data, recordings, n, mode,
                                                np.random.default_rng(seed), streams)
    out = []
    for level in levels if levels is not None else range(len(model.manifest.levels)):
        windows = decode_level(model, edge, data, encoded, level).windows(win)
        p_act = model.classify(windows, calibrated=False).activity
        readings = {k: p.astype(np.float64)
                    for k, p in zip(shorter, model.readings(windows, shorter), strict=True)}
        out.append(LiveStreams(level, p_act.astype(np.float64), data.activity[owners], stream,
                               starts, owners, readings))
    return out


MAX_WEIGHT = 4.0
_UNUSED = 1e-3  # a pooled reading weighed below this is dropped (not read at all)


def _filter_nll(theta: np.ndarray, logs: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL of the true activity under the filtered belief (csi_cloud.smoothing's
    recursion) of the pool ``theta[:-1]`` of the log readings ``logs`` (B, T, K, L) of B
    streams padded to T seconds (``labels`` (B, T), -1 on padding), ``stay = theta[-1]``."""
    weights, stay = theta[:-1], theta[-1]
    # The pool normalised, then floored as the filter floors each second's evidence.
    pooled = logs @ weights  # (B, T, K)
    pooled = pooled - pooled.max(axis=-1, keepdims=True)
    pooled = pooled - np.log(np.exp(pooled).sum(axis=-1, keepdims=True))
    evidence = np.maximum(pooled, np.log(EVIDENCE_FLOOR))
    k = evidence.shape[-1]
    rows = np.arange(len(labels))
    belief: np.ndarray | None = None
    total = 0.0
    for t in range(evidence.shape[1]):
        score = evidence[:, t]
        if belief is not None:
            score = score + np.log(stay * belief + (1.0 - stay) / k)
        score = score - score.max(axis=1, keepdims=True)
        log_belief = score - np.log(np.exp(score).sum(axis=1, keepdims=True))
        belief = np.exp(log_belief)
        seen = labels[:, t] >= 0
        total -= float(log_belief[rows[seen], labels[seen, t]].sum())
    return total / max(int((labels >= 0).sum()), 1)


def fit_pool_weights(pieces: Sequence[tuple[np.ndarray, np.ndarray]]
                     ) -> tuple[np.ndarray, float]:
    """The pool weights (L,) and the filter's ``stay`` with the lowest NLL of the true
    activity under the filtered belief, over ``pieces``: each one stream's calibrated log
    readings (N, K, L) and true activities (N,), -1 where a second is not scored (the filter
    still runs through it). L-BFGS-B, weights in [0, 4], stay in [0, 0.99]."""
    longest = max(len(y) for _, y in pieces)
    x = np.zeros((len(pieces), longest, *pieces[0][0].shape[1:]))
    y = np.full((len(pieces), longest), -1, np.int64)
    for i, (logs, labels) in enumerate(pieces):
        x[i, : len(labels)], y[i, : len(labels)] = logs, labels
    m = x.shape[-1]
    fit = minimize(_filter_nll, np.r_[np.full(m, 1.0 / m), 0.5], args=(x, y),
                   method="L-BFGS-B", bounds=[(0.0, MAX_WEIGHT)] * m + [(0.0, 0.99)])
    return np.asarray(fit.x[:-1]), float(fit.x[-1])


def fit_pool(joined: Sequence[LiveStreams], lengths: ContextLengths
             ) -> tuple[ContextLengths, float]:
    """The pool weights of ``lengths``' readings (csi_cloud.model.lengths.pool) and the
    filter's ``stay``, fitted together over every second of ``joined``
    (:func:`fit_pool_weights`). Shorter lengths whose weight comes out below 0.001 are
    dropped. Returns the pooled lengths and the stay."""
    n = lengths.lengths[-1]
    pieces: list[tuple[np.ndarray, np.ndarray]] = []
    for s in joined:
        logs = np.log(np.clip(np.stack(
            [apply_temperature(s.readings[k] if k != n else s.p_raw, t)
             for k, t in zip(lengths.lengths, lengths.temperatures, strict=True)], axis=-1),
            EVIDENCE_FLOOR, None))
        edges = [*np.flatnonzero(s.starts).tolist(), len(s.labels)]
        if edges[0] != 0:
            edges.insert(0, 0)
        pieces += [(logs[a:b], s.labels[a:b]) for a, b in itertools.pairwise(edges)
                   if b > a]
    fitted, stay = fit_pool_weights(pieces)
    m = len(lengths.lengths)
    weights = [round(float(w), 4) if w >= _UNUSED else 0.0 for w in fitted]
    if not any(weights):  # nothing to pool: the full window alone
        weights[-1] = 1.0
    keep = [i for i, w in enumerate(weights) if w or i == m - 1]
    pooled = ContextLengths(tuple(lengths.lengths[i] for i in keep),
                            tuple(lengths.temperatures[i] for i in keep),
                            tuple(weights[i] for i in keep))
    return pooled, round(stay, 3)


def _label(candidate: Sequence[int], lengths: ContextLengths) -> str:
    """An option's name in ``contexts_accuracy``: the candidate set, and how it is read
    (a pooled option names the lengths it kept when it dropped some)."""
    name = ",".join(map(str, candidate))
    if lengths.weights is None:
        return name
    kept = ",".join(map(str, lengths.lengths))
    return f"{name} pooled" + ("" if kept == name else f" (reads {kept})")


def fit_lengths(joined: list[LiveStreams], n: int, tolerance: float = 0.005
                ) -> tuple[ContextLengths, float, dict[str, float]]:
    """The live lengths (csi_cloud.model.lengths) for ``joined`` streams (each holding the
    readings of every candidate length): each length's temperature (NLL, levels pooled),
    then, of every set of :func:`candidate_lengths` read the most confident way (filtered at
    its best ``stay``) or pooled (weights and ``stay`` from :func:`fit_pool`), the one whose
    filtered live output is the most accurate per second, a costlier one (one
    classification per length per segment) only where it beats the best cheaper one by more
    than ``tolerance`` for each classification it adds. Returns it, its ``stay``, and each
    option's accuracy."""
    y = np.concatenate([s.labels for s in joined])
    temperature = {k: fit_temperature(np.concatenate([s.readings[k] if k != n else s.p_raw
                                                      for s in joined]), y)
                   for k in sorted({k for c in candidate_lengths(n) for k in c})}
    options: list[tuple[ContextLengths, float, float, str]] = []
    for candidate in candidate_lengths(n):
        lengths = ContextLengths(candidate, tuple(temperature[k] for k in candidate))
        stay, by_stay = fit_stay([st for s in joined for st in s.streams(s.live(lengths))])
        options.append((lengths, stay, by_stay[f"{stay:g}"], _label(candidate, lengths)))
        if len(candidate) > 1:
            pooled, stay = fit_pool(joined, lengths)
            _, at_stay = fit_stay([st for s in joined for st in s.streams(s.live(pooled))],
                                  grid=(stay,))
            options.append((pooled, stay, at_stay[f"{stay:g}"], _label(candidate, pooled)))
    # Cheapest first; at the same cost the most confident reading before the pool.
    options.sort(key=lambda o: len(o[0].lengths))
    scores: dict[str, float] = {}
    best: tuple[float, ContextLengths, float] | None = None
    for lengths, stay, score, label in options:
        scores[label] = round(score, 4)
        added = len(lengths.lengths) - (0 if best is None else len(best[1].lengths))
        if best is None or score > best[0] + tolerance * added:
            best = (score, lengths, stay)
    assert best is not None
    return best[1], best[2], scores


def fit_activity_calibration(model: CloudModel, edge: EdgeEncoder | CloudModel,
                             data: SegmentData, recordings: np.ndarray, *, fitted_on: str,
                             target: float = DEFAULT_TARGET, seed: int = 0,
                             streams: int = 3) -> dict[str, Any]:
    """``calibration["activity"]`` fitted on ``recordings`` (which must be recordings the
    bundle was not trained on; ``fitted_on`` says which, for the manifest)."""
    labelled = np.asarray(recordings)[data.activity[np.asarray(recordings)] >= 0]
    if len(labelled) == 0:
        raise ValueError("no labelled recording to calibrate on")
    n = model.net.cfg.context_segments
    joined = live_streams(model, edge, data, labelled, "joined", seed=seed,
                          streams=min(streams, len(labelled)),
                          lengths=[k for c in candidate_lengths(n) for k in c])
    lengths, stay, length_scores = fit_lengths(joined, n)
    p = np.concatenate([s.p_raw for s in joined])
    y = np.concatenate([s.labels for s in joined])
    temperature = lengths.temperatures[-1]  # the full window's, as every caller reads it
    live_raw = np.concatenate([s.live(lengths, calibrated=False) for s in joined])
    live = np.concatenate([s.live(lengths) for s in joined])
    _, stay_scores = fit_stay([st for s in joined for st in s.streams(s.live(lengths))],
                              grid=sorted({*STAY_GRID, stay}))  # the chosen stay among them
    conf, correct = [], []
    for s in joined:
        belief = filter_stream(s.live(lengths), stay, s.starts)
        conf.append(belief.max(1))
        correct.append(belief.argmax(1) == s.labels)
    threshold = fit_threshold(np.concatenate(conf), np.concatenate(correct), target)
    return {
        "temperature": round(temperature, 4),
        "contexts": lengths.as_calibration(),
        "stay": stay,
        "threshold": threshold,
        "target_accuracy": target,
        "fitted_on": fitted_on,
        "recordings": len(labelled),
        "windows": len(p),
        "nll_before": round(mean_nll(p, y), 4),
        "nll_after": round(mean_nll(apply_temperature(p, temperature), y), 4),
        "ece_before": round(expected_calibration_error(p, y), 4),
        "ece_after": round(expected_calibration_error(apply_temperature(p, temperature), y),
                           4),
        "live_nll": {"raw": round(mean_nll(live_raw, y), 4), "calibrated":
                     round(mean_nll(live, y), 4)},
        "live_ece": {"raw": round(expected_calibration_error(live_raw, y), 4), "calibrated":
                     round(expected_calibration_error(live, y), 4)},
        "contexts_accuracy": length_scores,
        "stay_accuracy": stay_scores,
        "method": "temperatures: NLL of every per-second window of joined streams, all rate "
                  "levels pooled, one per context length; lengths: the candidate set, read "
                  "the most confident way (stay: its best filtered per-second accuracy) or "
                  "pooled (weights and stay: lowest NLL under the filtered belief), whose "
                  "filtered live output is the most accurate per second on joined streams; "
                  "threshold: lowest whose answered seconds are "
                  f">= {target} accurate on those streams",
    }


def calibrate_folder(folder: Path | Bundle, data: SegmentData, recordings: np.ndarray, *,
                     fitted_on: str, target: float = DEFAULT_TARGET) -> dict[str, Any]:
    """Fit :func:`fit_activity_calibration` for the bundle in ``folder`` and write it into
    its manifest (the bundle id is recomputed: the calibration is part of it). Returns the
    activity calibration."""
    bundle = Bundle.load(folder)
    model = CloudModel.load(bundle)
    activity = fit_activity_calibration(model, EdgeEncoder(bundle), data, recordings,
                                        fitted_on=fitted_on, target=target)
    manifest = model.manifest.model_copy(
        update={"calibration": {**model.manifest.calibration, "activity": activity}})
    written = write_manifest(bundle.folder, manifest)
    refresh_header(bundle.folder, written.manifest.model_dump(mode="json"))
    return activity


def split_recordings(folder: Path | Bundle, dataset: str, data_dir: Path,
                     part: Literal["train", "val", "test"]) -> tuple[SegmentData, str]:
    """The recordings of one part of the split a bundle was trained with (rebuilt from its
    manifest's ``training``: seed and fractions, checked against its counts), preprocessed
    with its input spec; and a description for ``fitted_on``. Raises ValueError when the
    bundle was not trained on a random split of ``dataset`` or the rebuilt split differs."""
    import re

    from ..datasets import index_dataset, random_split
    from .data import load_segments

    manifest = Bundle.load(folder).manifest
    training = manifest.training
    match = re.fullmatch(r"random by recording, stratified by activity, val ([0-9.]+), "
                         r"test ([0-9.]+)", str(training.get("split", "")))
    if training.get("dataset") != dataset or match is None:
        raise ValueError(f"bundle {manifest.name!r} was not trained on a random split of "
                         f"{dataset!r} (training: dataset {training.get('dataset')!r}, split "
                         f"{training.get('split')!r})")
    examples = list(index_dataset(dataset, data_dir))
    split = random_split(examples, seed=int(training["seed"]), val=float(match[1]),
                         test=float(match[2]))
    counts = {"train": len(split.train), "val": len(split.val), "test": len(split.test)}
    expected = {k: training.get(k) for k in counts}
    if counts != expected:
        raise ValueError(f"{data_dir} splits into {counts}, not the bundle's {expected}: not "
                         f"the folder it was trained on")
    chosen = list(getattr(split, part))
    labels = manifest.labels
    data = load_segments(chosen, manifest.input_spec, list(labels["activity"] or []),
                         list(labels["identity"] or []))
    return data, (f"{dataset} {part} split (seed {training['seed']}, {len(chosen)} "
                  f"recordings the bundle's weights were not fitted on)")
