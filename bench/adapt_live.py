"""What an adapted bundle's live output shows in the new setting: per-second accuracy as the
service gives it while the held-out recordings stream, before and after ``csi adapt``.

    python bench/adapt_live.py [--data ../shared/data] [--settings cross-session,cross-room]
                               [--draws 3] [--orders 3] [--levels 0]

The bundles are the ones ``bench/model.py`` trains for its few-shot settings and keeps in
``.cache/bench/bundles/fition`` (run it first, e.g. ``python bench/model.py --datasets fition
--protocols few-shot --few-shot-settings cross-session --shots 5 --draws 3
--source-anchors-shots "" --threads 2``, and the same with ``cross-room``). Those are
trained without the live-output calibration, so each is first calibrated on its own
validation recordings, as ``csi train`` calibrates a bundle (csi_cloud.model.trust
.calibrate_folder). Then, for each support draw of K = 5 recordings per activity of the new
setting (csi_cloud.model.adapt.pick_support, the few-shot protocol's draws), the held-out
recordings are streamed through each variant:

- ``before``: the parent bundle as it is;
- ``adapted, full window only``: the head refitted on the support, the short-reading layer
  dropped and the live-output calibration dropped (``csi adapt`` before this bench): the live
  output reads the full window alone, with the default filter;
- ``adapted, parent's live settings``: the same head, the parent's calibration carried over
  (the adapted full-window layer reads the shorter readings);
- ``adapted (csi adapt)``: what ``csi adapt`` does now: the short-reading layer refitted on
  the support's shorter readings too, and the parent's live settings carried over
  (csi_cloud.model.adapt_job.adapted_calibration).

Scores, per rate level of ``--levels`` (every byte through the real codes, as bench/trust.py
streams them): **live** smoothed per-second accuracy (the held-out recordings end to end on
one AP, ``--orders`` random orders, the context and the filter running across every change),
**separate** smoothed per-second accuracy (each recording its own stream) and
**per recording** (the full window ending at each recording's last segment, the few-shot
protocol's figure). Results: ``bench/results/adapt_live.json`` (about 3 minutes for the six
tasks).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import save_results  # noqa: E402
from trust import shared_data  # noqa: E402  (bench/trust.py, beside this script)

from csi_cloud.model.adapt import adapt_head, pick_support  # noqa: E402
from csi_cloud.model.adapt_job import adapted_calibration  # noqa: E402
from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.heads import codes_from_segments, save_derived  # noqa: E402
from csi_cloud.model.trust import calibrate_folder, live_streams  # noqa: E402
from csi_cloud.smoothing import TrustParams, filter_stream  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402

KEPT = ROOT / ".cache" / "bench" / "bundles" / "fition"
SHOTS = 5
VARIANTS = ("before", "adapted, full window only", "adapted, parent's live settings",
            "adapted (csi adapt)")


def _scores(folder: Path, edge: EdgeEncoder, data: Any, query: np.ndarray, levels: list[int],
            orders: int) -> dict[str, list[float]]:
    """Per level of ``levels``: live and separate smoothed per-second accuracy and the
    per-recording accuracy of the bundle in ``folder`` on the ``query`` recordings."""
    model = CloudModel.load(folder)
    params = TrustParams.from_calibration(model.manifest.calibration)
    live = np.zeros((orders, len(levels)))
    for order in range(orders):
        for i, ls in enumerate(live_streams(model, edge, data, query, "joined", seed=order,
                                            levels=levels)):
            belief = filter_stream(ls.live(model.lengths), params.stay, ls.starts)
            live[order, i] = float((belief.argmax(1) == ls.labels).mean())
    separate, per_recording = [], []
    for ls in live_streams(model, edge, data, query, "separate", levels=levels):
        belief = filter_stream(ls.live(model.lengths), params.stay, ls.starts)
        separate.append(float((belief.argmax(1) == ls.labels).mean()))
        last = np.r_[ls.starts[1:], True]
        per_recording.append(float((ls.p_raw[last].argmax(1) == ls.labels[last]).mean()))
    return {"live_smoothed": live.mean(0).tolist(), "separate_smoothed": separate,
            "per_recording": per_recording}


def bench_task(kept: Path, data: Any, draws: int, orders: int, levels: list[int],
               work: Path) -> dict[str, Any]:
    split = json.loads((kept / "split.json").read_text())
    target = np.asarray(split["test"])
    parent = work / "parent"
    shutil.copytree(kept, parent)
    calibrate_folder(parent, data, np.asarray(split["val"]),
                     fitted_on=f"the task's {len(split['val'])} validation recordings")
    model, edge = CloudModel.load(parent), EdgeEncoder(parent)
    calibration = model.manifest.calibration
    lengths = [int(k) for k in model.manifest.training["options"]["head_lengths"]]
    codes = codes_from_segments(model, edge, data)
    runs: dict[str, list[dict[str, list[float]]]] = {v: [] for v in VARIANTS}
    for draw in range(draws):
        support, query = pick_support(codes, target, SHOTS, draw)
        refit = adapt_head(model.net, codes, support)
        nets = {"before": (model.net, calibration),
                "adapted, full window only": (refit, adapted_calibration(calibration,
                                                                         head=False)),
                "adapted, parent's live settings": (refit, calibration),
                "adapted (csi adapt)": (adapt_head(model.net, codes, support,
                                                   short_lengths=lengths),
                                        adapted_calibration(calibration, head=True))}
        for variant, (net, cal) in nets.items():
            folder = work / f"derived-{draw}-{VARIANTS.index(variant)}"
            save_derived(parent, folder, net, name="adapted", calibration=cal)
            runs[variant].append(_scores(folder, edge, data, query, levels, orders))
            shutil.rmtree(folder)
    activity = calibration["activity"]
    return {"target_recordings": len(target), "support_draws": draws,
            "parent_live_settings": {"contexts": activity["contexts"],
                                     "stay": activity["stay"]},
            "variants": {v: {key: [round(float(x), 4) for x in
                                   np.mean([r[key] for r in rows], axis=0)]
                             for key in rows[0]} for v, rows in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--settings", default="cross-session,cross-room")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--orders", type=int, default=3, help="orders of the live streams")
    parser.add_argument("--levels", default="0")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "adapt_live.json")
    args = parser.parse_args()
    import model as bench_model  # bench/model.py: the same recordings, in the same order
    import torch

    torch.set_num_threads(1)
    levels = [int(x) for x in args.levels.split(",") if x]
    started = time.perf_counter()
    data, *_ = bench_model.prepare("fition", args.data / "fition")
    report: dict[str, Any] = {"command": "python bench/adapt_live.py", "machine":
                              platform.node(), "shots": SHOTS, "levels": levels,
                              "orders": args.orders, "tasks": {}}
    for setting in [s for s in args.settings.split(",") if s]:
        kept = sorted(KEPT.glob(f"{setting}-*-0"))
        if not kept:
            raise SystemExit(f"no kept {setting} bundles in {KEPT}: run bench/model.py's "
                             f"few-shot {setting} setting first (see this script's doc)")
        for folder in kept:
            with tempfile.TemporaryDirectory() as tmp:
                task = bench_task(folder, data, args.draws, args.orders, levels, Path(tmp))
            report["tasks"][folder.name] = {"setting": setting, **task}
            row = task["variants"]
            print(f"{folder.name}: live smoothed, level {levels[0]}: " + ", ".join(
                f"{v} {row[v]['live_smoothed'][0]:.3f}" for v in VARIANTS), flush=True)
    report["mean"] = {setting: {v: {key: [round(float(x), 4) for x in np.mean(
        [t["variants"][v][key] for t in report["tasks"].values() if t["setting"] == setting],
        axis=0)] for key in ("live_smoothed", "separate_smoothed", "per_recording")}
        for v in VARIANTS} for setting in {t["setting"] for t in report["tasks"].values()}}
    report["seconds"] = round(time.perf_counter() - started, 1)
    save_results(report, args.out, None)


if __name__ == "__main__":
    main()
