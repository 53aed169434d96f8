"""Wire format version 2 against version 1 on the shipped bundles' held-out test recordings.

    python bench/wire_version.py [--bundles fition,wiar] [--data ../shared/data] [--update]

Version 2 (csi_edge.codec) codes a message's segments as one coder stream instead of one
stream and one length byte a segment. Nothing else changes: the same int8 codes, the same
predictions. For each bundle this scores its test split again through real payloads
(csi_cloud.model.evaluate.evaluate_bundle, as ``csi train`` scored it, now in version 2),
checks that every accuracy figure is the one the bundle recorded (the codes are the same, so
they must be), and puts each level's payload bytes a second in version 2 beside the recorded
version-1 figure. Results: bench/results/wire_version.json.

``--update`` writes the new figures into the bundles' ``metrics.test_split`` and report.md
(the bundle id does not cover metrics, so it stays), keeping the report's other sections and
notes; it refuses when an accuracy figure moved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import environment  # noqa: E402
from head_lengths import load_split  # noqa: E402
from refit_head import REFIT_NOTE, SECTION, hand_notes  # noqa: E402
from trust import BUNDLES, shared_data  # noqa: E402

from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle  # noqa: E402
from csi_cloud.model.pipeline import report_notes  # noqa: E402
from csi_cloud.model.report import write_report  # noqa: E402
from csi_edge.bundle import Bundle, EdgeEncoder, write_manifest  # noqa: E402
from csi_edge.codec import FORMAT_VERSION  # noqa: E402

OUT = ROOT / "bench" / "results" / "wire_version.json"
BYTE_KEYS = ("payload_bytes_per_s", "payload_bytes_per_segment", "compression_ratio")
# Timing moves from run to run; ``model`` is the id the figures were measured under (a
# bundle whose id changed since keeps its weights: csi_edge.bundle.bundle_id).
SKIP = ("encoder_ms_per_segment", "model")


def _moved(before: Any, after: Any, path: str = "") -> list[str]:
    """Paths of the figures other than bytes and timing that differ (a figure the bundle
    did not record yet, such as a score added to the evaluation since, is new, not moved)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after)):
            if key in BYTE_KEYS or key in SKIP or before.get(key) is None:
                continue
            out += _moved(before.get(key), after.get(key), f"{path}.{key}")
        return out
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [m for i, (b, a) in enumerate(zip(before, after, strict=True))
                for m in _moved(b, a, f"{path}[{i}]")]
    if isinstance(before, float) and isinstance(after, float):
        return [] if abs(before - after) < 1e-9 else [f"{path}: {before} -> {after}"]
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def rescore(folder: Path, dataset: str, data_dir: Path, update: bool) -> dict[str, Any]:
    data, parts = load_split(folder, dataset, data_dir)
    bundle = Bundle.load(folder)
    cloud = CloudModel.load(bundle)
    before = bundle.manifest.metrics["test_split"]
    t0 = time.perf_counter()
    evaluation = evaluate_bundle(cloud, EdgeEncoder(bundle), data, parts["test"],
                                 dataset=dataset)
    after = evaluation.summary
    moved = _moved(before, after)
    levels = [{"level": b["level"],
               "segments_per_message": bundle.manifest.level(b["level"]).segments_per_message,
               "version_1_bytes_per_s": b["payload_bytes_per_s"],
               "version_2_bytes_per_s": a["payload_bytes_per_s"],
               "saved_bytes_per_s": round(b["payload_bytes_per_s"] - a["payload_bytes_per_s"], 2),
               "version_1_bytes_per_segment": b["payload_bytes_per_segment"],
               "version_2_bytes_per_segment": a["payload_bytes_per_segment"]}
              for b, a in zip(before["levels"], after["levels"], strict=True)]
    result: dict[str, Any] = {"bundle": bundle.manifest.id, "test_recordings": len(parts["test"]),
                              "segments": after["segments"], "levels": levels,
                              "figures_moved": moved, "seconds": round(time.perf_counter() - t0)}
    if update and not moved:
        bundle = write_manifest(folder, bundle.manifest.model_copy(update={
            "metrics": {**bundle.manifest.metrics, "test_split": after}}))
        report = folder / "report.md"
        text = report.read_text()
        notes = report_notes(dataset, cloud)
        kept = hand_notes(text, notes)
        # refit_head's own note (hand_notes leaves it to refit_head): kept as it was.
        refit_notes = [" ".join(b.split("\n\n", 1)[0].split())
                       for b in text.split("\n- ")[1:] if b.startswith(REFIT_NOTE)]
        note = (f"The payload bytes above are wire format version {FORMAT_VERSION} (one coder "
                "stream a message), measured by `python bench/wire_version.py --update` on the "
                "same test recordings; every accuracy figure is the one the bundle was scored "
                "with in version 1 (`bench/results/wire_version.json` has both byte counts).")
        write_report(folder, manifest=bundle.manifest.model_dump(mode="json"), history=None,
                     evaluation=evaluation, protocols=bundle.manifest.metrics.get("protocols"),
                     notes=[*notes, *refit_notes, *kept, note])
        sections = [m.group(0) for m in SECTION.finditer(text)]
        report.write_text(report.read_text().rstrip() + "\n\n" + "\n\n".join(sections) + "\n")
        result["updated"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", default="fition,wiar")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of the shared datasets (default: ../shared/data)")
    parser.add_argument("--update", action="store_true",
                        help="write the version-2 byte figures into the bundles")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    data = args.data or shared_data()
    results: dict[str, Any] = {}
    for name in args.bundles.split(","):
        if name not in BUNDLES:
            parser.error(f"no dataset known for bundle {name!r} ({', '.join(BUNDLES)})")
        dataset, sub = BUNDLES[name]
        results[name] = rescore(ROOT / "models" / name, dataset, data / sub, args.update)
        print(json.dumps({name: results[name]}), flush=True)
    args.out.write_text(json.dumps({
        "benchmark": "wire format version 2 against version 1, shipped bundles' test splits",
        "command": "python bench/wire_version.py" + (" --update" if args.update else ""),
        "environment": environment(), "bundles": results}, indent=2) + "\n")
    return 1 if any(r["figures_moved"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
