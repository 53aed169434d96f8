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
temperature (NLL of the per-second windows of joined streams, every rate level pooled), then
the filter's ``stay`` (best filtered accuracy on joined streams) and the abstention threshold
(the lowest whose answered seconds reach ``target`` accuracy on those joined streams).
:func:`calibrate_folder` writes the result into a bundle's manifest (the id is recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from csi_edge.bundle import Bundle, EdgeEncoder, write_manifest

from ..smoothing import filter_stream, fit_stay, fit_threshold
from .compression import CloudModel
from .data import SegmentData
from .evaluate import decode_level, encode_recordings
from .temperature import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    mean_nll,
)
from .window import slot_rows

__all__ = ["LiveStreams", "calibrate_folder", "fit_activity_calibration", "live_streams",
           "stream_layout"]

Mode = Literal["separate", "joined"]
DEFAULT_TARGET = 0.8


@dataclass
class LiveStreams:
    """Every second of some streams at one rate level: uncalibrated probabilities (N, K),
    true activity (N,), the stream each second belongs to (N,), whether a new stream starts
    at it (N,), and its recording (N,)."""

    level: int
    p_raw: np.ndarray
    labels: np.ndarray
    stream: np.ndarray
    starts: np.ndarray
    recording: np.ndarray

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
                 seed: int = 0, streams: int = 1, context: int | None = None
                 ) -> list[LiveStreams]:
    """The per-second uncalibrated probabilities of ``recordings`` streamed ``mode``-wise, at
    each rate level of ``levels`` (default all). ``context``: classify from the last
    ``context`` segments only (the older slots of the window masked as missing), to measure
    how a shorter context follows changes."""
    n = model.net.cfg.context_segments
    encoded = encode_recordings(edge, data, recordings)
    win, owners, stream, starts = stream_layout(data, recordings, n, mode,
                                                np.random.default_rng(seed), streams)
    if context is not None:
        if not 1 <= context <= n:
            raise ValueError(f"context must be 1..{n} segments, got {context}")
        win[:, : n - context] = -1
    out = []
    for level in levels if levels is not None else range(len(model.manifest.levels)):
        decoded = decode_level(model, edge, data, encoded, level)
        p_act = model.classify(decoded.windows(win), calibrated=False).activity
        out.append(LiveStreams(level, p_act.astype(np.float64), data.activity[owners], stream,
                               starts, owners))
    return out


def fit_activity_calibration(model: CloudModel, edge: EdgeEncoder | CloudModel,
                             data: SegmentData, recordings: np.ndarray, *, fitted_on: str,
                             target: float = DEFAULT_TARGET, seed: int = 0,
                             streams: int = 3) -> dict[str, Any]:
    """``calibration["activity"]`` fitted on ``recordings`` (which must be recordings the
    bundle was not trained on; ``fitted_on`` says which, for the manifest)."""
    labelled = np.asarray(recordings)[data.activity[np.asarray(recordings)] >= 0]
    if len(labelled) == 0:
        raise ValueError("no labelled recording to calibrate on")
    joined = live_streams(model, edge, data, labelled, "joined", seed=seed,
                          streams=min(streams, len(labelled)))
    p = np.concatenate([s.p_raw for s in joined])
    y = np.concatenate([s.labels for s in joined])
    temperature = fit_temperature(p, y)
    calibrated = apply_temperature(p, temperature)
    stay_streams = [st for s in joined for st in s.streams(apply_temperature(s.p_raw,
                                                                            temperature))]
    stay, stay_scores = fit_stay(stay_streams)
    conf, correct = [], []
    for s in joined:
        belief = filter_stream(apply_temperature(s.p_raw, temperature), stay, s.starts)
        conf.append(belief.max(1))
        correct.append(belief.argmax(1) == s.labels)
    threshold = fit_threshold(np.concatenate(conf), np.concatenate(correct), target)
    return {
        "temperature": round(temperature, 4),
        "stay": stay,
        "threshold": threshold,
        "target_accuracy": target,
        "fitted_on": fitted_on,
        "recordings": len(labelled),
        "windows": len(p),
        "nll_before": round(mean_nll(p, y), 4),
        "nll_after": round(mean_nll(calibrated, y), 4),
        "ece_before": round(expected_calibration_error(p, y), 4),
        "ece_after": round(expected_calibration_error(calibrated, y), 4),
        "stay_accuracy": stay_scores,
        "method": "temperature: NLL of every per-second window of joined streams, all rate "
                  "levels pooled; stay: "
                  "best filtered per-second accuracy on joined streams; threshold: lowest "
                  f"whose answered seconds are >= {target} accurate on those streams",
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
    write_manifest(bundle.folder, manifest)
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
