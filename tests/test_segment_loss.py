"""Robustness to lost segments: training with segment dropout, evaluation under segment loss."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from csi_cloud.cli import app
from csi_cloud.model.compression import CloudModel
from csi_cloud.model.data import SegmentData, windows
from csi_cloud.model.evaluate import evaluate_bundle
from csi_cloud.model.network import CSICodecNet, ModelConfig
from csi_cloud.model.robustness import (
    evaluate_segment_loss,
    load_folder,
    lossy_windows,
    parse_rates,
)
from csi_cloud.model.train import TrainOptions, drop_segments, forward_windows, train
from csi_edge.bundle import EdgeEncoder

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "fition"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sample_data(samples: Path) -> SegmentData:
    return load_folder(BUNDLE, "fition", samples / "fition")


@pytest.fixture(scope="module")
def bundle() -> tuple[CloudModel, EdgeEncoder]:
    return CloudModel.load(BUNDLE), EdgeEncoder(BUNDLE)


# -- segment dropout (training) ------------------------------------------------------------


def test_dropout_rate_follows_uniform_draw() -> None:
    present = np.ones((20_000, 8), bool)
    keep = drop_segments(present, 0.6, np.random.default_rng(0))
    # r ~ U(0, 0.6) per window: E[r] = 0.3 on every slot but the last (always kept)
    assert abs((~keep[:, :-1]).mean() - 0.3) < 0.01
    assert keep[:, -1].all()
    # a rate per window, not per slot: the per-window drop share spreads over [0, 0.6)
    share = (~keep[:, :-1]).mean(axis=1)
    assert share.std() > 0.15 and np.quantile(share, 0.99) < 0.95
    assert (~drop_segments(present, 1e-6, np.random.default_rng(1))).sum() <= 2


def test_dropout_keeps_the_last_present_slot_and_never_adds_one() -> None:
    rng = np.random.default_rng(3)
    present = rng.random((5_000, 8)) < 0.7
    present[:50] = False  # windows with nothing present stay empty
    keep = drop_segments(present, 0.99, np.random.default_rng(4))
    assert not (keep & ~present).any()
    has = present.any(axis=1)
    assert keep[has].any(axis=1).all() and not keep[~has].any()
    last = 7 - np.argmax(present[:, ::-1], axis=1)
    assert keep[np.flatnonzero(has), last[has]].all()
    assert (~keep & present).sum() > 0.3 * present.sum()  # it does drop


def test_dropout_is_deterministic_per_seed() -> None:
    present = np.random.default_rng(0).random((200, 8)) < 0.8
    before = present.copy()
    a = drop_segments(present, 0.5, np.random.default_rng(7))
    b = drop_segments(present, 0.5, np.random.default_rng(7))
    c = drop_segments(present, 0.5, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(present, before)


def test_dropout_hides_slots_from_the_classifier_only() -> None:
    torch.manual_seed(0)
    net = CSICodecNet(ModelConfig(antennas=1, subcarriers=56, segment_frames=50, activities=6,
                                  identities=4)).eval()
    # Segments that differ in profile and strength; the unquantized level (4) keeps the
    # untrained latent continuous, so hiding segments visibly changes the pooled context.
    scale = torch.linspace(0.1, 3.0, 3 * 8).view(-1, 1, 1, 1)
    x = 6 + torch.randn(3 * 8, 1, 1, 56) + torch.randn(3 * 8, 50, 1, 56) * scale
    present = torch.ones(3, 8, dtype=torch.bool)
    seen = torch.from_numpy(drop_segments(present.numpy(), 0.9, np.random.default_rng(0)))
    assert (seen != present).any()
    level = torch.tensor([4, 4, 4])
    full = forward_windows(net, x, present, level)
    dropped = forward_windows(net, x, present, level, seen=seen)
    assert torch.equal(full["dynamics_hat"], dropped["dynamics_hat"])  # reconstruction: all
    assert (full["activity"] - dropped["activity"]).abs().max() > 1e-5
    assert (full["identity"] - dropped["identity"]).abs().max() > 1e-3
    again = forward_windows(net, x, present, level, seen=present)
    assert torch.equal(full["activity"], again["activity"])


def test_segment_dropout_option_is_validated() -> None:
    with pytest.raises(ValueError):
        TrainOptions(segment_dropout=1.0)
    with pytest.raises(ValueError):
        TrainOptions(segment_dropout=-0.1)


def test_short_training_with_segment_dropout(sample_data: SegmentData) -> None:
    data = sample_data
    cfg = ModelConfig(antennas=1, subcarriers=56, segment_frames=50,
                      activities=int(data.activity.max()) + 1,
                      identities=int(data.identity.max()) + 1)
    recs = np.arange(len(data))
    weights = []
    for dropout in (0.0, 0.5):
        result = train(cfg, data, recs, recs,
                       TrainOptions(epochs=1, threads=1, segment_dropout=dropout))
        assert len(result.history) == 1 and np.isfinite(result.history[0].loss)
        weights.append(result.net.classifier.activity.weight.detach().clone())
    assert not torch.equal(weights[0], weights[1])  # the dropout reached the classifier


# -- evaluation under segment loss ---------------------------------------------------------


def _synthetic(slots: list[list[int]]) -> SegmentData:
    """Recordings holding the given segment slots (no CSI needed for window arithmetic)."""
    counts = np.array([len(s) for s in slots])
    m = int(counts.sum())
    return SegmentData(
        x=np.zeros((m, 1, 1, 1), np.float32),
        recording=np.repeat(np.arange(len(slots)), counts),
        slot=np.concatenate([np.array(s) for s in slots]),
        start=np.concatenate([[0], np.cumsum(counts)[:-1]]),
        count=counts, slots=np.array([max(s) + 1 for s in slots]),
        activity=np.zeros(len(slots), np.int64), identity=np.zeros(len(slots), np.int64),
        examples=[], native_bytes_per_s=np.ones(len(slots)))


def test_window_ends_at_the_last_arrived_segment() -> None:
    data = _synthetic([list(range(10)), [0, 1, 2, 5, 6], [0, 1]])
    arrived = np.ones(len(data.x), bool)
    recs = np.arange(3)
    win, which = lossy_windows(data, recs, 4, arrived)
    ref, _ = windows(data, recs, 4)
    assert np.array_equal(win, ref) and which.tolist() == [0, 1, 2]
    arrived[[9, 8, 5]] = False  # recording 0 loses slots 9, 8 and 5
    arrived[10:15] = [True, True, True, True, False]  # recording 1 loses its last (slot 6)
    arrived[15:] = False  # nothing of recording 2 arrives
    win, which = lossy_windows(data, recs, 4, arrived)
    assert which.tolist() == [0, 1, -1]
    assert win[0].tolist() == [4, -1, 6, 7]  # ends at slot 7, slot 5 masked
    assert win[1].tolist() == [12, -1, -1, 13]  # slots 2, 3, 4 (gap), 5


@pytest.mark.e2e
def test_rate_zero_matches_evaluate_bundle(sample_data: SegmentData,
                                           bundle: tuple[CloudModel, EdgeEncoder]) -> None:
    model, edge = bundle
    recs = np.arange(len(sample_data))
    top = len(model.manifest.levels) - 1
    # Relabelled copies make the accuracy a count of each predicted class, so agreement is
    # agreement of the predictions themselves, not just of a (possibly perfect) score.
    variants = [sample_data] + [dataclasses.replace(
        sample_data, activity=np.full(len(sample_data), c), identity=np.full(len(sample_data), c))
        for c in range(4)]
    checked = 0
    for data in variants:
        ref = {lv["level"]: lv for lv in evaluate_bundle(model, edge, data, recs)
               .summary["levels"]}
        loss = evaluate_segment_loss(model, edge, data, recs, [0.0], levels=[0, top], draws=2)
        for entry in loss["levels"]:
            row = entry["rates"][0]
            expected = ref[entry["level"]]
            assert row["activity_accuracy"] == round(expected["activity_accuracy"], 4)
            assert row["identity_accuracy"] == round(expected["identity_accuracy"], 4)
            assert row["activity_accuracy_std"] == 0.0 and row["segments_lost"] == 0.0
            checked += expected["activity_accuracy"] not in (0.0, 1.0)
    assert checked >= 4  # the comparison was not only between trivial scores
    win, _ = windows(sample_data, recs, model.net.cfg.context_segments)
    assert loss["levels"][0]["rates"][0]["missing_fraction"] == round(float((win < 0).mean()), 4)


def test_per_segment_accuracy_at_rate_zero_matches_the_codes_path(
        sample_data: SegmentData, bundle: tuple[CloudModel, EdgeEncoder]) -> None:
    """Every segment's prediction, from two code paths: the wire payloads here, the edge
    codes decoded directly in csi_cloud.model.heads."""
    from csi_cloud.model.heads import classify_codes, codes_from_segments

    model, edge = bundle
    recs = np.arange(len(sample_data))
    codes = codes_from_segments(model, edge, sample_data)
    loss = evaluate_segment_loss(model, edge, sample_data, recs, [0.0, 0.5], draws=3)
    for entry in loss["levels"]:
        p_act, _, _, owners = classify_codes(model.net, codes, recs, entry["level"],
                                             all_windows=True)
        assert len(owners) == len(sample_data.x)
        expected = float((p_act.argmax(1) == sample_data.activity[owners]).mean())
        clean, lossy = entry["rates"]
        assert clean["activity_accuracy_per_segment"] == round(expected, 4)
        assert clean["activity_accuracy_per_segment_std"] == 0.0
        assert lossy["activity_accuracy_per_segment_std"] > 0


def test_loss_masks_slots_and_is_seeded(sample_data: SegmentData,
                                        bundle: tuple[CloudModel, EdgeEncoder]) -> None:
    model, edge = bundle
    recs = np.arange(len(sample_data))
    rates = [0.0, 0.3, 0.6]
    a = evaluate_segment_loss(model, edge, sample_data, recs, rates, levels=[0], draws=6, seed=1)
    b = evaluate_segment_loss(model, edge, sample_data, recs, rates, levels=[0], draws=6, seed=1)
    c = evaluate_segment_loss(model, edge, sample_data, recs, rates, levels=[0], draws=6, seed=2)
    assert a == b and a != c
    rows = a["levels"][0]["rates"]
    missing = [r["missing_fraction"] for r in rows]
    assert missing[0] < missing[1] - 0.15 < missing[2] - 0.3
    assert rows[0]["segments_lost"] == 0.0
    assert abs(rows[2]["segments_lost"] - 0.6) < 0.15
    assert rows[2]["activity_accuracy_std"] > 0  # the draws differ
    with pytest.raises(ValueError, match=r"1\.0"):
        evaluate_segment_loss(model, edge, sample_data, recs, [0.0, 1.0])


def test_parse_rates_names_the_bad_value() -> None:
    assert parse_rates("0, 0.1,0.5") == [0.0, 0.1, 0.5]
    for bad in ("1", "-0.1", "x", "nan", ""):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_rates(f"0,{bad}")


# -- command line --------------------------------------------------------------------------


def test_evaluate_segment_loss_command(samples: Path) -> None:
    runner = CliRunner()
    args = ["evaluate", "--model", str(BUNDLE), "--dataset", "fition", "--data",
            str(samples / "fition"), "--segment-loss", "0,0.3", "--draws", "3"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rates"] == [0.0, 0.3] and report["draws"] == 3
    assert [lv["level"] for lv in report["levels"]] == [0, 1, 2, 3]
    row = report["levels"][0]["rates"][1]
    assert {"activity_accuracy", "activity_accuracy_std", "identity_accuracy",
            "identity_accuracy_std", "missing_fraction"} <= row.keys()
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "missing" in table.stdout
    bad = runner.invoke(app, [*args[:-3], "0,0.3,1.5"])
    assert bad.exit_code == 2 and "'1.5'" in bad.stderr and "[0, 1)" in bad.stderr


def test_train_command_passes_segment_dropout(samples: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from csi_cloud.model import pipeline

    seen: list[TrainOptions] = []

    def fake_train_bundle(*args: object, **kwargs: object) -> None:
        seen.append(args[3])  # type: ignore[arg-type]
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline, "train_bundle", fake_train_bundle)
    runner = CliRunner()
    args = ["train", "--dataset", "fition", "--data", str(samples / "fition"), "--out",
            str(tmp_path / "m"), "--epochs", "1", "--threads", "1"]
    result = runner.invoke(app, [*args, "--segment-dropout", "0.4"])
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert seen[0].segment_dropout == 0.4 and seen[0].epochs == 1
    bad = runner.invoke(app, [*args, "--segment-dropout", "1.2"])
    assert bad.exit_code == 2 and "--segment-dropout" in bad.stderr and len(seen) == 1
