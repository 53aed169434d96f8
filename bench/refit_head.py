"""Fit a shipped bundle's context head again with this version's code, its network untouched.

    python bench/refit_head.py [--bundles fition,wiar] [--data ../shared/data] [--complete]

``csi train`` fits the context head in closed form after the network (docs/model.md). Training
the network again on another machine gives another network (docs/trust.md, "Between
machines"), so this script fits only the head again, exactly as ``csi train`` fits it
(csi_cloud.model.fitting.fit_bundle_head: the bundle's own training and validation
recordings, seed, features and short-reading lengths), then the live output's activity
calibration on the validation recordings as ``csi train`` does (temperatures, context
lengths, filter, abstention threshold: csi_cloud.model.trust.calibrate_folder). The network,
the edge encoder and the entropy tables stay as shipped, byte for byte: every code and every
byte on the wire is the same.

It scores the held-out test recordings again (``metrics.test_split`` in bundle.json) and
writes report.md anew, keeping the sections the benches wrote and the notes added by hand;
``training.head_refit`` records the command, the machine and the level-0 figures as trained
and after the refit.

What this version's head changes (docs/model.md): the transmitted profile coefficients are
read as the whole steps that were sent ("Exact inputs"), identity mixes in the nearest
training windows ("Identity neighbours", bundles with identities), and a complete-window
activity layer reads the windows whose every context slot is present ("Complete windows").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import environment  # noqa: E402
from head_lengths import load_split  # noqa: E402
from trust import BUNDLES, shared_data  # noqa: E402

from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle  # noqa: E402
from csi_cloud.model.fitting import fit_bundle_head  # noqa: E402
from csi_cloud.model.pipeline import report_notes  # noqa: E402
from csi_cloud.model.report import write_report  # noqa: E402
from csi_cloud.model.trust import calibrate_folder  # noqa: E402
from csi_edge.bundle import Bundle, EdgeEncoder, write_manifest  # noqa: E402

SECTION = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", re.S)
REFIT_NOTE = "The test-split figures above were measured by `python bench/refit_head.py`"


def hand_notes(text: str, generated: list[str]) -> list[str]:
    """The bullets of a report's Notes section that no code writes (added by hand; a report
    without notes of its own may hold such bullets after its plots, with no heading)."""
    head = text.split("\n<!-- ", 1)[0]
    if "## Notes" in head:
        body = head.split("## Notes", 1)[1]
    else:
        body = head.rsplit("\n![", 1)[-1].split("\n", 1)[-1]
    bullets = [" ".join(b.split()) for b in re.split(r"^- ", body, flags=re.M)[1:]]
    return [b for b in bullets if not any(b[:40] == g[:40] for g in generated)
            and not b.startswith(("Identity mixes", REFIT_NOTE))]


def level0(summary: dict[str, Any]) -> dict[str, float | None]:
    low = summary["levels"][0]
    return {key: None if low.get(key) is None else round(low[key], 4) for key in (
        "activity_accuracy", "activity_accuracy_per_second", "identity_accuracy",
        "identity_accuracy_per_second")}


def _figures(values: dict[str, float | None]) -> str:
    text = (f"activity {values['activity_accuracy']:.3f} "
            f"({values['activity_accuracy_per_second']:.3f} per second)")
    if values.get("identity_accuracy") is not None:
        text += (f", identity {values['identity_accuracy']:.3f} "
                 f"({values['identity_accuracy_per_second']:.3f})")
    return text


def refit(folder: Path, dataset: str, data_dir: Path, complete: bool | None = None
          ) -> dict[str, Any]:
    data, parts = load_split(folder, dataset, data_dir)
    manifest = Bundle.load(folder).manifest
    options = manifest.training["options"]
    n = int(manifest.model["context_segments"])
    earlier = manifest.training.get("head_refit")
    # A bundle refitted before keeps the figures it had as trained.
    as_trained_level0 = (earlier["level0_as_trained"] if isinstance(earlier, dict)
                         else level0(manifest.metrics["test_split"]))
    fit_bundle_head(folder, data, parts["train"], parts["val"],
                    features=int(options["head_features"]), seed=int(options["seed"]),
                    lengths=[k for k in options.get("head_lengths", []) if k < n],
                    # The bundle's own choice (a bundle fitted before the option has none:
                    # without the layer) unless told.
                    complete=bool(options.get("head_complete", False)) if complete is None
                    else complete)
    calibrate_folder(folder, data, parts["val"],
                     fitted_on=f"{len(parts['val'])} validation recordings of the training split")
    bundle = Bundle.load(folder)
    cloud = CloudModel.load(bundle)
    evaluation = evaluate_bundle(cloud, EdgeEncoder(bundle), data, parts["test"],
                                 dataset=dataset)
    after = evaluation.summary
    machine = environment()
    info: dict[str, Any] = {"command": "python bench/refit_head.py",
            "machine": f"{machine['cpu']}, {', '.join(machine['isa'])}",
            "level0_as_trained": as_trained_level0, "level0_after": level0(after)}
    bundle = write_manifest(folder, bundle.manifest.model_copy(update={
        "metrics": {**bundle.manifest.metrics, "test_split": after},
        "training": {**bundle.manifest.training, "head_refit": info}}))
    report = folder / "report.md"
    text = report.read_text()
    notes = report_notes(dataset, cloud)
    notes.append(
        f"{REFIT_NOTE} on one machine ({info['machine']}), after it fitted the context head "
        "again with this version's code on the same recordings, seed and features (the "
        "network, the edge encoder and every byte on the wire unchanged; docs/model.md, "
        "\"Exact inputs\"). Level 0 as measured when the bundle was trained: "
        f"{_figures(info['level0_as_trained'])}; after the refit: "
        f"{_figures(info['level0_after'])}.")
    write_report(folder, manifest=bundle.manifest.model_dump(mode="json"), history=None,
                 evaluation=evaluation, protocols=bundle.manifest.metrics.get("protocols"),
                 notes=[*notes, *hand_notes(text, notes)])
    sections = [m.group(0) for m in SECTION.finditer(text)]
    report.write_text(report.read_text().rstrip() + "\n\n" + "\n\n".join(sections) + "\n")
    return {"bundle": bundle.manifest.id, **info}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", default="fition,wiar")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of the shared datasets (default: ../shared/data)")
    parser.add_argument("--complete", action=argparse.BooleanOptionalAction, default=None,
                        help="fit the complete-window layer (default: as the bundle's "
                             "training.options.head_complete says; docs/model.md, \"Complete "
                             "windows\")")
    args = parser.parse_args(argv)
    data = args.data or shared_data()
    for name in args.bundles.split(","):
        if name not in BUNDLES:
            parser.error(f"no dataset known for bundle {name!r} ({', '.join(BUNDLES)})")
        dataset, sub = BUNDLES[name]
        result = refit(ROOT / "models" / name, dataset, data / sub, args.complete)
        print(json.dumps({name: result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
