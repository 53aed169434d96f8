"""Prediction rows per idle payload byte: what an AP's idle messages cost the database.

Real ingest, filter and store (Ingestor, LiveTrust, Persistence) on a fresh SQLite database,
no broker: one coded segment, then N idle messages of K = 255 segments (the wire format's
limit) per case. Cases: ``steady`` (an idle room: quality 1, no motion score), ``noisy``
(quality and motion bytes varying per segment, as an AP's credentials can send), ``epochs``
(a new epoch per message: the context starts afresh every time). Counts stored rows, the
segments they stand for and the idle payload bytes.

    python bench/idle_rows.py                 # bench/results/idle_rows.json
    python bench/idle_rows.py --messages 20   # quicker

It uses only what every version of the store has, so the same script measures before and
after a change of the row layout (``PYTHONPATH`` pointing at another checkout).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
K = 255


def run_case(case: str, messages: int, folder: Path) -> dict[str, Any]:
    from csi_cloud.db import Database, Prediction
    from csi_cloud.events import LiveTrust
    from csi_cloud.ingest import Ingestor
    from csi_cloud.persistence import Persistence, codes_of
    from csi_cloud.registry import ModelRegistry
    from csi_edge.bundle import EdgeEncoder
    from csi_edge.codec import Payload, SegmentRecord, encode_payload

    registry = ModelRegistry(MODELS)
    db = Database(f"sqlite:///{folder / f'{case}.db'}")
    ingestor = Ingestor(registry)
    trust = LiveTrust(registry, db, "csi/v1")
    store = Persistence(db, ingestor, registry)
    encoder = EdgeEncoder(MODELS / "fition")
    segment_ms = round(encoder.spec.segment_s * 1000)
    codes = encoder.compress_codes(np.zeros((1, 50, 1, 56), np.float32), 1)[0]
    base = 1_700_000_000_000

    def send(payloads: list[bytes]) -> None:
        # Each message its own arrival time, as from the broker (a row never spans two).
        now = time.time()
        result = ingestor.process([("bench", "ap", p, now + i / 1000)
                                   for i, p in enumerate(payloads)])
        events = [p.as_dict() for p in result.predictions]
        trust.observe(events)
        store.store(events, codes_of(events, result), {("bench", "ap")})

    send([encode_payload(Payload(1, encoder.model_id, 1, 0, base, (SegmentRecord(1.0),),
                                 codes=codes))])
    rng = np.random.default_rng(0)
    idle_bytes, t0 = 0, time.perf_counter()
    batch: list[bytes] = []
    for m in range(messages):
        first = 1 + m * K
        epoch = 1 + m if case == "epochs" else 1
        noisy = case == "noisy"
        records = tuple(
            SegmentRecord(float(rng.integers(0, 256)) / 255 if noisy else 1.0, b"",
                          float(rng.uniform(-2, 4)) if noisy else None) for _ in range(K))
        payload = encode_payload(Payload(1, encoder.model_id, epoch, first,
                                         base + first * segment_ms, records, idle=True,
                                         motion=noisy))
        idle_bytes += len(payload)
        batch.append(payload)
        if len(batch) == 8:
            send(batch)
            batch = []
    if batch:
        send(batch)
    seconds = time.perf_counter() - t0
    with db.session() as s:
        rows = s.scalar(select(func.count()).select_from(Prediction)) or 0
    db.close()
    counters = ingestor.aps[("bench", "ap")].counters
    idle_rows = rows - 1  # less the coded segment's
    return {"messages": messages, "segments_per_message": K,
            "idle_segments": messages * K, "segments_tracked": counters["segments"],
            "duplicates": counters["duplicates"], "missing_segments":
                counters["missing_segments"], "idle_payload_bytes": idle_bytes,
            "idle_rows": idle_rows, "rows_per_message": round(idle_rows / messages, 3),
            "rows_per_kb": round(1000 * idle_rows / idle_bytes, 3),
            "payload_bytes_per_row": round(idle_bytes / max(idle_rows, 1), 1),
            "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=60, help="idle messages per case")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/idle_rows.json")
    parser.add_argument("--label", default="", help="a name for this code (before/after)")
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error(f"--messages must be at least 1, got {args.messages}")
    torch.set_num_threads(1)
    import csi_cloud

    with tempfile.TemporaryDirectory() as tmp:
        cases = {case: run_case(case, args.messages, Path(tmp))
                 for case in ("steady", "noisy", "epochs")}
    for case, r in cases.items():
        print(f"{case:7} {r['idle_segments']} idle segments in {r['idle_payload_bytes']} B -> "
              f"{r['idle_rows']} rows ({r['rows_per_kb']} rows/KB, {r['rows_per_message']} "
              f"per message), {r['seconds']} s")
    result = {"label": args.label, "code": str(Path(csi_cloud.__file__).parent),
              "python": sys.version.split()[0], "machine": platform.machine(), "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
