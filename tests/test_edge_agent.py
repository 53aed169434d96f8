"""The edge agent against a real Mosquitto: end to end, outages, kills, control, live UDP."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
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
from _harness import FOLDER, MODEL, PREFIX, ROOT, SAMPLE, Mosquitto, run_edge, wait_until
from _mqtt_client import Collector

from csi_edge import read_recording
from csi_edge.bundle import BundleManifest, EdgeEncoder, bundle_id
from csi_edge.codec import decode_payload
from csi_edge.preprocess import Preprocessor
from csi_edge.readers._pcap import read_udp_payloads
from csi_edge.rollout import edge_archive


def _alive(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        raise AssertionError(f"edge exited with {proc.returncode}: "
                             f"{proc.communicate()[0][-3000:]}")


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
    proc = run_edge(broker, tmp_path / "spool", "--source", f"file://{SAMPLE}",
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
    proc = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}",
                      "--site", "lab", "--ap", "ap1", "--speed", "10", "--level", "2")
    collector.wait_for(lambda: len(segments_of(collector, "lab", "ap1")) >= 5, 30,
                       "first segments")
    broker.stop()
    # The edge keeps encoding into its spool meanwhile.
    spool = tmp_path / "spool" / "lab" / "ap1.sqlite"
    wait_until(lambda: _spooled(spool) >= 30, 30, "30 segments spooled during the outage",
               lambda: _alive(proc))
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
    proc = run_edge(broker, spool, "--source", f"file://{SAMPLE}", "--site", "lab",
                      "--ap", "ap1", "--speed", "max", "--level", "2")
    db = spool / "lab" / "ap1.sqlite"
    deadline = time.monotonic() + 60
    queued = -1
    while time.monotonic() < deadline:
        # The spool's file exists a moment before its table: -1 until both do.
        count = _spooled(db)
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
        proc = run_edge(broker, spool, "--source", f"file://{SAMPLE}", "--site", "lab",
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
    proc = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site",
                      "lab", "--ap", "ap1", "--speed", "5", "--level", "2")
    try:
        collector.wait_for(lambda: len(segments_of(collector, "lab", "ap1")) >= 2, 30,
                           "first segments")
        collector.publish(f"{PREFIX}/lab/ap1/ctl", b"not json {")
        # Bombs: nested 5,000 deep (RecursionError in json.loads), 20 kB, not UTF-8.
        collector.publish(f"{PREFIX}/lab/ap1/ctl", b"[" * 5000)
        collector.publish(f"{PREFIX}/lab/ap1/ctl", json.dumps({"action": "x" * 20_000}))
        collector.publish(f"{PREFIX}/lab/ap1/ctl", b"\xff\xfe{}")
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
    assert status["counters"]["ctl_rejected"] == 5
    assert "ctl rejected" in status["error"] and "9" in status["error"]
    # Every rejection was reported, with its reason, and none reached the status unbounded.
    errors = {json.loads(m.payload)["error"] for m in collector.on(f"{PREFIX}/lab/ap1/status")}
    errors.discard(None)
    assert any("nested 5000 deep" in e for e in errors), errors
    assert any("limit 16384" in e for e in errors), errors
    assert any("not UTF-8" in e for e in errors), errors
    assert max(len(e) for e in errors) <= len("ctl rejected: ") + 300
    assert max(len(m.payload) for m in collector.on(f"{PREFIX}/lab/ap1/status")) < 4000


@pytest.mark.e2e
def test_presence_measured_on_the_empty_room_is_kept_across_a_restart(
        broker: Mosquitto, collector: Collector, tmp_path: Path) -> None:
    """``calibrate_presence`` over ``ctl``: bad values refused with the value named, the next
    seconds measured and pinned, the pin kept in the spool for the next run, released."""
    spool = tmp_path / "spool"
    ctl = f"{PREFIX}/lab/ap1/ctl"

    topic = f"{PREFIX}/lab/ap1/status"
    since = 0  # status messages of earlier runs are not read

    def motion() -> dict:
        statuses = [json.loads(m.payload) for m in collector.on(topic)[since:]]
        online = [s for s in statuses if s["online"]]
        return (online[-1].get("motion") or {}) if online else {}

    def run() -> subprocess.Popen[str]:
        return run_edge(broker, spool, "--source", f"file://{FOLDER}", "--site", "lab", "--ap",
                        "ap1", "--speed", "5", "--level", "2")

    proc = run()
    try:
        collector.wait_for(lambda: motion().get("calibrated") is True, 30, "auto calibration")
        assert motion()["mode"] == "auto"
        for bad in (2, 601, "30", True, None):
            collector.publish(ctl, json.dumps({"action": "calibrate_presence", "empty_s": bad}))
        collector.publish(ctl, json.dumps({"action": "calibrate_presence", "empty_s": 5,
                                           "delay_s": 121}))
        collector.publish(ctl, json.dumps({"action": "calibrate_presence", "empty_s": 5}))
        def measuring() -> list[dict]:  # every status that says so, in order
            statuses = [json.loads(m.payload) for m in collector.on(topic)[since:]]
            return [m for s in statuses if s["online"] and (m := s.get("motion") or {})
                    .get("mode") == "measuring"]

        collector.wait_for(lambda: bool(measuring()), 30, "measuring")
        # The first one (later ones count down): the seconds looking back, then 5.
        assert measuring()[0]["measuring_left"] >= 5
        collector.wait_for(lambda: motion().get("mode") == "pinned", 30, "a pinned reference")
        pinned = motion()["reference"]
        assert isinstance(pinned, float)
    finally:
        proc.send_signal(signal.SIGINT)
        code, out = finish(proc, 15)
    assert code == 0, out
    status = last_status(collector, "lab", "ap1")
    assert status["counters"]["ctl_rejected"] == 6
    errors = {json.loads(m.payload)["error"] for m in collector.on(f"{PREFIX}/lab/ap1/status")}
    assert any("empty_s 601" in str(e) for e in errors), errors
    assert any("empty_s '30'" in str(e) for e in errors), errors
    assert any("delay_s 121" in str(e) for e in errors), errors
    with sqlite3.connect(spool / "lab" / "ap1.sqlite") as db:
        kept = dict(db.execute("SELECT key, value FROM meta WHERE key LIKE 'presence%'"))
    assert kept["presence_reference"] == pytest.approx(pinned, abs=1e-3)
    assert isinstance(kept["presence_reference_layout"], int | float)

    # The next run starts pinned (no warm-up), then goes back to automatic on request.
    since = len(collector.on(topic))
    proc = run()
    try:
        collector.wait_for(lambda: motion().get("mode") == "pinned", 30, "the pin restored")
        assert motion()["reference"] == pinned and motion()["calibrated"] is True
        collector.publish(ctl, json.dumps({"action": "calibrate_presence", "auto": True}))
        collector.wait_for(lambda: motion().get("mode") == "auto", 30, "back to automatic")
    finally:
        proc.send_signal(signal.SIGINT)
        code, out = finish(proc, 15)
    assert code == 0, out
    with sqlite3.connect(spool / "lab" / "ap1.sqlite") as db:
        assert db.execute("SELECT value FROM meta WHERE key LIKE 'presence%'").fetchall() == []


@pytest.mark.e2e
def test_live_udp_with_bad_packets(broker: Mosquitto, collector: Collector, tmp_path: Path,
                                   shared_fition: Path) -> None:
    pcap = shared_fition / "walking_user1_rm1" / "walking_user1_rm1_12.pcap"
    payloads = read_udp_payloads(pcap)
    port = _free_udp_port()
    proc = run_edge(broker, tmp_path / "spool", "--source", f"nexmon-udp://127.0.0.1:{port}",
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
    proc = run_edge(broker, tmp_path / "spool", "--source", f"file://{wiar}", "--site", "lab",
                      "--ap", "ap1")
    code, out = finish(proc, 30)
    assert code == 2
    assert "fition" in out and "intel5300" in out and "nexmon" in out
    proc = run_edge(broker, tmp_path / "spool", "--source", "stdin", "--site", "lab",
                      "--ap", "ap1")
    code, out = finish(proc, 30)
    assert code == 2 and "esp32" in out and "nexmon" in out
    proc = run_edge(broker, tmp_path / "spool", "--source", f"file://{SAMPLE}", "--site",
                      "a/b", "--ap", "ap1")
    code, out = finish(proc, 30)
    assert code == 2 and "'a/b'" in out


def test_many_aps_in_one_process(broker: Mosquitto, collector: Collector,
                                 tmp_path: Path) -> None:
    files = sorted(FOLDER.rglob("*.pcap"))[:4]
    streams = [arg for i, f in enumerate(files) for arg in ("--stream", f"lab/ap{i}=file://{f}")]
    proc = run_edge(broker, tmp_path / "spool", "--speed", "max", *streams)
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


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.HTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def variant_bundle(folder: Path, onnx: bytes | None = None, note: str = "test") -> BundleManifest:
    """A copy of the default bundle with another id (same weights and a new calibration note,
    or ``onnx`` as its encoder), self-consistent: hashes and id match."""
    shutil.copytree(MODEL, folder)
    data = json.loads((folder / "bundle.json").read_text())
    data["calibration"] = {**data.get("calibration", {}), "variant": note}
    if onnx is not None:
        (folder / "edge.onnx").write_bytes(onnx)
        data["files"]["edge"] = {**data["files"]["edge"], "bytes": len(onnx),
                                 "sha256": hashlib.sha256(onnx).hexdigest()}
    manifest = BundleManifest.model_validate(data)
    manifest.id = bundle_id(manifest)
    (folder / "bundle.json").write_text(json.dumps(manifest.model_dump(mode="json")))
    return manifest


@pytest.mark.e2e
def test_model_switch_only_to_a_listed_bundle_that_runs(broker: Mosquitto, collector: Collector,
                                                        tmp_path: Path) -> None:
    """The edge switches only to the commanded id, when the cloud lists it, the download
    checks out and the encoder runs; anything else leaves the running model streaming."""
    from csi_cloud.model.compression import CloudModel

    variant = variant_bundle(tmp_path / "variant")
    broken = variant_bundle(tmp_path / "broken", onnx=b"not an ONNX model " * 64)
    foreign = variant_bundle(tmp_path / "foreign", note="not announced")
    good = edge_archive(tmp_path / "variant")
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF
    listed = [variant.id, broken.id]  # the cloud's model list; `foreign` is not on it
    _Files.hits = []
    _Files.routes = {
        "/api/v1/models": json.dumps({"data": [{"id": i} for i in listed],
                                      "count": len(listed)}).encode(),
        f"/api/v1/models/{variant.id}/edge": good,
        f"/api/v1/models/{broken.id}/edge": edge_archive(tmp_path / "broken"),
        f"/api/v1/models/{foreign.id}/edge": edge_archive(tmp_path / "foreign"),
        "/tampered": bytes(tampered)}
    server = _serve(_Files)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    proc = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site",
                      "lab", "--ap", "ap1", "--speed", "5", "--level", "2", "--cloud-url", base)
    old_id = EdgeEncoder(MODEL).model_id
    try:
        collector.wait_for(lambda: len(segments_of(collector, "lab", "ap1")) >= 2, 30,
                           "first segments")
        ctl = f"{PREFIX}/lab/ap1/ctl"
        commands = [
            {"model_id": variant.id, "url": base + "/tampered"},  # fails its hash
            {"model_id": "ab" * 32},  # not listed
            {"model_id": foreign.id},  # self-consistent, served, but not listed
            {"model_id": broken.id},  # listed, checks out, but its encoder does not load
            {"model_id": variant.id, "url": f"{base}/api/v1/models/{foreign.id}/edge"},
        ]
        for i, command in enumerate(commands, 1):
            collector.publish(ctl, json.dumps({"action": "switch_model", **command}))
            collector.wait_for(lambda i=i: last_status(collector, "lab", "ap1")["counters"]
                               ["model_switch_failures"] == i, 20, f"failed switch {i}")
            status = last_status(collector, "lab", "ap1")
            assert status["model"] == EdgeEncoder(MODEL).manifest.id, command
            assert status["state"] == "streaming" and status["online"], status
        errors = [json.loads(m.payload)["error"] or "" for m in collector.on(
            f"{PREFIX}/lab/ap1/status")]
        assert any("tampered did not send a zip" in e for e in errors), errors
        assert any(f"{'ab' * 6}… is not among the 2 model(s)" in e for e in errors), errors
        assert any(f"{foreign.id[:12]}… is not among" in e for e in errors), errors
        assert any("does not load" in e for e in errors), errors
        assert any(f"sent model {foreign.id[:12]}" in e for e in errors), errors
        # Nothing was downloaded for an id the cloud does not list.
        assert f"/api/v1/models/{'ab' * 32}/edge" not in _Files.hits
        assert f"/api/v1/models/{foreign.id}/edge" in _Files.hits  # only as command 5's url
        assert _Files.hits.count(f"/api/v1/models/{foreign.id}/edge") == 1
        before = len(segments_of(collector, "lab", "ap1"))
        collector.wait_for(lambda: len(segments_of(collector, "lab", "ap1")) > before + 2, 20,
                           "segments on the old model after the failures")

        collector.publish(ctl, json.dumps({"action": "switch_model", "model_id": variant.id}))
        new_id = EdgeEncoder(tmp_path / "variant").model_id
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


@pytest.mark.e2e
def test_ctl_never_makes_the_edge_contact_another_address(broker: Mosquitto,
                                                         collector: Collector,
                                                         tmp_path: Path) -> None:
    """Blind SSRF: a ctl url off the cloud base URL is refused before any request, and the
    status says the same whatever is (or is not) listening there."""

    class Other(_Files):
        routes: ClassVar[dict[str, bytes]] = {}
        hits: ClassVar[list[str]] = []

    _Files.hits, _Files.routes = [], {"/api/v1/models": b'{"data": [], "count": 0}'}
    cloud, other = _serve(_Files), _serve(Other)
    base = f"http://127.0.0.1:{cloud.server_address[1]}"
    with socket.socket() as closed:  # bound, never listening: a closed port
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        targets = [f"http://127.0.0.1:{other.server_address[1]}/admin",
                   f"http://127.0.0.1:{closed_port}/",
                   "http://169.254.169.254/latest/meta-data/",
                   f"{base}/../../etc/passwd", "file:///etc/passwd",
                   f"http://127.0.0.1:{cloud.server_address[1]}@127.0.0.1:"
                   f"{other.server_address[1]}/x"]
        proc = run_edge(broker, tmp_path / "spool", "--source", f"file://{FOLDER}", "--site",
                          "lab", "--ap", "ap1", "--speed", "5", "--cloud-url", base)
        try:
            collector.wait_for(lambda: len(segments_of(collector, "lab", "ap1")) >= 1, 30,
                               "first segments")
            for i, url in enumerate(targets, 1):
                collector.publish(f"{PREFIX}/lab/ap1/ctl", json.dumps(
                    {"action": "switch_model", "model_id": "cd" * 32, "url": url}))
                collector.wait_for(lambda i=i: last_status(collector, "lab", "ap1")
                                   ["counters"]["ctl_rejected"] == i, 20, f"refusal {i}")
        finally:
            proc.send_signal(signal.SIGINT)
            code, out = finish(proc, 15)
            cloud.shutdown()
            other.shutdown()
    assert code == 0, out
    assert Other.hits == [] and _Files.hits == []  # not even the cloud's list was read
    errors = [json.loads(m.payload)["error"] for m in collector.on(f"{PREFIX}/lab/ap1/status")]
    refusals = [e for e in errors if e and "not under the cloud base URL" in e]
    assert len(set(refusals)) == len(targets), errors
    for e in refusals:  # no trace of what is at the other address
        # (404 as a word: the ports in the quoted URLs are random and may hold "404")
        assert not re.search(r"refused|timed out|\b404\b|errno", e.lower()), e


@pytest.mark.e2e
def test_a_source_that_dies_stops_the_process_with_the_reason(broker: Mosquitto,
                                                              collector: Collector,
                                                              tmp_path: Path) -> None:
    """A looping replay whose folder disappears: the stream is reported failed (not online
    and doing nothing), the other stream of the process stops too, and the exit code is 1."""
    dying = tmp_path / "dying"
    shutil.copytree(FOLDER / "walking_user1_rm1", dying)
    proc = run_edge(broker, tmp_path / "spool", "--speed", "10", "--loop", "--stream",
                      f"lab/dying=file://{dying}", "--stream", f"lab/fine=file://{FOLDER}")
    try:
        collector.wait_for(lambda: len(segments_of(collector, "lab", "dying")) >= 2
                           and len(segments_of(collector, "lab", "fine")) >= 2, 30,
                           "both streams")
        shutil.rmtree(dying)
        code, out = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, out
    collector.wait_for(lambda: not last_status(collector, "lab", "dying")["online"], 10,
                       "the failed stream's final status")
    statuses = [json.loads(m.payload) for m in collector.on(f"{PREFIX}/lab/dying/status")]
    online_error = [s for s in statuses if s["online"] and s["state"] == "error"]
    assert online_error, "the failure is published at once, before the stop"
    final = statuses[-1]
    assert final["state"] == "error" and not final["online"], final
    assert "no readable recording left" in final["error"], final["error"]
    assert len(final["error"]) <= 300
    assert "stream failed; stopping every stream" in out
    fine = last_status(collector, "lab", "fine")
    assert not fine["online"] and fine["state"] == "offline" and fine["error"] is None


def test_an_encoder_that_raises_fails_the_stream_and_the_process(
        broker: Mosquitto, collector: Collector, tmp_path: Path) -> None:
    """Any exception in the producer (here the encoder, on its third batch) is a failure: the
    status says so at once, every stream stops, the exit code is 1, and what was queued is
    kept."""
    import asyncio

    from csi_edge.agent import EdgeAgent
    from csi_edge.settings import load_settings

    settings = load_settings(model=MODEL, broker=broker.url, spool_dir=tmp_path / "spool",
                             status_heartbeat_s=30, speed="5", loop=True, drain_timeout_s=3,
                             models_dir=tmp_path / "fetched",
                             streams=[{"site": "lab", "ap": "bad", "source": f"file://{FOLDER}"},
                                      {"site": "lab", "ap": "good",
                                       "source": f"file://{FOLDER}"}])

    async def main() -> tuple[int, EdgeAgent]:
        agent = EdgeAgent(settings)
        agent.check()
        bad = agent.streams[0]
        calls = {"n": 0}
        encode = bad._encode

        def failing(segments: list) -> None:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("encoder exploded " + "x" * 1000)
            encode(segments)

        bad._encode = failing  # type: ignore[method-assign]
        return await asyncio.wait_for(agent.run(), 60), agent

    code, agent = asyncio.run(main())
    assert code == 1
    assert agent.streams[0].state == "error" and agent.streams[1].state != "error"
    collector.wait_for(lambda: not last_status(collector, "lab", "bad")["online"], 10,
                       "the final status")
    statuses = [json.loads(m.payload) for m in collector.on(f"{PREFIX}/lab/bad/status")]
    first_error = next(s for s in statuses if s["state"] == "error")
    assert first_error["online"]  # published at once, not at the 30 s status interval
    assert first_error["error"].startswith("stream failed: RuntimeError: encoder exploded")
    assert len(first_error["error"]) == 300
    assert statuses[-1]["state"] == "error" and not statuses[-1]["online"]
    good = last_status(collector, "lab", "good")
    assert not good["online"] and good["state"] == "offline"


@pytest.mark.e2e
def test_a_udp_port_taken_fails_the_stream_with_the_reason(broker: Mosquitto,
                                                           collector: Collector,
                                                           tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = run_edge(broker, tmp_path / "spool", "--source",
                          f"nexmon-udp://127.0.0.1:{port}", "--site", "lab", "--ap", "live")
        code, out = finish(proc, 60)
    assert code == 1, out
    collector.wait_for(lambda: collector.on(f"{PREFIX}/lab/live/status"), 10, "a status")
    final = last_status(collector, "lab", "live")
    assert final["state"] == "error" and not final["online"]
    assert "cannot listen" in final["error"] and str(port) in final["error"]


def _spooled(db: Path, what: str = "count(*)") -> int:
    """``what`` over the segments in a spool (read-only, beside the writer; -1: none yet)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            row = con.execute(f"SELECT {what} FROM segment").fetchone()
    except sqlite3.Error:
        return -1
    return -1 if row is None or row[0] is None else int(row[0])


@pytest.mark.e2e
def test_a_full_disk_drops_the_oldest_segments_and_keeps_streaming(
        broker: Mosquitto, collector: Collector, tmp_path: Path) -> None:
    """The spool on a real 3 MiB file system, of which it may use ~256 KiB before it counts
    as full, the broker down: the stream goes on, dropping its oldest segments (counted),
    and once the broker is back the newest arrive, in order; every segment encoded is either
    delivered or counted as dropped."""
    from test_edge_spool import small_filesystem

    with small_filesystem(tmp_path, 3 * 1024) as fs:
        broker.stop()
        env = {"CSI_EDGE_SPOOL_MIN_FREE_BYTES": str((3 << 20) - (256 << 10)),
               "CSI_EDGE_SPOOL_WAL_LIMIT_BYTES": str(64 << 10),
               "CSI_EDGE_DRAIN_TIMEOUT_S": "20"}
        proc = run_edge(broker, fs / "spool", "--source", f"file://{FOLDER}", "--site",
                          "lab", "--ap", "ap1", "--speed", "max", "--loop", "--level", "3",
                          env=env)
        try:
            deadline = time.monotonic() + 90
            db = fs / "spool" / "lab" / "ap1.sqlite"
            while True:  # until the spool, full, has dropped its oldest segments
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "the spool never filled"
                if db.exists() and _spooled(db, "min(seq)") > 100:
                    break
                time.sleep(0.5)
            # Still running, and still dropping the oldest to make room.
            oldest = _spooled(db, "min(seq)")
            wait_until(lambda: _spooled(db, "min(seq)") > oldest + 50, 30,
                       "more of the oldest segments dropped while the disk stays full",
                       lambda: _alive(proc))
            broker.start()
            collector.wait_for(lambda: collector.on(f"{PREFIX}/lab/ap1/status") and
                               last_status(collector, "lab", "ap1")["counters"]
                               ["segments_dropped_disk_full"] > 0, 60, "drops in the status")
            status = last_status(collector, "lab", "ap1")
            assert status["online"] and status["state"] == "streaming"
            assert "disk_full" in status["problems"]
            proc.send_signal(signal.SIGTERM)
            code, out = finish(proc, 60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 0, out
        collector.wait_for(lambda: not last_status(collector, "lab", "ap1")["online"], 20,
                           "the final status")
    final = last_status(collector, "lab", "ap1")["counters"]
    arrivals = first_arrivals(segments_of(collector, "lab", "ap1"))
    seqs = [seq for _, seq in arrivals]
    assert seqs == sorted(seqs) and seqs[0] > 0, "the oldest were dropped, the rest in order"
    assert final["segments_buffered"] == 0
    assert len(seqs) + final["segments_dropped_disk_full"] == final["segments_encoded"]
    assert final["segments_dropped_spool_full"] == 0
    # Logged once per episode (an episode ends when a drop made room), never per segment.
    assert "disk full" in out
    assert out.count("disk full") <= max(4, final["segments_dropped_disk_full"] // 20)


@pytest.mark.e2e
def test_stop_is_prompt_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    """SIGTERM during a long reconnect backoff: out within the drain time, spool kept."""
    # A bound, never listening socket: connections are refused, and no other process can
    # take the port meanwhile.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        # Every reconnect backoff 20 s or more, from the first: far longer than the 1 s drain,
        # so a busy machine's slow exit cannot pass for waiting one out.
        env = dict(os.environ, PYTHONUNBUFFERED="1", CSI_EDGE_DRAIN_TIMEOUT_S="1",
                   CSI_EDGE_RECONNECT_MIN_S="20")
        log = tmp_path / "edge.log"
        with log.open("w") as out_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(MODEL),
                 "--broker", f"mqtt://127.0.0.1:{port}", "--spool-dir", str(tmp_path / "spool"),
                 "--source", f"file://{SAMPLE}", "--site", "lab", "--ap", "ap1", "--speed",
                 "max"], stdout=out_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

        def backoff_s() -> float:  # the newest reconnect backoff the edge logged
            found = re.findall(r"retrying in ([0-9.]+) s", log.read_text())
            return float(found[-1]) if found else 0.0

        # Stopped during a backoff, once the spool holds what the edge encoded meanwhile.
        wait_until(lambda: backoff_s() >= 20, 60, "a reconnect backoff of 20 s or more")
        spool = tmp_path / "spool" / "lab" / "ap1.sqlite"
        wait_until(lambda: _spooled(spool) >= 8, 60, "8 segments spooled")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took = time.monotonic() - t0
        out = log.read_text()
    assert took < 10, f"stop took {took:.1f} s:\n{out[-2000:]}"
    assert out.count("retrying") < 20, "no tight reconnect loop while stopping"
    assert _spooled(spool) >= 8  # kept


def test_a_new_loop_pass_starts_a_new_epoch(broker: Mosquitto, collector: Collector,
                                            tmp_path: Path) -> None:
    """With ``loop_new_epoch`` each pass of a looping replay is its own epoch from seq 0, so
    the cloud never classifies the start of a pass with the end of the last one."""
    proc = run_edge(broker, tmp_path / "spool", "--source", f"file://{SAMPLE}", "--site",
                      "lab", "--ap", "ap1", "--speed", "max", "--loop", "--level", "3",
                      env={"CSI_EDGE_LOOP_NEW_EPOCH": "true"})
    try:
        collector.wait_for(lambda: len({e for e, _ in first_arrivals(
            segments_of(collector, "lab", "ap1"))}) >= 3, 60, "three passes")
    finally:
        proc.send_signal(signal.SIGTERM)
        finish(proc, 30)
    per_pass = len(Preprocessor(EdgeEncoder(MODEL).spec).process(read_recording(SAMPLE)).data)
    arrivals = first_arrivals(segments_of(collector, "lab", "ap1"))
    epochs = list(dict.fromkeys(e for e, _ in arrivals))
    assert [(e - epochs[0]) % 65536 for e in epochs] == list(range(len(epochs)))
    for epoch in epochs[:-1]:  # every finished pass: seq 0.. of one recording, nothing more
        seqs = [s for e, s in arrivals if e == epoch]
        assert seqs == list(range(len(seqs))), (epoch, seqs[:5])
        assert abs(len(seqs) - per_pass) <= 1, (len(seqs), per_pass)
