"""The fold bundles ``bench/model.py`` keeps, for the benches that measure one change of the
context head on them (bench/identity_neighbours.py, bench/exact_inputs.py).

    python bench/model.py --datasets fition --protocols random --anchor-fits last \\
        --threads 2 --level0 0,16 --no-reuse --out bench/results/model_identity_neighbours.json

(``--no-reuse``: bundles kept by an earlier version are trained again) keeps the 5 bundles of
Fition's random protocol under ``.cache/bench/bundles/fition``, each with its ``split.json``
(training, validation and test recordings).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from _report import save_results  # bench/_report.py, beside this module

from csi_cloud.model.data import SegmentData
from csi_cloud.model.pipeline import prepare

ROOT = Path(__file__).resolve().parents[1]
KEPT = ROOT / ".cache" / "bench" / "bundles" / "fition"
Fold = tuple[Path, dict[str, np.ndarray]]  # bundle folder, recordings of each part


def kept_folds(doc: str, out: str, argv: list[str] | None
               ) -> tuple[argparse.Namespace, list[Fold], SegmentData]:
    """Parse a bench's ``--data``, ``--bundles`` and ``--out`` (default
    ``bench/results/<out>``), find the kept fold bundles (a clear error without them) and load
    Fition's recordings. Returns the arguments, each fold and the recordings."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--bundles", type=Path, default=KEPT,
                        help="kept bench/model.py bundles of Fition's random folds")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / out)
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.bundles.glob("random-*") if (p / "split.json").is_file())
    if not folders:
        parser.error(f"no kept bundles in {args.bundles}: run bench/model.py first "
                     "(see this script's help)")
    folds: list[Fold] = []
    for folder in folders:
        split: dict[str, Any] = json.loads((folder / "split.json").read_text())
        folds.append((folder, {k: np.array(split[k], np.int64)
                               for k in ("train", "val", "test")}))
    data, _, _, _ = prepare("fition", args.data / "fition")
    return args, folds, data


def save_folds(script: str, args: argparse.Namespace, folds: list[dict[str, Any]],
               mean: dict[str, Any], started: float) -> None:
    """Write a fold bench's results (``args.out``: the command, the bundles read, each fold
    and the means over them, the seconds it took) and print the means."""
    report = {"command": f"python bench/{script}", "bundles": str(args.bundles),
              "folds": folds, "mean": mean, "seconds": round(time.perf_counter() - started, 1)}
    save_results(report, args.out, None)
    print(json.dumps(mean))
