"""Wire format version 2 against version 1 on the shipped bundles' held-out test recordings.

    python bench/wire_version.py [--bundles fition,wiar] [--data ../shared/data] [--update]

Version 2 (csi_edge.codec) codes a message's segments as one coder stream instead of one
stream and one length byte a segment, and drops the quality bytes of a message whose segments
are all whole (FULL_QUALITY). Nothing else changes: the same int8 codes, the same predictions.
For each bundle and level this packs the test split's int8 codes and each segment's quality
into messages as the edge does (``segments_per_message``, a gap starts a new message) three
ways, real payloads each: version 1; version 2 with one stream a message but every quality
byte; version 2 as sent (FULL_QUALITY where it applies). It then scores the test split again
through real payloads (csi_cloud.model.evaluate.evaluate_bundle, as ``csi train`` scored it)
and checks that every accuracy figure the bundle recorded is unchanged (the codes are the
same, so they must be; a figure the evaluation added since is new and only written). Results:
bench/results/wire_version.json.

``--level0-layouts 4,16;2,12`` also counts what level 0 would send with other layouts (latent
groups, profile coefficients) at its segments a message, the same recordings and encoder
(the bundle's tables cover every group and coefficient): ``level0_layouts`` in the results.

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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _report import environment  # noqa: E402
from head_lengths import load_split  # noqa: E402
from refit_head import REFIT_NOTE, SECTION, hand_notes  # noqa: E402
from trust import BUNDLES, shared_data  # noqa: E402

from csi_cloud.model.compression import CloudModel  # noqa: E402
from csi_cloud.model.data import SegmentData  # noqa: E402
from csi_cloud.model.evaluate import evaluate_bundle  # noqa: E402
from csi_cloud.model.pipeline import report_notes  # noqa: E402
from csi_cloud.model.report import write_report  # noqa: E402
from csi_edge.bundle import (  # noqa: E402
    Bundle,
    EdgeEncoder,
    encode_message_codes,
    encode_segment_codes,
    write_manifest,
)
from csi_edge.codec import (  # noqa: E402
    FORMAT_VERSION,
    Payload,
    SegmentRecord,
    encode_payload,
    message_groups,
)

OUT = ROOT / "bench" / "results" / "wire_version.json"
NOTE = "The payload bytes above are wire format version"
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


def level_bytes(edge: EdgeEncoder, data: SegmentData, recordings: np.ndarray,
                level: int) -> dict[str, Any]:
    """Payload bytes a second of ``recordings`` at ``level``, three ways (module docstring)."""
    spec = edge.manifest.level(level)
    total = {"version_1": 0, "one_stream_only": 0, "version_2": 0}
    segments = flagged = 0
    for r in recordings.tolist():
        start, count = int(data.start[r]), int(data.count[r])
        slots = data.slot[start : start + count]
        symbols, profile = edge.encode(data.x[start : start + count])
        codes = [edge.codes(s, p, level) for s, p in zip(symbols, profile, strict=True)]
        quality = (np.ones(count) if data.quality is None
                   else data.quality[start : start + count])
        for group in message_groups(slots.tolist(), spec.segments_per_message):
            first = int(slots[group[0]])
            v1 = encode_payload(Payload(
                level, edge.model_id, 1, first, 0,
                tuple(SegmentRecord(float(quality[g]), encode_segment_codes(
                    codes[g], edge.manifest, edge.tables)) for g in group), version=1))
            v2 = encode_payload(Payload(
                level, edge.model_id, 1, first, 0,
                tuple(SegmentRecord(float(quality[g])) for g in group),
                codes=encode_message_codes([codes[g] for g in group], edge.manifest,
                                           edge.tables)))
            whole = all(round(float(quality[g]) * 255) == 255 for g in group)
            total["version_1"] += len(v1)
            total["version_2"] += len(v2)
            total["one_stream_only"] += len(v2) + (len(group) if whole else 0)
            segments += len(group)
            flagged += len(group) if whole else 0
    seconds = segments * edge.spec.segment_s
    return {"level": level, "segments_per_message": spec.segments_per_message,
            **{f"{k}_bytes_per_s": round(v / seconds, 2) for k, v in total.items()},
            "whole_segments_share": round(flagged / segments, 4)}


def rescore(folder: Path, dataset: str, data_dir: Path, update: bool,
            layouts: list[tuple[int, int]] | None = None) -> dict[str, Any]:
    data, parts = load_split(folder, dataset, data_dir)
    bundle = Bundle.load(folder)
    cloud = CloudModel.load(bundle)
    before = bundle.manifest.metrics["test_split"]
    t0 = time.perf_counter()
    edge = EdgeEncoder(bundle)
    levels = [level_bytes(edge, data, parts["test"], spec.level)
              for spec in bundle.manifest.levels]
    tried = []
    for groups, components in layouts or []:
        manifest = edge.manifest
        edge.manifest = manifest.model_copy(update={"levels": [
            lv.model_copy(update={"groups": groups, "profile_components": components})
            if lv.level == 0 else lv for lv in manifest.levels]})
        try:
            tried.append({"groups": groups, "profile_components": components,
                          **level_bytes(edge, data, parts["test"], 0)})
        finally:
            edge.manifest = manifest
    evaluation = evaluate_bundle(cloud, edge, data, parts["test"], dataset=dataset)
    after = evaluation.summary
    moved = _moved(before, after)
    for row, scored in zip(levels, after["levels"], strict=True):
        # evaluate_bundle's own count of the same payloads: the two must agree.
        row["evaluation_bytes_per_s"] = scored["payload_bytes_per_s"]
    result: dict[str, Any] = {"bundle": bundle.manifest.id, "test_recordings": len(parts["test"]),
                              "segments": after["segments"], "levels": levels,
                              "level0_layouts": tried,
                              "figures_moved": moved, "seconds": round(time.perf_counter() - t0)}
    if update and not moved:
        bundle = write_manifest(folder, bundle.manifest.model_copy(update={
            "metrics": {**bundle.manifest.metrics, "test_split": after}}))
        report = folder / "report.md"
        text = report.read_text()
        notes = report_notes(dataset, cloud)
        # This script's own note of an earlier run is written anew below.
        kept = [b for b in hand_notes(text, notes) if not b.startswith(NOTE)]
        # refit_head's own note (hand_notes leaves it to refit_head): kept as it was.
        refit_notes = [" ".join(b.split("\n\n", 1)[0].split())
                       for b in text.split("\n- ")[1:] if b.startswith(REFIT_NOTE)]
        note = (f"{NOTE} {FORMAT_VERSION} (one coder stream a message, no quality bytes for "
                "a message of whole segments), measured by `python bench/wire_version.py "
                "--update` on the same test recordings, each segment with its own quality; "
                "every accuracy figure the bundle had recorded in version 1 came out the "
                "same (the live and smoothed per-second columns are the evaluation's since, "
                "new here; `bench/results/wire_version.json` has the byte counts of both "
                "versions).")
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
    parser.add_argument("--level0-layouts", default="",
                        help="other level-0 layouts to count, GROUPS,COEFFICIENTS;... (e.g. "
                             "4,16 for level 1's codes)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    data = args.data or shared_data()
    results: dict[str, Any] = {}
    for name in args.bundles.split(","):
        if name not in BUNDLES:
            parser.error(f"no dataset known for bundle {name!r} ({', '.join(BUNDLES)})")
        dataset, sub = BUNDLES[name]
        layouts = [(int(g), int(c)) for g, c in (
            item.split(",") for item in args.level0_layouts.split(";") if item)]
        results[name] = rescore(ROOT / "models" / name, dataset, data / sub, args.update,
                                layouts)
        print(json.dumps({name: results[name]}), flush=True)
    args.out.write_text(json.dumps({
        "benchmark": "wire format version 2 against version 1, shipped bundles' test splits",
        "command": "python bench/wire_version.py" + (" --update" if args.update else "")
        + (f" --level0-layouts '{args.level0_layouts}'" if args.level0_layouts else ""),
        "environment": environment(), "bundles": results}, indent=2) + "\n")
    return 1 if any(r["figures_moved"] for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
