"""The dashboard at ``/``: its assets in-process (TestClient), the CSI endpoint behind the
heatmap, and the page itself in a real headless Chromium against a real broker, a real cloud
subprocess and a real edge agent replaying the committed Nexmon samples."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _broker import Mosquitto
from _browser import page_errors
from _harness import FOLDER, MODEL, TOKEN, Cloud
from fastapi.testclient import TestClient

from csi_cloud.api.app import create_app
from csi_cloud.dashboard import ASSETS
from csi_cloud.dashboard import FOLDER as DASHBOARD
from csi_cloud.settings import CloudSettings
from csi_edge import read_recording
from csi_edge.bundle import EdgeEncoder
from csi_edge.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EXTERNAL = re.compile(r"https?://|//cdn", re.IGNORECASE)


# -- in-process: the assets and the CSI endpoint -------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("dashboard")
    settings = CloudSettings(broker=None, dev=True, token=TOKEN, db=f"sqlite:///{tmp}/db.sqlite",
                             models=ROOT / "models", recordings=tmp / "rec", jobs_dir=tmp / "jobs")
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(("path", "media_type"), [("/", "text/html"),
                                                  ("/app.js", "text/javascript"),
                                                  ("/style.css", "text/css")])
def test_assets_are_served_with_their_types(client: TestClient, path: str,
                                            media_type: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == media_type
    assert response.text.strip()
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert client.head(path).status_code == 200


def test_every_asset_is_served_and_local(client: TestClient) -> None:
    on_disk = {p.name for p in DASHBOARD.iterdir()
               if p.is_file() and p.suffix in (".html", ".js", ".css")}
    assert on_disk == {name for name, _ in ASSETS.values()}, "a file the routes do not serve"
    for path in ASSETS:
        text = client.get(path).text
        assert not EXTERNAL.search(text), f"{path} refers to another origin: " \
            f"{EXTERNAL.search(text)}"
    index = client.get("/").text
    refs = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert {"app.js", "style.css"} <= set(refs)
    for ref in refs:
        if ref.startswith("data:"):
            continue
        assert client.get(f"/{ref}").status_code == 200, ref


def test_dashboard_is_package_data() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\][^\[]*csi_cloud = \["dashboard/\*"\]',
                     text)


def test_api_stays_json_and_dashboard_stays_out_of_the_schema(client: TestClient) -> None:
    assert client.get("/api/v1/nothing-here").json() == {"detail": "Not Found"}
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_csi_endpoint_reconstructs_the_latest_segment(client: TestClient) -> None:
    assert client.get("/api/v1/aps/lab/none/csi").status_code == 404
    service = client.app.state.service  # type: ignore[attr-defined]
    edge = EdgeEncoder(MODEL)
    pcap = FOLDER / "walking_user1_rm1" / "walking_user1_rm1_10.pcap"
    batch = Preprocessor(edge.spec).process(read_recording(pcap))
    payloads = [edge.compress(batch.data[i : i + 1], level=3, first_seq=i, epoch=7,
                              timestamp_ms=1_700_000_000_000 + 1000 * i) for i in range(3)]
    result = service.ingestor.process([("lab", "csi", p, time.time()) for p in payloads])
    assert len(result.predictions) == 3

    response = client.get("/api/v1/aps/lab/csi/csi")
    assert response.status_code == 200
    body = response.json()
    spec = edge.spec
    assert (body["epoch"], body["seq"], body["rate_level"]) == (7, 2, 3)
    assert body["timestamp"] == pytest.approx(1_700_000_002.0)
    assert body["model"] == edge.manifest.id and body["model_name"] == "fition"
    assert body["domain"] == "log1p_amplitude" and spec.normalisation == "log"
    assert body["subcarriers"] == list(spec.subcarriers)
    assert body["frames"] == spec.segment_frames == len(body["values"])
    assert body["rate_hz"] == spec.nominal_rate_hz
    values = np.array(body["values"])
    assert values.shape == (spec.segment_frames, len(spec.subcarriers))
    assert values.min() == pytest.approx(body["min"]) and values.max() == pytest.approx(body["max"])
    # In the input's domain: close to the segment that was sent (log1p of the amplitude).
    sent = batch.data[2, :, 0, :]
    assert np.abs(values - sent).mean() < 0.25 * np.abs(sent - sent.mean()).mean() + 0.1
    assert np.corrcoef(values.mean(axis=0), sent.mean(axis=0))[0, 1] > 0.9
    assert client.get("/api/v1/aps/lab/csi/csi", params={"antenna": 1}).status_code == 422


# -- a real browser --------------------------------------------------------------------------------


def _edge(broker: Mosquitto, folder: Path, *args: str) -> subprocess.Popen[bytes]:
    with (folder / "edge.log").open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "csi_edge.cli", "edge", "--model", str(MODEL), "--broker",
             broker.url, "--spool-dir", str(folder / "spool"), "--status-interval", "1", *args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env=dict(os.environ, CSI_EDGE_MODELS_DIR=str(folder / "fetched")))


def stop_edge(edge: subprocess.Popen[bytes]) -> None:
    edge.send_signal(signal.SIGINT)
    try:
        edge.wait(20)
    except subprocess.TimeoutExpired:
        edge.kill()
        edge.wait(5)


def _wait(check: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{logs()}")
        time.sleep(0.2)


HEATMAP_PIXELS = """
const c = document.getElementById("heatmap");
const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
let painted = 0, total = 0;
const colours = new Set();
for (let i = 0; i < d.length; i += 4 * 5) {
  total++;
  if (d[i + 3] > 0) { painted++; colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]); }
}
return [painted, total, colours.size];
"""


@pytest.mark.e2e
def test_dashboard_in_chromium(broker: Mosquitto, tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'cloud.db'}", tmp_path)
    cloud.start()
    edge = _edge(broker, tmp_path, "--source", f"file://{FOLDER}", "--site", "lab", "--ap",
                 "ap1", "--speed", "4", "--loop", "--level", "2")
    row = 'tr[data-ap="lab/ap1"]'

    def text(selector: str) -> str:
        return browser.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : ''",
            selector)

    def logs() -> str:
        edge_log = (tmp_path / "edge.log").read_text(errors="replace")[-1500:]
        return (f"page: {text('main')[:1500]}\nconsole: {browser.get_log('browser')[-10:]}\n"
                f"edge: {edge_log}\ncloud: {cloud.log.read_text(errors='replace')[-1500:]}")

    try:
        browser.get(f"{cloud.url}/")
        assert browser.title.startswith("csi-pipeline")
        assert browser.find_element(By.ID, "view-rooms").is_displayed()  # people's view first
        browser.find_element(By.ID, "tab-console").click()
        assert "view=console" in browser.current_url
        labels = EdgeEncoder(MODEL).manifest.labels
        _wait(lambda: text(f"{row} span.activity") in labels["activity"], 90,
              "the AP with an activity", logs)
        assert text(f"{row} .state") == "online"
        assert text(f"{row} span.identity") in labels["identity"]
        assert "confident" in text(f"{row} td:nth-child(3)")
        _wait(lambda: browser.find_element(By.ID, "transport").get_attribute("data-kind")
              == "ws", 10, "the WebSocket", logs)

        # Predictions keep arriving: the shown segment number advances, live.
        seen = [text(f"{row} span.seq")]
        for _ in range(3):
            seen.append(_wait(lambda: (s := text(f"{row} span.seq")) != seen[-1] and s, 20,
                              f"a segment after {seen[-1]}", logs))
        numbers = [int(s.lstrip("#")) for s in seen]
        assert numbers == sorted(numbers) and len(set(numbers)) == 4, seen

        # The heatmap of the selected AP (the only one, selected by default) is painted.
        _wait(lambda: "Reconstructed CSI of segment" in text("#heatmap-caption"), 20,
              "the heatmap caption", logs)
        painted, total, colours = browser.execute_script(HEATMAP_PIXELS)
        assert painted > 0.95 * total and colours > 20, (painted, total, colours)
        assert "log(1 + |H|)" in text("#heatmap-caption")
        assert "56 subcarriers" in text("#heatmap-caption")
        browser.find_element(By.ID, "relative").click()  # each subcarrier minus its mean
        assert "minus each subcarrier's segment mean" in text("#heatmap-caption")
        assert browser.execute_script(HEATMAP_PIXELS)[2] > 20
        browser.find_element(By.ID, "relative").click()
        assert "minus" not in text("#heatmap-caption")

        # History beside it.
        _wait(lambda: browser.execute_script(
            "return document.querySelectorAll('#history li').length") >= 3, 20, "history", logs)
        assert browser.execute_script("return document.querySelectorAll('#strip span').length") \
            >= 3
        assert text("#legend") == "".join(labels["activity"])

        # Payload bytes/s next to what the raw CSI would need.
        def number(selector: str) -> float:
            shown = text(selector).replace(",", "")
            return float(shown) if re.fullmatch(r"[0-9.]+", shown) else 0.0

        _wait(lambda: number(f"{row} span.payload-value") > 0, 30, "payload bytes/s", logs)
        payload = number(f"{row} span.payload-value")
        raw = number(f"{row} span.raw-value")
        native = EdgeEncoder(MODEL).manifest.metrics["test_split"]["native_bytes_per_s"]
        assert raw == pytest.approx(native, abs=1)
        assert 0 < payload < raw / 10, (payload, raw)
        assert "less sent" in text(f"{row} td.raw")
        assert text(f"{row} span.gaps-value").isdigit()
        assert text(f"{row} td.model").startswith("fition")
        assert text(f"{row} span.level") == "2"

        # The rate control: without a token it says so; with it the AP goes to level 0.
        Select(browser.find_element(By.CSS_SELECTOR, f"{row} select.rate-select")) \
            .select_by_value("0")
        browser.find_element(By.CSS_SELECTOR, f"{row} button.rate-set").click()
        _wait(lambda: "token" in text(f"{row} output.rate-result"), 20, "the token hint", logs)
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        _wait(lambda: "saved" in text("#token-state"), 20, "the token saved", logs)
        assert browser.execute_script("return sessionStorage.getItem('csi-token')") == TOKEN
        browser.find_element(By.CSS_SELECTOR, f"{row} button.rate-set").click()

        def reported_level() -> bool:
            ap = httpx.get(f"{cloud.url}/api/v1/aps/lab/ap1", timeout=5).json()
            return (ap["status"] or {}).get("rate_level") == 0

        _wait(reported_level, 30, "the edge's status at rate level 0", logs)
        _wait(lambda: text(f"{row} span.level") == "0", 10, "level 0 on the page", logs)
        _wait(lambda: "runs level 0" in text(f"{row} output.rate-result"), 10,
              "the confirmation", logs)
        _wait(lambda: cloud.get("/aps/lab/ap1")["rate_level"] == 0  # type: ignore[index]
              and cloud.get("/predictions", site="lab", ap="ap1",  # type: ignore[index]
                            limit=1)["data"][0]["rate_level"] == 0,
              30, "predictions at level 0", logs)

        problems = page_errors(browser)
        assert not problems, problems
        ARTIFACTS.mkdir(exist_ok=True)
        time.sleep(1.5)  # one more poll and heatmap refresh for the picture
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

        # The fallbacks: without WebSockets the page follows the SSE stream; without either it
        # polls /api/v1/aps. Either way the shown segment keeps advancing.
        for blocked, kind in (("WebSocket", "sse"), ("EventSource", "poll")):
            browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {
                "source": f"window.{blocked} = function () {{ throw new Error('blocked'); }};"})
            browser.refresh()
            _wait(lambda kind=kind: browser.find_element(By.ID, "transport")
                  .get_attribute("data-kind") == kind, 15, f"transport {kind}", logs)
            first = _wait(lambda: text(f"{row} span.seq").startswith("#")
                          and text(f"{row} span.seq"), 15, "a prediction", logs)
            shown = _wait(lambda first=first: (s := text(f"{row} span.seq")) not in ("", first)
                          and s, 20, f"a new prediction over {kind}", logs)
            _wait(lambda shown=shown: f"{shown} " in text("#history li"), 10,
                  f"{shown} in the history over {kind}", logs)
    finally:
        stop_edge(edge)
        cloud.stop()
