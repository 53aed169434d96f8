"""The edge agent against a real Mosquitto: end to end, outages, kills, control, live UDP."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from _broker import Mosquitto
from _mqtt_client import Collector

from csi_edge import read_recording
from csi_edge.bundle import BundleManifest, EdgeEncoder, bundle_id
from csi_edge.codec import decode_payload
from csi_edge.preprocess import Preprocessor
from csi_edge.readers._pcap import read_udp_payloads
from csi_edge.rollout import edge_archive

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fition"
SAMPLE = ROOT / "datasets" / "samples" / "fition" / "walking_user1_rm1" / \
    "walking_user1_rm1_10.pcap"
FOLDER = ROOT / "datasets" / "samples" / "fition"
PREFIX = "csi/v1"


def edge_command(broker: Mosquitto, spool: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(MODEL),
            "--broker", broker.url, "--spool-dir", str(spool), "--status-interval", "1",
            *args]


def start_edge(broker: Mosquitto, spool: Path, *args: str,
               idle: bool = True) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               CSI_EDGE_MODELS_DIR=str(spool.parent / "fetched"), CSI_EDGE_IDLE=str(idle).lower())
    return subprocess.Popen(edge_command(broker, spool, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def finish(proc: subprocess.Popen[str], timeout_s: float = 60) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"edge did not finish in {timeout_s} s:\n{out[-3000:]}") from None
    return proc.returncode, out


def segments_of(collector: Collector, site: str, ap: str) -> list[tuple[int, int, int, bytes]]:
    """(epoch, seq, level, model id) of every segment received, in arrival order."""
    out = []
    for m in collector.on(f"{PREFIX}/{site}/{ap}/seg"):
        p = decode_payload(m.payload)
        out.extend((p.epoch, p.seq(i), p.level, p.model_id) for i in range(len(p.segments)))
    return out


def first_arrivals(segments: list[tuple[int, int, int, bytes]]) -> list[tuple[int, int]]:
    """(epoch, seq) in order of first arrival (QoS 1 may deliver a message twice)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for epoch, seq, _, _ in segments:
        if (epoch, seq) not in seen:
            seen.add((epoch, seq))
            out.append((epoch, seq))
    return out


def last_status(collector: Collector, site: str, ap: str) -> dict:
    messages = collector.on(f"{PREFIX}/{site}/{ap}/status")
    assert messages, "no status received"
    return json.loads(messages[-1].payload)


@pytest.fixture
def collector(broker: Mosquitto) -> Iterator[Collector]:
    c = Collector(broker.port, [f"{PREFIX}/#"])
    yield c
    c.close()


def test_replay_decodes_to_the_offline_codes(broker: Mosquitto, collector: Collector,
                                             tmp_path: Path) -> None:
    from csi_cloud.model.compression import CloudModel

    # Idle markers off: every segment coded (idle markers end to end: tests/test_idle.py).
    proc = start_edge(broker, tmp_path / "spool", "--source", f"file://{SAMPLE}",
                      "--site", "lab", "--ap", "ap1", "--speed", "max",
                      "--timestamps", "recorded", "--level", "1", idle=False)
    code, out = finish(proc)
    assert code == 0, out
    collector.wait_for(lambda: any(not json.loads(m.payload)["online"]
                                   for m in collector.on(f"{PREFIX}/lab/ap1/status")),
                       what="the offline status")

    # The offline path: the same reader, preprocessing and int8 encoder on the whole file.
    encoder = EdgeEncoder(MODEL)
    batch = Preprocessor(encoder.spec).process(read_recording(SAMPLE))
    symbols, profile = encoder.encode(batch.data)
    level = encoder.manifest.level(1)

    cloud = CloudModel.load(MODEL)
    decoded = [d for m in collector.on(f"{PREFIX}/lab/ap1/seg") for d in
               cloud.decompress(m.payload)]
    assert [d.seq for d in decoded] == list(range(len(batch)))
    assert len(decoded) == len(batch) >= 8
    for i, d in enumerate(decoded):
        np.testing.assert_array_equal(d.codes.latent, symbols[i, : level.groups])
        np.testing.assert_array_equal(d.codes.profile, profile[i, : level.profile_components])
        assert d.timestamp_ms == pytest.approx(batch.start_time[i] * 1000, abs=1)
        assert d.quality == pytest.approx(batch.quality[i], abs=1 / 255)
    status = last_status(collector, "lab", "ap1")
    assert status["online"] is False and status["model"] == encoder.manifest.id
    counters = status["counters"]
    assert counters["segments_encoded"] == counters["segments_sent"] == len(batch)
    assert counters["frames_in"] == len(read_recording(SAMPLE))
    assert counters["frames_dropped"]["other_transmitter"] == 21
    assert counters["payload_bytes"] == sum(len(m.payload) for m in
                                            collector.on(f"{PREFIX}/lab/ap1/seg"))
    assert counters["wire_bytes"] > counters["payload_bytes"]


@pytest.mark.e2e
def test_broker_outage_loses_nothing_and_keeps_order(broker: Mosquitto, collector: Collector,
                                                     tmp_path: Path) -> None:
    proc = start_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}",
                      "--site", "lab", "--ap", "ap1", "--speed", "10", "--level", "2")
    collector.wait_for(lambda: len(segments_of(collector, "lab", "ap1")) >= 5, 30,
                       "first segments")
    broker.stop()
    time.sleep(4)  # the edge keeps encoding into its spool meanwhile
    broker.start()
    code, out = finish(proc, 120)
    assert code == 0, out
    collector.wait_for(lambda: not last_status(collector, "lab", "ap1")["online"], 20,
                       "the final status")
    status = last_status(collector, "lab", "ap1")
    n = status["counters"]["segments_encoded"]
    assert status["counters"]["reconnects"] >= 1
    arrivals = first_arrivals(segments_of(collector, "lab", "ap1"))
    epoch = arrivals[0][0]
    assert arrivals == [(epoch, s) for s in range(n)], "every segment, once, in order"
    assert n >= 60  # 8 recordings of ~10 s


@pytest.mark.e2e
def test_killed_edge_delivers_its_spool_on_restart(broker: Mosquitto, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    broker.stop()  # nothing reachable: everything stays in the spool
    proc = start_edge(broker, spool, "--source", f"file://{SAMPLE}", "--site", "lab",
                      "--ap", "ap1", "--speed", "max", "--level", "2")
    db = spool / "lab" / "ap1.sqlite"
    deadline = time.monotonic() + 60
    queued = -1
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as con:
                count = con.execute("SELECT count(*) FROM segment").fetchone()[0]
            if count == queued and count > 0:
                break
            queued = count
        time.sleep(0.5)
    assert queued >= 8
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)

    broker.start()
    collector = Collector(broker.port, [f"{PREFIX}/#"])
    try:
        proc = start_edge(broker, spool, "--source", f"file://{SAMPLE}", "--site", "lab",
                          "--ap", "ap1", "--speed", "max", "--level", "2")
        code, out = finish(proc)
        assert code == 0, out
        collector.wait_for(lambda: any(not json.loads(m.payload)["online"] for m in
                                       collector.on(f"{PREFIX}/lab/ap1/status")), 20,
                           "final status")
        arrivals = first_arrivals(segments_of(collector, "lab", "ap1"))
    finally:
        collector.close()
    old, new = arrivals[0][0], arrivals[-1][0]
    assert old != new, "a restart starts a new epoch"
    assert arrivals == ([(old, s) for s in range(queued)] + [(new, s) for s in range(queued)])


@pytest.mark.e2e
def test_rate_change_over_ctl_and_bad_ctl(broker: Mosquitto, collector: Collector,
                                          tmp_path: Path) -> None:
    proc = start_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site",
                      "lab", "--ap", "ap1", "--speed", "5", "--level", "2")
    try:
        collector.wait_for(lambda: len(segments_of(collector, "lab", "ap1")) >= 2, 30,
                           "first segments")
        collector.publish(f"{PREFIX}/lab/ap1/ctl", b"not json {")
        collector.publish(f"{PREFIX}/lab/ap1/ctl", json.dumps({"action": "set_rate",
                                                               "level": 9}))
        collector.publish(f"{PREFIX}/lab/ap1/ctl", json.dumps({"action": "set_rate",
                                                               "level": 0}))
        collector.wait_for(lambda: any(level == 0 for _, _, level, _ in
                                       segments_of(collector, "lab", "ap1")), 30,
                           "a level-0 segment")
        collector.wait_for(lambda: last_status(collector, "lab", "ap1")["rate_level"] == 0, 10,
                           "status at level 0")
    finally:
        proc.send_signal(signal.SIGINT)
        code, out = finish(proc, 15)
    assert code == 0, out
    levels = [level for _, _, level, _ in segments_of(collector, "lab", "ap1")]
    switch = levels.index(0)
    assert set(levels[:switch]) == {2} and set(levels[switch:]) == {0}, levels
    # Level 0 batches 4 segments a message; the stop flushed a partial one.
    level0 = [decode_payload(m.payload) for m in collector.on(f"{PREFIX}/lab/ap1/seg")
              if decode_payload(m.payload).level == 0]
    assert level0 and all(len(p.segments) <= 4 for p in level0)
    status = last_status(collector, "lab", "ap1")
    assert status["counters"]["ctl_rejected"] == 2
    assert "ctl rejected" in status["error"] and "9" in status["error"]


@pytest.mark.e2e
def test_live_udp_with_bad_packets(broker: Mosquitto, collector: Collector, tmp_path: Path,
                                   shared_fition: Path) -> None:
    pcap = shared_fition / "walking_user1_rm1" / "walking_user1_rm1_12.pcap"
    payloads = read_udp_payloads(pcap)
    port = _free_udp_port()
    proc = start_edge(broker, tmp_path / "spool", "--source", f"nexmon-udp://127.0.0.1:{port}",
                      "--site", "lab", "--ap", "live", "--level", "2")
    try:
        collector.wait_for(lambda: any(json.loads(m.payload)["online"] for m in
                                       collector.on(f"{PREFIX}/lab/live/status")), 20,
                           "the agent online")
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        start = time.monotonic()
        t0 = float(payloads.timestamps[0])
        sent = 0
        for i, (payload, t) in enumerate(zip(payloads.payloads, payloads.timestamps,
                                             strict=True)):
            if t - t0 > 7:
                break
            delay = start + (t - t0) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sender.sendto(payload, ("127.0.0.1", port))
            sent += 1
            if i % 50 == 10:
                sender.sendto(b"\x11\x11garbage", ("127.0.0.1", port))  # bad length
                sender.sendto(b"\x00" * len(payload), ("127.0.0.1", port))  # bad magic
        sender.close()
        collector.wait_for(lambda: len(segments_of(collector, "lab", "live")) >= 4, 20,
                           "live segments")
    finally:
        proc.send_signal(signal.SIGINT)
        code, out = finish(proc, 15)
    assert code == 0, out
    status = last_status(collector, "lab", "live")
    dropped = status["counters"]["frames_dropped"]
    assert dropped["bad_length"] >= 5 and dropped["bad_magic"] >= 5
    assert "bad_length" in status["problems"] and "bad_magic" in status["problems"]
    assert "bad_length" in out  # logged once with the offending value
    assert out.count("bad_length:") == 1
    arrivals = first_arrivals(segments_of(collector, "lab", "live"))
    assert [s for _, s in arrivals] == list(range(len(arrivals)))
    assert sent > 300


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_model_that_cannot_take_the_source_refuses_to_start(broker: Mosquitto,
                                                            tmp_path: Path) -> None:
    wiar = next((ROOT / "datasets" / "samples" / "wiar").rglob("*.dat"))
    proc = start_edge(broker, tmp_path / "spool", "--source", f"file://{wiar}", "--site", "lab",
                      "--ap", "ap1")
    code, out = finish(proc, 30)
    assert code == 2
    assert "fition" in out and "intel5300" in out and "nexmon" in out
    proc = start_edge(broker, tmp_path / "spool", "--source", "stdin", "--site", "lab",
                      "--ap", "ap1")
    code, out = finish(proc, 30)
    assert code == 2 and "esp32" in out and "nexmon" in out
    proc = start_edge(broker, tmp_path / "spool", "--source", f"file://{SAMPLE}", "--site",
                      "a/b", "--ap", "ap1")
    code, out = finish(proc, 30)
    assert code == 2 and "'a/b'" in out


def test_many_aps_in_one_process(broker: Mosquitto, collector: Collector,
                                 tmp_path: Path) -> None:
    files = sorted(FOLDER.rglob("*.pcap"))[:4]
    streams = [arg for i, f in enumerate(files) for arg in ("--stream", f"lab/ap{i}=file://{f}")]
    proc = start_edge(broker, tmp_path / "spool", "--speed", "max", *streams)
    code, out = finish(proc)
    assert code == 0, out
    for i in range(len(files)):
        collector.wait_for(lambda i=i: any(not json.loads(m.payload)["online"] for m in
                                           collector.on(f"{PREFIX}/lab/ap{i}/status")), 20,
                           f"ap{i} final status")
        arrivals = first_arrivals(segments_of(collector, "lab", f"ap{i}"))
        assert len(arrivals) >= 8
        assert last_status(collector, "lab", f"ap{i}")["counters"]["segments_sent"] == \
            len(arrivals)


class _Files(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, bytes]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def variant_bundle(folder: Path) -> BundleManifest:
    """A copy of the default bundle with another id (same weights, new calibration note)."""
    shutil.copytree(MODEL, folder)
    data = json.loads((folder / "bundle.json").read_text())
    data["calibration"] = {**data.get("calibration", {}), "variant": "test"}
    manifest = BundleManifest.model_validate(data)
    manifest.id = bundle_id(manifest)
    (folder / "bundle.json").write_text(json.dumps(manifest.model_dump(mode="json")))
    return manifest


@pytest.mark.e2e
def test_model_switch_over_ctl(broker: Mosquitto, collector: Collector, tmp_path: Path) -> None:
    from csi_cloud.model.compression import CloudModel

    variant = variant_bundle(tmp_path / "variant")
    good = edge_archive(tmp_path / "variant")
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF
    _Files.routes = {f"/api/v1/models/{variant.id}/edge": good, "/tampered": bytes(tampered)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    proc = start_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site",
                      "lab", "--ap", "ap1", "--speed", "5", "--level", "2", "--cloud-url", base)
    old_id = EdgeEncoder(MODEL).model_id
    try:
        collector.wait_for(lambda: len(segments_of(collector, "lab", "ap1")) >= 2, 30,
                           "first segments")
        ctl = f"{PREFIX}/lab/ap1/ctl"
        collector.publish(ctl, json.dumps({"action": "switch_model", "model_id": variant.id,
                                           "url": base + "/tampered"}))
        collector.publish(ctl, json.dumps({"action": "switch_model", "model_id": "ab" * 32}))
        collector.wait_for(lambda: last_status(collector, "lab", "ap1")["counters"]
                           ["model_switch_failures"] == 2, 20, "two failed switches")
        assert last_status(collector, "lab", "ap1")["model"] == EdgeEncoder(MODEL).manifest.id
        collector.publish(ctl, json.dumps({"action": "switch_model", "model_id": variant.id}))
        new_id = bytes.fromhex(variant.id)[:3]
        collector.wait_for(lambda: any(m == new_id for *_, m in
                                       segments_of(collector, "lab", "ap1")), 30,
                           "a segment on the new model")
    finally:
        proc.send_signal(signal.SIGINT)
        code, out = finish(proc, 15)
        server.shutdown()
    assert code == 0, out
    models = [m for *_, m in segments_of(collector, "lab", "ap1")]
    switch = models.index(new_id)
    assert set(models[:switch]) == {old_id} and set(models[switch:]) == {new_id}
    assert last_status(collector, "lab", "ap1")["model"] == variant.id
    # The cloud decodes the new model's segments with the new bundle.
    cloud = CloudModel.load(tmp_path / "variant")
    payloads = [m.payload for m in collector.on(f"{PREFIX}/lab/ap1/seg")
                if decode_payload(m.payload).model_id == new_id]
    assert all(cloud.decompress(p) for p in payloads)
    assert (tmp_path / "spool").exists()


@pytest.mark.e2e
def test_stop_is_prompt_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    """SIGTERM during a long reconnect backoff: out within the drain time, spool kept."""
    # A bound, never listening socket: connections are refused, and no other process can
    # take the port meanwhile.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = dict(os.environ, PYTHONUNBUFFERED="1", CSI_EDGE_DRAIN_TIMEOUT_S="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(MODEL), "--broker",
             f"mqtt://127.0.0.1:{port}", "--spool-dir", str(tmp_path / "spool"), "--source",
             f"file://{SAMPLE}", "--site", "lab", "--ap", "ap1", "--speed", "max"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        time.sleep(12)  # the backoff has grown past several seconds
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, out = finish(proc, 30)
        took = time.monotonic() - t0
    assert took < 1.0 + 2.0, f"stop took {took:.1f} s:\n{out[-2000:]}"
    assert out.count("retrying") < 20, "no tight reconnect loop while stopping"
    with sqlite3.connect(tmp_path / "spool" / "lab" / "ap1.sqlite") as con:
        assert con.execute("SELECT count(*) FROM segment").fetchone()[0] >= 8
