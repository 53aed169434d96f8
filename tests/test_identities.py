"""Open-set identity and enrollment: unit checks, and enrollment end to end through the API
with a real Mosquitto, a real ``csi edge`` and a real ``csi cloud``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from _broker import Mosquitto
from _harness import FOLDER, MODEL, ROOT, TOKEN, Cloud, recorded, run_edge, wait_until

from csi_cloud.datasets import index_dataset
from csi_cloud.model.compression import CloudModel
from csi_cloud.model.data import load_segments
from csi_cloud.model.heads import (
    auroc,
    codes_from_segments,
    enroll_identity,
    identity_features,
    open_set_decision,
)
from csi_edge.bundle import EdgeEncoder, load_manifest

NM = FOLDER / "nm_user2_rm2" / "nm_user2_rm2_10.pcap"


def test_auroc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 50), np.round(rng.normal(0, 1, 70), 1)
    pairs = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(pos, neg) == pytest.approx(pairs)
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5


def test_the_shipped_bundle_is_calibrated_for_open_set_and_enrollment() -> None:
    stats = load_manifest(MODEL).calibration["identity"]
    identities = load_manifest(MODEL).labels["identity"]
    assert stats["score"] == "feature_distance" and stats["threshold"] > 0
    assert len(stats["feature_mean"]) == len(identities)
    assert len(stats["feature_std"]) == len(stats["feature_mean"][0])
    p = np.array([[0.9, 0.05, 0.03, 0.02], [0.3, 0.3, 0.2, 0.2]])
    # Feature distance: at a person's mean -> known; far from everyone -> unknown.
    means = np.asarray(stats["feature_mean"])
    far = means[0] + 10 * stats["threshold"] * np.asarray(stats["feature_std"])
    decided = open_set_decision(p, {"identity": stats}, np.stack([means[1], far]))
    assert decided.tolist() == [False, True]
    with pytest.raises(ValueError, match="features"):
        open_set_decision(p, {"identity": stats})
    # Bundles calibrated on the highest probability (the earlier score) still work.
    decided = open_set_decision(p, {"identity": {"score": "max_probability", "threshold": 0.5}})
    assert decided.tolist() == [False, True]
    assert not open_set_decision(p, {}).any(), "no calibration: never unknown"


def test_enrollment_changes_only_the_identity_layer_and_names_the_new_person() -> None:
    model = CloudModel.load(MODEL)
    m = model.manifest
    examples = [e for e in index_dataset("fition", FOLDER) if e.path == NM]
    data = load_segments(examples, m.input_spec, m.labels["activity"], m.labels["identity"])
    codes = codes_from_segments(model, EdgeEncoder(MODEL), data)
    net, stats = enroll_identity(model.net, m.calibration, codes, np.arange(len(data)))
    old, new = model.net.state_dict(), net.state_dict()
    for key, value in old.items():
        if key.startswith("classifier.identity."):
            assert new[key].shape[0] == value.shape[0] + 1
        else:
            assert np.array_equal(new[key].numpy(), value.numpy()), key
    feats, _ = identity_features(net, codes, np.arange(len(data)))
    with torch.no_grad():
        probs = torch.softmax(net.classifier.identity(torch.from_numpy(feats)), -1).numpy()
    assert (probs.argmax(1) == len(m.labels["identity"])).mean() > 0.9
    assert len(stats["feature_mean"]) == len(m.labels["identity"]) + 1
    assert stats["enrolled_accepted"] > 0.9


def _wait_predictions(cloud: Cloud, minimum: int, timeout: float = 60, **params: object
                      ) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = cloud.get("/predictions", limit=10_000, **params)["data"]
        if len(rows) >= minimum:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} predictions"
        time.sleep(0.3)


def _wait_recorded(cloud: Cloud, folder: Path, earlier: int) -> int:
    """Wait until every segment the AP's finished edge run sent (after ``earlier`` recorded
    before it) is committed to the recordings; the segments that run sent."""
    def sent() -> int | None:
        status = cloud.get("/aps/lab/ap1")["status"]
        if not status or status["online"]:
            return None
        return status["counters"]["segments_sent"]

    wait_until(lambda: (n := sent()) is not None
               and recorded(folder / "recordings")[0] >= earlier + n, 30,
               "the edge run's segments committed to the recordings")
    return int(sent() or 0)


@pytest.mark.e2e
def test_enrollment_end_to_end_edges_keep_streaming(broker: Mosquitto, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODEL, models / "fition")
    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'c.db'}", tmp_path)
    cloud.command[cloud.command.index(str(ROOT / "models"))] = str(models)
    cloud.env["CSI_CLOUD_RECORDING_FLUSH_S"] = "0.5"
    base = load_manifest(MODEL)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    cloud.start()
    try:
        started = time.time()
        edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{NM}", "--site", "lab",
                        "--ap", "ap1", "--speed", "4", "--level", "1")
        out, _ = edge.communicate(timeout=120)
        assert edge.returncode == 0, out
        before = _wait_predictions(cloud, 8, site="lab", ap="ap1")
        assert {r["model"] for r in before} == {base.id}
        for r in before:  # the context share that did not arrive (here: before the stream)
            assert r["missing_fraction"] == round(1 - r["context_present"] / r["context_size"], 4)
        assert max(r["missing_fraction"] for r in before) > 0.5
        assert min(r["missing_fraction"] for r in before) == 0.0
        first = _wait_recorded(cloud, tmp_path, 0)
        ranges = [{"site": "lab", "ap": "ap1", "start": started - 30, "end": time.time()}]
        # Refusals first: nothing is stored or queued for them.
        bad = httpx.post(f"{cloud.url}/api/v1/identities", headers=headers, timeout=10,
                         json={"name": base.labels["identity"][0], "ranges": ranges})
        assert bad.status_code == 422 and "already known" in bad.text
        assert httpx.post(f"{cloud.url}/api/v1/identities", timeout=10,
                          json={"name": "alice", "ranges": ranges}).status_code == 401
        missing = httpx.post(f"{cloud.url}/api/v1/identities", headers=headers, timeout=10,
                             json={"name": "alice", "ranges": [{**ranges[0], "ap": "nope"}]})
        assert missing.status_code == 404

        job = httpx.post(f"{cloud.url}/api/v1/identities", headers=headers, timeout=10,
                         json={"name": "alice", "ranges": ranges})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        state = cloud.finished_job(job_id)
        assert state["state"] == "succeeded", state
        new_id = state["bundle"]
        assert new_id != base.id
        assert state["metrics"]["activated"] is True

        identities = cloud.get("/identities")
        assert identities["model"] == new_id
        assert identities["identities"] == [*base.labels["identity"], "alice"]
        assert identities["open_set"] and identities["enrollable"]
        derived = cloud.get(f"/models/{new_id}")
        assert derived["edge_id"] == base.id and derived["parent"] == base.id
        # The derived bundle carries the parent's edge encoder byte for byte.
        folder = next(p for p in models.iterdir() if (p / "bundle.json").is_file()
                      and json.loads((p / "bundle.json").read_text())["id"] == new_id)
        assert (folder / "edge.onnx").read_bytes() == (MODEL / "edge.onnx").read_bytes()
        labels = cloud.get("/labels", site="lab", ap="ap1")["data"]
        assert any(r["identity"] == "alice" for r in labels)

        # The same edge software and bundle stream on, untouched: the cloud now names alice.
        edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{NM}", "--site", "lab",
                        "--ap", "ap1", "--speed", "4", "--level", "1")
        out, _ = edge.communicate(timeout=120)
        assert edge.returncode == 0, out
        deadline = time.monotonic() + 30
        while True:
            rows = [r for r in _wait_predictions(cloud, len(before) + 8, site="lab", ap="ap1")
                    if r["model"] == new_id]
            if len(rows) >= len(before) - 2 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert rows, "predictions from the enrolled bundle"
        named = [r["identity"] for r in rows if r["context_present"] >= 4]
        assert named.count("alice") >= 0.8 * len(named), named
        status = cloud.get("/aps/lab/ap1")["status"]
        assert status["model"] == base.id, "the edge was not switched"
        assert status["counters"]["ctl_received"] == 0
        assert not (tmp_path / "fetched").exists() or not any((tmp_path / "fetched").iterdir())

        # Segments stored under the derived bundle belong to the parent's family too: a job on
        # the parent reads them (here, only the second stream, stored after the switch).
        _wait_recorded(cloud, tmp_path, first)
        second = [r["timestamp"] for r in rows]
        job = httpx.post(f"{cloud.url}/api/v1/identities", headers=headers, timeout=10,
                         json={"name": "bob", "base_model": base.id, "activate": False,
                               "ranges": [{"site": "lab", "ap": "ap1", "start": min(second),
                                           "end": max(second) + 1}]})
        assert job.status_code == 202, job.text
        state = cloud.finished_job(job.json()["id"])
        assert state["state"] == "succeeded", state
        assert state["metrics"]["segments"] >= len(rows) - 1
        assert cloud.get("/identities")["model"] == new_id  # not activated
    finally:
        cloud.stop()


@pytest.mark.e2e
def test_evaluate_open_set_leaves_each_user_out() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "csi_cloud.cli", "evaluate", "--model", str(MODEL), "--dataset",
         "fition", "--data", str(FOLDER), "--open-set", "--epochs", "2", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    users = load_manifest(MODEL).labels["identity"]
    assert list(result["per_user"]) == users
    for row in result["per_user"].values():
        assert 0 <= row["auroc"] <= 1 and 0 <= row["closed_set_identity_accuracy"] <= 1
        assert row["windows_unknown"] > 0 and row["windows_known"] > 0
    assert result["split"]["holdout"] is False  # 8 samples: no held-out recording
    table = subprocess.run(  # the table a person reads, not only the JSON
        [sys.executable, "-m", "csi_cloud.cli", "evaluate", "--model", str(MODEL), "--dataset",
         "fition", "--data", str(FOLDER), "--open-set", "--epochs", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert table.returncode == 0, table.stderr
    assert all(user in table.stdout for user in users), table.stdout
    both = subprocess.run(
        [sys.executable, "-m", "csi_cloud.cli", "evaluate", "--model", str(MODEL), "--dataset",
         "fition", "--data", str(FOLDER), "--open-set", "--segment-loss", "0.1"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert both.returncode == 2 and "choose one" in both.stderr
