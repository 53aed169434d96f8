"""Training jobs through the HTTP API: a real training process on the committed Fition
samples, a job on a broken dataset, queueing, and the request checks."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from csi_cloud.api import create_app
from csi_cloud.model.compression import CloudModel
from csi_cloud.settings import CloudSettings

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples" / "fition"
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOBS = "/api/v1/training-jobs"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("jobs")
    models = tmp / "models"
    models.mkdir()
    shutil.copytree(ROOT / "models" / "fition", models / "fition")
    broken = tmp / "broken"  # named like Fition recordings, but not pcap files
    (broken / "walking_user1_rm1").mkdir(parents=True)
    (broken / "walking_user1_rm1" / "walking_user1_rm1_1.pcap").write_bytes(b"not a pcap" * 10)
    outside = tmp / "outside"
    outside.mkdir()
    (tmp / "data").mkdir()
    (tmp / "data" / "escape").symlink_to(outside, target_is_directory=True)
    settings = CloudSettings(
        broker=None, dev=False, token=TOKEN, models=models,
        db=f"sqlite:///{tmp / 'cloud.db'}", recordings=tmp / "recordings",
        jobs_dir=tmp / "jobs",
        datasets={"fition": SAMPLES, "fition:broken": broken, "fition:links": tmp / "data"})
    with TestClient(create_app(settings)) as client:
        yield {"client": client, "models": models, "tmp": tmp, "outside": outside,
               "jobs": tmp / "jobs"}


def wait(client: TestClient, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"{JOBS}/{job_id}").json()
        if job["state"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def model_ids(client: TestClient) -> set[str]:
    return {m["id"] for m in client.get("/api/v1/models").json()["data"]}


@pytest.mark.e2e
def test_training_job_produces_a_served_bundle(env: dict[str, Any]) -> None:
    client: TestClient = env["client"]
    before = model_ids(client)
    base = client.get("/api/v1/models/fition").json()["id"]
    started = time.monotonic()
    r = client.post(JOBS, headers=AUTH, json={"dataset": "fition", "epochs": 2,
                                               "activate": True})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["bundle"] is None
    assert job["request"]["base_model"] == base  # the active model by default
    assert "_data_dir" not in job["request"]
    # Queued behind it: a second job waits until the first is done (one at a time).
    second = client.post(JOBS, headers=AUTH, json={"dataset": "fition:broken"}).json()
    seen_running = set()
    while True:
        # The second job is read first: if the first still runs afterwards, the second was
        # waiting when it was read.
        second_state = client.get(f"{JOBS}/{second['id']}").json()["state"]
        job = client.get(f"{JOBS}/{job['id']}").json()
        if job["state"] in ("succeeded", "failed"):
            break
        assert second_state == "queued"
        running = client.get(JOBS, params={"state": "running"}).json()
        assert running["count"] <= 1
        seen_running |= {j["id"] for j in running["data"]}
        assert time.monotonic() - started < 300  # (a busy machine's bound, as the others')
        time.sleep(0.2)
    took = time.monotonic() - started
    assert job["state"] == "succeeded", job["error"] or job["log"]
    assert seen_running <= {job["id"]}
    assert job["progress"] == 1.0 and job["finished"] >= job["started"]
    assert "epoch 2/2" in job["log"] and len(job["log"]) <= 32_000
    metrics = job["metrics"]
    assert metrics["epochs_run"] == 2 and metrics["recordings_used"] == 8
    # Activation announces the model to the APs over MQTT; this service has no broker, so
    # the bundle is served but not made active (and says why).
    assert metrics["compatible_with_base"] is True and metrics["activated"] is False
    assert "not activated" in job["log"]
    assert {lv["level"] for lv in metrics["levels"]} == {0, 1, 2, 3}
    assert 0 <= metrics["activity_accuracy"] <= 1
    # The bundle: in the models folder, loadable and verified, served, and now active.
    folder = env["models"] / metrics["name"]
    model = CloudModel.load(folder)
    assert model.id == job["bundle"] == metrics["id"]
    assert model.manifest.training["job"] == job["id"]
    assert model.manifest.training["base_model"] == base
    served = client.get("/api/v1/models").json()["data"]
    assert model_ids(client) == before | {model.id}
    assert [m["active"] for m in served if m["id"] == model.id] == [False]
    assert not [p for p in env["models"].iterdir() if p.name.startswith(".")]
    # The job folder keeps only job.json (no staging bundle, no links).
    assert sorted(p.name for p in (env["jobs"] / job["id"]).iterdir()) == ["job.json"]
    listed = client.get(JOBS).json()
    assert job["id"] in {j["id"] for j in listed["data"]}
    print(f"training job: {took:.1f} s, {metrics}")
    # The queued job then ran, and failed cleanly.
    assert wait(client, second["id"])["state"] == "failed"


def test_job_on_a_bad_dataset_fails_cleanly(env: dict[str, Any]) -> None:
    client: TestClient = env["client"]
    models_before = sorted(p.name for p in env["models"].iterdir())
    ids_before = model_ids(client)
    active_before = [m["id"] for m in client.get("/api/v1/models").json()["data"]
                     if m["active"]]
    r = client.post(JOBS, headers=AUTH, json={"dataset": "fition:broken", "epochs": 1,
                                               "activate": True})
    assert r.status_code == 202, r.text
    job = wait(client, r.json()["id"])
    assert job["state"] == "failed" and job["bundle"] is None
    assert "no Fition" in job["error"] or "recordings" in job["error"], job["error"]
    assert job["error"] in job["log"]
    assert sorted(p.name for p in env["models"].iterdir()) == models_before
    assert model_ids(client) == ids_before
    assert [m["id"] for m in client.get("/api/v1/models").json()["data"]
            if m["active"]] == active_before


def test_write_access_is_required(env: dict[str, Any]) -> None:
    client: TestClient = env["client"]
    count = client.get(JOBS).json()["count"]
    body = {"dataset": "fition", "epochs": 1}
    assert client.post(JOBS, json=body).status_code == 401
    assert client.post(JOBS, json=body,
                       headers={"Authorization": "Bearer wrong-token-0123456789"}
                       ).status_code == 401
    assert client.get(JOBS).json()["count"] == count
    assert client.get(f"{JOBS}/no-such-job").status_code == 404


@pytest.mark.parametrize("body", [
    {"dataset": "fition", "data": "/etc"},
    {"dataset": "fition", "data": "../../.."},
    {"dataset": "fition", "data": "OUTSIDE"},
    {"dataset": "fition:links", "data": "escape"},  # a link inside a root, pointing out
    {"dataset": "fition", "data": "no-such-folder"},
    {"dataset": "nope"},
    {"dataset": "recordings"},  # the service has no recordings yet
    {"dataset": "fition", "base_model": "no-such-model"},
    {"dataset": "fition", "epochs": 0},
    {"dataset": "fition", "epochs": 100_000},
    {"dataset": "fition", "max_recordings": 1},
    {"dataset": "fition", "unknown_option": 1},
    {"dataset": "../fition"},
    {"dataset": "fition", "self_train": True},  # self-training is for adapt jobs
    {"dataset": "fition", "mode": "adapt", "shots": 2, "self_train": True},  # recordings only
])
def test_bad_requests_are_422(env: dict[str, Any], body: dict[str, Any]) -> None:
    client: TestClient = env["client"]
    if body.get("data") == "OUTSIDE":
        body = {**body, "data": str(env["outside"])}
    count = client.get(JOBS).json()["count"]
    r = client.post(JOBS, headers=AUTH, json=body)
    assert r.status_code == 422, r.text
    assert client.get(JOBS).json()["count"] == count


def test_self_training_requests_say_what_they_need(env: dict[str, Any]) -> None:
    client: TestClient = env["client"]
    r = client.post(JOBS, headers=AUTH, json={"dataset": "fition", "self_train": True})
    assert r.status_code == 422 and "self_train is for mode 'adapt', not 'train'" in r.text
    r = client.post(JOBS, headers=AUTH, json={"dataset": "fition", "mode": "adapt",
                                              "shots": 2, "self_train": True})
    assert r.status_code == 422, r.text
    assert "needs dataset 'recordings', not 'fition'" in r.text


@pytest.mark.e2e
def test_data_override_inside_a_root_is_accepted(env: dict[str, Any]) -> None:
    client: TestClient = env["client"]
    # Any registered folder may be named (here another dataset's folder, holding no pcap).
    r = client.post(JOBS, headers=AUTH, json={"dataset": "fition", "data": str(
        env["tmp"] / "broken" / "walking_user1_rm1"), "epochs": 1})
    assert r.status_code == 202, r.text
    job = wait(client, r.json()["id"])
    assert job["state"] == "failed" and "walking_user1_rm1" in job["error"]
