"""What the identity neighbours add: the same bundles scored with and without them.

    python bench/model.py --datasets fition --protocols random --anchor-fits last \\
        --threads 2 --level0 0,16 --no-reuse \\
        --out bench/results/model_identity_neighbours.json
    python bench/identity_neighbours.py [--data ../shared/data] [--out FILE]

The first command trains ours on Fition's 5 folds (split by recording) with the anchors beside
it, and keeps each fold's bundle (``.cache/bench/bundles/fition/random-*``). This script
scores each kept bundle on its fold's test recordings twice, as bench/model.py scores it
(csi_cloud.model.evaluate.evaluate_bundle: the last window of each recording, and every
window the service would classify): as trained, and with every level's identity neighbours
removed (csi_cloud.model.neighbours; the ridge layer alone, what heads were before them).
Nothing else differs: the same network, codes, features and ridge layers, on the same
machine. It also says which ``k`` and weight each level's validation windows chose.

Results: ``bench/results/identity_neighbours.json`` (about 3 minutes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _kept import kept_folds, save_folds  # noqa: E402

from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402


def _identity(summary: dict[str, Any]) -> dict[str, Any]:
    return {"per_recording": [round(lv["identity_accuracy"], 4) for lv in summary["levels"]],
            "per_second": [round(lv["identity_accuracy_per_second"], 4)
                           for lv in summary["levels"]],
            "unquantized": round(summary["unquantized"]["identity_accuracy"], 4),
            "activity": [round(lv["activity_accuracy"], 4) for lv in summary["levels"]]}


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args, kept, data = kept_folds(__doc__, "identity_neighbours.json", argv)
    folds: list[dict[str, Any]] = []
    for folder, parts in kept:
        test = parts["test"]
        model, edge = CloudModel.load(folder), EdgeEncoder(folder)
        head = model.net.context_head
        if head is None:
            raise SystemExit(f"{folder} has no context head")
        chosen = [None if lv.neighbours is None else
                  {"k": lv.neighbours.k, "weight": lv.neighbours.weight} for lv in head.levels]
        if head.levels[0].identity is None:
            raise SystemExit(f"{folder} has no identity layer: run bench/model.py as this "
                             "script's help says (--no-reuse)")
        with_nn = _identity(evaluate_bundle(model, edge, data, test).summary)
        for lv in head.levels:
            lv.neighbours = None
        without = _identity(evaluate_bundle(model, edge, data, test).summary)
        if without["activity"] != with_nn["activity"]:
            raise SystemExit("the activity moved with the identity neighbours")
        folds.append({"bundle": folder.name, "test_recordings": len(test),
                      "neighbours": chosen, "with": with_nn, "without": without})
        print(f"{folder.name}: level 0 identity {without['per_recording'][0]:.3f} -> "
              f"{with_nn['per_recording'][0]:.3f}", flush=True)

    def mean(key: str, part: str) -> list[float] | float:
        values = np.mean([f[key][part] for f in folds], axis=0)
        return np.round(values, 4).tolist()  # type: ignore[no-any-return]

    save_folds("identity_neighbours.py", args, folds,
               {key: {part: mean(key, part) for part in ("per_recording", "per_second",
                                                          "unquantized")}
                for key in ("with", "without")}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
