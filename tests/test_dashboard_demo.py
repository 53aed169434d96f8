"""The honest demo: the replayed samples are labelled by their names, so ``csi demo`` posts
the truth of each pass as a label; its lines and the dashboard show it beside the prediction
with a running per-second accuracy, and each pass of the loop is a new epoch (a fresh
context), never the end of one pass mixed into the next."""

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
from _broker import free_port

from csi_cloud.demo_truth import truth_of
from csi_edge.bundle import load_manifest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples" / "fition"


def test_truth_of_a_sample_comes_from_its_name() -> None:
    labels = load_manifest(ROOT / "models" / "fition").labels
    truth = truth_of(SAMPLES / "nm_user2_rm2" / "nm_user2_rm2_10.pcap", SAMPLES, labels)
    assert truth is not None and (truth.activity, truth.identity) == ("nm", "user2")
    assert 9 < truth.duration_s < 11
    # A name no dataset layout reads, or an activity the model does not know: no truth.
    assert truth_of(SAMPLES / "nm_user2_rm2" / "nm_user2_rm2_10.pcap", SAMPLES,
                    {"activity": ["walking"], "identity": None}) is None
    odd = Path("/nowhere/capture.pcap")
    assert truth_of(odd, odd.parent, labels) is None


@pytest.mark.e2e
def test_demo_shows_the_truth_and_a_new_epoch_per_pass(tmp_path: Path, browser: Any) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    work = tmp_path / "demo"
    files = sorted(SAMPLES.rglob("*.pcap"))
    labels = load_manifest(ROOT / "models" / "fition").labels
    truths = {f"ap{k + 1}": truth_of(files[k], SAMPLES, labels) for k in range(2)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "csi_cloud.cli", "demo", "--http", f"127.0.0.1:{port}",
         "--workdir", str(work), "--aps", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"{base}/api/v1{path}", timeout=5) as response:
            return json.loads(response.read())

    def passes_labelled() -> bool:
        try:
            found = get("/labels?limit=100")["data"]
        except OSError:
            return False
        return all(len([x for x in found if x["ap"] == ap]) >= 2 for ap in truths)

    def text(selector: str) -> str:
        return str(browser.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : ''",
            selector))

    try:
        deadline = time.monotonic() + 120
        while not passes_labelled():  # two passes of each ~10 s recording
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no second pass labelled within 120 s"
            time.sleep(0.5)
        browser.get(f"{base}/")
        card = 'article.room[data-ap="demo/ap1"]'
        truth = truths["ap1"]
        assert truth is not None
        deadline = time.monotonic() + 30
        while not (text(f"{card} .truth").startswith(f"Truth: {truth.activity}")
                   and "labelled s" in text(f"{card} .accuracy")):
            assert time.monotonic() < deadline, text("main")[:1500]
            time.sleep(0.3)
        browser.save_screenshot(str(tmp_path / "demo-truth.png"))

        for ap, expected in truths.items():
            assert expected is not None
            rows = [x for x in get(f"/labels?site=demo&ap={ap}&limit=100")["data"]]
            assert {(x["activity"], x["identity"]) for x in rows} == \
                {(expected.activity, expected.identity)}
            predictions = get(f"/predictions?site=demo&ap={ap}&limit=10000")["data"]
            for row in rows:
                assert row["end"] - row["start"] == pytest.approx(expected.duration_s, abs=0.01)
                inside = [p for p in predictions if row["start"] - 0.05 <= p["timestamp"]
                          < row["end"] - 0.5]
                # One pass, one epoch, from seq 0: the context never spans two passes.
                assert len({p["epoch"] for p in inside}) == 1, row
                assert min(p["seq"] for p in inside) == 0, row
                assert all(p["context_present"] <= p["seq"] + 1 for p in inside)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-3000:]
    assert "labelled recordings: the truth is posted as labels" in out
    lines = [line for line in out.splitlines() if line.startswith("demo/ap1 ")]
    assert any(f"truth {truths['ap1'].activity} " in line and "right " in line  # type: ignore[union-attr]
               for line in lines), lines[-5:]
