"""Presence and motion without a model, against labels, per second: csi_edge.presence.

    python bench/presence.py [--data ../shared/data] [--seeds 5] [--out FILE]

Everything runs through the edge's and the cloud's own code: the segmenting of a presence-only
stream (``presence_spec`` + ``Preprocessor``, 1 s segments), the :class:`MotionMeter` fed in
0.1 s chunks as a file replay feeds it, the score rounded through its wire byte, and the
cloud's :class:`PresenceTracker` with its default settings (threshold 1.5, sensitivity 1,
hold 30 s). Nothing is trained and nothing is tuned per file: each stream calibrates itself
from what it has seen so far. A stream of several recordings joins them on the segment grid
after a gap of just over a second (:func:`join`), so that every second belongs to one
recording.

(a) ESPectre ESP32 recordings (``esp32-espectre``): one stream per chip session, its
    ``baseline`` recording (quiet room) then its ``movement`` recording, paired by chip and
    time (the movement file was collected within 10 minutes after the baseline). The first
    ``warmup_segments`` (5) seconds calibrate and are not scored (counted in
    ``unscored_seconds``); every other second is labelled by the recording its middle falls in.
    Time to detect: from the first frame of the movement recording to the end of the first
    segment flagged ``motion`` (when the edge can send it). Also, for the chips recorded in two
    sessions, one stream of both sessions (baseline 1, movement 1, baseline 2, movement 2):
    the return to quiet and a recalibration across sessions, scored for ``motion`` and for
    ``presence`` (whose 30 s hold counts against the second baseline).
    Target: per-second F1 >= 0.97.
(b) Fition (Nexmon): one stream per recording session (user and room), all its recordings in
    a random order (``--seeds`` orders), ``nm`` negative, every other activity positive, each
    second labelled by its recording. ROC AUC of the motion score per second (pooled over the
    sessions, and per session), per recording (the median score of its seconds), and the
    per-second precision/recall/F1/false-positive rate of ``motion`` at the default threshold;
    the per-second ROC AUC at each second into the recordings (where the per-second figure is
    lost: the still seconds at the ends of moving recordings). The reference: the idle
    statistic (csi_edge.motion, the median temporal std of the log amplitude) on the same
    segments. Target: ROC AUC >= 0.90.
(c) WiAR (Intel 5300): every recording is an activity; there is no empty or still recording to
    be negative, so no F1 or false-positive rate exists. The detector is run on the Intel 5300
    stream (3 antennas x 30 subcarriers) to show it scores it; nothing is claimed.
(d) Wire cost: bytes per second of the committed Fition samples at every rate level of
    ``models/fition``, with and without the motion byte, through the real encoder and codec;
    and of a presence-only stream at 1, 5 and 10 segments per message.
(e) Edge CPU: the motion score's processor time per segment on each kind of hardware.
(f) A room that is rarely quiet: the automatic reference against one measured on the empty
    room (``MotionCalibration.measure_empty``, the dashboard's "Room is empty: measure"):
    ESP32 movement recordings alone, and a chip's next session against a reference measured
    in its first; Fition sessions with half their ``nm`` recordings measured first and the
    rest among the moving ones (``--seeds`` orders).
(g) A room's own motion threshold, fitted on labelled seconds
    (:func:`~csi_edge.presence.fit_motion_threshold`, the API's ``presence/threshold/fit``):
    each Fition session streamed as in (b) with the automatic reference; half of its
    recordings (a random half per order) are the labelled ones the threshold is fitted on
    (``nm`` still, the others moving; no still second flagged), the other half is scored:
    ``motion`` per second at the site's threshold (1.5) and at the fitted one
    (``--seeds`` orders, per session and pooled).
Ablations: each design choice of the detector undone in turn, on (a) and (b).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from csi_edge.codec import (  # noqa: E402
    Payload,
    SegmentRecord,
    encode_payload,
    idle_payload_size,
    motion_byte,
    motion_from_byte,
)
from csi_edge.frames import CSIFrames  # noqa: E402
from csi_edge.motion import motion_statistic  # noqa: E402
from csi_edge.preprocess import Preprocessor  # noqa: E402
from csi_edge.presence import (  # noqa: E402
    MotionConfig,
    MotionMeter,
    PresenceConfig,
    PresenceTracker,
    fit_motion_threshold,
    presence_spec,
)
from csi_edge.readers import read_recording  # noqa: E402

__all__ = ["TARGET_ESP32_F1", "TARGET_FITION_AUC", "main"]

TARGET_ESP32_F1 = 0.97
TARGET_FITION_AUC = 0.90
CHUNK_S = 0.1  # a file replay hands frames on in chunks this long
JOIN_GAP_S = 1.05  # between joined recordings: over MotionConfig.max_gap_s
PAIR_WITHIN_S = 600.0


@dataclass
class Second:
    """One scored (or unscored) segment of a stream."""

    start: float
    label: int  # 1 moving/occupied, 0 quiet/empty
    source: str  # the recording it belongs to
    score: float | None  # after the wire byte
    motion: bool | None
    presence: bool | None
    idle_statistic: float | None  # csi_edge.motion's statistic, for the reference


def join(recordings: Sequence[tuple[CSIFrames, int]]) -> Iterator[tuple[CSIFrames, int, float]]:
    """The recordings as one stream: (frames with shifted times, label, start of the file).

    Each recording starts on the 1 s segment grid, at least ``JOIN_GAP_S`` after the previous
    one ended: no second holds two recordings, and no trailing window reaches across a join
    (the channel of another capture is not motion; MotionMeter never spans a gap over 1 s).
    """
    next_start: float | None = None
    for frames, label in recordings:
        t = frames.timestamp
        shift = 0.0 - float(t[0]) if next_start is None else next_start - float(t[0])
        t = t + shift
        next_start = float(math.ceil(t[-1] + JOIN_GAP_S))
        yield replace(frames, timestamp=t), label, float(t[0])


def run_stream(recordings: Sequence[tuple[CSIFrames, int]],
               presence: PresenceConfig | None = None,
               motion_config: MotionConfig | None = None,
               empty: Sequence[tuple[CSIFrames, int]] = ()) -> list[Second]:
    """Replay recordings as one presence-only stream; one :class:`Second` per segment.

    ``empty``: recordings of the empty room played first and measured as the operator's
    "the room is empty" does (``MotionCalibration.measure_empty`` over every statistic they
    give, counted on a replay of them alone); their seconds are in the output too."""
    meter = MotionMeter(motion_config)
    if empty:
        probe = MotionMeter(motion_config)
        _replay(empty, probe, PresenceTracker(presence or PresenceConfig()))
        meter.calibration.measure_empty(len(probe.calibration.history))
    return _replay([*empty, *recordings], meter, PresenceTracker(presence or PresenceConfig()))


def _replay(recordings: Sequence[tuple[CSIFrames, int]], meter: MotionMeter,
            tracker: PresenceTracker) -> list[Second]:
    pre: Preprocessor | None = None
    spans: list[tuple[float, float, int, str]] = []  # (start, end, label, source) per file
    out: list[Second] = []
    for frames, label, start in join(recordings):
        spans.append((start, float(frames.timestamp[-1]), label, frames.source))
        t = frames.timestamp
        edges = np.arange(t[0], t[-1] + CHUNK_S, CHUNK_S)
        bounds = [0, *np.searchsorted(t, edges[1:], side="left").tolist(), t.size]
        for a, b in itertools.pairwise(bounds):
            if b <= a:
                continue
            chunk = frames.take(np.arange(a, b))
            if pre is None:  # as the edge: the segmenting from the first chunk
                pre = Preprocessor(presence_spec(chunk))
            meter.push(chunk)
            for segment in pre.push(chunk):
                end = segment.start_time + pre.spec.segment_s
                raw = meter.score(segment.start_time, end)
                score = motion_from_byte(motion_byte(raw))  # what the cloud receives
                motion, occupied = tracker.update(segment.start_time, end, score)
                middle = segment.start_time + pre.spec.segment_s / 2
                owner = next((s for s in spans if s[0] <= middle <= s[1] + JOIN_GAP_S),
                             spans[-1])
                amplitude = np.maximum(segment.data, 0)
                out.append(Second(segment.start_time, owner[2], owner[3], score, motion,
                                  occupied, motion_statistic(np.log1p(amplitude))))
    return out


def rates(truth: np.ndarray, flagged: np.ndarray) -> dict[str, float | int | None]:
    """Per-second precision, recall, F1 and false-positive rate."""
    tp = int((truth & flagged).sum())
    fp = int((~truth & flagged).sum())
    fn = int((truth & ~flagged).sum())
    tn = int((~truth & ~flagged).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"seconds": tp + fp + fn + tn, "positives": tp + fn, "negatives": fp + tn,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": _round(precision), "recall": _round(recall), "f1": _round(f1),
            "false_positive_rate": _round(fp / (fp + tn) if fp + tn else None)}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U, ties counted half)."""
    y = np.asarray(labels, dtype=bool)
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    positives, negatives = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _scored(seconds: list[Second], field: str) -> tuple[np.ndarray, np.ndarray]:
    kept = [s for s in seconds if getattr(s, field) is not None]
    return (np.array([s.label for s in kept], dtype=bool),
            np.array([bool(getattr(s, field)) for s in kept], dtype=bool))


# -- (a) ESPectre --------------------------------------------------------------------------------


def espectre_sessions(folder: Path) -> list[tuple[CSIFrames, CSIFrames]]:
    """(baseline, movement) pairs of one chip, the movement collected right after."""
    baseline = [read_recording(p) for p in sorted((folder / "baseline").glob("*.npz"))]
    movement = [read_recording(p) for p in sorted((folder / "movement").glob("*.npz"))]
    pairs = []
    for b in baseline:
        after = [m for m in movement if m.info.chip == b.info.chip
                 and 0 < m.timestamp[0] - b.timestamp[-1] < PAIR_WITHIN_S]
        if len(after) != 1:
            raise SystemExit(f"{b.source}: {len(after)} movement recordings of chip "
                             f"{b.info.chip} within {PAIR_WITHIN_S:.0f} s after it")
        pairs.append((b, after[0]))
    return pairs


def bench_espectre(folder: Path, log: Callable[[str], None]) -> dict[str, Any]:
    pairs = espectre_sessions(folder)
    return _espectre(pairs, log)


def _espectre(pairs: list[tuple[CSIFrames, CSIFrames]], log: Callable[[str], None],
              motion_config: MotionConfig | None = None, detail: bool = True
              ) -> dict[str, Any]:
    streams = []
    all_seconds: list[Second] = []
    thresholds = (1.0, 1.5, 2.0, 3.0)
    for base, move in pairs:
        seconds = run_stream([(base, 0), (move, 1)], motion_config=motion_config)
        all_seconds += seconds
        truth, flagged = _scored(seconds, "motion")
        move_start = float(next(s.start for s in seconds if s.label == 1))
        first = next((s for s in seconds if s.label == 1 and s.motion), None)
        detect = None if first is None else round(first.start + 1.0 - move_start, 3)
        scores = [s.score for s in seconds if s.score is not None]
        row: dict[str, Any] = {
            "chip": base.info.chip, "gain_locked": base.info.extra.get("gain_locked"),
            "baseline": Path(base.source).name, "movement": Path(move.source).name,
            "rate_hz": [round(base.rate_hz, 1), round(move.rate_hz, 1)],
            "unscored_seconds": sum(1 for s in seconds if s.score is None),
            "motion": rates(truth, flagged),
            "presence": rates(*_scored(seconds, "presence")),
            "time_to_detect_s": detect,
            "score_quiet_max": _round(max((s.score for s in seconds if s.label == 0
                                           and s.score is not None), default=None), 3),
            "score_moving_min": _round(min((s.score for s in seconds if s.label == 1
                                            and s.score is not None), default=None), 3),
            "score_auc": _round(auc([s.label for s in seconds if s.score is not None], scores)),
        }
        streams.append(row)
        if detail:
            log(f"  {row['chip']:<6s} F1 {row['motion']['f1']}  FPR "
                f"{row['motion']['false_positive_rate']}  detect {detect} s  quiet max "
                f"{row['score_quiet_max']}  moving min {row['score_moving_min']}")
    truth, flagged = _scored(all_seconds, "motion")
    detects = [r["time_to_detect_s"] for r in streams if r["time_to_detect_s"] is not None]
    scored = [s for s in all_seconds if s.score is not None]
    sweep = {f"{t:g}": rates(np.array([s.label for s in scored], dtype=bool),
                             np.array([s.score >= t for s in scored], dtype=bool))  # type: ignore[operator]
             for t in thresholds}
    return {
        "protocol": "per chip session: its baseline recording then its movement recording as "
                    "one presence-only stream; calibration from what the stream has seen (the "
                    "first 5 s of the baseline warm up, unscored); score through the wire "
                    "byte; default decision (threshold 1.5, sensitivity 1, hold 30 s); every "
                    "other second labelled by its recording (baseline empty, movement "
                    "occupied); no training, nothing tuned per file",
        "streams": streams,
        "pooled": {"motion": rates(truth, flagged),
                   "presence": rates(*_scored(all_seconds, "presence")),
                   "unscored_seconds": sum(1 for s in all_seconds if s.score is None),
                   "score_auc": _round(auc([s.label for s in scored],
                                           [s.score for s in scored])),  # type: ignore[misc]
                   "time_to_detect_s": {"median": _round(float(np.median(detects)), 3),
                                        "max": _round(max(detects), 3),
                                        "missed_streams": len(streams) - len(detects)}},
        "threshold_sweep_motion": sweep,
        "two_sessions": _two_sessions(pairs, log) if detail else None,
        "target_f1": TARGET_ESP32_F1,
        "target_met": bool((rates(truth, flagged)["f1"] or 0) >= TARGET_ESP32_F1),
    }


def _two_sessions(pairs: list[tuple[CSIFrames, CSIFrames]],
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    by_chip: dict[str, list[tuple[CSIFrames, CSIFrames]]] = {}
    for pair in pairs:
        by_chip.setdefault(str(pair[0].info.chip), []).append(pair)
    out = []
    for chip, sessions in sorted(by_chip.items()):
        if len(sessions) < 2:
            continue
        (b1, m1), (b2, m2) = sorted(sessions, key=lambda p: float(p[0].timestamp[0]))[:2]
        seconds = run_stream([(b1, 0), (m1, 1), (b2, 0), (m2, 1)])
        second_baseline = [s for s in seconds if s.source == b2.source]
        row: dict[str, Any] = {
               "chip": chip, "recordings": [Path(r.source).name for r in (b1, m1, b2, m2)],
               "motion": rates(*_scored(seconds, "motion")),
               "presence": rates(*_scored(seconds, "presence")),
               "second_baseline_motion_seconds": sum(1 for s in second_baseline if s.motion),
               "second_baseline_seconds": len(second_baseline)}
        out.append(row)
        log(f"  {chip} two sessions: motion F1 {row['motion']['f1']} FPR "
            f"{row['motion']['false_positive_rate']}; presence F1 {row['presence']['f1']}")
    return out


# -- (b) Fition ----------------------------------------------------------------------------------


def fition_sessions(folder: Path) -> dict[str, list[tuple[CSIFrames, int]]]:
    sessions: dict[str, list[tuple[CSIFrames, int]]] = {}
    for path in sorted(folder.rglob("*.pcap")):
        top = path.relative_to(folder).parts[0]  # <activity>_<user>_<room>
        activity, user, room = top.split("_")
        frames = read_recording(path)
        sessions.setdefault(f"{user}_{room}", []).append((frames, int(activity != "nm")))
    return sessions


def bench_fition(folder: Path, seeds: int, log: Callable[[str], None]) -> dict[str, Any]:
    return _fition(fition_sessions(folder), seeds, log)


def _fition(sessions: dict[str, list[tuple[CSIFrames, int]]], seeds: int,
            log: Callable[[str], None], motion_config: MotionConfig | None = None
            ) -> dict[str, Any]:
    per_seed = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        everything: list[Second] = []
        per_session = {}
        position: dict[int, float] = {}  # id of a Second -> seconds into its recording
        for name, recordings in sorted(sessions.items()):
            order = rng.permutation(len(recordings))
            stream = run_stream([recordings[i] for i in order], motion_config=motion_config)
            first: dict[str, float] = {}
            for s in stream:
                first.setdefault(s.source, s.start)
                position[id(s)] = s.start - first[s.source]
            seconds = [s for s in stream if s.score is not None]
            everything += seconds
            per_session[name] = _round(auc([s.label for s in seconds],
                                           [s.score for s in seconds]))  # type: ignore[misc]
        labels = [s.label for s in everything]
        by_file: dict[str, list[Second]] = {}
        for s in everything:
            by_file.setdefault(s.source, []).append(s)
        files = sorted(by_file)
        file_labels = [by_file[f][0].label for f in files]
        row: dict[str, Any] = {
            "seed": seed,
            "seconds": len(everything),
            "auc_per_second": _round(auc(labels, [s.score for s in everything])),  # type: ignore[misc]
            "auc_per_second_by_session": per_session,
            "auc_per_recording": _round(auc(file_labels, [
                float(np.median([s.score for s in by_file[f]])) for f in files])),  # type: ignore[misc]
            "idle_statistic_auc_per_second": _round(auc(labels, [
                s.idle_statistic for s in everything])),  # type: ignore[misc]
            "idle_statistic_auc_per_recording": _round(auc(file_labels, [
                float(np.median([s.idle_statistic for s in by_file[f]]))  # type: ignore[misc]
                for f in files])),
            "motion": rates(*_scored(everything, "motion")),
            "moving_recordings_seconds_below_threshold": _round(float(np.mean(
                [not s.motion for s in everything if s.label == 1]))),
            "auc_per_second_by_position": _by_position(everything, position),
            "threshold_sweep_motion": {
                f"{t:g}": rates(np.array(labels, dtype=bool),
                                np.array([s.score >= t for s in everything], dtype=bool))  # type: ignore[operator]
                for t in (0.5, 1.0, 1.5, 2.0)},
        }
        per_seed.append(row)
        log(f"  seed {seed}: AUC per second {row['auc_per_second']} (idle statistic "
            f"{row['idle_statistic_auc_per_second']}), per recording "
            f"{row['auc_per_recording']}; motion F1 {row['motion']['f1']} FPR "
            f"{row['motion']['false_positive_rate']}")

    def summary(key: str) -> dict[str, float]:
        values = [float(r[key]) for r in per_seed]
        return {"mean": round(float(np.mean(values)), 4), "min": round(min(values), 4),
                "max": round(max(values), 4)}

    mean_auc = summary("auc_per_second")["mean"]
    return {
        "protocol": "per recording session (user and room): all its recordings in a random "
                    "order as one presence-only stream (a replay of a folder), calibration "
                    "from what the stream has seen; nm seconds negative, the other activities' "
                    "seconds positive (each second labelled by its recording); "
                    f"{seeds} orders",
        "sessions": {k: len(v) for k, v in sorted(sessions.items())},
        "auc_per_second": summary("auc_per_second"),
        "auc_per_recording": summary("auc_per_recording"),
        "idle_statistic_auc_per_second": summary("idle_statistic_auc_per_second"),
        "idle_statistic_auc_per_recording": summary("idle_statistic_auc_per_recording"),
        "per_seed": per_seed,
        "target_auc": TARGET_FITION_AUC,
        "target_met_per_second": bool(mean_auc >= TARGET_FITION_AUC),
        "why_per_second_is_capped": "a recording's label covers its 10 s, not each second: "
                                    "moving recordings hold still stretches (a fall, then lying "
                                    "still; walking out of the link) and some nm recordings "
                                    "hold movement; moving_recordings_seconds_below_threshold "
                                    "gives the share of moving-labelled seconds as still as a "
                                    "quiet room",
    }


def _by_position(seconds: list[Second], position: dict[int, float]) -> dict[str, Any]:
    """ROC AUC of the seconds at each whole second into their recording (nm against moving at
    the same place), and the median score of each: where the per-second figure is lost."""
    out: dict[str, Any] = {}
    for k in sorted({int(p) for p in position.values()}):
        here = [s for s in seconds if int(position[id(s)]) == k]
        labels = [s.label for s in here]
        if 0 < sum(labels) < len(labels):
            out[str(k)] = {
                "seconds": len(here), "auc": _round(auc(labels, [s.score for s in here])),  # type: ignore[misc]
                "median_score_nm": _round(float(np.median([s.score for s in here
                                                           if not s.label])), 3),  # type: ignore[type-var]
                "median_score_moving": _round(float(np.median([s.score for s in here
                                                               if s.label])), 3)}  # type: ignore[type-var]
    return out


# -- (f) a room that is rarely quiet: the automatic reference against one measured empty ----------


def bench_rarely_quiet(data: Path, seeds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Where a room is quiet less than a quarter of the time the automatic reference lands on
    movement. Against it: the reference measured on the empty room (the dashboard's "Room is
    empty: measure", ``ctl`` ``calibrate_presence``), on recordings the scores are not
    computed on."""
    return {"esp32": _rarely_quiet_esp32(espectre_sessions(data / "esp32-espectre"), log),
            "fition": _rarely_quiet_fition(fition_sessions(data / "fition"), seeds, log)}


def _rarely_quiet_esp32(pairs: list[tuple[CSIFrames, CSIFrames]],
                        log: Callable[[str], None]) -> dict[str, Any]:
    only_moving: list[Second] = []
    measured_first: list[Second] = []
    for base, move in pairs:
        only_moving += run_stream([(move, 1)])
        measured_first += [s for s in run_stream([(move, 1)], empty=[(base, 0)])
                           if s.source == move.source]
    # A reference measured in one session, used in the chip's next one (another day for the
    # ESP32: 2026-02-14 and 2026-03-10): its empty room and its movement.
    by_chip: dict[str, list[tuple[CSIFrames, CSIFrames]]] = {}
    for pair in pairs:
        by_chip.setdefault(str(pair[0].info.chip), []).append(pair)
    later: dict[str, list[Second]] = {"automatic": [], "measured": []}
    chips = []
    for chip, sessions in sorted(by_chip.items()):
        if len(sessions) < 2:
            continue
        (b1, _), (b2, m2) = sorted(sessions, key=lambda p: float(p[0].timestamp[0]))[:2]
        chips.append(chip)
        later["automatic"] += run_stream([(b2, 0), (m2, 1)])
        later["measured"] += [s for s in run_stream([(b2, 0), (m2, 1)], empty=[(b1, 0)])
                              if s.source != b1.source]
    out = {
        "protocol": "per chip session, its movement recording alone: the automatic reference "
                    "(warmed up on the movement itself) against the reference measured on the "
                    "session's baseline recording played first (every statistic it gives); "
                    "the movement's seconds scored (motion recall). Then, for the chips "
                    "recorded in two sessions, the second session (baseline then movement) "
                    "scored against a reference measured on the first session's baseline, "
                    "against the automatic one",
        "movement_only": {"automatic": rates(*_scored(only_moving, "motion")),
                          "measured_empty": rates(*_scored(measured_first, "motion"))},
        "next_session": {"chips": chips,
                         "automatic": rates(*_scored(later["automatic"], "motion")),
                         "measured_empty": rates(*_scored(later["measured"], "motion"))},
    }
    log(f"  ESP32 movement only: motion recall automatic "
        f"{out['movement_only']['automatic']['recall']}, measured empty "
        f"{out['movement_only']['measured_empty']['recall']}; next session F1 / FPR automatic "
        f"{out['next_session']['automatic']['f1']} / "
        f"{out['next_session']['automatic']['false_positive_rate']}, measured "
        f"{out['next_session']['measured_empty']['f1']} / "
        f"{out['next_session']['measured_empty']['false_positive_rate']}")
    return out


def _rarely_quiet_fition(sessions: dict[str, list[tuple[CSIFrames, int]]], seeds: int,
                         log: Callable[[str], None]) -> dict[str, Any]:
    per_seed = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        automatic: list[Second] = []
        measured: list[Second] = []
        quiet_share = []
        for _, recordings in sorted(sessions.items()):
            nm = [recordings[i] for i in rng.permutation(len(recordings))
                  if recordings[i][1] == 0]
            moving = [r for r in recordings if r[1] == 1]
            empty, kept = nm[:len(nm) // 2], nm[len(nm) // 2:]
            stream = [(kept + moving)[i] for i in rng.permutation(len(kept) + len(moving))]
            quiet_share.append(len(kept) / len(stream))
            automatic += run_stream(stream)
            sources = {r[0].source for r in empty}
            measured += [s for s in run_stream(stream, empty=empty) if s.source not in sources]
        row = {"seed": seed, "automatic": rates(*_scored(automatic, "motion")),
               "measured_empty": rates(*_scored(measured, "motion")),
               "quiet_share": _round(float(np.mean(quiet_share)), 3)}
        per_seed.append(row)
        log(f"  Fition seed {seed}: motion F1 / recall / FPR automatic "
            f"{row['automatic']['f1']} / {row['automatic']['recall']} / "
            f"{row['automatic']['false_positive_rate']}, measured empty "
            f"{row['measured_empty']['f1']} / {row['measured_empty']['recall']} / "
            f"{row['measured_empty']['false_positive_rate']}")

    def mean(which: str, key: str) -> float | None:
        values = [r[which][key] for r in per_seed if r[which][key] is not None]
        return _round(float(np.mean(values))) if values else None

    return {
        "protocol": "per recording session: half of its nm recordings (a random half) are the "
                    "empty-room measurement, played first; the other half and every moving "
                    "recording in a random order are the stream scored (nm about a tenth of "
                    "its recordings: a room quiet less than a quarter of the time); the same "
                    "stream with the automatic reference alone; nm seconds negative; "
                    f"{seeds} orders",
        "per_seed": per_seed,
        "mean": {which: {k: mean(which, k) for k in ("precision", "recall", "f1",
                                                    "false_positive_rate")}
                 for which in ("automatic", "measured_empty")},
    }


# -- (g) a threshold fitted on labelled seconds ----------------------------------------------------


def bench_fitted_threshold(folder: Path, seeds: int, log: Callable[[str], None]
                           ) -> dict[str, Any]:
    return _fitted_threshold(fition_sessions(folder), seeds, log)


def _fitted_threshold(sessions: dict[str, list[tuple[CSIFrames, int]]], seeds: int,
                      log: Callable[[str], None]) -> dict[str, Any]:
    site = PresenceConfig().motion_threshold
    per_seed = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        default_scored: list[tuple[int, bool]] = []
        fitted_scored: list[tuple[int, bool]] = []
        per_session: dict[str, dict[str, Any]] = {}
        for name, recordings in sorted(sessions.items()):
            stream = [recordings[i] for i in rng.permutation(len(recordings))]
            seconds = [s for s in run_stream(stream) if s.score is not None]
            files = sorted({s.source for s in seconds})
            labelled = {files[i] for i in rng.permutation(len(files))[:len(files) // 2]}
            fit = fit_motion_threshold(
                [s.score for s in seconds if s.source in labelled and s.label == 0],
                [s.score for s in seconds if s.source in labelled and s.label == 1])
            scored = [s for s in seconds if s.source not in labelled]
            truth = np.array([s.label == 1 for s in scored])
            scores = np.array([s.score for s in scored], dtype=np.float64)
            per_session[name] = {"threshold": fit.threshold,
                                 "fit": fit.as_dict(),
                                 "site": rates(truth, scores >= site),
                                 "fitted": rates(truth, scores >= fit.threshold)}
            default_scored += [(int(t), bool(v >= site)) for t, v in zip(truth, scores,
                                                                         strict=True)]
            fitted_scored += [(int(t), bool(v >= fit.threshold)) for t, v in zip(
                truth, scores, strict=True)]
        row: dict[str, Any] = {"seed": seed, "sessions": per_session,
                               "site": rates(np.array([t for t, _ in default_scored], dtype=bool),
                                             np.array([f for _, f in default_scored],
                                                      dtype=bool)),
                               "fitted": rates(np.array([t for t, _ in fitted_scored],
                                                        dtype=bool),
                                               np.array([f for _, f in fitted_scored],
                                                        dtype=bool))}
        per_seed.append(row)
        log(f"  seed {seed}: motion F1 / recall / FPR at the site's threshold "
            f"{row['site']['f1']} / {row['site']['recall']} / "
            f"{row['site']['false_positive_rate']}, fitted {row['fitted']['f1']} / "
            f"{row['fitted']['recall']} / {row['fitted']['false_positive_rate']} (thresholds "
            + ", ".join(f"{k} {v['threshold']}" for k, v in per_session.items()) + ")")

    def mean(which: str, key: str, session: str | None = None) -> float | None:
        rows = [r[which] if session is None else r["sessions"][session][which]
                for r in per_seed]
        values = [v[key] for v in rows if v[key] is not None]
        return _round(float(np.mean(values))) if values else None

    keys = ("precision", "recall", "f1", "false_positive_rate")
    return {
        "protocol": "per recording session, all its recordings in a random order as one "
                    "stream with the automatic reference (as (b)); a random half of its "
                    "recordings labelled (nm still, the others moving) and the threshold "
                    "fitted on their seconds (fit_motion_threshold, no still second flagged); "
                    "motion scored on the other half's seconds at the site's threshold "
                    f"({site}) and at the fitted one; {seeds} orders",
        "per_seed": per_seed,
        "mean": {which: {k: mean(which, k) for k in keys} for which in ("site", "fitted")},
        "by_session": {name: {
            "thresholds": [r["sessions"][name]["threshold"] for r in per_seed],
            **{which: {k: mean(which, k, name) for k in keys} for which in ("site", "fitted")}}
            for name in sorted(sessions)},
    }


# -- ablations -------------------------------------------------------------------------------------

ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "window_2s": ("a 2 s window instead of 4 s", {"window_s": 2.0}),
    "no_despike": ("no running median over 5 frames", {"despike_frames": 1}),
    "no_detrend": ("plain variance over the window (no 0.5 s detrending)", {"detrend_s": 0.0}),
    "no_smoothing": ("no 0.1 s moving average", {"smooth_s": 0.0}),
    "stable_half": ("NBVI-like: only the most stable half of the subcarriers in the median",
                    {"stable_fraction": 0.5}),
    "previous": ("the earlier statistic: 0.2 s moving average, variance over 2 s, no "
                 "despiking, no detrending",
                 {"despike_frames": 1, "smooth_s": 0.2, "detrend_s": 0.0, "window_s": 2.0}),
    "quantile_10": ("the quiet reference at the 10 % quantile instead of 25 %",
                    {"reference_quantile": 0.10}),
    "quantile_5": ("the quiet reference at the 5 % quantile", {"reference_quantile": 0.05}),
}


def bench_ablations(data: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Each variant of the detector on (a) and (b) (one Fition order): why the defaults."""
    pairs = espectre_sessions(data / "esp32-espectre")
    sessions = fition_sessions(data / "fition")
    out = {}
    for name, (what, change) in ABLATIONS.items():
        config = replace(MotionConfig(), **change)
        esp32 = _espectre(pairs, log, config, detail=False)
        fition = _fition(sessions, 1, lambda _: None, config)
        out[name] = {"what": what, "change": change,
                     "esp32_f1": esp32["pooled"]["motion"]["f1"],
                     "esp32_false_positive_rate":
                         esp32["pooled"]["motion"]["false_positive_rate"],
                     "esp32_score_auc": esp32["pooled"]["score_auc"],
                     "fition_auc_per_second": fition["auc_per_second"]["mean"],
                     "fition_auc_per_recording": fition["auc_per_recording"]["mean"],
                     "fition_motion": fition["per_seed"][0]["motion"]}
        log(f"  {name}: ESP32 F1 {out[name]['esp32_f1']}, Fition AUC per second "
            f"{out[name]['fition_auc_per_second']}, per recording "
            f"{out[name]['fition_auc_per_recording']}")
    return {"protocol": "the protocols of (a) and (b), Fition with its first order only",
            "variants": out}


# -- (c) WiAR --------------------------------------------------------------------------------------


def bench_wiar(folder: Path, log: Callable[[str], None], files: int = 40) -> dict[str, Any]:
    paths = sorted(folder.glob("*.dat"))[:files]
    seconds = [s for s in run_stream([(read_recording(p), 1) for p in paths])]
    scores = np.array([s.score for s in seconds if s.score is not None])
    log(f"  WiAR: {len(seconds)} seconds of {len(paths)} recordings, {scores.size} scored")
    return {
        "evaluated": False,
        "reason": "every WiAR recording is a person performing an activity: there is no empty "
                  "room and no still recording to be negative, so no precision, F1 or "
                  "false-positive rate can be measured (and a calibration from quiet periods "
                  "has none to learn from)",
        "runs_on_intel5300": {"recordings": len(paths), "seconds": len(seconds),
                              "scored_seconds": int(scores.size),
                              "score_quantiles_10_50_90": [round(float(q), 3) for q in
                                                           np.quantile(scores, [.1, .5, .9])]
                              if scores.size else None},
    }


# -- (d) bytes -------------------------------------------------------------------------------------


def bench_bytes(model: Path, samples: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Payload bytes per second of the samples at each level, without and with motion."""
    from csi_edge.bundle import EdgeEncoder, encode_message_codes

    encoder = EdgeEncoder(model)
    manifest = encoder.manifest
    segments = []
    for path in sorted(samples.rglob("*.pcap")):
        batch = Preprocessor(encoder.spec).process(read_recording(path))
        segments.append(batch)
    seconds = sum(len(b) for b in segments) * encoder.spec.segment_s
    levels = []
    for spec in manifest.levels:
        sizes = {False: 0, True: 0}
        for batch in segments:
            symbols, profile = encoder.encode(batch.data)
            codes = [encoder.codes(s, p, spec.level)
                     for s, p in zip(symbols, profile, strict=True)]
            k = spec.segments_per_message
            for i in range(0, len(codes), k):
                stream = encode_message_codes(codes[i:i + k], manifest, encoder.tables)
                for motion in (False, True):
                    group = tuple(SegmentRecord(1.0, motion=0.5 if motion else None)
                                  for _ in codes[i:i + k])
                    sizes[motion] += len(encode_payload(Payload(
                        spec.level, encoder.model_id, 0, i, 0, group, motion=motion,
                        codes=stream)))
        row = {"level": spec.level, "segments_per_message": spec.segments_per_message,
               "payload_bytes_per_s": round(sizes[False] / seconds, 2),
               "payload_bytes_per_s_with_motion": round(sizes[True] / seconds, 2),
               "added_bytes_per_s": round((sizes[True] - sizes[False]) / seconds, 3)}
        row["added_percent"] = round(100 * row["added_bytes_per_s"] /
                                     row["payload_bytes_per_s"], 1)
        levels.append(row)
        log(f"  level {spec.level}: {row['payload_bytes_per_s']} -> "
            f"{row['payload_bytes_per_s_with_motion']} B/s (+{row['added_bytes_per_s']})")
    return {
        "what": f"payload bytes (header, records, codes, CRC) of the committed Fition samples "
                f"({len(segments)} recordings, {seconds:.0f} s) at each level of "
                f"{manifest.name}, messages of the level's segments_per_message, without and "
                "with the MOTION byte; MQTT framing and TCP/IP are the same either way",
        "levels": levels,
        # Whole segments (FULL_QUALITY: no quality bytes), as nearly every segment is.
        "idle_message_of_10": {"without_motion": idle_payload_size(10, full_quality=True),
                               "with_motion": idle_payload_size(10, motion=True,
                                                                full_quality=True)},
        "presence_only_bytes_per_s": {str(k): round(idle_payload_size(
            k, motion=True, full_quality=True) / k, 2) for k in (1, 5, 10)},
    }


# -- (e) CPU ---------------------------------------------------------------------------------------


def bench_cost(paths: dict[str, Path], log: Callable[[str], None],
               repeats: int = 20) -> dict[str, Any]:
    """CPU time of the MotionMeter per segment (push in 0.1 s chunks + score), steady state."""
    out = {}
    for name, path in paths.items():
        frames = read_recording(path)
        segments = Preprocessor(presence_spec(frames)).process(frames)
        t = frames.timestamp
        edges = np.arange(t[0], t[-1] + CHUNK_S, CHUNK_S)
        bounds = [0, *np.searchsorted(t, edges[1:], side="left").tolist(), t.size]
        chunks = [frames.take(np.arange(a, b)) for a, b in itertools.pairwise(bounds) if b > a]
        meter = MotionMeter()
        meter.push(chunks[0])  # the band, detected once per stream
        meter.forget_frames()
        scored = 0
        started = time.process_time()
        for _ in range(repeats):
            k = 0
            for chunk in chunks:
                meter.push(chunk)
                while k < len(segments) and segments.start_time[k] + 1 <= chunk.timestamp[-1]:
                    meter.score(float(segments.start_time[k]),
                                float(segments.start_time[k]) + 1)
                    k += 1
                    scored += 1
            meter.forget_frames()
        ms = 1000 * (time.process_time() - started) / scored
        out[name] = {"recording": str(path.relative_to(ROOT) if path.is_relative_to(ROOT)
                                      else path.name),
                     "rate_hz": round(frames.rate_hz, 1), "antennas": frames.antennas,
                     "subcarriers": meter.band_size, "cpu_ms_per_segment": round(ms, 3)}
        log(f"  {name}: {ms:.2f} ms CPU per segment")
    return {"what": "process CPU time of MotionMeter.push (0.1 s chunks) and .score per 1 s "
                    "segment, steady state, one thread, on this machine (shared)",
            "streams": out}


# -- the table in docs/presence.md ---------------------------------------------------------------

DOC = ROOT / "docs" / "presence.md"
DOC_BEGIN = "<!-- bench/presence.py writes this table from bench/results/presence.json -->"
DOC_END = "<!-- end of the table -->"


def render_table(result: dict[str, Any]) -> str:
    """The results table of docs/presence.md, from a results file."""
    esp32, fition = result["esp32_espectre"], result["fition"]
    pooled = esp32["pooled"]
    motion, occupied = pooled["motion"], pooled["presence"]
    detect = pooled["time_to_detect_s"]
    rows = [
        "| measure | result | target |",
        "|---|---|---|",
        f"| ESPectre ESP32, 6 chip sessions, per second `motion`: precision / recall / F1 / "
        f"false-positive rate | {motion['precision']} / {motion['recall']} / {motion['f1']} / "
        f"{motion['false_positive_rate']} ({motion['seconds']} s scored, "
        f"{pooled['unscored_seconds']} calibrating) | F1 >= {esp32['target_f1']} |",
        f"| the same, `presence` (30 s hold) | {occupied['precision']} / {occupied['recall']} / "
        f"{occupied['f1']} / {occupied['false_positive_rate']} | |",
        f"| ESP32 time to detect (movement start to the end of the first motion segment) | "
        f"median {detect['median']} s, max {detect['max']} s, "
        f"{detect['missed_streams']} stream(s) missed | |",
    ]
    for row in esp32["two_sessions"] or []:
        m, p = row["motion"], row["presence"]
        rows.append(f"| ESP32 {row['chip']}, two sessions in one stream: `motion` F1 / FPR; "
                    f"`presence` F1 / FPR (the hold covers the second baseline) | {m['f1']} / "
                    f"{m['false_positive_rate']}; {p['f1']} / {p['false_positive_rate']} | |")
    auc_s, auc_r = fition["auc_per_second"], fition["auc_per_recording"]
    idle_s, idle_r = fition["idle_statistic_auc_per_second"], \
        fition["idle_statistic_auc_per_recording"]
    rows += [
        f"| Fition `nm` vs moving, ROC AUC per second (mean, min-max over "
        f"{len(fition['per_seed'])} stream orders) | {auc_s['mean']} ({auc_s['min']}-"
        f"{auc_s['max']}) | >= {fition['target_auc']} |",
        f"| the same, today's idle statistic on the same seconds | {idle_s['mean']} | |",
        f"| Fition ROC AUC per recording (median score) | {auc_r['mean']} ({auc_r['min']}-"
        f"{auc_r['max']}); idle statistic {idle_r['mean']} | |",
    ]
    first = fition["per_seed"][0]
    m = first["motion"]
    rows.append(f"| Fition per second `motion` at the default threshold (first order): "
                f"precision / recall / F1 / FPR | {m['precision']} / {m['recall']} / {m['f1']} / "
                f"{m['false_positive_rate']}; moving-labelled seconds below the threshold: "
                f"{first['moving_recordings_seconds_below_threshold']} | |")
    by_position = first["auc_per_second_by_position"]
    rows.append("| Fition per second ROC AUC at each second into the recordings (first order; "
                "median score nm / moving) | " + "; ".join(
                    f"{k} s: {v['auc']} ({v['median_score_nm']} / {v['median_score_moving']})"
                    for k, v in by_position.items()) + " | |")
    rows.append(f"| WiAR (Intel 5300) | not measurable: {result['wiar']['reason']} | |")
    quiet = result.get("rarely_quiet")
    if quiet:
        alone, later = quiet["esp32"]["movement_only"], quiet["esp32"]["next_session"]
        rows.append(f"| a room rarely quiet, ESP32 movement recordings alone: `motion` recall, "
                    f"automatic / measured on the empty room | {alone['automatic']['recall']} / "
                    f"{alone['measured_empty']['recall']} | |")
        rows.append(f"| ESP32 {', '.join(later['chips'])}, next session against a reference "
                    f"measured in the first: `motion` F1 / FPR, automatic; measured | "
                    f"{later['automatic']['f1']} / {later['automatic']['false_positive_rate']}; "
                    f"{later['measured_empty']['f1']} / "
                    f"{later['measured_empty']['false_positive_rate']} | |")
        fm = quiet["fition"]["mean"]
        rows.append(f"| Fition, half the nm recordings measured empty, the rest among the moving "
                    f"ones: `motion` precision / recall / F1 / FPR, automatic; measured (mean of "
                    f"{len(quiet['fition']['per_seed'])} orders) | "
                    f"{fm['automatic']['precision']} / {fm['automatic']['recall']} / "
                    f"{fm['automatic']['f1']} / {fm['automatic']['false_positive_rate']}; "
                    f"{fm['measured_empty']['precision']} / {fm['measured_empty']['recall']} / "
                    f"{fm['measured_empty']['f1']} / "
                    f"{fm['measured_empty']['false_positive_rate']} | |")
    fitted = result.get("fitted_threshold")
    if fitted:
        fm = fitted["mean"]
        rows.append(f"| Fition, each room's own threshold fitted on half its recordings "
                    f"(labelled), the other half scored: `motion` precision / recall / F1 / "
                    f"FPR, the site's 1.5; fitted (mean of {len(fitted['per_seed'])} orders) | "
                    f"{fm['site']['precision']} / {fm['site']['recall']} / {fm['site']['f1']} "
                    f"/ {fm['site']['false_positive_rate']}; {fm['fitted']['precision']} / "
                    f"{fm['fitted']['recall']} / {fm['fitted']['f1']} / "
                    f"{fm['fitted']['false_positive_rate']} | |")
        for name, row in fitted["by_session"].items():
            rows.append(f"| the same, {name}: thresholds fitted "
                        f"{' / '.join(f'{t:g}' for t in row['thresholds'])}; `motion` recall / "
                        f"FPR, the site's; fitted | {row['site']['recall']} / "
                        f"{row['site']['false_positive_rate']}; {row['fitted']['recall']} / "
                        f"{row['fitted']['false_positive_rate']} | |")
    for level in result["bytes"]["levels"]:
        rows.append(f"| wire, level {level['level']} (Fition samples): payload B/s without / "
                    f"with the motion byte | {level['payload_bytes_per_s']} / "
                    f"{level['payload_bytes_per_s_with_motion']} (+{level['added_bytes_per_s']}, "
                    f"+{level['added_percent']} %) | |")
    only = result["bytes"]["presence_only_bytes_per_s"]
    rows.append(f"| wire, presence only, payload B/s at 1 / 5 / 10 segments a message | "
                f"{only['1']} / {only['5']} / {only['10']} | |")
    cpu = result["cpu"]["streams"]
    rows.append("| edge CPU of the motion score per 1 s segment (Nexmon / Intel 5300 / ESP32) | "
                + " / ".join(f"{cpu[k]['cpu_ms_per_segment']} ms" for k in
                             ("nexmon", "intel5300", "esp32")) + " | |")
    rows += ["", "Ablations (the same protocols, Fition with one order):", "",
             "| variant | ESP32 F1 | Fition AUC per second | per recording | Fition `motion` F1 / "
             "FPR |", "|---|---|---|---|---|",
             f"| default | {motion['f1']} | {first['auc_per_second']} | "
             f"{first['auc_per_recording']} | {first['motion']['f1']} / "
             f"{first['motion']['false_positive_rate']} |"]
    for name, row in result["ablations"]["variants"].items():
        at = row.get("fition_motion")
        rows.append(f"| {name}: {row['what']} | {row['esp32_f1']} | "
                    f"{row['fition_auc_per_second']} | {row['fition_auc_per_recording']} | "
                    + (f"{at['f1']} / {at['false_positive_rate']}" if at else "-") + " |")
    return "\n".join(rows)


def write_doc_table(result: dict[str, Any], doc: Path = DOC) -> None:
    text = doc.read_text()
    head, _, rest = text.partition(DOC_BEGIN)
    _, _, tail = rest.partition(DOC_END)
    doc.write_text(f"{head}{DOC_BEGIN}\n{render_table(result)}\n{DOC_END}{tail}")


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "CSI_SHARED_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--seeds", type=int, default=5, help="Fition stream orders")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "fition")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "presence.json")
    args = parser.parse_args(argv)
    for sub in ("esp32-espectre", "fition", "wiar/height_90"):
        if not (args.data / sub).is_dir():
            parser.error(f"{args.data / sub} is missing (--data or CSI_SHARED_DATA)")
    t0 = time.perf_counter()

    def log(text: str) -> None:
        print(text, flush=True)

    log("(a) ESPectre ESP32, per chip session: baseline then movement")
    esp32 = bench_espectre(args.data / "esp32-espectre", log)
    log(f"    pooled motion: {esp32['pooled']['motion']}")
    log("(b) Fition, per session, all recordings in random orders")
    fition = bench_fition(args.data / "fition", args.seeds, log)
    log("(c) WiAR")
    wiar = bench_wiar(args.data / "wiar" / "height_90", log)
    log("(f) a room that is rarely quiet: automatic against measured empty")
    rarely_quiet = bench_rarely_quiet(args.data, args.seeds, log)
    log("(g) a room's own threshold, fitted on labelled seconds")
    fitted = bench_fitted_threshold(args.data / "fition", args.seeds, log)
    log("ablations")
    ablations = bench_ablations(args.data, log)
    log("(d) bytes")
    wire = bench_bytes(args.model, ROOT / "datasets" / "samples" / "fition", log)
    log("(e) CPU")
    esp32_file = sorted((args.data / "esp32-espectre" / "movement").glob("*c6*.npz"))[0]
    cost = bench_cost({
        "nexmon": ROOT / "datasets" / "samples" / "fition" / "walking_user1_rm1" /
        "walking_user1_rm1_10.pcap",
        "intel5300": ROOT / "datasets" / "samples" / "wiar" / "height_90" / "csi_a1_1.dat",
        "esp32": esp32_file}, log)
    result = {
        "benchmark": "presence",
        "command": "python bench/presence.py" + (" " + " ".join(argv) if argv else ""),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "detector": {"motion": {k: getattr(MotionConfig(), k) for k in
                                MotionConfig.__dataclass_fields__},
                     "decision": {k: getattr(PresenceConfig(), k) for k in
                                  PresenceConfig.__dataclass_fields__},
                     "wire_resolution": 1 / 16},
        "esp32_espectre": esp32,
        "fition": fition,
        "wiar": wiar,
        "rarely_quiet": rarely_quiet,
        "fitted_threshold": fitted,
        "ablations": ablations,
        "bytes": wire,
        "cpu": cost,
        "runtime_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=_json) + "\n")
    log(f"wrote {args.out} in {result['runtime_s']} s")
    if args.out.resolve() == (ROOT / "bench" / "results" / "presence.json").resolve():
        write_doc_table(json.loads(args.out.read_text()))
        log(f"updated the table in {DOC}")
    return 0


def _json(value: object) -> object:
    if isinstance(value, np.integer | np.floating | np.bool_):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


if __name__ == "__main__":
    sys.exit(main())
