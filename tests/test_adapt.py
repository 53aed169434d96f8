"""Few-shot adaptation: ``csi adapt``, derived bundles that share the edge part, and the
operator's path through the API (labels on a live AP's recordings, then an adapt job)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from _broker import Mosquitto
from _harness import FOLDER, MODEL, ROOT, TOKEN, Cloud, recorded, run_edge, wait_until

from csi_cloud.model.adapt import (
    _accuracy,
    adapt_head,
    head_windows,
    load_codes,
    pick_support,
    shrinkage,
    support_windows,
)
from csi_cloud.model.compression import CloudModel
from csi_cloud.model.context_head import profile_coefficients
from csi_cloud.model.heads import CodeData, classify_codes
from csi_cloud.registry import ModelRegistry
from csi_edge import read_recording
from csi_edge.bundle import EdgeEncoder, load_manifest
from csi_edge.preprocess import Preprocessor

WALK = FOLDER / "walking_user1_rm1" / "walking_user1_rm1_10.pcap"
NM = FOLDER / "nm_user2_rm2" / "nm_user2_rm2_10.pcap"


def _csi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "csi_cloud.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(MODEL, models / "fition")
    out = models / "fition-adapted"
    done = _csi("adapt", "--model", str(models / "fition"), "--data", str(FOLDER),
                "--shots", "1", "--epochs", "3", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    return out, json.loads(done.stdout)


@pytest.mark.e2e
def test_adapt_writes_a_derived_bundle_on_the_same_edge_part(
        adapted: tuple[Path, dict[str, object]]) -> None:
    out, result = adapted
    parent, child = load_manifest(MODEL), load_manifest(out)
    assert result["bundle"] == child.id != parent.id
    assert child.edge_id == parent.id and child.parent == parent.id
    assert child.wire_id == parent.id
    assert (out / "edge.onnx").read_bytes() == (MODEL / "edge.onnx").read_bytes()
    assert child.input_spec == parent.input_spec and child.entropy == parent.entropy
    assert child.levels == parent.levels
    # Only the context head's activity layers moved (closed-form refit): the full window's,
    # the short-reading one (on the support's shorter readings, at the lengths the parent
    # fitted its own on) and the complete-window one (refitted on the support's complete
    # windows, or dropped where they miss an activity); the network, the head's features
    # and its identity layer are the parent's.
    a, b = CloudModel.load(MODEL).net.state_dict(), CloudModel.load(out).net.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    with np.load(MODEL / "cloud.npz") as pa, np.load(out / "cloud.npz") as ch:
        dropped = set(pa.files) - set(ch.files)
        assert set(ch.files) <= set(pa.files)
        assert all(".complete." in k for k in dropped), dropped
        changed = {k for k in ch.files if not np.array_equal(pa[k], ch[k])}
    layers = (".activity.", ".short.", ".complete.")
    assert changed and all(k.startswith("head.") and any(m in k for m in layers)
                           for k in changed), changed
    refitted = {k.split(".")[1] for k in changed}
    assert all(any(f"head.{lv}.short." in k for k in changed) for lv in refitted), changed
    # The live output keeps the parent's settings (lengths, pool, filter), saying so.
    assert child.calibration["activity"]["contexts"] == parent.calibration["activity"]["contexts"]
    assert child.calibration["activity"]["stay"] == parent.calibration["activity"]["stay"]
    assert child.calibration["activity"]["fitted_on"].startswith("carried over from the parent")
    assert child.training["options"]["head_lengths"] == [1, 2, 4]
    assert result["method"] == "ridge" and result["held_out_accuracy"] is True
    assert result["support"] == 6 and result["held_out"] == 2  # 8 samples, 6 activities
    assert len(result["activity_accuracy_after"]) == len(parent.levels)  # type: ignore[arg-type]


def test_payloads_of_the_parent_edge_decode_with_the_derived_bundle(
        adapted: tuple[Path, dict[str, object]]) -> None:
    out, _ = adapted
    edge = EdgeEncoder(MODEL)  # what the APs keep running
    batch = Preprocessor(edge.spec).process(read_recording(WALK))
    payload = edge.compress(batch.data[:2], level=1, first_seq=0, epoch=1, timestamp_ms=0)
    derived = CloudModel.load(out)
    segments = derived.decompress(payload)
    reference = CloudModel.load(MODEL).decompress(payload)
    for a, b in zip(segments, reference, strict=True):
        assert np.array_equal(a.codes.latent, b.codes.latent)
        assert np.allclose(a.reconstruction, b.reconstruction)
    registry = ModelRegistry(out.parent)
    assert len(registry) == 2 and not registry.problems
    prefix = edge.model_id
    assert registry.by_prefix(prefix).id == load_manifest(MODEL).id, "the family root by default"
    registry.serve(derived.id)
    assert registry.by_prefix(prefix).id == derived.id
    assert registry.same_edge(derived.id, load_manifest(MODEL).id)


@pytest.fixture(scope="module")
def sample_codes() -> tuple[CloudModel, CodeData]:
    return load_codes(MODEL, "fition", FOLDER)


def test_shared_window_features_score_as_the_service_classifies(
        sample_codes: tuple[CloudModel, CodeData]) -> None:
    """``csi adapt`` computes the head's features of every window once and scores the parent
    and the adapted head on them: each window's probabilities must be exactly those of the
    service's path (classify_codes, batch by batch), per recording and per second."""
    model, codes = sample_codes
    recordings = np.arange(len(codes))
    windows = head_windows(model.net, codes, recordings)
    assert [(v, lv) for v, lv, *_ in windows.groups] == [(v, v) for v in range(4)]
    head = model.net.context_head
    assert head is not None
    for v, lv, owners, last, whole, feats in windows.groups:
        p_act, _, _, expected_owners = classify_codes(model.net, codes, recordings, v,
                                                      all_windows=True, features=False)
        assert np.array_equal(owners, expected_owners)
        part = head.levels[lv]
        assert np.array_equal(part.activity_probabilities(feats, whole), p_act)
        end, _, _, end_owners = classify_codes(model.net, codes, recordings, v,
                                               features=False)
        assert np.array_equal(owners[last], end_owners)
        assert np.array_equal(part.activity_probabilities(feats[last], whole[last]), end)
        assert whole.any() and not whole.all(), "both kinds of window are scored"
    for every in (False, True):
        shared = _accuracy(model.net, codes, recordings[2:], every=every, windows=windows)
        assert shared == _accuracy(model.net, codes, recordings[2:], every=every)
        assert all(0 <= a <= 1 for a in shared)
    with pytest.raises(ValueError, match=r"\[7\]"):
        head_windows(model.net, codes, recordings[:7]).accuracy(head, codes.activity,
                                                                recordings)


def test_adapting_on_shared_features_fits_what_the_support_windows_give(
        sample_codes: tuple[CloudModel, CodeData]) -> None:
    """The refit reads the support's rows of features computed for support and held-out
    recordings together: the same numbers, in the same order, as the support windows alone
    (support_windows, the head's features of them), hence the same ridge layers."""
    model, codes = sample_codes
    support, query = pick_support(codes, np.arange(len(codes)), 1, 0)
    shared = adapt_head(model.net, codes, support,
                        windows=head_windows(model.net, codes, np.union1d(support, query)))
    alone = adapt_head(model.net, codes, support)
    head = model.net.context_head
    assert head is not None and shared.context_head is not None
    assert alone.context_head is not None
    for lv, ((z, p, present), owners) in support_windows(
            codes, support, model.net.cfg.context_segments).items():
        feats, got = head_windows(model.net, codes, support).select(lv, support)
        assert np.array_equal(got, owners)
        assert np.array_equal(feats, head.levels[lv].features(
            z, profile_coefficients(model.net, p, transmitted=True), present))
        a, b = shared.context_head.levels[lv].activity, alone.context_head.levels[lv].activity
        assert np.array_equal(a.coef, b.coef) and np.array_equal(a.intercept, b.intercept)
        assert not np.array_equal(a.coef, head.levels[lv].activity.coef), "it was refitted"
        # The short-reading layer was fitted on the parent's setting: without the lengths it
        # was fitted on, the adapted head reads the live output's shorter readings with its
        # refitted full-window layer; the parent keeps its own.
        assert head.levels[lv].short is not None
        assert shared.context_head.levels[lv].short is None


def test_adapting_refits_the_short_reading_layer_on_the_support_s_shorter_readings(
        sample_codes: tuple[CloudModel, CodeData]) -> None:
    from csi_cloud.model.context_head import truncated
    from csi_cloud.model.rocket import ridge_to_prior

    model, codes = sample_codes
    support, _ = pick_support(codes, np.arange(len(codes)), 1, 0)
    adapted = adapt_head(model.net, codes, support, short_lengths=(1, 2, 4))
    head, new = model.net.context_head, adapted.context_head
    assert head is not None and new is not None
    for lv, ((z, p, present), owners) in support_windows(
            codes, support, model.net.cfg.context_segments).items():
        parent, refit = head.levels[lv].short, new.levels[lv].short
        assert parent is not None and refit is not None
        # The same closed-form refit as the full window's layer, on the support's windows
        # read at 1, 2 and 4 slots, shrunk towards the parent's short-reading layer.
        coeff = profile_coefficients(model.net, p, transmitted=True)
        short, src = truncated((z, coeff, present), (1, 2, 4))
        expected = ridge_to_prior(head.levels[lv].features(*short),
                                  codes.activity[owners[src]], parent,
                                  groups=owners[src])
        assert np.allclose(refit.coef, expected.coef) and not np.allclose(refit.coef,
                                                                          parent.coef)
        assert np.allclose(refit.intercept, expected.intercept)
        assert refit.temperature == parent.temperature
        assert new.levels[lv].by_length == {}
        # The chosen shrinkage of both layers is reported.
        chosen = shrinkage(adapted)[str(lv)]
        assert chosen["short_alpha"] == refit.alpha
        assert chosen["short_prior_weight"] == refit.prior_weight
    # ridge-alone: the support alone, no parent prior, for the short layer too.
    alone = adapt_head(model.net, codes, support, prior=False, short_lengths=(1, 2, 4))
    assert alone.context_head is not None
    for lv in support_windows(codes, support, model.net.cfg.context_segments):
        layer = alone.context_head.levels[lv].short
        assert layer is not None and layer.prior_weight in (None, 0.0)
        assert not np.allclose(layer.coef, new.levels[lv].short.coef)  # type: ignore[union-attr]


def test_adapting_drops_the_complete_window_layer_and_changes_nothing_else(
        sample_codes: tuple[CloudModel, CodeData]) -> None:
    """Where the support reaches a level, the adapted head has no complete-window layer there
    and every other layer is exactly what adapting the same parent without one gives (so
    the adapted bundle reads a new setting as it did before the layer existed); a level the
    support does not reach keeps the parent's layers, that one included."""
    model, codes = sample_codes
    with_layer = copy.deepcopy(model.net)
    without = copy.deepcopy(model.net)
    assert with_layer.context_head is not None and without.context_head is not None
    for part in with_layer.context_head.levels:
        part.complete = copy.deepcopy(part.activity)
        part.complete.coef = part.complete.coef[::-1].copy()
    for part in without.context_head.levels:
        part.complete = None
    support, _ = pick_support(codes, np.arange(len(codes)), 1, 0)
    reached = set(support_windows(codes, support, model.net.cfg.context_segments))
    for prior in (True, False):
        a = adapt_head(with_layer, codes, support, prior=prior, short_lengths=(1, 2, 4))
        b = adapt_head(without, codes, support, prior=prior, short_lengths=(1, 2, 4))
        assert a.context_head is not None and b.context_head is not None
        for lv, (pa, pb) in enumerate(zip(a.context_head.levels, b.context_head.levels,
                                          strict=True)):
            if lv in reached:
                assert pa.complete is None
            else:
                assert pa.complete is with_layer.context_head.levels[lv].complete or (
                    pa.complete is not None and np.array_equal(
                        pa.complete.coef, with_layer.context_head.levels[lv].complete.coef))
            for layer in ("activity", "short"):
                la, lb = getattr(pa, layer), getattr(pb, layer)
                assert (la is None) == (lb is None)
                if la is not None:
                    assert np.array_equal(la.coef, lb.coef)
                    assert np.array_equal(la.intercept, lb.intercept)
    assert reached and len(reached) < len(with_layer.context_head.levels)


def test_an_adapted_bundle_keeps_its_parent_s_live_settings_only_for_a_refitted_head() -> None:
    from csi_cloud.model.adapt_job import adapted_calibration

    parent = {"identity": {"threshold": 0.3},
              "activity": {"contexts": {"lengths": [1, 8], "temperatures": [1.0, 2.0],
                                        "weights": [0.7, 0.1]},
                           "stay": 0.6, "fitted_on": "its 80 validation recordings"}}
    parent["activity"].update(nll_before=1.2, contexts_accuracy={"8": 0.6})  # diagnostics
    kept = adapted_calibration(parent, head=True)
    assert kept["identity"] == parent["identity"]
    assert kept["activity"] == {
        "contexts": parent["activity"]["contexts"], "stay": 0.6,
        "fitted_on": "carried over from the parent bundle by csi adapt",
        "parent_fitted_on": "its 80 validation recordings"}
    # Adapted again: still the first parent's recordings, not a nested sentence.
    again = adapted_calibration(kept, head=True)
    assert again["activity"]["parent_fitted_on"] == "its 80 validation recordings"
    assert adapted_calibration(parent, head=False) == {"identity": {"threshold": 0.3}}
    assert adapted_calibration({"identity": {}}, head=True) == {"identity": {}}


@pytest.mark.e2e
def test_adapt_refuses_bad_arguments_clearly(tmp_path: Path) -> None:
    done = _csi("adapt", "--model", str(MODEL), "--data", str(FOLDER), "--shots", "0",
                "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "greater than or equal to 1" in done.stderr
    done = _csi("adapt", "--model", str(MODEL), "--data", str(FOLDER), "--shots", "1",
                "--part", "encoder", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "'encoder'" in done.stderr
    wiar = ROOT / "datasets" / "samples" / "wiar"
    done = _csi("adapt", "--model", str(MODEL), "--dataset", "wiar", "--data", str(wiar),
                "--shots", "1", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "error:" in done.stderr
    assert not (tmp_path / "x").exists()


def test_self_training_needs_a_head_and_unlabelled_recordings(tmp_path: Path) -> None:
    done = _csi("adapt", "--model", str(MODEL), "--data", str(FOLDER), "--shots", "1",
                "--self-train", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "needs a folder of its unlabelled recordings" in done.stderr
    done = _csi("adapt", "--model", str(MODEL), "--data", str(FOLDER), "--shots", "1",
                "--self-train", "--method", "finetune", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "method 'finetune' does not (use ridge)" in done.stderr
    assert not (tmp_path / "x").exists()
    # A folder of another dataset's layout: its recordings, less those already labelled.
    from csi_cloud.datasets import index_dataset
    from csi_cloud.model.adapt_job import unlabelled_examples

    examples = list(index_dataset("fition", FOLDER))
    pool = unlabelled_examples("fition", FOLDER, examples[:3], FOLDER, chunk_s=8.0)
    assert [e.path for e in pool] == [e.path for e in examples[3:]]


def test_adapt_self_trains_on_the_recorded_stream_outside_the_labels(tmp_path: Path) -> None:
    """``csi adapt --dataset recordings --self-train``: the labelled ranges of the service's
    recordings are the support and the held-out set; what the same APs streamed outside them
    is the unlabelled pool, in pieces of one context window (8 s)."""
    from test_cloud_storage import decoded, payloads

    from csi_cloud.storage import RecordingStore

    registry = ModelRegistry(ROOT / "models")
    encoder = EdgeEncoder(MODEL)
    store = RecordingStore(tmp_path / "rec", max_bytes=2**30, max_s=1e9)
    labelled = {"walking": [WALK, FOLDER / "walking_user2_rm2" / "walking_user2_rm2_11.pcap"],
                "nm": [NM, FOLDER / "nm_user4_rm4" / "nm_user4_rm4_11.pcap"]}
    for activity, paths in labelled.items():
        for i, path in enumerate(paths):
            records = decoded(registry, payloads(encoder, path, "home", f"{activity}{i}"))
            store.append(records)
            t0 = records[0].timestamp_ms / 1000
            for lo in (t0, t0 + 2):  # two labelled ranges of 2 s a file, 5 or 6 s left over
                store.label_range("home", f"{activity}{i}", lo, lo + 2, activity)
    # APs nobody labelled: another room, whose stream is not this adaptation's.
    for i, path in enumerate(sorted(FOLDER.glob("[fs]*/**/*.pcap"))):  # fall, sit, stand
        store.append(decoded(registry, payloads(encoder, path, "home", f"other{i}")))
    store.close()
    models = tmp_path / "models"
    shutil.copytree(MODEL, models / "fition")
    out = models / "fition-self-trained"
    done = _csi("adapt", "--model", str(models / "fition"), "--dataset", "recordings",
                "--data", str(tmp_path / "rec"), "--shots", "2", "--self-train",
                "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["support"] == 4 and result["held_out"] == 4
    trained = result["self_training"]
    # Four unlabelled pieces: what each labelled AP streamed after its labelled ranges (5 or
    # 6 s, over half a piece); nothing of the APs without a label.
    assert trained["unlabelled"] == 4 and sum(trained["pseudo_labels"].values()) == 4
    assert set(trained["pseudo_labels"]) <= set(load_manifest(MODEL).labels["activity"] or [])
    guard = trained["guard"]
    assert guard["folds"] == 2 and guard["windows"] > 0
    assert trained["kept"] == guard["kept"] == (guard["p_worse"] >= 0.05)
    assert guard["recordings_better"] + guard["recordings_worse"] <= 4
    assert ("activity_accuracy_without" in trained) == trained["kept"]
    assert load_manifest(out).training["self_training"] == trained


def _epoch_range(cloud: Cloud, seen: set[int]) -> tuple[float, float, int]:
    """The capture time range of the newest epoch's predictions."""
    deadline = time.monotonic() + 60
    while True:
        rows = cloud.get("/predictions", site="lab", ap="ap1", limit=10_000)["data"]
        epochs = {r["epoch"] for r in rows} - seen
        if epochs:
            epoch = epochs.pop()
            mine = [r for r in rows if r["epoch"] == epoch]
            if len(mine) >= 8:
                return min(r["timestamp"] for r in mine), max(r["timestamp"] for r in mine) + 1, \
                    epoch
        assert time.monotonic() < deadline, "no predictions for the new epoch"
        time.sleep(0.3)


@pytest.mark.e2e
def test_operator_adapts_a_deployed_model_from_api_labels(broker: Mosquitto,
                                                          tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(MODEL, models / "fition")
    cloud = Cloud(broker, f"sqlite:///{tmp_path / 'c.db'}", tmp_path)
    cloud.command[cloud.command.index(str(ROOT / "models"))] = str(models)
    cloud.env["CSI_CLOUD_RECORDING_FLUSH_S"] = "0.5"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    base = load_manifest(MODEL)
    cloud.start()
    try:
        seen: set[int] = set()
        labelled = 0
        for path, activity in ((WALK, "walking"), (NM, "nm")):
            edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{path}", "--site",
                            "lab", "--ap", "ap1", "--speed", "4", "--level", "1")
            out, _ = edge.communicate(timeout=120)
            assert edge.returncode == 0, out
            start, end, epoch = _epoch_range(cloud, seen)
            seen.add(epoch)
            label = httpx.post(f"{cloud.url}/api/v1/labels", headers=headers, timeout=10,
                               json={"site": "lab", "ap": "ap1", "start": start, "end": end,
                                     "activity": activity})
            assert label.status_code == 201, label.text
            assert label.json()["recordings"] >= 1
            labelled += label.json()["recordings"]
        wait_until(lambda: recorded(tmp_path / "recordings")[1] >= labelled, 30,
                   f"{labelled} labels committed to the recordings")
        bad = httpx.post(f"{cloud.url}/api/v1/training-jobs", headers=headers, timeout=10,
                         json={"mode": "adapt", "dataset": "recordings"})
        assert bad.status_code == 422 and "shots" in bad.text
        job = httpx.post(f"{cloud.url}/api/v1/training-jobs", headers=headers, timeout=10,
                         json={"mode": "adapt", "dataset": "recordings", "shots": 1000,
                               "epochs": 5, "activate": True})
        assert job.status_code == 202, job.text
        state = cloud.finished_job(job.json()["id"])
        assert state["state"] == "succeeded", state
        # Every labelled recording is in the support (the recorder may rotate one replay into
        # several files): nothing is left to test it on, so it is not held out and is not
        # activated without force.
        assert state["metrics"]["support"] == labelled, state["metrics"]
        assert state["metrics"]["activated"] is False
        assert state["metrics"]["held_out"] == 0
        assert cloud.get(f"/models/{state['bundle']}")["metrics"]["adaptation"][
            "held_out_accuracy"] is False
        url = f"{cloud.url}/api/v1/models/{state['bundle']}/activate"
        refused = httpx.post(url, headers=headers, timeout=10)
        assert refused.status_code == 409 and "held_out" in refused.text, refused.text
        forced = httpx.post(url, headers=headers, params={"force": "true"}, timeout=30)
        assert forced.status_code == 200, forced.text
        derived = cloud.get(f"/models/{state['bundle']}")
        assert derived["edge_id"] == base.id and derived["active"]
        assert derived["training"]["kind"] == "few-shot adaptation"
        # The AP streams on with its encoder; the adapted bundle now classifies it.
        edge = run_edge(broker, tmp_path / "spool", "--source", f"file://{WALK}", "--site",
                        "lab", "--ap", "ap1", "--speed", "4", "--level", "1")
        out, _ = edge.communicate(timeout=120)
        assert edge.returncode == 0, out
        _, _, epoch = _epoch_range(cloud, seen)
        rows = [r for r in cloud.get("/predictions", site="lab", ap="ap1", limit=10_000)["data"]
                if r["epoch"] == epoch]
        assert {r["model"] for r in rows} == {state["bundle"]}
        status = cloud.get("/aps/lab/ap1")["status"]
        assert status["model"] == base.id and status["counters"]["ctl_received"] == 0
    finally:
        cloud.stop()
