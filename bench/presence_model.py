"""Should presence also read the activity model? Per second, against labels, on recordings the
bundle was not trained on.

    python bench/presence_model.py [--data ../shared/data] [--seeds 3] [--out FILE]

Presence and motion come from the edge's motion score alone (docs/presence.md): it needs no
model and means the same on every radio. In a room where movement moves the channel little
(Fition's room 1: the demo's first AP) the score misses most moving seconds, and the room card
reads "Empty · still" beside "walking 92 %". The activity model has a still class on Fition
(``nm``), so its smoothed label could stand in as a second motion sensor: a second whose
label is a moving activity, not ``uncertain``, would count as motion. This bench measures
what that would do, with the service's own code on both sides:

- **the score**: bench/presence.py's replay (``run_stream``: the edge's segmenting, the
  ``MotionMeter`` in 0.1 s chunks, the wire byte, the cloud's ``PresenceTracker`` with the
  default threshold, sensitivity and 30 s hold), each session's recordings joined;
- **the model**: the shipped Fition bundle's live output on the same recordings joined in the
  same order (csi_cloud.model.trust.live_streams, the bundle's context lengths, pool and
  temperatures, the HMM filter with its ``stay``; ``uncertain`` below its threshold), level 0.

Recordings: the **test** part of the bundle's split, one stream per session (user and room),
``--seeds`` orders. Those sessions are the ones the bundle was trained on (other recordings
of them): on Fition a random split mostly measures the session (FIELD-NOTES), so the model's
figures here are its best case; in a room it was not trained in, no model reads activities
far above chance (docs/model.md). Each second of a recording is paired with the other side's
second of the same slot of that recording (seconds since its start: the model side's may
lack a few, where the recording's packets have gaps, and the score side has one more at the
end); seconds the score does not rate yet (the stream's first, calibrating) are left out.

Two measures (pooled over the sessions, and per session):

- ``moving``: per-second precision, recall, F1 and false-positive rate of "someone moves"
  (truth: the recording's activity is not ``nm``) for the score's ``motion``, the model's
  moving label, and either of them;
- ``still_streams``: each session's ``nm`` test recordings alone, joined (a still room, the
  case an ``occupied`` that never ends comes from): the share of their seconds that
  ``presence`` (the 30 s hold after each motion second) reads occupied, from the score alone
  and from the score or the model's moving label.

Each order streams the same recordings: ``seconds`` sums the orders, ``seconds_per_order``
is their mean.

Results: ``bench/results/presence_model.json``; docs/presence.md ("Why presence does not read
the activity model") quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from presence import Second, rates, run_stream  # noqa: E402

from csi_cloud.api.schemas.aps import STILL_ACTIVITIES  # noqa: E402
from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.data import SegmentData  # noqa: E402
from csi_cloud.model.trust import live_streams, split_recordings  # noqa: E402
from csi_cloud.smoothing import TrustParams, filter_stream  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402
from csi_edge.presence import PresenceConfig  # noqa: E402
from csi_edge.readers import read_recording  # noqa: E402

LEVEL = 0


def held(flags: Sequence[bool], starts: Sequence[float], segment_s: float,
         hold_s: float) -> np.ndarray:
    """Per second, ``presence`` as csi_edge.presence.PresenceTracker holds it: occupied on a
    flagged second and for ``hold_s`` after its end."""
    out, last = [], None
    for flag, start in zip(flags, starts, strict=True):
        end = start + segment_s
        if flag:
            last = end
        out.append(last is not None and end - last < hold_s)
    return np.array(out, bool)


def pair(model_rows: dict[int, dict[int, int]], score_rows: dict[int, dict[int, Second]],
         order: Sequence[int]) -> list[tuple[int, int, Second]]:
    """(recording, model row, scored second) for each slot (seconds since the recording's
    start) both sides have, recording by recording in ``order``, slots ascending."""
    out = []
    for r in order:
        rows, seconds = model_rows.get(r, {}), score_rows.get(r, {})
        out += [(r, rows[k], seconds[k]) for k in sorted(rows.keys() & seconds.keys())]
    return out


def score_slots(seconds: Sequence[Second]) -> dict[int, Second]:
    """One recording's scored seconds by slot: whole seconds since its first (the replay
    starts each recording on the segment grid: bench/presence.py's ``join``)."""
    if not seconds:
        return {}
    first = min(s.start for s in seconds)
    return {round(s.start - first): s for s in seconds if s.motion is not None}


def _stream(model: CloudModel, edge: EdgeEncoder, data: SegmentData, recordings: list[int],
            seed: int, still: set[int], params: TrustParams) -> dict[str, np.ndarray]:
    """One session's recordings joined in one order: per paired second, the truth (moving),
    the score's motion, the model's moving label, and the second's start."""
    ls = live_streams(model, edge, data, np.array(recordings), "joined", levels=[LEVEL],
                      seed=seed)[0]
    belief = filter_stream(ls.live(model.lengths), params.stay, ls.starts)
    label, sure = belief.argmax(1), belief.max(1) >= params.threshold
    order = [int(r) for i, r in enumerate(ls.recording) if i == 0 or r != ls.recording[i - 1]]
    scored = run_stream([(read_recording(data.examples[r].path),
                          int(int(data.activity[r]) not in still)) for r in order])
    source = {str(data.examples[r].path): r for r in order}
    by_recording: dict[int, list[Second]] = {}
    for second in scored:
        by_recording.setdefault(source[second.source], []).append(second)
    # The live stream's windows of a recording follow its data rows, whose slots are its own.
    model_rows = {r: dict(zip(data.slot[data.start[r]:data.start[r] + data.count[r]].tolist(),
                              np.flatnonzero(ls.recording == r).tolist(), strict=True))
                  for r in order}
    pairs = pair(model_rows, {r: score_slots(v) for r, v in by_recording.items()}, order)
    return {
        "truth": np.array([int(data.activity[r]) not in still for r, _, _ in pairs]),
        "score": np.array([bool(s.motion) for _, _, s in pairs]),
        "model": np.array([bool(sure[row]) and int(label[row]) not in still
                           for _, row, _ in pairs]),
        "start": np.array([s.start for _, _, s in pairs])}


def bench(data_dir: Path, seeds: int, folder: Path) -> dict[str, Any]:
    model, edge = CloudModel.load(folder), EdgeEncoder(folder)
    params = TrustParams.from_calibration(model.manifest.calibration)
    segment_s = model.manifest.input_spec.segment_s
    hold_s = PresenceConfig().hold_s
    activities = list(model.manifest.labels["activity"] or [])
    still = {activities.index(a) for a in STILL_ACTIVITIES if a in activities}
    if not still:
        raise SystemExit(f"{folder}: no still activity ({', '.join(STILL_ACTIVITIES)}) to "
                         "measure against")
    data, described = split_recordings(folder, "fition", data_dir, "test")
    sessions: dict[str, list[int]] = {}
    for i, example in enumerate(data.examples):
        sessions.setdefault(f"{example.identity}_{example.room}", []).append(i)
    moving: dict[str, list[dict[str, Any]]] = {"score": [], "model": [], "either": []}
    moving_by_session: dict[str, dict[str, list[dict[str, Any]]]] = {}
    still_share: dict[str, list[float]] = {"score": [], "either": []}
    by_session: dict[str, dict[str, float]] = {}
    still_seconds = 0
    for seed in range(seeds):
        for session, recordings in sessions.items():
            s = _stream(model, edge, data, recordings, seed, still, params)
            for name, flags in (("score", s["score"]), ("model", s["model"]),
                                ("either", s["score"] | s["model"])):
                moving[name].append(rates(s["truth"], flags))
                moving_by_session.setdefault(session, {}).setdefault(name, []).append(
                    rates(s["truth"], flags))
            quiet = [r for r in recordings if int(data.activity[r]) in still]
            if not quiet:
                continue
            q = _stream(model, edge, data, quiet, seed, still, params)
            still_seconds += len(q["start"])
            mine = by_session.setdefault(session, {"seconds": 0, "score": 0, "either": 0,
                                                   "model_moving": 0})
            mine["seconds"] += len(q["start"])
            mine["model_moving"] += int(q["model"].sum())
            for name, flags in (("score", q["score"]), ("either", q["score"] | q["model"])):
                occupied = float(held(flags, q["start"], segment_s, hold_s).sum())
                still_share[name].append(occupied)
                mine[name] += occupied

    def pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
        tp, fp, fn, tn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn"))
        seconds = tp + fp + fn + tn
        return {"seconds": seconds, "seconds_per_order": round(seconds / seeds),
                "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                "precision": round(tp / (tp + fp), 4) if tp + fp else None,
                "recall": round(tp / (tp + fn), 4) if tp + fn else None,
                "f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp else 0.0,
                "false_positive_rate": round(fp / (fp + tn), 4) if fp + tn else None}

    return {
        "bundle": model.id, "level": LEVEL, "recordings": described,
        "sessions": {k: len(v) for k, v in sessions.items()}, "orders": seeds,
        "still_activities": sorted(activities[i] for i in still),
        "stay": params.stay, "threshold": params.threshold, "hold_s": hold_s,
        "moving": {name: pooled(rows) for name, rows in moving.items()},
        "moving_by_session": {session: {name: pooled(rows) for name, rows in by_name.items()}
                              for session, by_name in moving_by_session.items()},
        "still_streams": {"seconds": still_seconds,
                          "seconds_per_order": round(still_seconds / seeds),
                          "occupied_share": {name: round(sum(v) / max(still_seconds, 1), 4)
                                             for name, v in still_share.items()},
                          "by_session": {
                              k: {"seconds": v["seconds"],
                                  "seconds_per_order": round(v["seconds"] / seeds),
                                  "model_moving_share": round(v["model_moving"] / v["seconds"], 4),
                                  "occupied_share": {n: round(v[n] / v["seconds"], 4)
                                                     for n in ("score", "either")}}
                              for k, v in by_session.items()}},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "CSI_SHARED_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--seeds", type=int, default=3, help="stream orders per session")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "fition")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "presence_model.json")
    args = parser.parse_args(argv)
    if not (args.data / "fition").is_dir():
        parser.error(f"{args.data / 'fition'} is missing (--data or CSI_SHARED_DATA)")
    t0 = time.perf_counter()
    result = {"benchmark": "presence_model",
              "command": "python bench/presence_model.py" + (" " + " ".join(argv)
                                                              if argv else ""),
              "machine": {"python": platform.python_version(),
                          "platform": platform.platform(), "cpus": os.cpu_count()},
              **bench(args.data / "fition", args.seeds, args.model)}
    result["runtime_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, row in result["moving"].items():
        print(f"moving, {name}: precision {row['precision']} recall {row['recall']} "
              f"F1 {row['f1']} FPR {row['false_positive_rate']}")
    print(f"still streams ({result['still_streams']['seconds']} s): occupied share "
          f"{result['still_streams']['occupied_share']}")
    for session, row in result["still_streams"]["by_session"].items():
        print(f"  {session}: {row}")
    print(f"wrote {args.out} in {result['runtime_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
