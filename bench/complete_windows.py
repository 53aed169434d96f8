"""The complete-window activity layer, measured paired: the same networks, the head fitted
without and with it.

    python bench/complete_windows.py [--datasets wiar,fition] [--data ../shared/data]

For every kept bundle of bench/model.py's random k-fold (``.cache/bench/bundles``, run it
first), the context head is fitted again on a copy, twice, exactly as ``csi train`` fits it
(csi_cloud.model.fitting.fit_bundle_head: the fold's training and validation recordings, the
bundle's seed, features and short-reading lengths): once without the complete-window layer
(``TrainOptions.head_complete`` False, the head before this option) and once with it. Both
are scored on the fold's test recordings through the real payloads
(csi_cloud.model.evaluate.evaluate_bundle): each level's activity (and identity) per
recording and per second (every window the service classifies, most with part of their
context on recordings of about the context's length), and the unquantized path's. The
network, the edge encoder and every byte on the wire are the same in
both arms, so the difference is the layer's alone.

Few-shot, in both arms (csi_cloud.model.fewshot.few_shot, as bench/model.py scores ours): 5
labelled recordings per activity of the bundle's test recordings as the support, the rest as
the query, 3 draws; before adaptation, after ``csi adapt``'s refit towards the parent, and
refitted on the support alone. On WiAR's folds that is the learning curve's K = 5; on the
kept bundles of Fition's cross-session and cross-room settings (bench/model.py
``--protocols few-shot``), the new session or room (their bundles are scored for few-shot
alone: before adaptation they read another setting).

Results: bench/results/complete_windows.json (per fold, the means, and each figure's paired
difference).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _report import environment  # noqa: E402

from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle  # noqa: E402
from csi_cloud.model.fewshot import few_shot  # noqa: E402
from csi_cloud.model.fitting import fit_bundle_head  # noqa: E402
from csi_cloud.model.pipeline import prepare  # noqa: E402
from csi_edge.bundle import Bundle, EdgeEncoder  # noqa: E402

BUNDLES = ROOT / ".cache" / "bench" / "bundles"
DATA = {"fition": "fition", "wiar": "wiar/height_90"}
ARMS = ("without", "with")
# The live reading and its smoothed label are left out: the kept bundles are not calibrated
# (bench/model.py fits them without), so they would be the full window at temperature 1
# (bench/trust.py measures the live output of the shipped bundles).
KEYS = ("activity_accuracy", "activity_accuracy_per_second", "identity_accuracy",
        "identity_accuracy_per_second")


def _figures(summary: dict[str, Any]) -> dict[str, float]:
    """Level -> figure -> value, flattened as ``"<level>.<key>"`` (the unquantized path's
    as ``"unquantized.<key>"``)."""
    out: dict[str, float] = {}
    for lv in summary["levels"]:
        out |= {f"{lv['level']}.{k}": float(lv[k]) for k in KEYS if lv.get(k) is not None}
    unq = summary["unquantized"]
    out |= {f"unquantized.{k}": float(unq[k]) for k in KEYS if unq.get(k) is not None}
    return out


def _few_shot_figures(result: dict[str, Any]) -> dict[str, float]:
    """few_shot's K = 5 means, flattened as ``"few_shot.<method>.<level>.<key>"``."""
    out: dict[str, float] = {}
    for method in ("ours_before", "ours_adapted", "ours_support_only"):
        for key, value in result["5"].get(method, {}).items():
            if key.startswith("level") and "accuracy" in key:
                level, figure = key[len("level"):].split("_", 1)
                out[f"few_shot.{method}.{level}.{figure}"] = float(value["mean"])
    return out


def measure(folder: Path, data: Any, dataset: str, *, evaluate: bool = True
            ) -> dict[str, Any]:
    split = json.loads((folder / "split.json").read_text())
    train, val, test = (np.array(split[k]) for k in ("train", "val", "test"))
    options = Bundle.load(folder).manifest.training["options"]
    n = int(Bundle.load(folder).manifest.model["context_segments"])
    protocol = split["protocol"]
    # Bundles of another level-0 layout or profile blocks are measured apart.
    layout = "".join(f" {k} {split[k]}" for k in ("level0", "profile_blocks", "head_complete")
                     if split.get(k))
    row: dict[str, Any] = {"protocol": protocol + layout, "task": split["task"],
                           "seed": split["seed"], "test_recordings": len(test)}
    for arm in ARMS:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / folder.name
            shutil.copytree(folder, copy)
            t0 = time.perf_counter()
            fit_bundle_head(copy, data, train, val, features=int(options["head_features"]),
                            seed=int(options["seed"]),
                            lengths=[k for k in options.get("head_lengths", []) if k < n],
                            complete=arm == "with")
            seconds = time.perf_counter() - t0
            bundle = Bundle.load(copy)
            model = CloudModel.load(bundle)
            assert model.net.context_head is not None
            layers = [part.complete is not None for part in model.net.context_head.levels]
            edge = EdgeEncoder(bundle)
            figures = (_figures(evaluate_bundle(model, edge, data, test,
                                                dataset=dataset).summary)
                       if protocol == "random" and evaluate else {})
            if protocol != "random" or dataset == "wiar":
                figures |= _few_shot_figures(few_shot(model, edge, data, test, [5], 3))
        row[arm] = {"figures": figures, "head_seconds": round(seconds, 1),
                    "complete_layers": layers}
    return row


def _means(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    keys = sorted(set.intersection(*(set(r[a]["figures"]) for r in rows for a in ARMS)))
    out: dict[str, Any] = {}
    for key in keys:
        values = {a: np.array([r[a]["figures"][key] for r in rows]) for a in ARMS}
        diff = values["with"] - values["without"]
        out[key] = {"without": round(float(values["without"].mean()), 4),
                    "with": round(float(values["with"].mean()), 4),
                    "difference_points": round(100 * float(diff.mean()), 2),
                    "folds_up_same_down": [int((diff > 0).sum()), int((diff == 0).sum()),
                                           int((diff < 0).sum())]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="wiar,fition")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--few-shot-only", action="store_true",
                        help="only the few-shot figures (no k-fold evaluation)")
    parser.add_argument("--protocols", default="random,cross-session,cross-room",
                        help="the kept bundles of these protocols (comma-separated)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "complete_windows.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "complete_windows",
                              "command": "python bench/complete_windows.py "
                                         + " ".join(sys.argv[1:] if argv is None else argv),
                              "environment": environment(), "datasets": {}}
    for name in args.datasets.split(","):
        kept = [m.parent for m in sorted((BUNDLES / name).glob("*/bundle.json"))
                if json.loads((m.parent / "split.json").read_text())["protocol"]
                in args.protocols.split(",")]
        if not kept:
            raise SystemExit(f"no kept bundles in {BUNDLES / name}: run bench/model.py "
                             f"--datasets {name} first")
        data, *_ = prepare(name, args.data / DATA[name])
        rows = []
        for folder in kept:
            rows.append(measure(folder, data, name, evaluate=not args.few_shot_only))
            print(name, rows[-1]["task"], json.dumps(
                {a: {k: v for k, v in rows[-1][a]["figures"].items() if k.startswith("0.")}
                 for a in ARMS}), flush=True)
            report["datasets"][name] = {
                "bundles": [str(f.relative_to(ROOT)) for f in kept], "tasks": rows,
                "means": {protocol: _means([r for r in rows if r["protocol"] == protocol])
                          for protocol in dict.fromkeys(r["protocol"] for r in rows)}}
            report["seconds"] = round(time.perf_counter() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
