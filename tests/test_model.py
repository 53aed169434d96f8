"""The network, quantizers, bundles and the compress/decompress contract."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from csi_cloud.model.compression import CloudModel
from csi_cloud.model.export import EdgeGraph
from csi_cloud.model.fitting import fit
from csi_cloud.model.network import CSICodecNet, ModelConfig
from csi_cloud.model.pipeline import prepare
from csi_cloud.model.quantizers import FSQ, EMAVectorQuantizer
from csi_cloud.model.train import TrainOptions, forward_windows
from csi_edge.bundle import BundleError, EdgeEncoder, load_manifest
from csi_edge.codec import PayloadError, decode_payload

ROOT = Path(__file__).resolve().parents[1]


def small_config(**kw: object) -> ModelConfig:
    return ModelConfig(antennas=1, subcarriers=56, segment_frames=50, activities=6,
                       identities=4, **kw)


def test_fsq_indices_codes_indices_round_trip() -> None:
    fsq = FSQ(channels=6, levels=5)
    symbols = torch.randint(0, 5, (4, 6, 7))
    codes = fsq.dequantize(symbols)  # values in [-1, 1]
    assert codes.abs().max() <= 1
    again = fsq(_inverse_bound(fsq, codes))
    assert torch.equal(again.symbols, symbols)
    assert torch.allclose(again.z_q, codes)


def test_quantizer_and_edge_graph_keep_module_half() -> None:
    """The latent bound is ``half_width``: ``nn.Module.half()`` still converts to float16."""
    fsq = FSQ(channels=6, levels=5)
    assert fsq.half_width == 2 and fsq.half() is fsq
    graph = EdgeGraph(CSICodecNet(small_config()))
    assert graph.half_width == 2.0
    assert graph.half().profile_basis.dtype == torch.float16


def _inverse_bound(fsq: FSQ, codes: torch.Tensor) -> torch.Tensor:
    """A pre-activation whose bounded value is exactly at each code's level."""
    return torch.atanh(codes * (1 - 1e-6))


def test_vq_indices_codes_indices_round_trip() -> None:
    vq = EMAVectorQuantizer(channels=8, dim=2, size=25).eval()
    symbols = torch.randint(0, 25, (3, 4, 7))
    codes = vq.dequantize(symbols)
    assert torch.equal(vq(codes).symbols, symbols)


def test_vq_restarts_dead_codes() -> None:
    torch.manual_seed(0)
    vq = EMAVectorQuantizer(channels=2, dim=2, size=8, dead_after=3).train()
    z = torch.randn(16, 2, 5) * 0.01 + 3.0  # every vector near one point: most codes unused
    before = vq.codebook.clone()
    for _ in range(5):
        vq(z)
    moved = (vq.codebook - before).norm(dim=-1) > 1.0
    assert moved.sum() >= 2, "dead codes must jump to encoder outputs"
    assert int(vq.unused_steps.max()) < 3


def test_straight_through_passes_gradients_unchanged() -> None:
    """Fails if `.detach()` is missing (gradient 0) or misplaced (gradient 0 or doubled)."""
    fsq = FSQ(channels=4, levels=5)
    z = torch.randn(2, 4, 7, requires_grad=True)
    weight = torch.randn(2, 4, 7)
    (fsq(z).z_q * weight).sum().backward()
    through_quantizer = z.grad.clone()
    z.grad = None
    ((torch.tanh(z) * fsq.half_width / fsq.half_width) * weight).sum().backward()
    assert torch.allclose(through_quantizer, z.grad)
    assert through_quantizer.abs().sum() > 0


def test_task_losses_reach_the_encoder() -> None:
    torch.manual_seed(0)
    net = CSICodecNet(small_config())
    x = torch.randn(2 * 8, 50, 1, 56) * 0.3 + 6
    present = torch.ones(2, 8, dtype=torch.bool)
    out = forward_windows(net, x, present, torch.tensor([0, 3]))
    loss = torch.nn.functional.cross_entropy(out["activity"], torch.tensor([1, 2]))
    loss.backward()
    first_conv = net.encoder.net[0].weight.grad
    assert first_conv is not None and first_conv.abs().sum() > 0
    assert net.decoder.net[0].weight.grad is None  # only the classification path was used


def test_levels_mask_latent_channels() -> None:
    net = CSICodecNet(small_config())
    mask = net.channel_mask(torch.tensor([0, 1, 2, 3, 4]))[..., 0]
    assert mask.sum(dim=1).tolist() == [0, 4, 8, 16, 16]  # level 4 = unquantized: all


def test_encoder_is_small() -> None:
    net = CSICodecNet(small_config())
    assert sum(p.numel() for p in net.encoder.parameters()) <= 100_000


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    """A bundle trained for a few epochs on the committed samples."""
    data, spec, activities, identities = prepare("fition", samples / "fition")
    recs = np.arange(len(data))
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    fit(data, spec, activities, identities, recs, recs,
        TrainOptions(epochs=2, threads=1, head_complete=True), out, name="tiny")
    return out


def test_bundle_files_and_id(trained: Path) -> None:
    manifest = load_manifest(trained)
    assert {p.name for p in trained.iterdir()} >= {"bundle.json", "edge.onnx", "cloud.npz"}
    assert (trained / "edge.onnx").stat().st_size <= 100_000
    assert len(manifest.levels) == 4 and manifest.labels["identity"]
    with np.load(trained / "cloud.npz", allow_pickle=False) as arrays:  # no pickle anywhere
        assert "encoder.mean" in arrays.files
        # Every level's head (and the unquantized path's) has its complete-window layer.
        assert {f"head.{i}.complete.coef" for i in range(5)} <= set(arrays.files)
    assert manifest.training["options"]["head_complete"] is True


def test_tampered_bundle_is_refused(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    edge = bytearray((copy / "edge.onnx").read_bytes())
    edge[-10] ^= 0xFF
    (copy / "edge.onnx").write_bytes(bytes(edge))
    with pytest.raises(BundleError, match="sha256"):
        load_manifest(copy)
    shutil.copy(trained / "edge.onnx", copy / "edge.onnx")
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["entropy"]["latent"]["counts"][0][0] += 1
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="hashes to id"):
        load_manifest(copy)


def test_compress_decompress_round_trip(trained: Path, samples: Path) -> None:
    data, *_ = prepare("fition", samples / "fition")
    edge, cloud = EdgeEncoder(trained), CloudModel.load(trained)
    segments = data.x[:4]
    symbols, profile = edge.encode(segments)
    for level in range(4):
        payload = edge.compress(segments, level=level, first_seq=2**32 - 2, epoch=9,
                                timestamp_ms=1_764_000_000_000, quality=[1, 0.5, 0.25, 0])
        header = decode_payload(payload)
        assert (header.level, header.epoch, len(header.segments)) == (level, 9, 4)
        decoded = cloud.decompress(payload)
        assert [d.seq for d in decoded] == [2**32 - 2, 2**32 - 1, 0, 1]
        assert [d.timestamp_ms for d in decoded] == [1_764_000_000_000 + 1000 * i
                                                     for i in range(4)]
        spec = edge.manifest.level(level)
        for i, d in enumerate(decoded):
            assert np.array_equal(d.codes.latent, symbols[i, : spec.groups])
            assert np.array_equal(d.codes.profile, profile[i, : spec.profile_components])
            assert d.reconstruction.shape == (50, 1, 56)
    # the float reference path gives the same payload bytes when the codes agree
    assert cloud.compress(segments[:1], level=0) == edge.compress(
        segments[:1], level=0, first_seq=0, epoch=0, timestamp_ms=0) or not np.array_equal(
        cloud.encode(segments[:1])[0], symbols[:1])


def test_decompress_rejects_foreign_model(trained: Path, samples: Path, tmp_path: Path) -> None:
    data, *_ = prepare("fition", samples / "fition")
    edge = EdgeEncoder(trained)
    payload = bytearray(edge.compress(data.x[:1], level=0, first_seq=0, epoch=0,
                                      timestamp_ms=0))
    payload[1] ^= 0x01  # model id, then fix the CRC so only the id is wrong
    from csi_edge.codec import crc16

    payload[-2:] = crc16(bytes(payload[:-2])).to_bytes(2, "big")
    with pytest.raises(PayloadError, match="model id"):
        CloudModel.load(trained).decompress(bytes(payload))


def test_per_second_accuracy_counts_every_prediction_the_service_makes(
        trained: Path, samples: Path) -> None:
    """Per recording: one window per recording; per second: one per segment, windows that
    start mid-recording included (recomputed here from the service's classify path)."""
    from csi_cloud.model.data import segment_windows
    from csi_cloud.model.evaluate import decode_level, encode_recordings, evaluate_bundle

    data, *_ = prepare("fition", samples / "fition")
    edge, cloud = EdgeEncoder(trained), CloudModel.load(trained)
    recs = np.arange(len(data))
    summary = evaluate_bundle(cloud, edge, data, recs).summary
    every, owner, _ = segment_windows(data, recs, cloud.net.cfg.context_segments)
    assert len(every) == len(data.x) > len(recs)
    decoded = decode_level(cloud, edge, data, encode_recordings(edge, data, recs), 0)
    windows = decoded.windows(every)
    assert not windows.present[:, 0].all(), "the first windows of a stream are partial"
    p_act = cloud.classify(windows).activity
    expected = float((p_act.argmax(1) == data.activity[owner]).mean())
    assert summary["levels"][0]["activity_accuracy_per_second"] == pytest.approx(expected)
    assert 0 <= summary["unquantized"]["activity_accuracy_per_second"] <= 1


def test_per_second_accuracy_of_the_live_reading_and_the_smoothed_label(samples: Path) -> None:
    """The report's live and smoothed per-second figures are what the service shows: the
    shipped bundle's live reading (classify_live, its pooled context lengths) and its filter
    run second by second over each recording from a fresh start (recomputed here)."""
    from csi_cloud.model.data import segment_windows
    from csi_cloud.model.evaluate import decode_level, encode_recordings, evaluate_bundle
    from csi_cloud.smoothing import HMMFilter, TrustParams

    bundle = ROOT / "models" / "wiar"
    data, *_ = prepare("wiar", samples / "wiar" / "height_90")
    edge, cloud = EdgeEncoder(bundle), CloudModel.load(bundle)
    weights = cloud.lengths.weights
    assert weights is not None and sum(w > 0 for w in weights) > 1, \
        "the shipped bundle pools several lengths"
    recs = np.arange(len(data))
    summary = evaluate_bundle(cloud, edge, data, recs).summary
    every, owner, _ = segment_windows(data, recs, cloud.net.cfg.context_segments)
    stay = TrustParams.from_calibration(cloud.manifest.calibration).stay
    for level in (0, 2):
        decoded = decode_level(cloud, edge, data, encode_recordings(edge, data, recs), level)
        live = cloud.classify_live(decoded.windows(every)).activity
        truth = data.activity[owner]
        smoothed = []
        for r in recs.tolist():
            f = HMMFilter(live.shape[1], stay)
            smoothed += [int(f.update(p).argmax()) for p in live[owner == r]]
        row = summary["levels"][level]
        assert row["activity_accuracy_live_per_second"] == pytest.approx(
            float((live.argmax(1) == truth).mean()))
        assert row["activity_accuracy_smoothed_per_second"] == pytest.approx(
            float((np.array(smoothed) == truth).mean()))


def test_level_cost_is_paired_against_the_unquantized_path(trained: Path, samples: Path) -> None:
    """Each level's cost is the unquantized accuracy minus the level's on the same windows,
    per recording and per second, inside its own interval."""
    from csi_cloud.model.evaluate import evaluate_bundle

    data, *_ = prepare("fition", samples / "fition")
    summary = evaluate_bundle(CloudModel.load(trained), EdgeEncoder(trained), data,
                              np.arange(len(data))).summary
    unq = summary["unquantized"]
    for row in summary["levels"]:
        for suffix in ("", "_per_second"):
            points = row[f"activity_cost_points{suffix}"]
            assert points == pytest.approx(100 * (unq[f"activity_accuracy{suffix}"]
                                                  - row[f"activity_accuracy{suffix}"]), abs=0.01)
            low, high = row[f"activity_cost{suffix}_ci95"]
            assert low <= points <= high


def test_paired_cost_resamples_recordings() -> None:
    from csi_cloud.model.evaluate import paired_cost

    owner = np.repeat(np.arange(4), [1, 1, 1, 9])
    right = np.ones(12, bool)
    assert paired_cost(right, right, owner) == (0.0, [0.0, 0.0])
    # One recording of four, with 9 of the 12 windows, is wrong at the level: 75 points per
    # window; the windows of a recording are drawn together, so a draw without it costs 0.
    wrong = right.copy()
    wrong[3:] = False
    points, (low, high) = paired_cost(right, wrong, owner)
    assert points == 75.0 and low == 0.0 and 75.0 < high <= 100.0
    with pytest.raises(ValueError, match="3 owners"):
        paired_cost(right, wrong, owner[:3])


def test_int8_edge_codes_match_float_codes(trained: Path, samples: Path) -> None:
    data, *_ = prepare("fition", samples / "fition")
    edge, cloud = EdgeEncoder(trained), CloudModel.load(trained)
    int8_symbols, int8_profile = edge.encode(data.x)
    float_symbols, float_profile = cloud.encode(data.x)
    assert (int8_symbols == float_symbols).mean() >= 0.99
    assert (int8_profile == float_profile).mean() >= 0.99


def csi(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("csi")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "csi_cloud.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_train_and_evaluate_commands(samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "tiny"
    run = csi("train", "--dataset", "fition", "--data", str(samples / "fition"), "--out",
              str(out), "--epochs", "2", "--threads", "1", "--level0", "1,12")
    assert run.returncode == 0, run.stderr
    level0 = load_manifest(out).levels[0]  # the layout asked for, kept in the bundle
    assert (level0.groups, level0.profile_components) == (1, 12)
    assert (out / "report.md").is_file() and (out / "rate_accuracy.png").is_file()
    # 8 recordings leave no test split: the bundle is scored on what it was trained on, and
    # says so in bundle.json and in the report's title.
    assert load_manifest(out).held_out is False
    title = (out / "report.md").read_text().splitlines()[0]
    assert "NOT held out" in title, title
    evaluation = csi("evaluate", "--model", str(out), "--dataset", "fition", "--data",
                     str(samples / "fition"), "--json")
    assert evaluation.returncode == 0, evaluation.stderr
    summary = json.loads(evaluation.stdout)
    assert {"model", "dataset", "examples", "unquantized", "levels"} <= summary.keys()
    keys = {"level", "payload_bytes_per_s", "payload_bytes_per_segment", "compression_ratio",
            "activity_accuracy", "activity_macro_f1", "identity_accuracy", "identity_macro_f1",
            "activity_accuracy_per_second", "identity_accuracy_per_second",
            "nmse_db", "encoder_ms_per_segment"}
    assert all(keys <= set(level) for level in summary["levels"])
    assert keys - {"level"} <= set(summary["unquantized"])
    rates = [lv["payload_bytes_per_s"] for lv in summary["levels"]]
    assert rates == sorted(rates) and rates[0] <= 32
    listed = csi("models", "list", "--root", str(tmp_path / "models"), "--json")
    assert json.loads(listed.stdout)[0]["name"] == "tiny"
    refused = csi("evaluate", "--model", str(out), "--dataset", "wiar", "--data",
                  str(samples / "wiar"))
    assert refused.returncode == 2
    assert "'tiny'" in refused.stderr and "'wiar'" in refused.stderr


@pytest.mark.e2e
def test_training_is_reproducible(samples: Path, tmp_path: Path) -> None:
    data, spec, activities, identities = prepare("fition", samples / "fition")
    recs = np.arange(len(data))
    ids = []
    for run in ("a", "b"):
        _, manifest = fit(data, spec, activities, identities, recs, recs,
                          TrainOptions(epochs=1, threads=1, seed=3), tmp_path / run, name="r")
        ids.append(manifest.id)
    assert ids[0] == ids[1]


def test_checkpoints_are_written_without_pickle(samples: Path, tmp_path: Path) -> None:
    from csi_cloud.model.train import train

    data, _spec, activities, identities = prepare("fition", samples / "fition")
    cfg = ModelConfig(antennas=1, subcarriers=56, segment_frames=50, activities=len(activities),
                      identities=len(identities))
    recs = np.arange(len(data))
    train(cfg, data, recs, recs, TrainOptions(epochs=2, threads=1), checkpoints=tmp_path)
    for name in ("best.npz", "last.npz"):
        with np.load(tmp_path / name, allow_pickle=False) as arrays:
            assert "encoder.net.0.weight" in arrays.files
