"""Two cloud workers behind one Mosquitto: shared subscription versus sharding by site.

Four APs (two per site) replay committed Fition samples at 20x real time, one segment a
message; two workers
share one PostgreSQL database (127.0.0.1:5432, trust auth), as they would in production. Two
layouts:
  - ``shared``: both workers in one MQTT 5 shared-subscription group for every site. Mosquitto
    hands messages out round robin, so each worker sees part of each AP's stream;
  - ``sharded``: worker 1 takes site ``north``, worker 2 ``south`` (``csi cloud --site``).
For each, it reports the fraction of predictions equal to a single worker's (same activity
and probability within 1e-3 of the offline computation over the same codes), the mean
context present (segments of the 8-segment context that the deciding worker had) and whether
each segment was handled exactly once.

    python bench/workers.py        # about a minute; results in bench/results/workers.json
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from csi_edge import read_recording  # noqa: E402
from csi_edge.bundle import EdgeEncoder  # noqa: E402
from csi_edge.preprocess import Preprocessor  # noqa: E402

SAMPLES = ROOT / "datasets" / "samples" / "fition"
FILES = {
    ("north", "ap1"): SAMPLES / "walking_user1_rm1" / "walking_user1_rm1_10.pcap",
    ("north", "ap2"): SAMPLES / "sitdown_user3_rm3" / "sitdown_user3_rm3_20.pcap",
    ("south", "ap1"): SAMPLES / "nm_user2_rm2" / "nm_user2_rm2_10.pcap",
    ("south", "ap2"): SAMPLES / "falling_user1_rm1" / "falling_user1_rm1_1.pcap",
}
POSTGRES = os.environ.get("CSI_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LEVEL = 2  # one segment a message, as a live AP sends them


def offline(path: Path, level: int = LEVEL) -> list[tuple[str, float]]:
    """Activity and its probability per segment as one worker (or ``csi evaluate``) computes
    them."""
    from csi_cloud.model.compression import CloudModel

    model = ROOT / "models" / "fition"
    edge, cloud = EdgeEncoder(model), CloudModel.load(model)
    batch = Preprocessor(edge.spec).process(read_recording(path))
    decoded = [cloud.decompress(edge.compress(batch.data[i : i + 1], level=level, first_seq=i,
                                              epoch=1, timestamp_ms=0))[0]
               for i in range(len(batch))]
    n = cloud.net.cfg.context_segments
    slots = {int(k): i for i, k in enumerate(batch.index - batch.index[0])}
    out = []
    for k in (batch.index - batch.index[0]).tolist():
        window = [slots.get(s) for s in range(k - n + 1, k + 1)]
        z = np.stack([decoded[w].z_q if w is not None else np.zeros_like(decoded[0].z_q)
                      for w in window])[None]
        p = np.stack([decoded[w].profile if w is not None
                      else np.zeros_like(decoded[0].profile) for w in window])[None]
        present = np.array([[w is not None for w in window]])
        p_act, _ = cloud.classify(z, p, present, np.array([level]))
        a = int(p_act[0].argmax())
        out.append((cloud.manifest.labels["activity"][a], float(p_act[0, a])))
    return out


def run(layout: str, work: Path) -> dict[str, Any]:
    import psycopg

    name = f"csi_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    db = f"{POSTGRES.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    port = free_port()
    conf = work / f"{layout}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                               str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        time.sleep(0.5)
        for k, site in enumerate(("north", "south")):
            http = free_port()
            extra = ["--site", site] if layout == "sharded" else []
            proc = subprocess.Popen(
                [sys.executable, "-m", "csi_cloud.cli", "cloud", "--models", str(ROOT / "models"),
                 "--broker", f"mqtt://127.0.0.1:{port}", "--http", f"127.0.0.1:{http}",
                 "--db", db, "--recordings", str(work / f"rec-{layout}-{k}"), "--client-id",
                 f"bench-{layout}-{k}", "--log-level", "WARNING", *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                env=dict(os.environ, CSI_CLOUD_TOKEN="bench-token-0123456789abcdef",
                         CSI_CLOUD_JOBS_DIR=str(work / "jobs"), CSI_CLOUD_RECORD="false"))
            workers.append((proc, f"http://127.0.0.1:{http}"))
        for _, url in workers:
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        streams = [a for (site, ap), f in FILES.items()
                   for a in ("--stream", f"{site}/{ap}=file://{f}")]
        subprocess.run([sys.executable, "-m", "csi_edge.cli", "edge", "--model",
                        str(ROOT / "models" / "fition"), "--broker", f"mqtt://127.0.0.1:{port}",
                        "--spool-dir", str(work / f"spool-{layout}"), "--speed", "20",
                        "--timestamps", "recorded", "--level", str(LEVEL), "--log-level",
                        "WARNING",
                        *streams], check=True, cwd=ROOT, timeout=120)
        time.sleep(5)
        url = workers[0][1]
        equal = total = once = 0
        present: list[int] = []
        per_ap = {}
        for (site, ap), path in FILES.items():
            expected = offline(path)
            rows = httpx.get(f"{url}/api/v1/predictions", params={
                "site": site, "ap": ap, "limit": 10_000}, timeout=10).json()["data"]
            rows.sort(key=lambda r: r["seq"])
            counts = Counter(r["seq"] for r in rows)
            got = {r["seq"]: (r["activity"], r["activity_confidence"]) for r in rows}
            same = sum(i in got and got[i][0] == a and abs(got[i][1] - p) < 1e-3
                       for i, (a, p) in enumerate(expected))
            equal += same
            total += len(expected)
            once += sum(1 for i in range(len(expected)) if counts.get(i) == 1)
            present += [r["context_present"] for r in rows]
            per_ap[f"{site}/{ap}"] = {"segments": len(expected), "equal_to_one_worker": same}
        return {"layout": layout, "segments": total,
                "handled_exactly_once": once / total,
                "predictions_equal_to_one_worker": equal / total,
                "mean_context_present": round(float(np.mean(present)), 2), "per_ap": per_ap}
    finally:
        for proc, _ in workers:
            proc.terminate()
            proc.wait(30)
        broker.terminate()
        broker.wait(10)
        with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="csi-bench-workers-") as tmp:
        results = [run(layout, Path(tmp)) for layout in ("shared", "sharded")]
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "per_ap"}))
    out = ROOT / "bench" / "results" / "workers.json"
    out.write_text(json.dumps({"benchmark": "two cloud workers, one Mosquitto",
                               "command": "python bench/workers.py", "runs": results},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
