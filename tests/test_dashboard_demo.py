"""The honest demo: the replayed samples are labelled by their names, so ``csi demo`` posts
the truth of each recording played as a label; its lines and the dashboard show it beside the
prediction with a running per-second accuracy. Each AP is one person's room and plays their
recordings in turn; each recording played is a new epoch (a fresh context), never the end of
one mixed into the next."""

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

from csi_cloud.demo import _rooms
from csi_cloud.demo_truth import Truth, TruthKeeper, truth_of
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


def test_each_ap_is_one_persons_room_playing_their_recordings_in_turn(tmp_path: Path) -> None:
    labels = load_manifest(ROOT / "models" / "fition").labels
    files = sorted(SAMPLES.rglob("*.pcap"))
    found = _rooms(SAMPLES, files, labels, 3, tmp_path)
    assert found is not None
    rooms, left_out = found
    assert left_out == 1  # four people in the samples, three APs
    assert [r.who for r in rooms] == ["user1", "user4", "user2"]  # by their first recording
    for room in rooms:
        # The folder the edge replays holds exactly these links, in play order by name.
        assert sorted(room.folder.iterdir()) == room.plays
        truths = [truth_of(p, SAMPLES, labels) for p in room.plays]
        assert len(truths) == 2 and all(t is not None and t.identity == room.who
                                        for t in truths)
    assert [truth_of(p, SAMPLES, labels).activity  # type: ignore[union-attr]
            for p in rooms[0].plays] == ["falling", "walking"]
    # More APs than people: from the first again; nobody left out.
    more, left = _rooms(SAMPLES, files, labels, 5, tmp_path / "more")  # type: ignore[misc]
    assert [r.who for r in more] == ["user1", "user4", "user2", "user3", "user1"] and left == 0
    # Nobody with two recordings: no rooms, each AP loops one recording.
    assert _rooms(SAMPLES, files[:1], labels, 3, tmp_path / "one") is None


def test_the_truth_of_an_epoch_is_the_recording_it_plays() -> None:
    a, b = Truth("falling", "user1", 10.0), Truth("walking", "user1", 11.0)
    keeper = TruthKeeper("http://127.0.0.1:9", "token", 1.0, {"demo/ap1": [a, b], "demo/ap2": []})
    assert "demo/ap2" not in keeper.truths
    # The first epoch seen plays the first recording; the next ones follow in turn, the
    # wire's u16 epoch wrapping.
    assert keeper.truth("demo/ap1", 65535) == a
    assert [keeper.truth("demo/ap1", e) for e in (0, 1, 2, 65535)] == [b, a, b, a]
    keeper.count("demo/ap1", [{"epoch": 65535, "seq": 0, "activity": "falling"},
                              {"epoch": 0, "seq": 0, "activity": "falling"},
                              {"epoch": 0, "seq": 0, "activity": "walking"},
                              {"epoch": 1, "seq": 3, "activity": None}])
    score = keeper.scores["demo/ap1"]
    assert (score.right, score.total) == (1, 2)  # seen once each; no activity, not counted
    assert "truth walking ✗" in keeper.text("demo/ap1", {"epoch": 0, "activity": "falling"})


@pytest.mark.e2e
def test_demo_shows_the_truth_and_a_new_epoch_per_recording(tmp_path: Path,
                                                           browser: Any) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    work = tmp_path / "demo"
    files = sorted(SAMPLES.rglob("*.pcap"))
    labels = load_manifest(ROOT / "models" / "fition").labels
    found = _rooms(SAMPLES, files, labels, 2, tmp_path / "expected")
    assert found is not None
    plays = {f"ap{k + 1}": [truth_of(p, SAMPLES, labels) for p in room.plays]
             for k, room in enumerate(found[0])}
    # Into a file, not a pipe: a pipe nobody reads while the test waits would block the
    # demo's printing once full.
    log = tmp_path / "demo.out"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "csi_cloud.cli", "demo", "--http", f"127.0.0.1:{port}",
             "--workdir", str(work), "--aps", "2"],
            stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"{base}/api/v1{path}", timeout=5) as response:
            return json.loads(response.read())

    def plays_labelled() -> bool:
        try:
            found = get("/labels?limit=100")["data"]
        except OSError:
            return False
        # Each AP's two recordings, and the first again (the loop started over).
        return all(len([x for x in found if x["ap"] == ap]) >= 3 for ap in plays)

    def text(selector: str) -> str:
        return str(browser.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : ''",
            selector))

    try:
        deadline = time.monotonic() + 150
        while not plays_labelled():  # two ~10 s recordings an AP, then the first again
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no third recording labelled within 150 s"
            time.sleep(0.5)
        browser.get(f"{base}/")
        card = 'article.room[data-ap="demo/ap1"]'
        activities = {t.activity for t in plays["ap1"] if t is not None}
        deadline = time.monotonic() + 30
        while not (any(text(f"{card} .truth").startswith(f"Truth: {a}") for a in activities)
                   and "labelled s" in text(f"{card} .accuracy")):
            assert time.monotonic() < deadline, text("main")[:1500]
            time.sleep(0.3)
        browser.save_screenshot(str(tmp_path / "demo-truth.png"))

        for ap, expected in plays.items():
            assert all(t is not None for t in expected)
            rows = sorted(get(f"/labels?site=demo&ap={ap}&limit=100")["data"],
                          key=lambda x: x["start"])
            predictions = get(f"/predictions?site=demo&ap={ap}&limit=10000")["data"]
            epochs = []
            for i, row in enumerate(rows):
                # The recordings in play order, round and round.
                truth = expected[i % len(expected)]
                assert truth is not None
                assert (row["activity"], row["identity"]) == (truth.activity, truth.identity)
                assert row["end"] - row["start"] == pytest.approx(truth.duration_s, abs=0.01)
                inside = [p for p in predictions if row["start"] - 0.05 <= p["timestamp"]
                          < row["end"] - 0.5]
                # One recording, one epoch, from seq 0: the context never spans two.
                assert len({p["epoch"] for p in inside}) == 1, row
                assert min(p["seq"] for p in inside) == 0, row
                assert all(p["context_present"] <= p["seq"] + 1 for p in inside)
                epochs.append(inside[0]["epoch"])
            assert len(set(epochs)) == len(epochs)  # a new epoch for every recording played
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "labelled recordings: the truth is posted as labels" in out
    assert "demo/ap1 (user1) alternates: falling_user1_rm1_1.pcap then walking_user1_rm1_10.pcap" \
        in out
    lines = [line for line in out.splitlines() if line.startswith("demo/ap1 ")]
    for truth in plays["ap1"]:
        assert truth is not None
        assert any(f"truth {truth.activity} " in line and "right " in line
                   for line in lines), lines[-5:]
