"""What compression costs against our own uncompressed path, per rate level, with intervals.

    python bench/compression_cost.py [--datasets fition,wiar] [--refit-seeds 2]

For each shipped bundle (models/<name>), on the recordings of its own split it was not fitted
on: every level through the real wire payloads (``evaluate_bundle``: int8 edge encoder, every
byte counted) against the unquantized path on the same windows, per recording (the window
ending at the last segment) and per second (every prediction the service makes). The cost is
paired and its 95% interval resamples recordings (csi_cloud.model.evaluate.paired_cost).

- ``test``: the held-out test recordings (what report.md's table reads);
- ``val``: the validation recordings (the network's early stopping and the heads' ridge
  penalty and temperature were chosen on them, equally for every level and the unquantized
  path: a second look, not a clean one);
- with ``--update-bundle``: the test evaluation becomes the bundle's ``metrics.test_split``
  (bundle.json, through ``write_manifest``; metrics are not part of the id) and report.md's
  test table is rendered again from it (the figures measured at training time move by a
  recording or two per level when the evaluation code changes: the last window is one draw);
- ``refit``: the context head refitted on the bundle's training recordings with other seeds
  (``fit_bundle_head`` on a copy: new random features and training windows, same network),
  scored on the test recordings: how much of a level's cost is the draw of its head.

Results: bench/results/compression_cost.json, and a section in each bundle's report.md.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _report import put_section  # noqa: E402

from csi_cloud.datasets import index_dataset, random_split  # noqa: E402
from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.data import load_segments  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle  # noqa: E402
from csi_cloud.model.fitting import fit_bundle_head  # noqa: E402
from csi_cloud.model.report import METRIC_KEYS, _table  # noqa: E402
from csi_cloud.model.trust import split_recordings  # noqa: E402
from csi_edge.bundle import Bundle, EdgeEncoder, write_manifest  # noqa: E402

DATA = {"fition": "fition", "wiar": "wiar/height_90"}
BEGIN, END = "<!-- compression-cost:begin -->", "<!-- compression-cost:end -->"
COST_KEYS = ["activity_cost_points", "activity_cost_ci95", "activity_cost_points_per_second",
             "activity_cost_per_second_ci95", "identity_cost_points", "identity_cost_ci95",
             "identity_cost_points_per_second", "identity_cost_per_second_ci95"]


def _row(summary: dict[str, Any]) -> dict[str, Any]:
    unq = summary["unquantized"]
    return {"recordings": summary["examples"],
            "unquantized": {k: unq[k] for k in unq if "accuracy" in k},
            "levels": [{k: v for k, v in lv.items()
                        if k == "level" or k == "payload_bytes_per_s" or "accuracy" in k
                        or k in COST_KEYS} for lv in summary["levels"]]}


def _evaluate(folder: Path, data: Any, dataset: str, update: bool) -> dict[str, Any]:
    bundle = Bundle.load(folder)
    summary = evaluate_bundle(CloudModel.load(bundle), EdgeEncoder(bundle), data,
                              np.arange(len(data)), dataset=dataset).summary
    if update:
        manifest = bundle.manifest.model_copy(
            update={"metrics": {**bundle.manifest.metrics, "test_split": summary}})
        write_manifest(folder, manifest)
        _put_table(folder / "report.md", summary)
    return _row(summary)


def _put_table(path: Path, summary: dict[str, Any]) -> None:
    """Replace report.md's test table (the first table with METRIC_KEYS' header)."""
    lines = path.read_text().split("\n")
    header = "| " + " | ".join(METRIC_KEYS) + " |"
    start = lines.index(header)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    table = _table([{**summary["unquantized"], "level": "unquantized"}, *summary["levels"]],
                   METRIC_KEYS).rstrip("\n").split("\n")
    path.write_text("\n".join([*lines[:start], *table, *lines[end:]]))


def _refits(folder: Path, dataset: str, data_dir: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """The head refitted with each seed on the bundle's training recordings, scored on its test
    recordings (split rebuilt from the manifest, as split_recordings does)."""
    manifest = Bundle.load(folder).manifest
    training = manifest.training
    test_frac = float(str(training["split"]).rsplit("test ", 1)[1])
    val_frac = float(str(training["split"]).split("val ", 1)[1].split(",")[0])
    examples = list(index_dataset(dataset, data_dir))
    split = random_split(examples, seed=int(training["seed"]), val=val_frac, test=test_frac)
    chosen = [*split.train, *split.val, *split.test]
    labels = manifest.labels
    data = load_segments(chosen, manifest.input_spec, list(labels["activity"] or []),
                         list(labels["identity"] or []))
    position = {id(e): i for i, e in enumerate(data.examples)}

    def part(examples: list[Any]) -> np.ndarray:
        return np.array([position[id(e)] for e in examples if id(e) in position], np.int64)

    train, val, test = part(split.train), part(split.val), part(split.test)
    out = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / folder.name
            shutil.copytree(folder, copy)
            fit_bundle_head(copy, data, train, val, seed=seed,
                            complete=bool(training.get("options", {}).get("head_complete")))
            bundle = Bundle.load(copy)
            row = _row(evaluate_bundle(CloudModel.load(bundle), EdgeEncoder(bundle), data,
                                       test).summary)
        out.append({"seed": seed, **row})
    return out


def _fmt(points: float | None, ci: list[float] | None) -> str:
    return "-" if points is None or ci is None else f"{points:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def render(result: dict[str, Any]) -> str:
    lines = [
        "## What compression costs, with intervals (bench/compression_cost.py)", "",
        "Each level's accuracy through the real payloads against our unquantized path on the "
        "same windows, in points (positive: the level loses), with a 95% interval from a "
        "bootstrap over recordings. Per recording: the window ending at each recording's last "
        "segment; per second: every prediction the service makes. `test`: the held-out test "
        "recordings; `val`: the validation recordings (early stopping, ridge penalty and "
        "temperature chosen on them, alike for every path); `refit seed s`: the head refitted "
        "with another seed, scored on the test recordings. Results: "
        "`bench/results/compression_cost.json`.", "",
        "| recordings | level | B/s | activity cost | activity cost per second | "
        "identity cost | identity cost per second |",
        "|---|---|---|---|---|---|---|"]
    runs = [(name, run) for name, run in result["parts"].items()]
    runs += [(f"refit seed {r['seed']} (test)", r) for r in result.get("refit", [])]
    for name, run in runs:
        for lv in run["levels"]:
            lines.append(
                f"| {name} ({run['recordings']}) | {lv['level']} | "
                f"{lv['payload_bytes_per_s']:.1f} | "
                f"{_fmt(lv.get('activity_cost_points'), lv.get('activity_cost_ci95'))} | "
                f"{_fmt(lv.get('activity_cost_points_per_second'), lv.get('activity_cost_per_second_ci95'))} | "  # noqa: E501
                f"{_fmt(lv.get('identity_cost_points'), lv.get('identity_cost_ci95'))} | "
                f"{_fmt(lv.get('identity_cost_points_per_second'), lv.get('identity_cost_per_second_ci95'))} |")  # noqa: E501
    lines += ["", *_verdict(result), *result.get("notes", [])]
    return "\n".join(lines)


def _verdict(result: dict[str, Any]) -> list[str]:
    """The table's reading, computed from it (no figure typed in by hand)."""
    test = result["parts"]["test"]
    n = test["recordings"]
    out = [f"- One recording is {100 / n:.1f} points of the {n} test recordings."]
    for suffix, what in (("", "per recording"), ("_per_second", "per second")):
        key, ci = f"activity_cost_points{suffix}", f"activity_cost{suffix}_ci95"
        worst = max(test["levels"], key=lambda lv: lv[key])
        clear = [lv["level"] for lv in test["levels"] if lv[ci][0] > 0]
        out.append(f"- Activity {what}, test: the worst level is {worst['level']} at "
                   f"{_fmt(worst[key], worst[ci])} points; "
                   + (f"the interval lies above zero at level(s) {clear}." if clear else
                      "every level's interval reaches zero (no cost)."))
    refits = result.get("refit", [])
    if refits:
        for lv in test["levels"]:
            costs = [lv["activity_cost_points"]] + [
                r["levels"][lv["level"]]["activity_cost_points"] for r in refits]
            per_s = [lv["activity_cost_points_per_second"]] + [
                r["levels"][lv["level"]]["activity_cost_points_per_second"] for r in refits]
            out.append(f"- Level {lv['level']}, shipped head and {len(refits)} refits on the "
                       f"test recordings: activity cost per recording {min(costs):+.1f} to "
                       f"{max(costs):+.1f} points (mean {np.mean(costs):+.1f}), per second "
                       f"{min(per_s):+.1f} to {max(per_s):+.1f} (mean {np.mean(per_s):+.1f}).")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="fition,wiar")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--refit-seeds", type=int, default=2,
                        help="head refits with seeds 1..N on the test recordings (0: none)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "compression_cost.json")
    parser.add_argument("--notes", type=Path, default=None,
                        help="JSON {dataset: [lines]} added under each report's table")
    parser.add_argument("--update-bundle", action="store_true",
                        help="write the test evaluation into bundle.json and report.md's table")
    parser.add_argument("--render-only", action="store_true",
                        help="only render the results file (with --notes) into the reports")
    args = parser.parse_args()
    notes = json.loads(args.notes.read_text()) if args.notes else {}
    report: dict[str, Any] = (json.loads(args.out.read_text()) if args.out.is_file()
                              else {"benchmark": "compression_cost", "datasets": {}})
    for name in [d for d in args.datasets.split(",") if d]:
        if args.render_only:
            result = report["datasets"][name]
            result["notes"] = notes.get(name, result.get("notes", []))
            put_section(ROOT / "models" / name / "report.md", BEGIN, END, render(result))
            args.out.write_text(json.dumps(report, indent=1) + "\n")
            continue
        t0 = time.perf_counter()
        folder = ROOT / "models" / name
        data_dir = args.data / DATA[name]
        bundle = Bundle.load(folder)
        result: dict[str, Any] = {"bundle": bundle.manifest.id, "parts": {}}
        for part in ("test", "val"):
            data, _ = split_recordings(bundle, name, data_dir, part)
            result["parts"][part] = _evaluate(folder, data, name,
                                              args.update_bundle and part == "test")
        if args.refit_seeds:
            result["refit"] = _refits(folder, name, data_dir,
                                      list(range(1, args.refit_seeds + 1)))
        result["notes"] = notes.get(name, [])
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["datasets"][name] = result
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        put_section(folder / "report.md", BEGIN, END, render(result))
        print(render(result), flush=True)


if __name__ == "__main__":
    main()
