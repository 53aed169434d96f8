"""Does fitting the context head's activity layers on truncated windows help the live output?

    python bench/head_lengths.py [--data ../shared/data] [--bundles fition,wiar]
                                 [--lengths 1,2,4] [--seeds 3] [--out FILE] [--write]

The live output (csi_cloud.model.lengths) reads each window at the bundle's context lengths,
the older slots masked as missing, and gives the most confident reading. The committed heads'
activity layers were fitted on full windows (and the partial ones at the start of a
recording). Here each shipped bundle's head is refitted twice on a copy, on the same
training windows, seed and features as the bundle (csi_cloud.model.fitting.fit_bundle_head;
the network, edge encoder, quantizer and entropy tables are untouched, so every code and
byte is the same): once as it was (``refit``: shows the refit reproduces the committed
head), once also on copies of each window truncated to each of ``--lengths``
(``truncated``: a short-reading activity layer, csi_cloud.model.context_head.fit_level's
``lengths``); ``--variants per_length`` adds a head with a layer for each length instead
(fit_level's ``per_length``), ``--variants joined`` one whose layer truncates windows of the
training recordings streamed end to end, so that a window in a recording's first seconds
holds the end of the previous one, as in the joined streams the live figures are scored
on (fit_bundle_head's ``short_joined``). Each copy is then
recalibrated on the validation recordings exactly as ``csi calibrate`` does (temperatures,
context lengths, ``stay``, threshold), and scored with bench/trust.py's code on the
**validation** recordings (which chose the calibration: the figures the choice may use)
and on the **test** recordings (which choose nothing).

Per level: per-recording accuracy (full window, the target's base), live raw (full window
alone / live output), live smoothed, and each shorter reading's live accuracy at level 1.

``--write``: copy the ``truncated`` head and its calibration into ``models/NAME`` (cloud.npz
and bundle.json; the bundle id changes); then ``python bench/trust.py`` renders the reports.

Results: ``bench/results/head_lengths.json``.
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
sys.path.insert(0, str(ROOT / "bench"))

from trust import BUNDLES, bench_bundle, shared_data  # noqa: E402

from csi_cloud.datasets import index_dataset, random_split  # noqa: E402
from csi_cloud.model.data import SegmentData, load_segments  # noqa: E402
from csi_cloud.model.fitting import fit_bundle_head  # noqa: E402
from csi_cloud.model.trust import calibrate_folder  # noqa: E402
from csi_edge.bundle import Bundle  # noqa: E402


def load_split(folder: Path, dataset: str, data_dir: Path
               ) -> tuple[SegmentData, dict[str, np.ndarray]]:
    """Every recording of the bundle's split (rebuilt from its manifest, as
    csi_cloud.model.trust.split_recordings does) and the indices of each part."""
    manifest = Bundle.load(folder).manifest
    training = manifest.training
    test_frac = float(str(training["split"]).rsplit("test ", 1)[1])
    val_frac = float(str(training["split"]).split("val ", 1)[1].split(",")[0])
    split = random_split(list(index_dataset(dataset, data_dir)), seed=int(training["seed"]),
                         val=val_frac, test=test_frac)
    counts = {p: len(getattr(split, p)) for p in ("train", "val", "test")}
    if counts != {p: training.get(p) for p in counts}:
        raise ValueError(f"{data_dir} splits into {counts}, not the bundle's split")
    labels = manifest.labels
    data = load_segments([*split.train, *split.val, *split.test], manifest.input_spec,
                         list(labels["activity"] or []), list(labels["identity"] or []))
    position = {id(e): i for i, e in enumerate(data.examples)}
    parts = {p: np.array([position[id(e)] for e in getattr(split, p) if id(e) in position],
                         np.int64) for p in ("train", "val", "test")}
    if {p: len(v) for p, v in parts.items()} != counts:
        raise ValueError("a recording of the split did not load")
    return data, parts


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures compared here, of one bench/trust.py entry."""
    cal = result["calibration"]
    return {
        "bundle": result["bundle"],
        "contexts": result["contexts"], "stay": result["stay"],
        "threshold": result["threshold"],
        "calibration_contexts_accuracy": cal.get("contexts_accuracy"),
        "reading_accuracy_level1": result["live_context_sweep_level1"],
        "levels": [{
            "level": lv["level"],
            "per_recording": lv["per_recording_accuracy"],
            "per_recording_live": lv["per_recording_accuracy_live"],
            "live_raw_full": lv["live"]["full_context_raw_accuracy"],
            "live_raw": lv["live"]["raw_accuracy"],
            "live_smoothed": lv["live"]["smoothed_accuracy"],
            "separate_raw": lv["separate"]["raw_accuracy"],
            "separate_smoothed": lv["separate"]["smoothed_accuracy"],
            "margin": lv["target"]["margin"], "met": lv["target"]["met"],
        } for lv in result["levels"]],
    }


def bench(name: str, data_root: Path, lengths: tuple[int, ...], seeds: int,
          write: bool, variants: list[str], short_per_recording: int | None = None
          ) -> dict[str, Any]:
    dataset, sub = BUNDLES[name]
    folder = ROOT / "models" / name
    manifest = Bundle.load(folder).manifest
    options = manifest.training["options"]
    calibration = manifest.calibration["activity"]
    t0 = time.perf_counter()
    data, parts = load_split(folder, dataset, data_root / sub)
    out: dict[str, Any] = {"load_seconds": round(time.perf_counter() - t0, 1),
                           "lengths": list(lengths), "short_per_recording": short_per_recording,
                           "variants": {}}
    print(f"{name}: loaded {len(data)} recordings in {out['load_seconds']} s", flush=True)

    def scored(variant: str, copy: Path) -> None:
        entry: dict[str, Any] = {}
        for part in ("val", "test"):
            result = bench_bundle(name, dataset, data_root / sub, seeds, folder=copy,
                                  loaded=(data, parts[part], f"{len(parts[part])} {part} "
                                                             "recordings"))
            entry[part] = summary(result)
            for lv in entry[part]["levels"]:
                print(f"{name} {variant} {part} level {lv['level']}: per recording "
                      f"{lv['per_recording']:.3f}, live raw {lv['live_raw_full']:.3f} / "
                      f"{lv['live_raw']:.3f}, smoothed {lv['live_smoothed']:.3f} "
                      f"({lv['margin']:+.3f})", flush=True)
        out["variants"][variant] = entry

    if "committed" in variants:
        scored("committed", folder)
    with tempfile.TemporaryDirectory() as tmp:
        for variant, fit_lengths in (("refit", ()), ("truncated", lengths),
                                     ("per_length", lengths), ("joined", lengths)):
            if variant not in variants:
                continue
            copy = Path(tmp) / variant / name
            shutil.copytree(folder, copy)
            t0 = time.perf_counter()
            fit_bundle_head(copy, data, parts["train"], parts["val"],
                            features=int(options["head_features"]), seed=int(options["seed"]),
                            lengths=fit_lengths, per_length=variant == "per_length",
                            short_per_recording=short_per_recording,
                            short_joined=variant == "joined",
                            complete=bool(options.get("head_complete")))
            calibrate_folder(copy, data, parts["val"], fitted_on=calibration["fitted_on"],
                             target=float(calibration["target_accuracy"]))
            print(f"{name} {variant}: head fitted and calibrated in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            scored(variant, copy)
            if variant == "truncated" and write:
                for file in ("cloud.npz", "bundle.json"):
                    shutil.copy2(copy / file, folder / file)
                out["written"] = str(folder.relative_to(ROOT))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data())
    parser.add_argument("--bundles", default="fition,wiar")
    parser.add_argument("--lengths", default="1,2,4",
                        help="the shorter readings the truncated head is also fitted on")
    parser.add_argument("--seeds", type=int, default=3, help="orders of the live streams")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "head_lengths.json")
    parser.add_argument("--variants", default="committed,refit,truncated",
                        help="which of committed, refit, truncated, per_length, joined to "
                             "score (per_length: a layer for each length, fit_level's "
                             "per_length; joined: the layer fitted on windows of the "
                             "recordings streamed end to end)")
    parser.add_argument("--short-per-recording", type=int, default=None,
                        help="windows per training recording the short-reading layer "
                             "truncates (default: the full window layer's 5)")
    parser.add_argument("--write", action="store_true",
                        help="copy the truncated head and its calibration into models/NAME")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    lengths = tuple(int(k) for k in args.lengths.split(",") if k)
    report: dict[str, Any] = {"command": "python bench/head_lengths.py " + " ".join(sys.argv[1:]),
                              "machine": platform.node(), "bundles": {}}
    started = time.perf_counter()
    for name in [b for b in args.bundles.split(",") if b]:
        report["bundles"][name] = bench(name, args.data, lengths, args.seeds, args.write,
                                       args.variants.split(","), args.short_per_recording)
        report["seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
