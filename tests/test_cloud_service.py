"""The cloud service end to end: real Mosquitto, real edge agents, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _harness import (
    FOLDER,
    MODEL,
    PREFIX,
    SAMPLE,
    Cloud,
    Mosquitto,
    offline_predictions,
    postgres_database,
    run_edge,
)
from _mqtt_client import Collector

from csi_edge.bundle import EdgeEncoder
from csi_edge.codec import Payload, SegmentRecord, encode_payload


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cloud.db'}"
    else:
        yield from postgres_database()


@pytest.mark.e2e
def test_end_to_end_predictions_match_offline(broker: Mosquitto, db_url: str,
                                              tmp_path: Path) -> None:
    cloud = Cloud(broker, db_url, tmp_path)
    cloud.start()
    try:
        # Idle markers off: every segment is coded, as in the offline path (idle markers
        # end to end: tests/test_idle.py).
        edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{SAMPLE}", "--site",
                        "lab", "--ap", "ap1", "--speed", "max", "--level", "1", idle=False)
        out, _ = edge.communicate(timeout=60)
        assert edge.returncode == 0, out
        expected = offline_predictions(SAMPLE, level=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            page = cloud.get("/predictions", site="lab", ap="ap1", limit=1000)
            if page["count"] >= len(expected):
                break
            time.sleep(0.2)
        rows = sorted(page["data"], key=lambda p: p["seq"])
        assert [r["seq"] for r in rows] == list(range(len(expected)))
        assert [(r["activity"], r["identity"]) for r in rows] == expected
        aps = cloud.get("/aps")
        assert aps["count"] == 1
        ap = aps["data"][0]
        assert (ap["site"], ap["ap"], ap["model"], ap["rate_level"]) == (
            "lab", "ap1", EdgeEncoder(MODEL).manifest.id, 1)
        assert ap["prediction"]["seq"] == len(expected) - 1
        assert ap["prediction"]["activity"] == expected[-1][0] == "walking"
        assert ap["gaps"] == 0 and ap["status"]["counters"]["segments_sent"] == len(expected)
        latest = cloud.get("/aps/lab/ap1/prediction")
        assert latest["seq"] == len(expected) - 1
        # Received segments are recorded for retraining (by the recorder process, which
        # commits every couple of seconds).
        deadline = time.monotonic() + 20
        while not list((tmp_path / "recordings").rglob("*.h5")):
            assert time.monotonic() < deadline, "no recording written"
            time.sleep(0.2)
    finally:
        cloud.stop()


@pytest.mark.e2e
def test_live_websocket_and_sse_and_pred_topic(broker: Mosquitto, tmp_path: Path) -> None:
    import websockets

    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'c.db'}", tmp_path)
    cloud.start()
    collector = Collector(broker.port, [f"{PREFIX}/+/+/pred"], client_id="pred-reader")
    ws_events: list[dict] = []
    sse_events: list[dict] = []
    ready = threading.Event()
    sse_ready = threading.Event()

    async def ws_client() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{cloud.port}/api/v1/predictions/ws"
                                      "?site=lab") as ws:
            ready.set()
            while len(ws_events) < 5:
                ws_events.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))

    def sse_client() -> None:
        with httpx.stream("GET", f"{cloud.url}/api/v1/predictions/stream",
                          params={"ap": "ap1"}, timeout=30) as response:
            sse_ready.set()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    sse_events.append(json.loads(line[6:]))
                    if len(sse_events) >= 5:
                        return

    ws_thread = threading.Thread(target=lambda: asyncio.run(ws_client()))
    sse_thread = threading.Thread(target=sse_client)
    ws_thread.start()
    sse_thread.start()
    try:
        assert ready.wait(10) and sse_ready.wait(10)
        edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site",
                        "lab", "--ap", "ap1", "--speed", "10", "--level", "2")
        ws_thread.join(60)
        sse_thread.join(60)
        edge.send_signal(signal.SIGINT)
        edge.communicate(timeout=20)
        assert len(ws_events) >= 5 and len(sse_events) >= 5
        assert all(e["site"] == "lab" and e["ap"] == "ap1" for e in ws_events + sse_events)
        assert [e["seq"] for e in ws_events] == sorted(e["seq"] for e in ws_events)
        collector.wait_for(lambda: collector.on(f"{PREFIX}/lab/ap1/pred"), 10, "pred topic")
        pred = json.loads(collector.on(f"{PREFIX}/lab/ap1/pred")[-1].payload)
        assert pred["activity"] in EdgeEncoder(MODEL).manifest.labels["activity"]
        assert collector.on(f"{PREFIX}/lab/ap1/pred")[0].retain in (True, False)
    finally:
        collector.close()
        cloud.stop()


@pytest.mark.e2e
def test_cloud_restart_loses_nothing(broker: Mosquitto, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'c.db'}"
    cloud = Cloud(broker, db, tmp_path)
    cloud.start()
    edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site", "lab",
                    "--ap", "ap1", "--speed", "8", "--level", "2")
    try:
        deadline = time.monotonic() + 30
        while cloud.get("/predictions", site="lab", ap="ap1")["count"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        cloud.stop(signal.SIGKILL)  # no goodbye: the broker keeps the session and queues
        time.sleep(3)  # segments queue at the broker meanwhile: the downtime is the point
        cloud.start()
        out, _ = edge.communicate(timeout=120)
        assert edge.returncode == 0, out
        status_sent = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ap = cloud.get("/aps/lab/ap1")
            status_sent = ap["status"]["counters"]["segments_sent"]
            if not ap["status"]["online"] and ap["last_seq"] == status_sent - 1:
                break
            time.sleep(0.3)
        rows = cloud.get("/predictions", site="lab", ap="ap1", limit=10_000)["data"]
        seqs = sorted({r["seq"] for r in rows})
        assert seqs == list(range(status_sent)), "every segment predicted after the restart"
        assert len(rows) == status_sent, "each segment predicted once"
        # The broker may resend what the killed worker had not acknowledged after newer
        # messages: such a segment counts as late, not missing.
        assert ap["missing_segments"] == 0
    finally:
        if edge.poll() is None:
            edge.kill()
        cloud.stop()


def _payload(model_id: bytes, seq: int, codes: bytes) -> bytes:
    return encode_payload(Payload(1, model_id, 7, seq, int(time.time() * 1000),
                                  (SegmentRecord(1.0),), codes=codes))


@pytest.mark.e2e
def test_bad_payloads_are_rejected_and_counted_while_good_traffic_flows(
        broker: Mosquitto, tmp_path: Path) -> None:
    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'c.db'}", tmp_path)
    cloud.start()
    publisher = Collector(broker.port, [f"{PREFIX}/none"], client_id="bad-publisher",
                          persistent=False)
    edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site", "lab",
                    "--ap", "good", "--speed", "10", "--level", "2")
    try:
        encoder = EdgeEncoder(MODEL)
        good = encoder.compress(np.zeros((1, 50, 1, 56), np.float32), level=1, first_seq=0,
                                epoch=7, timestamp_ms=int(time.time() * 1000))
        wrong_crc = bytearray(good)
        wrong_crc[-1] ^= 0x55
        bad = {
            "garbage": os.urandom(40),
            "truncated": good[:15],
            "wrong_crc": bytes(wrong_crc),
            "unknown_model": _payload(b"\xde\xad\xbe", 0, good[19:-2]),
            "oversized": b"\x20" * 70_000,
        }
        topic = f"{PREFIX}/lab/evil/seg"
        for payload in bad.values():
            publisher.publish(topic, payload)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{cloud.url}/metrics", timeout=5).text
            if "csi_rejected_total" in metrics and metrics.count("csi_rejected_total{") >= 4:
                break
            time.sleep(0.3)
        rejected = {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                    for line in metrics.splitlines() if line.startswith("csi_rejected_total{")}
        assert rejected.get("too_short") == 1
        assert rejected.get("crc_mismatch", 0) >= 2  # garbage and the flipped CRC
        assert rejected.get("unknown_model") == 1
        assert rejected.get("too_large") == 1
        evil = cloud.get("/aps/lab/evil")
        assert sum(evil["counters"]["rejected"].values()) == 5
        # Good traffic kept flowing through all of it.
        deadline = time.monotonic() + 30
        while cloud.get("/predictions", site="lab", ap="good")["count"] < 10:
            assert time.monotonic() < deadline, "good traffic stalled"
            time.sleep(0.3)
        assert httpx.get(f"{cloud.url}/healthz").status_code == 200
    finally:
        edge.send_signal(signal.SIGINT)
        edge.communicate(timeout=20)
        publisher.close()
        cloud.stop()
