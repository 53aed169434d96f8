"""How long the dashboard's calibration flow takes, from opening the page to an active adapted
model, driven in a real headless Chromium at the page's default settings. One command:

    python bench/calibration_flow.py [--shots 3] [--seconds 10] [--ready 3]

A real Mosquitto, a ``csi cloud`` subprocess (the committed Fition bundle, copied into a work
folder) and a ``csi edge`` replaying the committed sample recordings in real time, one AP per
activity (the samples hold one recording of each of Fition's six activities, from four rooms):
the "room" is those six APs. The scripted user does what the page asks, with no pause of its
own: for each activity, ``--shots`` examples (the page's "examples per activity", default 3:
``shots - 1`` of them adapt the model, the last one per activity is held out), each a
get-ready countdown and a recording of the page's default length; then "Adapt" (with the
page's default of self-training on the unlabelled stream between the examples), then
"Activate" (and "Activate anyway" if the service refuses a model that held-out examples do
not show better, recorded as ``forced``).

Written to bench/results/calibration_flow.json: the time of each phase, the total from the
page's first paint to the adapted model classifying, the number of user actions (clicks and
choices) the flow took, and the adaptation's accuracy before/after on its held-out examples.
What is not measured: a person's own time to read the page, choose and get into position
between examples. The total is the machine's part; the JSON gives the action count so a
reader can add their own allowance. The held-out examples come from the same looping
recordings as the training examples (other seconds of them): they show the flow works, not
how well a model learns a real room (bench/model.py's few-shot protocol measures that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _procs import MODEL, SAMPLES, TOKEN, Cloud, Edge, Mosquitto, wait_until

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _streams() -> list[tuple[str, str, Path]]:
    """(activity, ``site/ap``, recording): one AP per activity the samples hold."""
    out = []
    for folder in sorted(SAMPLES.iterdir()):
        activity = folder.name.split("_")[0]
        if activity in {a for a, _, _ in out}:
            continue
        out.append((activity, f"room/{activity}", next(folder.rglob("*.pcap"))))
    return out


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--lang=en-GB"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _wait(check: Callable[[], Any], timeout: float, what: str) -> None:
    """Wait for ``check()``, looking every 0.1 s (the phases are timed to that)."""
    wait_until(check, timeout, what, every_s=0.1)


def run(shots: int, seconds: int, ready: int, work: Path) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    models = work / "models"
    shutil.copytree(MODEL, models / MODEL.name)
    streams = _streams()
    actions = 0
    with Mosquitto(work / "broker") as broker:
        cloud = Cloud(broker, f"sqlite:///{work / 'cloud.db'}", work)
        cloud.command[cloud.command.index(str(ROOT / "models"))] = str(models)
        cloud.env["CSI_CLOUD_RECORDING_FLUSH_S"] = "0.5"
        edge = Edge(broker, work, [(name, path) for _, name, path in streams], idle=True)
        browser = None
        try:
            cloud.start()
            edge.start()
            _wait(lambda: len([a for a in cloud.get("/aps")["data"]  # type: ignore[index]
                               if a.get("prediction")]) == len(streams), 120,
                  "every AP predicting")
            browser = _browser()

            def text(selector: str) -> str:
                return str(browser.execute_script(
                    "const n = document.querySelector(arguments[0]); "
                    "return n ? n.textContent : ''", selector))

            def field(element_id: str, value: str) -> None:
                node = browser.find_element(By.ID, element_id)
                node.clear()
                node.send_keys(value)

            started = time.monotonic()
            browser.get(f"{cloud.url}/#view=calibrate")
            _wait(lambda: browser.execute_script(
                "return document.querySelectorAll('#cal-ap option').length") == len(streams),
                30, "the AP picker")
            defaults = {k: browser.find_element(By.ID, k).get_attribute("value")
                        for k in ("cal-seconds", "cal-ready", "cal-k")}
            for element_id, value in (("cal-seconds", seconds), ("cal-ready", ready),
                                      ("cal-k", shots)):
                if defaults[element_id] != str(value):
                    field(element_id, str(value))
                    actions += 1
            browser.find_element(By.ID, "token").send_keys(TOKEN)
            browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
            actions += 1
            page_ready = time.monotonic()

            examples: list[float] = []
            for _ in range(shots):
                for activity, name, _path in streams:
                    t0 = time.monotonic()
                    Select(browser.find_element(By.ID, "cal-ap")).select_by_value(name)
                    Select(browser.find_element(By.ID, "cal-what")).select_by_value(
                        f"activity:{activity}")
                    browser.find_element(By.ID, "cal-record").click()
                    actions += 3
                    _wait(lambda name=name, activity=activity: text("#cal-status").startswith(
                        f"saved: {activity} on {name}"), seconds + ready + 30,
                        f"{activity} saved")
                    examples.append(time.monotonic() - t0)
            recorded = time.monotonic()

            adapt = browser.find_element(By.ID, "cal-adapt")
            _wait(adapt.is_enabled, 30, "the adapt button")
            adapt.click()
            actions += 1
            _wait(lambda: browser.find_element(By.ID, "cal-result").is_displayed()
                  or "failed" in text("#cal-adapt-status"), 600, "the adaptation")
            if "failed" in text("#cal-adapt-status"):
                raise SystemExit(f"adaptation failed: {text('#cal-adapt-status')}")
            adapted = time.monotonic()
            job = cloud.get("/training-jobs", limit=1)["data"][0]  # type: ignore[index]

            browser.find_element(By.ID, "cal-activate").click()
            actions += 1
            _wait(lambda: text("#cal-activate-status").startswith(("active:", "Not activated")),
                  60, "the activation answer")
            forced = text("#cal-activate-status").startswith("Not activated")
            if forced:
                browser.find_element(By.ID, "cal-force").click()
                actions += 1
                _wait(lambda: text("#cal-activate-status").startswith("active:"), 60,
                      "the forced activation")
            _wait(lambda: any(a.get("prediction", {}).get("model") == job["bundle"]
                              for a in cloud.get("/aps")["data"]),  # type: ignore[index]
                  60, "a prediction from the adapted model")
            done = time.monotonic()
        finally:
            if browser is not None:
                browser.quit()
            edge.stop()
            cloud.stop()
    metrics = job["metrics"]
    mean = (lambda xs: round(sum(xs) / len(xs), 4))  # noqa: E731
    return {
        "settings": {"shots_per_activity": shots, "seconds": seconds, "get_ready_s": ready,
                     "page_defaults": defaults, "activities": [a for a, _, _ in streams],
                     "aps": len(streams), "edge_speed": "real time"},
        "seconds": {"page_to_ready": round(page_ready - started, 2),
                    "recording_examples": round(recorded - page_ready, 2),
                    "per_example_median": round(sorted(examples)[len(examples) // 2], 2),
                    "adaptation_job": round(adapted - recorded, 2),
                    "activation_to_first_prediction": round(done - adapted, 2),
                    "total": round(done - started, 2)},
        "user_actions": actions,
        "examples": len(examples),
        "forced": forced,
        "job": {"shots": job["request"]["shots"], "held_out": metrics.get("held_out"),
                "activity_accuracy_before": mean(metrics["activity_accuracy_before"]),
                "activity_accuracy_after": mean(metrics["activity_accuracy_after"]),
                "self_train": job["request"].get("self_train"),
                "self_training": metrics.get("self_training")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=3,
                        help="examples per activity (the page's default: 3)")
    parser.add_argument("--seconds", type=int, default=10,
                        help="seconds per example (the page's default: 10)")
    parser.add_argument("--ready", type=int, default=3,
                        help="get-ready countdown in seconds (the page's default: 3)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "bench" / "results" / "calibration_flow.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.shots, args.seconds, args.ready, Path(tmp))
    report = {"benchmark": "calibration_flow",
              "command": "python bench/calibration_flow.py " + " ".join(sys.argv[1:]),
              "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in
                                                                  load_before],
                          "load_after": [round(x, 2) for x in os.getloadavg()]},
              "target_s": 600, **result}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
