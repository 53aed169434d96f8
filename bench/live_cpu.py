"""Processor time of the live output (``CloudModel.classify_live``) per run of 64 windows, this
checkout against another one (e.g. the main branch), alternating, on the same windows.

The windows are the committed samples (datasets/samples) of each shipped bundle, coded by its
int8 edge encoder at rate levels 0-3 (one level per recording, in turn) and decoded as the
cloud decodes them: "full", the windows whose 8 slots all hold a segment (a stream's steady
state; repeated to 64); "recorded", the first 64 windows in recording order (each recording's
first 7 windows start with missing slots). Each checkout is measured in a child process of its
own (so each imports its own code), on a worker thread as the service classifies (the ingest
thread), warmed first; the children alternate, ``--rounds`` times each, and the CPU time is
the child's process time (all its threads). Each child also saves what classify_live gave on
every sample window, and the outputs of the two checkouts are compared.

    python bench/live_cpu.py --against ../main          # about 2 minutes
Results: bench/results/live_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {"fition": "*.pcap", "wiar": "*.dat"}
RUN = 64


def windows(root: Path, name: str, pattern: str) -> Any:
    """Every sample window of bundle ``name`` (the child's code: Windows of its checkout)."""
    from csi_cloud.model.compression import CloudModel
    from csi_cloud.model.window import Windows, slot_rows
    from csi_edge import read_recording
    from csi_edge.bundle import EdgeEncoder
    from csi_edge.preprocess import Preprocessor

    edge = EdgeEncoder(root / "models" / name)
    cloud = CloudModel.load(root / "models" / name)
    n = cloud.net.cfg.context_segments
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("z_q", "profile", "present", "level")}
    paths = sorted((root / "datasets" / "samples" / name).rglob(pattern))
    for i, path in enumerate(paths):
        batch = Preprocessor(edge.spec).process(read_recording(path))
        if not len(batch):
            continue
        payload = edge.compress(batch.data, level=i % 4, first_seq=0, epoch=1, timestamp_ms=0)
        z_q, profile = cloud.decode_latent(cloud.decode_codes(payload)[1])
        slots = (batch.index - batch.index[0]).tolist()
        by_slot = {int(k): j for j, k in enumerate(slots)}
        rows = np.stack([slot_rows(by_slot, int(k), n) for k in slots])
        w = Windows.gather(rows, z_q, profile, i % 4)
        for key, values in parts.items():
            values.append(getattr(w, key))
    return cloud, Windows(*(np.concatenate(parts[k]) for k in ("z_q", "profile", "present",
                                                                 "level")))


def child(root: Path, reps: int, out: Path) -> None:
    """Measure this process's checkout (``root`` first on sys.path)."""
    from concurrent.futures import ThreadPoolExecutor

    from csi_cloud.model.context_head import profile_coefficients
    from csi_cloud.model.window import Windows

    result: dict[str, Any] = {}
    saved: dict[str, np.ndarray] = {}
    pool = ThreadPoolExecutor(1)  # the service classifies on its ingest thread
    for name, pattern in BUNDLES.items():
        cloud, every = windows(root, name, pattern)
        full = np.flatnonzero(every.present.all(axis=1))
        batches = {"full": np.resize(full, RUN), "recorded": np.arange(min(RUN, len(every)))}
        pool.submit(cloud.warm).result()
        for kind, rows in batches.items():
            w = Windows(every.z_q[rows], every.profile[rows], every.present[rows],
                        every.level[rows])

            def timed(fn: Any) -> float:
                fn()
                start = time.process_time()
                for _ in range(reps):
                    fn()
                return (time.process_time() - start) / reps * 1000

            head = cloud.net.context_head
            coeff = profile_coefficients(cloud.net, w.profile,
                                         transmitted=w.level < cloud.net.cfg.levels)
            result[f"{name}/{kind}"] = {
                "classify_live_ms": pool.submit(timed, lambda w=w, c=cloud: c.classify_live(w))
                .result(),
                # its parts: the full window (the network classifier where the bundle's
                # open-set score reads its features, the ROCKET head, the ridge layers) ...
                "full_window_only_ms": pool.submit(
                    timed, lambda w=w, c=cloud: c.classify(w, calibrated=False)).result(),
                # ... of which the ROCKET head (its transforms and ridge layers) ...
                "full_window_head_ms": pool.submit(
                    timed, lambda w=w, h=head, q=coeff: h.predict(w.z_q, q, w.present, w.level)
                ).result(),
                # ... and the shorter readings (1, 2, 4 slots: activity only)
                "shorter_readings_ms": pool.submit(
                    timed, lambda w=w, c=cloud: c.readings(w)).result(),
            }
        pred = pool.submit(cloud.classify_live, every).result()
        saved[f"{name}.activity"] = pred.activity
        assert pred.activity_raw is not None
        saved[f"{name}.activity_raw"] = pred.activity_raw
        if pred.identity is not None:
            saved[f"{name}.identity"] = pred.identity
        saved[f"{name}.unknown"] = pred.unknown
    np.savez(out.with_suffix(".npz"), **saved)
    out.write_text(json.dumps(result))


def commit_of(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", type=Path, required=True,
                        help="the other checkout (its csi_cloud, models and samples)")
    parser.add_argument("--label", default="", help="what the other checkout is")
    parser.add_argument("--against-commit", default="", help="its commit, when not a git "
                        "checkout (an exported tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20, help="calls per measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "live_cpu.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.root, args.reps, args.child)
        return
    roots = {"this": ROOT, "against": args.against.resolve()}
    measured: dict[str, list[dict[str, Any]]] = {k: [] for k in roots}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for key, root in roots.items():
                out = Path(tmp) / f"{key}-{r}.json"
                # The child imports the checkout's own packages: its root first on the path.
                loads.append(os.getloadavg()[0])
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--against", ".",
                                "--child", str(out), "--root", str(root),
                                "--reps", str(args.reps)], check=True, cwd=root,
                               env=dict(os.environ, PYTHONPATH=str(root)))
                measured[key].append(json.loads(out.read_text()))
                print(key, r, json.dumps(measured[key][-1]), flush=True)
        outputs = {k: np.load(Path(tmp) / f"{k}-0.npz") for k in roots}
        agreement = {}
        for name in outputs["this"].files:
            a, b = outputs["this"][name], outputs["against"][name]
            if name.endswith(".unknown"):
                agreement[name] = {"equal": bool(np.array_equal(a, b))}
                continue
            agreement[name] = {"windows": len(a),
                               "max_abs_difference": float(np.abs(a - b).max()),
                               "same_argmax": bool(np.array_equal(a.argmax(1), b.argmax(1)))}
    summary: dict[str, Any] = {}
    for case in measured["this"][0]:
        row: dict[str, Any] = {}
        for metric in measured["this"][0][case]:
            per = {k: [m[case][metric] for m in measured[k]] for k in roots}
            row[metric] = {"this_median": round(float(np.median(per["this"])), 2),
                           "against_median": round(float(np.median(per["against"])), 2),
                           "this_runs": [round(v, 2) for v in per["this"]],
                           "against_runs": [round(v, 2) for v in per["against"]]}
            row[metric]["ratio_this_to_against"] = round(
                row[metric]["this_median"] / row[metric]["against_median"], 3)
        summary[case] = row
    result = {
        "benchmark": f"CPU ms of CloudModel.classify_live per run of {RUN} windows (process "
                     "time, all threads), on the service's kind of thread; this checkout "
                     "against another, alternating child processes",
        "command": "python bench/live_cpu.py --against <checkout>",
        "this": commit_of(ROOT) + " (plus uncommitted changes, if any, at measurement)",
        "against": f"{args.against_commit or commit_of(roots['against'])} {args.label}".strip(),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1min_at_each_child": [round(v, 2) for v in loads]},
        "rounds": args.rounds,
        "reps": args.reps,
        "cases": summary,
        "outputs_on_every_sample_window": agreement,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(json.dumps(agreement, indent=1))


if __name__ == "__main__":
    main()
