"""What storing one ingest batch costs (Persistence.store: predictions and AP state in one
transaction), on PostgreSQL and SQLite, for two checkouts of the code, interleaved.

1,000 APs, batches of one segment from each of ``--batch`` APs in turn (one prediction row
each, the common case), after ``--warm`` batches already stored and the table analysed. Per
batch: the wall time of ``store()`` and this process's CPU time for it (PostgreSQL's own CPU
is not in it: the wall time is the figure that holds up ingest). Each round runs both
checkouts in fresh processes, in alternating order, on fresh databases; the medians of the
per-round medians are reported.

    python bench/store.py --before /tmp/before   # a checkout of the code before a change
    python bench/store.py --rounds 2 --batches 100   # quicker

``--before`` is put first on PYTHONPATH for its runs; the script uses only what every version
of the store has (``store()`` returning nothing before duplicates were refused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("CSI_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")
APS = 1000


def _event(ap: int, seq: int, now: float) -> dict[str, Any]:
    return {"site": "bench", "ap": f"ap{ap:04d}", "epoch": 1, "seq": seq,
            "timestamp": now - 1.0, "received": now, "model": "m" * 12, "rate_level": 2,
            "quality": 0.98, "context_present": 8, "context_size": 8, "activity": "walking",
            "activity_confidence": 0.91, "activity_confidence_raw": 0.88, "identity": "user3",
            "identity_confidence": 0.77, "probabilities": {"activity": {
                k: 0.1 for k in ("walking", "sitdown", "standup", "nm", "fall", "run")}},
            "motion_score": None, "motion": None, "presence": None, "idle": False,
            "smoothed_activity": "walking", "smoothed_confidence": 0.9, "uncertain": False}


def measure(dialect: str, batch: int, batches: int, warm: int) -> dict[str, Any]:
    """One run of one checkout (in this process): per-batch store times."""
    from sqlalchemy import text

    from csi_cloud.db import Database
    from csi_cloud.ingest import Ingestor
    from csi_cloud.persistence import Persistence
    from csi_cloud.registry import ModelRegistry

    registry = ModelRegistry(ROOT / "models")
    folder = Path(tempfile.mkdtemp(prefix="csi-bench-store-"))
    name = f"csi_bench_{uuid.uuid4().hex[:10]}"
    admin = POSTGRES.replace("postgresql+psycopg", "postgresql") + "/test"
    if dialect == "postgresql":
        import psycopg

        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        url = f"{POSTGRES}/{name}"
    else:
        url = f"sqlite:///{folder / 'store.db'}"
    db = Database(url)
    try:
        ingestor = Ingestor(registry)
        store = Persistence(db, ingestor, registry)
        codes = bytes(range(256))[:120]  # about a level-2 segment's entropy-coded codes
        seq = [0] * APS
        cursor = 0
        wall: list[float] = []
        cpu: list[float] = []
        for k in range(warm + batches):
            now = time.time()
            events = []
            for _ in range(batch):
                ap = cursor % APS
                cursor += 1
                events.append(_event(ap, seq[ap], now))
                state = ingestor.state("bench", f"ap{ap:04d}")
                state.epoch, state.last_seq, state.last_seen = 1, seq[ap], now
                state.counters["segments"] += 1
                seq[ap] += 1
            touched = {(e["site"], e["ap"]) for e in events}
            t0, c0 = time.perf_counter(), time.thread_time()
            store.store(events, [codes] * len(events), touched)
            if k == warm - 1:
                # The statistics autovacuum keeps in a running database (a fresh one has none,
                # and the planner then reads an AP's rows by the wrong index).
                with db.engine.begin() as con:
                    con.execute(text("ANALYZE predictions"))
            if k >= warm:
                wall.append(time.perf_counter() - t0)
                cpu.append(time.thread_time() - c0)
    finally:
        db.close()
        if dialect == "postgresql":
            import psycopg

            with psycopg.connect(admin, autocommit=True) as con:
                con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    wall.sort()
    return {"wall_ms_median": statistics.median(wall) * 1000,
            "wall_ms_p99": wall[int(0.99 * (len(wall) - 1))] * 1000,
            "cpu_ms_median": statistics.median(cpu) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True,
                        help="a checkout of the code to compare with (its csi_cloud, csi_edge)")
    parser.add_argument("--before-name", default="",
                        help="what --before is (a commit), recorded in the results")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, action="append",
                        help="segments per batch (repeatable; default 20 and 200)")
    parser.add_argument("--batches", type=int, default=200, help="batches measured per run")
    parser.add_argument("--warm", type=int, default=100, help="batches stored first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/store.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # dialect:batch, in a child process
    args = parser.parse_args(argv)
    if args.one:
        dialect, batch = args.one.split(":")
        print(json.dumps(measure(dialect, int(batch), args.batches, args.warm)))
        return 0
    sizes = args.batch or [20, 200]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for dialect in ("postgresql", "sqlite"):
            for batch in sizes:
                order = ("before", "after") if r % 2 == 0 else ("after", "before")
                for code in order:
                    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
                    if code == "before":
                        env["PYTHONPATH"] = str(args.before.resolve())
                    out = subprocess.run(
                        [sys.executable, __file__, "--before", str(args.before), "--one",
                         f"{dialect}:{batch}", "--batches", str(args.batches), "--warm",
                         str(args.warm)], env=env, cwd=ROOT, check=True, capture_output=True,
                        text=True).stdout
                    result = json.loads(out.strip().splitlines()[-1])
                    runs.setdefault(f"{dialect}, {batch} segments/batch, {code}", []).append(
                        result)
                    print(dialect, batch, code, result, flush=True)
    summary = {key: {k: round(statistics.median(run[k] for run in results), 3)
                     for k in results[0]} for key, results in runs.items()}
    args.out.write_text(json.dumps({
        "command": shlex.join(["python", "bench/store.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other work",
        "before": args.before_name or str(args.before), "after": "this checkout",
        "aps": APS, "rounds": args.rounds, "batches_per_run": args.batches,
        "warm_batches": args.warm, "summary": summary, "runs": runs}, indent=1) + "\n")
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
