"""Presence end to end: a real Mosquitto, a real edge streaming ESP32 recordings without a bundle
(presence only), the real cloud; presence over the API and in Home Assistant discovery."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import jinja2
import pytest
from _broker import Mosquitto
from _browser import page_errors
from _esp32 import channel, write_espectre
from _harness import TOKEN, Cloud, run_edge
from _mqtt_client import Collector

RATE = 100.0


def _stop(edge: subprocess.Popen[str]) -> None:
    edge.terminate()
    try:
        edge.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        edge.kill()
        edge.communicate()


def render(template: str, payload: bytes) -> str:
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload))


@pytest.mark.e2e
def test_esp32_presence_only_to_api_and_home_assistant(broker: Mosquitto,
                                                       tmp_path: Path) -> None:
    data = tmp_path / "esp32"
    # A quiet room, someone moving for 8 s, the room quiet again (one chip, gain not locked).
    for name, moving in (("1_baseline", None), ("2_movement", (0.0, 8.0)),
                         ("3_baseline", None)):
        write_espectre(data / f"{name}.npz", channel(800, RATE, moving=moving, seed=11,
                                                     gain_jitter_db=1.0),
                       chip="esp32", rate_hz=RATE, label=name[2:])
    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'cloud.db'}", tmp_path)
    cloud.env["CSI_CLOUD_PRESENCE_HOLD_S"] = "3"
    cloud.start()
    ha = Collector(broker.port, ["homeassistant/#", "csi/v1/+/+/pred"],
                   client_id="home-assistant", persistent=False)
    try:
        _check(cloud, ha, data, broker, tmp_path)
    finally:
        ha.close()
        cloud.stop()


def _check(cloud: Cloud, ha: Collector, data: Path, broker: Mosquitto, tmp_path: Path) -> None:
    edge = run_edge(broker, tmp_path / "spool", "--presence-only", "--source",
                    f"file://{data}", "--site", "home", "--ap", "hall", "--speed", "2")
    pred_topic = "csi/v1/home/hall/pred"
    try:
        ha.wait_for(lambda: any(json.loads(m.payload).get("presence") is True
                                for m in ha.on(pred_topic)), 60, "an occupied prediction")
        ha.wait_for(lambda: json.loads(ha.on(pred_topic)[-1].payload).get("presence") is False,
                    60, "empty again after the hold")
        out, _ = edge.communicate(timeout=60)
        assert edge.returncode == 0, out
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.communicate()
    preds = [json.loads(m.payload) for m in ha.on(pred_topic)]
    assert all(p["model"] is None and p["activity"] is None for p in preds)
    scored = [p for p in preds if p["motion_score"] is not None]
    moving = [p for p in scored if p["motion"]]
    still = [p for p in scored if not p["motion"]]
    assert len(moving) >= 5 and len(still) >= 5
    assert min(p["motion_score"] for p in moving) >= 1.5 > max(
        p["motion_score"] for p in still)

    # Home Assistant: occupancy, motion and a motion score; no activity without a model.
    configs = {m.topic: m.payload for m in ha.messages if m.topic.startswith(
        "homeassistant/")}
    node = "csi_home_hall"
    occupancy = json.loads(configs[f"homeassistant/binary_sensor/{node}/occupancy/config"])
    motion = json.loads(configs[f"homeassistant/binary_sensor/{node}/motion/config"])
    score = json.loads(configs[f"homeassistant/sensor/{node}/motion_score/config"])
    assert occupancy["device_class"] == "occupancy" and motion["device_class"] == "motion"
    assert configs[f"homeassistant/sensor/{node}/activity/config"] == b""
    assert configs[f"homeassistant/binary_sensor/{node}/presence/config"] == b""
    states = {render(occupancy["value_template"], m.payload) for m in ha.on(pred_topic)}
    assert {"ON", "OFF"} <= states
    assert {render(motion["value_template"], m.payload)
            for m in ha.on(pred_topic)} >= {"ON", "OFF"}
    last = ha.on(pred_topic)[-1].payload
    assert float(render(score["value_template"], last)) == json.loads(last)["motion_score"]

    # The API: the AP in presence-only mode, its predictions stored with presence.
    ap = cloud.get("/aps/home/hall")
    assert isinstance(ap, dict)
    assert ap["status"]["mode"] == "presence-only" and ap["model"] is None
    assert ap["status"]["motion"]["calibrated"] is True
    assert ap["prediction"]["presence"] is False
    page = cloud.get("/predictions", site="home", ap="hall", limit=100)
    assert isinstance(page, dict)
    stored = page["data"]
    assert len(stored) >= len(preds) and any(p["presence"] for p in stored)
    assert ap["gaps"] == 0


@pytest.mark.e2e
def test_presence_only_edge_rejects_a_rate_change(broker: Mosquitto, tmp_path: Path) -> None:
    """``set_rate`` on a presence-only AP is refused and reported in its status."""
    path = write_espectre(tmp_path / "x.npz", channel(3000, RATE, seed=12), rate_hz=RATE)
    ha = Collector(broker.port, ["csi/v1/home/den/status"], client_id="watcher",
                   persistent=False)
    edge = run_edge(broker, tmp_path / "spool", "--presence-only", "--source",
                    f"file://{path}", "--site", "home", "--ap", "den")
    try:
        ha.wait_for(lambda: any(json.loads(m.payload).get("online")
                                for m in ha.on("csi/v1/home/den/status")), 30, "online")
        ha.publish("csi/v1/home/den/ctl", json.dumps({"action": "set_rate", "level": 2}))
        ha.wait_for(lambda: any("no rate levels" in (json.loads(m.payload).get("error") or "")
                                for m in ha.on("csi/v1/home/den/status")), 30,
                    "the rejection in the status")
    finally:
        _stop(edge)
        ha.close()


@pytest.mark.e2e
def test_demo_on_esp32_recordings_shows_presence(tmp_path: Path) -> None:
    """``csi demo --data`` on ESPectre-style folders: presence only, each AP alternating
    between a quiet and a moving recording, occupied and empty in turn."""
    import os
    import sys

    from _broker import free_port

    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "esp32"
    for k, chip in enumerate(("c6", "esp32")):
        write_espectre(data / "baseline" / f"baseline_{chip}.npz",
                       channel(800, RATE, seed=20 + k), chip=chip, rate_hz=RATE,
                       label="baseline")
        write_espectre(data / "movement" / f"movement_{chip}.npz",
                       channel(800, RATE, moving=(0.0, 8.0), seed=20 + k), chip=chip,
                       rate_hz=RATE, label="movement")
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "csi_cloud.cli", "demo", "--data", str(data), "--aps", "2",
         "--http", f"127.0.0.1:{port}", "--duration", "45", "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=root, timeout=180,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "so presence only" in out
    assert "demo/ap1 alternates: baseline_c6.npz then movement_c6.npz" in out
    for ap in ("demo/ap1", "demo/ap2"):
        lines = [line for line in out.splitlines() if line.startswith(ap + " ")]
        states = [line.split()[3] for line in lines]
        assert "occupied" in states and "empty" in states, lines
        assert "calibrating" in states[:3], lines


@pytest.mark.e2e
def test_presence_measured_on_the_empty_room_from_the_dashboard(broker: Mosquitto,
                                                                 tmp_path: Path,
                                                                 browser: Any) -> None:
    """The room card's "Measure the empty room" in Chromium: the API's ctl, the edge waits
    (10 s to leave, the ~5 s its statistic looks back), measures 30 s and pins its reference
    (the AP's status says so, the card too); the movement after it scores against the empty
    room; "Back to automatic" releases it."""
    from selenium.webdriver.common.by import By

    data = tmp_path / "esp32"
    # One room (one seed: the same static paths): empty for 150 s, then someone moving; the
    # replay loops (a slow machine must not run out of stream).
    write_espectre(data / "1_baseline.npz", channel(15000, RATE, seed=31), chip="esp32",
                   rate_hz=RATE, label="baseline")
    write_espectre(data / "2_movement.npz", channel(6000, RATE, moving=(0.0, 60.0), seed=31),
                   chip="esp32", rate_hz=RATE, label="movement")
    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'cloud.db'}", tmp_path)
    cloud.env["CSI_CLOUD_PRESENCE_HOLD_S"] = "3"
    cloud.start()
    edge = run_edge(broker, tmp_path / "spool", "--presence-only", "--source",
                    f"file://{data}", "--site", "home", "--ap", "hall", "--speed", "3", "--loop")
    card = 'article.room[data-ap="home/hall"]'

    def text(selector: str) -> str:
        return str(browser.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : ''",
            selector))

    def motion() -> dict[str, Any]:
        ap = cloud.get("/aps/home/hall")
        return ((ap.get("status") or {}).get("motion") or {}) if isinstance(ap, dict) else {}

    def wait(check: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline or edge.poll() is not None:
                raise AssertionError(f"{what}: page {text('main')[:800]!r}, status {motion()}, "
                                     f"edge {edge.poll()}")
            time.sleep(0.2)
        return value

    try:
        browser.get(f"{cloud.url}/")
        wait(lambda: "calibrating itself" in text(f"{card} .presence-calibration summary"), 60,
             "the card with automatic presence")
        browser.find_element(By.CSS_SELECTOR, f"{card} .presence-calibration summary").click()
        browser.find_element(By.CSS_SELECTOR, f"{card} button.measure-empty").click()
        wait(lambda: "token" in text(f"{card} output.calibration-result"), 20, "the token hint")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        browser.find_element(By.CSS_SELECTOR, f"{card} button.measure-empty").click()
        wait(lambda: "leave the room" in text(f"{card} output.calibration-result"), 10,
             "the measurement sent")
        assert "measuring" in text(f"{card} .presence-calibration summary")
        assert browser.find_element(By.CSS_SELECTOR, f"{card} button.measure-empty") \
            .get_attribute("disabled") is not None
        wait(lambda: motion().get("mode") == "pinned", 60, "the edge's pinned reference")
        wait(lambda: "calibrated on the empty room" in text(
            f"{card} .presence-calibration summary"), 40, "the card saying so")
        pinned = motion()["reference"]

        # The movement after it: motion against the empty room's reference.
        def moving() -> list[dict[str, Any]]:
            page = cloud.get("/predictions", site="home", ap="hall", limit=200)
            assert isinstance(page, dict)
            return [p for p in page["data"] if p["motion"]]

        wait(lambda: len(moving()) >= 5, 60, "motion during the movement")
        assert motion()["reference"] == pinned  # the movement does not move the reference

        browser.find_element(By.CSS_SELECTOR, f"{card} button.release-empty").click()
        wait(lambda: motion().get("mode") == "auto", 30, "back to automatic")
        wait(lambda: "calibrating itself" in text(f"{card} .presence-calibration summary"), 30,
             "the card back to automatic")

        # The room's own motion threshold, fitted on labelled seconds from the card: a still
        # stretch of the empty room and a moving one, labelled through the API.
        assert "the site's" in text(f"{card} .threshold-text")
        page = cloud.get("/predictions", site="home", ap="hall", limit=1000)
        assert isinstance(page, dict)
        scored = sorted(p["timestamp"] for p in page["data"] if p["motion_score"] is not None)
        moved = min(p["timestamp"] for p in page["data"] if p["motion"])

        def moving_scored() -> list[float]:
            page = cloud.get("/predictions", site="home", ap="hall", limit=1000)
            assert isinstance(page, dict)
            return sorted(p["timestamp"] for p in page["data"]
                          if p["motion_score"] is not None and p["timestamp"] >= moved)

        # A fit needs 10 scored seconds of each kind: label a moving stretch already stored.
        stored = wait(lambda: (ts := moving_scored())[11:] and ts, 60, "12 s of movement stored")
        for start, end, activity in ((scored[0], scored[0] + 20, "nm"),
                                     (moved, stored[11] + 0.5, "walking")):
            r = httpx.post(f"{cloud.url}/api/v1/labels", headers={
                "Authorization": f"Bearer {TOKEN}"}, json={
                "site": "home", "ap": "hall", "start": start, "end": end,
                "activity": activity}, timeout=10)
            assert r.status_code == 201, r.text
        browser.find_element(By.CSS_SELECTOR, f"{card} button.fit-threshold").click()
        wait(lambda: "fitted: motion from a score of" in text(
            f"{card} output.calibration-result"), 20, "the fitted threshold")
        wait(lambda: "this room's" in text(f"{card} .threshold-text"), 20, "the card saying so")
        own = cloud.get("/aps/home/hall")
        assert isinstance(own, dict) and own["motion_threshold"]["how"] == "fitted"
        fitted = float(own["motion_threshold"]["threshold"])  # JS prints 1.0 as "1"
        assert f"this room's, {fitted:g} " in text(f"{card} .threshold-text")
        browser.find_element(By.CSS_SELECTOR, f"{card} button.site-threshold").click()
        wait(lambda: "the site's" in text(f"{card} .threshold-text"), 20,
             "back to the site's threshold")
        back = cloud.get("/aps/home/hall")
        assert isinstance(back, dict) and back["motion_threshold"] is None
        problems = page_errors(browser)
        assert not problems, problems
    finally:
        _stop(edge)
        cloud.stop()
