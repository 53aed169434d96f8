"""Two cloud workers against one Mosquitto and one PostgreSQL, APs sharded by site.

Mosquitto hands shared-subscription messages out round robin, message by message, so two
workers in one share group would each see every other segment of an AP and classify over half
a context. Workers therefore shard by site (``--site``): each AP's segments reach exactly one
worker, in order, and its predictions are those of a single worker.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from _broker import Mosquitto
from test_cloud_service import Cloud, _postgres_database, offline_predictions, run_edge

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples" / "fition"
FILES = {
    ("north", "ap1"): SAMPLES / "walking_user1_rm1" / "walking_user1_rm1_10.pcap",
    ("north", "ap2"): SAMPLES / "sitdown_user3_rm3" / "sitdown_user3_rm3_20.pcap",
    ("south", "ap1"): SAMPLES / "nm_user2_rm2" / "nm_user2_rm2_10.pcap",
    ("south", "ap2"): SAMPLES / "falling_user1_rm1" / "falling_user1_rm1_1.pcap",
}


@pytest.fixture
def postgres() -> str:  # type: ignore[misc]
    yield from _postgres_database()


def _predictions(cloud: Cloud, site: str, ap: str) -> list[dict]:
    rows = cloud.get("/predictions", site=site, ap=ap, limit=10_000)["data"]
    return sorted(rows, key=lambda r: r["seq"])


def _wait_for(cloud: Cloud, expected: dict[tuple[str, str], int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(len({r["seq"] for r in _predictions(cloud, site, ap)}) >= n
               for (site, ap), n in expected.items()):
            return
        time.sleep(0.3)


@pytest.mark.e2e
def test_two_workers_each_segment_once_and_as_one_worker(broker: Mosquitto, postgres: str,
                                                         tmp_path: Path) -> None:
    north = Cloud(broker, postgres, tmp_path, "worker-north", ("--site", "north"))
    south = Cloud(broker, postgres, tmp_path, "worker-south", ("--site", "south"))
    north.start()
    south.start()
    try:
        streams = [arg for (site, ap), f in FILES.items()
                   for arg in ("--stream", f"{site}/{ap}=file://{f}")]
        # Idle markers off: compared with the offline path, where every segment is coded.
        edge = run_edge(broker, tmp_path / "spool", "--speed", "max", "--timestamps",
                        "recorded", "--level", "1", *streams, idle=False)
        out, _ = edge.communicate(timeout=90)
        assert edge.returncode == 0, out
        expected = {key: offline_predictions(f, level=1) for key, f in FILES.items()}
        _wait_for(north, {k: len(v) for k, v in expected.items()}, 40)
        for (site, ap), offline in expected.items():
            rows = _predictions(north, site, ap)  # one database: either worker answers
            counts = Counter(r["seq"] for r in rows)
            assert sorted(counts) == list(range(len(offline))), (site, ap)
            assert set(counts.values()) == {1}, f"{site}/{ap}: a segment handled twice"
            assert [(r["activity"], r["identity"]) for r in rows] == offline, (site, ap)
        # Each worker handled only its own site's segments.
        metrics = {w: _segments_total(w) for w in (north, south)}
        assert metrics[north] == sum(len(v) for (s, _), v in expected.items() if s == "north")
        assert metrics[south] == sum(len(v) for (s, _), v in expected.items() if s == "south")
    finally:
        north.stop()
        south.stop()


def _segments_total(cloud: Cloud) -> float:
    import httpx

    text = httpx.get(f"{cloud.url}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("csi_segments_total "))


@pytest.mark.e2e
def test_killing_a_worker_mid_stream_loses_no_segment(broker: Mosquitto, postgres: str,
                                                      tmp_path: Path) -> None:
    north = Cloud(broker, postgres, tmp_path, "worker-north", ("--site", "north"))
    south = Cloud(broker, postgres, tmp_path, "worker-south", ("--site", "south"))
    north.start()
    south.start()
    edge = run_edge(broker, tmp_path / "spool", "--speed", "8", "--level", "2",
                    "--stream", f"north/ap1=file://{SAMPLES}",
                    "--stream", f"south/ap1=file://{SAMPLES}")
    try:
        deadline = time.monotonic() + 30
        while len(_predictions(south, "north", "ap1")) < 5:
            assert time.monotonic() < deadline, "no predictions"
            time.sleep(0.2)
        north.stop(signal.SIGKILL)  # mid-stream, without a goodbye
        time.sleep(3)
        north.start()  # same client id: the broker kept its session and queued for it
        out, _ = edge.communicate(timeout=120)
        assert edge.returncode == 0, out
        for site in ("north", "south"):
            deadline = time.monotonic() + 40
            while True:
                ap = south.get(f"/aps/{site}/ap1")
                sent = ap["status"]["counters"]["segments_sent"] if ap["status"] else -1
                rows = _predictions(south, site, "ap1")
                if not ap["status"]["online"] and len(rows) >= sent:
                    break
                assert time.monotonic() < deadline, f"{site}: {len(rows)} of {sent}"
                time.sleep(0.3)
            counts = Counter(r["seq"] for r in rows)
            assert sorted(counts) == list(range(sent)), site
            assert set(counts.values()) == {1}, site
            assert ap["missing_segments"] == 0
    finally:
        if edge.poll() is None:
            edge.kill()
        north.stop()
        south.stop()
