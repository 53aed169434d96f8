"""The dashboard's views at a phone's, a laptop's and a desktop's width, in a real headless
Chromium against a real broker, cloud and edge replaying the committed samples: nothing may
overflow the viewport (no horizontal scroll), and the rooms view shows what a person needs
(occupied or empty, the activity, who, the truth beside it where the stream is labelled, the
event timeline). Screenshots of every view and width go to the test's tmp dir."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from _broker import Mosquitto
from _browser import page_errors
from _harness import FOLDER, MODEL, TOKEN, Cloud
from test_dashboard import _edge, _wait, stop_edge

from csi_edge.bundle import EdgeEncoder

WALK = FOLDER / "walking_user1_rm1" / "walking_user1_rm1_10.pcap"
WIDTHS = (390, 1280, 1920)

# Every visible element that reaches past the viewport, except inside an element that scrolls
# or clips horizontally (a wide table may scroll inside its own box on a phone); plus the
# document itself being wider than the window.
OVERFLOW = """
const width = document.documentElement.clientWidth;
const problems = [];
// On a phone the browser widens innerWidth to fit an overflowing page: compare with both.
const viewport = Math.min(window.innerWidth, width);
if (document.documentElement.scrollWidth > viewport) {
  problems.push(`document scrollWidth ${document.documentElement.scrollWidth} > innerWidth ` +
                `${window.innerWidth} / clientWidth ${width}`);
}
const name = (e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") +
  (e.className && typeof e.className === "string" ? "." + e.className.split(" ").join(".") : "");
for (const e of document.querySelectorAll("body *")) {
  if (!e.getClientRects().length) continue;  // not rendered (a hidden view)
  let clipped = false;
  for (let p = e.parentElement; p && p !== document.body; p = p.parentElement) {
    if (getComputedStyle(p).overflowX !== "visible") { clipped = true; break; }
  }
  if (clipped) continue;
  const r = e.getBoundingClientRect();
  if (r.right > width + 0.5 || r.left < -0.5) {
    problems.push(`${name(e)} spans ${Math.round(r.left)}..${Math.round(r.right)} of ${width}`);
  }
}
return problems;
"""

SCROLLING = """
return [...document.querySelectorAll(".table-scroll")]
  .filter((e) => e.getClientRects().length && e.scrollWidth > e.clientWidth + 1)
  .map((e) => `${e.firstElementChild.id}: ${e.scrollWidth} > ${e.clientWidth}`);
"""


def _viewport(browser: Any, width: int) -> None:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 900 if width < 1000 else 1000, "deviceScaleFactor": 1,
        "mobile": width < 600})


@pytest.mark.e2e
def test_views_fit_every_width(broker: Mosquitto, tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'cloud.db'}", tmp_path)
    cloud.start()
    # lab/ap1 replays one labelled recording (its truth is posted below), lab/ap2 the folder.
    edge = _edge(broker, tmp_path, "--stream", f"lab/ap1=file://{WALK}", "--stream",
                 f"lab/ap2=file://{FOLDER}", "--speed", "4", "--loop", "--level", "2")
    labels = EdgeEncoder(MODEL).manifest.labels

    def text(selector: str) -> str:
        return browser.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : ''",
            selector)

    def logs() -> str:
        return (f"page: {text('main')[:1500]}\nconsole: {browser.get_log('browser')[-10:]}\n"
                f"edge: {(tmp_path / 'edge.log').read_text(errors='replace')[-1500:]}\n"
                f"cloud: {cloud.log.read_text(errors='replace')[-1500:]}")

    try:
        _wait(lambda: len(cloud.get("/aps")["data"]) == 2, 90,  # type: ignore[index]
              "both APs", logs)
        now = time.time()
        label = httpx.post(f"{cloud.url}/api/v1/labels", timeout=10,
                           headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"site": "lab", "ap": "ap1", "start": now - 600,
                                 "end": now + 3600, "activity": "walking",
                                 "identity": "user1"})
        assert label.status_code == 201, label.text

        browser.get(f"{cloud.url}/")
        card = 'article.room[data-ap="lab/ap1"]'
        _wait(lambda: text(f"{card} .room-activity") in labels["activity"], 60,
              "an activity on the card", logs)
        assert text(f"{card} .presence").split(" ·")[0] in ("Occupied", "Empty") or \
            "presence" in text(f"{card} .presence")
        assert text(f"{card} .who").startswith("Who: ")
        assert text(f"{card} .who").split()[1] in labels["identity"]
        _wait(lambda: text(f"{card} .truth").startswith("Truth: walking"), 30, "the truth",
              logs)
        _wait(lambda: "labelled s" in text(f"{card} .accuracy"), 30, "the running accuracy",
              logs)
        assert "Truth" not in text('article.room[data-ap="lab/ap2"]')  # no label there
        _wait(lambda: browser.execute_script(
            "return document.querySelectorAll('#timeline li').length") >= 2, 30,
            "events in the timeline", logs)
        assert browser.execute_script(
            "return document.querySelectorAll('#rooms article.room').length") == 2

        problems = {}
        for width in WIDTHS:
            _viewport(browser, width)
            for view in ("rooms", "calibrate", "console"):
                browser.find_element(By.ID, f"tab-{view}").click()
                assert browser.find_element(By.ID, f"view-{view}").is_displayed()
                if view == "console":
                    _wait(lambda: "Reconstructed CSI" in text("#heatmap-caption"), 20,
                          "the heatmap", logs)
                if view == "calibrate":
                    _wait(lambda: browser.execute_script(
                        "return document.querySelectorAll('#cal-what option').length") > 0,
                        20, "the calibration pickers", logs)
                time.sleep(0.3)  # a frame for the layout after the switch
                shot = tmp_path / f"dashboard-{view}-{width}.png"
                assert browser.save_screenshot(str(shot)), shot
                found = browser.execute_script(OVERFLOW)
                if width >= 1280:  # wide enough: not even a table scrolls in its box
                    found += browser.execute_script(SCROLLING)
                if found:
                    problems[f"{view} at {width} px"] = found[:10]
        assert not problems, problems
        errors = page_errors(browser)
        assert not errors, errors
    finally:
        stop_edge(edge)
        cloud.stop()


def test_overflow_check_catches_a_wide_element(tmp_path: Path, browser: Any) -> None:
    """The check itself: a page wider than the window, and a wide element in a scrolling
    box (allowed) next to one outside it (not)."""
    page = tmp_path / "wide.html"
    page.write_text('<!doctype html><meta name="viewport" content="width=device-width">'
                    '<div style="overflow-x:auto"><div style="width:2000px">in a box</div></div>'
                    '<p id="wide" style="width:900px">too wide</p>')
    _viewport(browser, 390)
    browser.get(page.as_uri())
    found = browser.execute_script(OVERFLOW)
    assert any("document scrollWidth" in f for f in found), found
    assert any(f.startswith("p#wide") for f in found), found
    assert len(found) == 2, found  # the one in the scrolling box is not counted
    _viewport(browser, 1280)
    assert browser.execute_script(OVERFLOW) == []
