"""How far the live per-second accuracy can go with the bundle's classifier: the reading of
the window that holds exactly the seconds since the true change, against the live output.

    python bench/live_bound.py [--data ../shared/data] [--seeds 3] [--bundles fition,wiar]

The live output (csi_cloud.model.lengths, csi_cloud.smoothing) must guess when the activity
changed. Here an oracle knows it: at each second of the test recordings laid end to end
(bench/trust.py's streams, ``--seeds`` orders), it reads the window at the length that covers
the seconds since the recording began (1 at its first second, up to the full context; the
last ``n`` seconds from then on), each length calibrated with a temperature fitted on the
validation recordings streamed the same way, on the seconds where the oracle reads that
length. That window holds nothing of the previous activity (with slots missing, fewer of
the current one's seconds): what a perfect change detector would give the classifier. It is
not a strict bound (a rule that combines several readings, bench/live_rules.py, could in
principle do better), but where it stays below the target, with the filter too, knowing when
the activity changed is not what is missing: the classifier's reading of a recording's first
seconds is. Scores per rate level:

- ``live``: the shipped live output after the filter (what the service shows; bench/trust.py);
- ``oracle``: the oracle's reading, each second alone;
- ``oracle_filtered``: the oracle's readings through the filter at the bundle's ``stay``,
  started afresh at each true change (what the filter knows of the current activity's past
  seconds, nothing of the previous one's);
- ``oracle_with_filter``: the oracle's reading multiplied into the live output's filtered
  belief;
- ``per_recording``: the full window ending at each recording's last second (the figure the
  live target subtracts 5 points from), and the oracle's reading by position in the recording.

Results: ``bench/results/live_bound.json`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import save_results  # noqa: E402
from trust import BUNDLES, shared_data  # noqa: E402  (bench/trust.py, beside this script)

from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.temperature import apply_temperature, fit_temperature  # noqa: E402
from csi_cloud.model.trust import LiveStreams, live_streams, split_recordings  # noqa: E402
from csi_cloud.smoothing import EVIDENCE_FLOOR, TrustParams, filter_stream  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402

POSITIONS = 8  # positions 0..7 apart, the rest together


def _reading(ls: LiveStreams, k: int, n: int) -> np.ndarray:
    return ls.p_raw if k == n else ls.readings[k]


def oracle_readings(ls: LiveStreams, temperatures: dict[int, float], n: int) -> np.ndarray:
    """Per second (N, K): the calibrated reading at the length that covers the seconds of
    its recording so far (position + 1, at most ``n``)."""
    length = np.minimum(ls.position() + 1, n)
    out = np.empty_like(ls.p_raw)
    for k in np.unique(length):
        rows = length == k
        out[rows] = apply_temperature(_reading(ls, int(k), n)[rows], temperatures[int(k)])
    return out


def bench_bundle(name: str, dataset: str, data_dir: Path, seeds: int) -> dict[str, Any]:
    folder = ROOT / "models" / name
    model, edge = CloudModel.load(folder), EdgeEncoder(folder)
    params = TrustParams.from_calibration(model.manifest.calibration)
    n = model.net.cfg.context_segments
    lengths = list(range(1, n))
    streams = {}
    for part in ("val", "test"):
        data, _ = split_recordings(folder, dataset, data_dir, part)
        recordings = np.arange(len(data))
        streams[part] = [live_streams(model, edge, data, recordings, "joined", seed=s,
                                      lengths=lengths) for s in range(seeds)]
        if part == "test":
            separate = live_streams(model, edge, data, recordings, "separate")
    levels = []
    for i in range(len(separate)):
        # Each length's temperature on the seconds the oracle reads it at.
        val = [(run[i], np.minimum(run[i].position() + 1, n)) for run in streams["val"]]
        temperatures = {k: fit_temperature(
            np.concatenate([_reading(ls, k, n)[used == k] for ls, used in val]),
            np.concatenate([ls.labels[used == k] for ls, used in val]))
            for k in [*lengths, n]}
        live, oracle, fresh, combined = [], [], [], []
        by_position: dict[str, list[float]] = {}
        for run in streams["test"]:
            ls = run[i]
            belief = filter_stream(ls.live(model.lengths), params.stay, ls.starts)
            read = oracle_readings(ls, temperatures, n)
            live.append(float((belief.argmax(1) == ls.labels).mean()))
            oracle.append(float((read.argmax(1) == ls.labels).mean()))
            restarted = filter_stream(read, params.stay, ls.position() == 0)
            fresh.append(float((restarted.argmax(1) == ls.labels).mean()))
            both = (np.log(np.clip(belief, EVIDENCE_FLOOR, None))
                    + np.log(np.clip(read, EVIDENCE_FLOOR, None)))
            combined.append(float((both.argmax(1) == ls.labels).mean()))
            position = np.minimum(ls.position(), POSITIONS)
            for p in range(POSITIONS + 1):
                rows = position == p
                key = str(p) if p < POSITIONS else f"{POSITIONS}+"
                by_position.setdefault(key, []).append(
                    float((read[rows].argmax(1) == ls.labels[rows]).mean()))
        sep = separate[i]
        last = np.r_[sep.starts[1:], True]
        levels.append({
            "level": sep.level,
            "per_recording": round(float((sep.p_raw[last].argmax(1)
                                          == sep.labels[last]).mean()), 4),
            "live": round(float(np.mean(live)), 4),
            "oracle": round(float(np.mean(oracle)), 4),
            "oracle_filtered": round(float(np.mean(fresh)), 4),
            "oracle_with_filter": round(float(np.mean(combined)), 4),
            "oracle_by_position": {k: round(float(np.mean(v)), 4)
                                   for k, v in by_position.items()}})
    return {"bundle": model.id, "seconds": len(streams["test"][0][0].labels),
            "levels": levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--seeds", type=int, default=3, help="orders of the live streams")
    parser.add_argument("--bundles", default="fition,wiar")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "live_bound.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    report: dict[str, Any] = {"command": "python bench/live_bound.py",
                              "machine": platform.node(), "seeds": args.seeds, "bundles": {}}
    for name in [b for b in args.bundles.split(",") if b]:
        dataset, sub = BUNDLES[name]
        if not (args.data / sub).is_dir():
            raise SystemExit(f"{args.data / sub} is not there: the bound needs the "
                             "bundle's validation and test recordings")
        entry = bench_bundle(name, dataset, args.data / sub, args.seeds)
        report["bundles"][name] = entry
        for lv in entry["levels"]:
            print(f"{name} level {lv['level']}: per recording {lv['per_recording']:.3f}, "
                  f"live {lv['live']:.3f}, oracle {lv['oracle']:.3f}, filtered "
                  f"{lv['oracle_filtered']:.3f}, with the live filter "
                  f"{lv['oracle_with_filter']:.3f}", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    save_results(report, args.out, None)


if __name__ == "__main__":
    main()
