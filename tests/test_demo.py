"""``csi demo`` as a newcomer runs it: predictions over HTTP within 60 s, clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from _broker import deploy_settings, free_port, mosquitto_binary

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _pids_with(text: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _run_demo(tmp_path: Path, *args: str, browser: Any = None
              ) -> tuple[list[dict], float, str, Path]:
    port = free_port()
    work = tmp_path / "demo"
    # Into a file, not a pipe: a pipe nobody reads while the test waits would block the
    # demo's printing once full.
    log = tmp_path / "demo.out"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi_cloud.cli", "demo", "--http", f"127.0.0.1:{port}",
             "--workdir", str(work), *args],
            stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    started = time.monotonic()
    aps: list[dict] = []
    try:
        while time.monotonic() - started < 60:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/aps",
                                            timeout=2) as r:
                    aps = json.loads(r.read())["data"]
            except OSError:
                aps = []
            if len(aps) >= 2 and all(a["prediction"] for a in aps):
                break
            time.sleep(0.5)
        ready_s = time.monotonic() - started
        assert len(aps) >= 2 and all(a["prediction"] for a in aps), \
            f"no predictions within 60 s: {aps}"
        assert _pids_with(str(work)), "children should be running"
        if browser is not None:
            _check_dashboard(browser, f"http://127.0.0.1:{port}/", [
                f"{a['site']}/{a['ap']}" for a in aps])
        time.sleep(3)  # the demo prints its live lines every 2 s
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        stop_s = time.monotonic() - t0
        out = log.read_text()
    assert proc.returncode == 0, out
    # Bounded by the demo's own stop limits (3 s edges, 5 s cloud, 5 s broker, then killed)
    # plus a busy machine's slack; a child signalled last may take a moment to be gone.
    assert stop_s <= 20, f"Ctrl-C took {stop_s:.1f} s"
    deadline = time.monotonic() + 10
    while _pids_with(str(work)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pids_with(str(work)), "a child outlived the demo"
    return aps, ready_s, out, work


def _check_dashboard(browser: Any, url: str, names: list[str]) -> None:
    """The demo's APs are on the dashboard with live activities, and they update."""
    from csi_edge.bundle import load_manifest

    activities = load_manifest(ROOT / "models" / "fition").labels["activity"] or []

    def text(selector: str) -> str:
        return str(browser.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : ''",
            selector))

    browser.get(url)
    deadline = time.monotonic() + 30
    while not all(text(f'tr[data-ap="{n}"] span.activity') in activities for n in names):
        assert time.monotonic() < deadline, f"dashboard: {text('main')[:800]}"
        time.sleep(0.3)
    first = text(f'tr[data-ap="{names[0]}"] td:nth-child(5)')
    deadline = time.monotonic() + 20
    while text(f'tr[data-ap="{names[0]}"] td:nth-child(5)') == first:
        assert time.monotonic() < deadline, "the dashboard did not update"
        time.sleep(0.3)
    artifacts = ROOT / "tests" / "artifacts"
    artifacts.mkdir(exist_ok=True)
    browser.save_screenshot(str(artifacts / "demo.png"))


def test_demo_broker_keeps_the_deployments_persistence_and_queue_settings(
        tmp_path: Path) -> None:
    """The demo's Mosquitto queues for the cloud's session like a deployment: persistence on,
    the same autosave and byte-bounded queue (not Mosquitto's default 1000 messages)."""
    from csi_cloud.demo import BROKER_PERSISTENCE, demo_broker_config

    assert deploy_settings() == BROKER_PERSISTENCE
    text = demo_broker_config(1884, tmp_path / "data")
    lines = set(text.splitlines())
    assert {"persistence true", f"persistence_location {tmp_path / 'data'}/",
            "listener 1884 127.0.0.1"} <= lines
    assert {f"{k} {v}" for k, v in deploy_settings().items()} <= lines
    assert (tmp_path / "data").is_dir()


@pytest.mark.e2e
def test_demo_with_mosquitto(tmp_path: Path, browser: Any) -> None:
    if mosquitto_binary() is None:
        if IN_CI:
            pytest.fail("CI=true but mosquitto is not installed")
        pytest.skip("needs mosquitto (the embedded broker is tested below)")
    aps, ready_s, out, work = _run_demo(tmp_path, "--aps", "2", browser=browser)
    assert {a["ap"] for a in aps} == {"ap1", "ap2"}
    assert (work / "broker-data" / "mosquitto.db").is_file()  # written at the clean stop
    assert all(a["prediction"]["activity"] for a in aps)
    assert "dashboard: http://127.0.0.1:" in out and "mosquitto" in out
    assert "demo/ap1" in out and "B/s" in out  # the live line per AP
    assert ready_s < 60


@pytest.mark.e2e
def test_demo_with_the_embedded_broker(tmp_path: Path) -> None:
    aps, _, out, _ = _run_demo(tmp_path, "--aps", "2", "--broker", "embedded")
    assert "embedded Python broker" in out
    assert all(a["prediction"]["activity"] for a in aps)


@pytest.mark.e2e
def test_demo_moves_off_a_taken_broker_port(tmp_path: Path) -> None:
    """The machine's own Mosquitto holds 1883: the demo says so and picks another port."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        # Take 1883 ourselves when we can. When binding fails, something else holds it (a
        # system broker, or a socket bound without listening); the demo's own bind check,
        # with the same SO_REUSEADDR, sees the same thing, which is the case under test.
        holder = stack.enter_context(socket.socket())
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past a TIME_WAIT
        try:
            holder.bind(("127.0.0.1", 1883))
            holder.listen()
        except OSError:
            pass
        _, _, out, _ = _run_demo(tmp_path, "--aps", "2")
    assert "port 1883 is taken" in out
