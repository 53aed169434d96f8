"""What the entropy coder costs on top of the information it codes, per rate level.

    python bench/coder_overhead.py [--data datasets/samples] [--out FILE]

In wire format version 1 each segment's codes went on the wire as their own ANS stream
(csi_edge.entropy: 32-bit words, trailing zero bytes dropped) after a length varint
(csi_edge.codec); the edge's queue still keeps each segment's stream so. An ANS stream ends with
the coder's state, so every stream carries some bytes beyond the information of its symbols.
This bench measures how many, on real segments: the committed samples of each shipped
bundle's dataset, encoded by the bundle's int8 edge encoder, at every rate level:

- ``bytes``: the mean length of a segment's coded stream, as the wire carries it;
- ``information``: the mean of ``-log2 p`` of the segment's symbols under the bundle's frozen
  tables, in bytes (what an ideal coder with those tables would need);
- ``overhead``: their difference, per segment;
- ``one_stream_per_message``: the mean bytes a segment would take if the segments of one
  message (the level's ``segments_per_message``, consecutive, of one recording) were coded
  as one stream, with no length varint (the decoder knows how many symbols each segment
  has), and what that saves per second at one segment a second: what wire format version 2
  does (``bench/wire_version.py`` measures it on the real payloads). Idle segments (no codes)
  are not counted: on a stream with idle seconds the saving is smaller.

The overhead is everything the coder adds: the state its stream ends with, and the rounding
of the tables' probabilities to its fixed point.

Results: ``bench/results/coder_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csi_cloud.model.pipeline import prepare  # noqa: E402
from csi_edge import entropy  # noqa: E402
from csi_edge.bundle import (  # noqa: E402
    BundleManifest,
    EdgeEncoder,
    SegmentCodes,
    segment_symbol_groups,
)

BUNDLES = {"fition": "fition", "wiar": "wiar"}


def varint_bytes(n: int) -> int:
    """Length of the minimal LEB128 varint of ``n`` (csi_edge.codec's record length)."""
    return max(1, (n.bit_length() + 6) // 7)


def information_bits(groups: list[tuple[np.ndarray, np.ndarray, entropy.EntropyTable]]
                     ) -> float:
    return sum(table.entropy_bits(sym, rows) for sym, rows, table in groups)


def messages(recording: np.ndarray, k: int) -> list[np.ndarray]:
    """Segment indices cut into messages of ``k`` consecutive segments of one recording (a
    recording's last message may be shorter, as a stream's last one is)."""
    out = []
    for r in np.unique(recording):
        rows = np.flatnonzero(recording == r)
        out.extend(rows[i:i + k] for i in range(0, len(rows), k))
    return out


def measure(manifest: BundleManifest, tables: tuple[entropy.EntropyTable, ...],
            symbols: np.ndarray, profile: np.ndarray,
            recording: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per level: the measured stream bytes of each segment against its information, and
    the same segments coded one stream per message (messages within a recording: segments
    (M,) ``recording``; default one recording). One-second segments: bytes a segment are
    bytes a second."""
    recording = np.zeros(len(symbols), np.int64) if recording is None else recording
    out = []
    for spec in manifest.levels:
        per_segment = [segment_symbol_groups(SegmentCodes(
                           spec.level, s[: spec.groups], manifest.level_profile(p, spec.level)),
                           manifest, tables) for s, p in zip(symbols, profile, strict=True)]
        streams = [entropy.encode(g) for g in per_segment]
        framed = [varint_bytes(len(s)) + len(s) for s in streams]
        k = spec.segments_per_message
        joint = sum(len(entropy.encode([grp for i in rows for grp in per_segment[i]]))
                    for rows in messages(recording, k))
        bytes_ = float(np.mean([len(s) for s in streams]))
        information = float(np.mean([information_bits(g) for g in per_segment])) / 8
        joint_per_segment = joint / len(streams)
        out.append({
            "level": spec.level, "segments": len(streams), "segments_per_message": k,
            "bytes": round(bytes_, 2), "information": round(information, 2),
            "overhead": round(bytes_ - information, 2),
            "with_length_varint": round(float(np.mean(framed)), 2),
            "one_stream_per_message": round(joint_per_segment, 2),
            "saved_bytes_per_s": round(float(np.mean(framed)) - joint_per_segment, 2),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "datasets" / "samples")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "coder_overhead.json")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "coder_overhead",
        "command": "python bench/coder_overhead.py" + (" " + " ".join(argv) if argv else ""),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "bundles": {}}
    for dataset, bundle in BUNDLES.items():
        edge = EdgeEncoder(ROOT / "models" / bundle)
        data, *_ = prepare(dataset, args.data / dataset)
        symbols, profile = edge.encode(data.x)
        if edge.manifest.input_spec.segment_s != 1.0:
            raise SystemExit(f"{bundle}: segments of {edge.manifest.input_spec.segment_s} s, "
                             "not 1 s: bytes a segment are not bytes a second")
        shown = args.data / dataset
        result["bundles"][bundle] = {
            "bundle_id": edge.manifest.id,
            "data": str(shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown),
            "levels": measure(edge.manifest, edge.tables, symbols, profile, data.recording)}
        for row in result["bundles"][bundle]["levels"]:
            print(f"{bundle} level {row['level']}: {row['bytes']} B a segment, information "
                  f"{row['information']}, overhead {row['overhead']}; one stream per message "
                  f"{row['one_stream_per_message']} (saves {row['saved_bytes_per_s']} B/s)")
    result["runtime_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
