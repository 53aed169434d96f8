"""Self-training on unlabelled recordings of the new setting, with and without its guard.

    python bench/self_training.py [--data ../shared/data] [--shots 5] [--draws 3] [--threads 1]
                                  [--bundles .cache/bench/bundles/fition]

`csi adapt` learns a new session or room from K labelled recordings per activity. A user's
room also gives unlabelled recordings (the live stream between calibrations). This bench asks
whether one round of self-training on them helps: fit the head on the support as
``csi adapt`` does (:func:`csi_cloud.model.adapt.adapt_head`), label each unlabelled
recording with the activity of highest mean log-probability over its windows (every rate
level's), add those recordings' windows with their pseudo-labels to the support, and fit
again from the parent (:mod:`csi_cloud.model.self_training`, what ``csi adapt --self-train``
and the service's adapt jobs run).

For every kept bundle of bench/model.py's Fition few-shot settings (``.cache/bench/bundles``:
run ``python bench/model.py --datasets fition --protocols few-shot --few-shot-settings
cross-session,cross-room --seeds 3 --source-anchors-shots "" --threads 1`` first: the 18
bundles behind bench/results/self_training.json), K = 5 labelled recordings per activity of
the new setting as the support (the draws of ``csi adapt``), the other recordings split at
random (seeded per draw) into an unlabelled pool and a test half. Every arm is scored on
the same test half, at level 0, per recording and per second: ``adapted`` (``csi adapt``
without self-training) and ``self_trained`` (one round on every pool recording, always
kept); ``self_trained_confident`` keeps the more confident half of the pool only;
``self_trained_guarded`` is ``csi adapt --self-train``: the round dropped where its guard
(a cross-validation on the support) reads the held-out support worse beyond chance
(``guard``: what it measured, and whether it kept it).
``pseudo_label_accuracy``: how many pool recordings got their true activity.

Results: bench/results/self_training.json (per bundle and draw, and the means per setting
and direction).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _report import environment  # noqa: E402

from csi_cloud.model.adapt import (  # noqa: E402
    _accuracy,
    adapt_head,
    head_windows,
    pick_support,
)
from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.heads import codes_from_segments  # noqa: E402
from csi_cloud.model.pipeline import prepare  # noqa: E402
from csi_cloud.model.self_training import (  # noqa: E402
    PseudoLabels,
    pseudo_labels,
    refit_with_pseudo_labels,
    self_train,
)
from csi_edge.bundle import EdgeEncoder  # noqa: E402

BUNDLES = ROOT / ".cache" / "bench" / "bundles" / "fition"
ARMS = ("adapted", "self_trained", "self_trained_confident", "self_trained_guarded")


def measure(folder: Path, data: Any, shots: int, draws: int) -> dict[str, Any]:
    split = json.loads((folder / "split.json").read_text())
    model, edge = CloudModel.load(folder), EdgeEncoder(folder)
    codes = codes_from_segments(model, edge, data)
    target = np.asarray(split["test"], dtype=np.int64)
    windows = head_windows(model.net, codes, target)
    rows = []
    for draw in range(draws):
        support, query = pick_support(codes, target, shots, draw)
        order = np.random.default_rng(100 + draw).permutation(query)
        pool, test = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
        adapted = adapt_head(model.net, codes, support, windows=windows)
        pseudo = pseudo_labels(adapted, windows, pool)
        recs, labels = pseudo.recordings, pseudo.labels
        confident = pseudo.confidence >= np.median(pseudo.confidence)
        guarded = self_train(model.net, adapted, codes, support, pool, windows=windows,
                             seed=draw)
        nets = {"adapted": adapted,
                "self_trained": refit_with_pseudo_labels(model.net, codes, support, pseudo,
                                                         windows=windows),
                "self_trained_confident": refit_with_pseudo_labels(
                    model.net, codes, support,
                    PseudoLabels(recs[confident], labels[confident],
                                 pseudo.confidence[confident]), windows=windows),
                "self_trained_guarded": guarded.net}
        row: dict[str, Any] = {
            "draw": draw, "support": len(support), "pool": len(pool), "test": len(test),
            "pseudo_label_accuracy": round(float((labels == codes.activity[recs]).mean()), 4),
            "pseudo_label_accuracy_confident": round(float(
                (labels[confident] == codes.activity[recs[confident]]).mean()), 4),
            "guard": guarded.as_dict()}
        for arm, net in nets.items():
            row[arm] = {"activity_accuracy": _accuracy(net, codes, test, windows=windows)[0],
                        "activity_accuracy_per_second": _accuracy(
                            net, codes, test, every=True, windows=windows)[0]}
        rows.append(row)
    return {"bundle": folder.name, "protocol": split["protocol"], "task": split["task"],
            "seed": split["seed"], "draws": rows}


def _means(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    draws = [d for t in tasks for d in t["draws"]]
    out: dict[str, Any] = {"runs": len(tasks), "draws": len(draws),
                           "pseudo_label_accuracy": round(float(np.mean(
                               [d["pseudo_label_accuracy"] for d in draws])), 4)}
    for arm in ARMS:
        out[arm] = {key: round(float(np.mean([d[arm][key] for d in draws])), 4)
                    for key in ("activity_accuracy", "activity_accuracy_per_second")}
    for arm in ARMS[1:]:
        out[f"{arm}_gain_points"] = round(100 * (out[arm]["activity_accuracy"]
                                                 - out["adapted"]["activity_accuracy"]), 1)
    out["guard_kept"] = sum(bool(d["guard"]["kept"]) for d in draws)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bundles", type=Path, default=BUNDLES,
                        help="the kept Fition bundles of bench/model.py [%(default)s]")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "self_training.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = [m.parent for m in sorted(args.bundles.glob("*/bundle.json"))
            if json.loads((m.parent / "split.json").read_text())["protocol"]
            in ("cross-session", "cross-room")]
    if not kept:
        raise SystemExit(f"no kept few-shot bundles in {args.bundles}: run bench/model.py "
                         "--datasets fition --protocols few-shot first")
    started = time.perf_counter()
    data, *_ = prepare("fition", args.data / "fition")
    report: dict[str, Any] = {"benchmark": "self_training",
                              "command": "python bench/self_training.py "
                                         + " ".join(sys.argv[1:] if argv is None else argv),
                              "environment": environment(), "shots": args.shots,
                              "draws": args.draws, "tasks": []}
    for folder in kept:
        report["tasks"].append(measure(folder, data, args.shots, args.draws))
        tasks = report["tasks"]
        report["means"] = {
            "directions": {name: _means([t for t in tasks if t["task"] == name])
                           for name in dict.fromkeys(t["task"] for t in tasks)},
            "settings": {name: _means([t for t in tasks if t["protocol"] == name])
                         for name in dict.fromkeys(t["protocol"] for t in tasks)}}
        report["seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        last = report["means"]["directions"][tasks[-1]["task"]]
        print(folder.name, json.dumps({a: last[a]["activity_accuracy"] for a in ARMS}),
              flush=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
