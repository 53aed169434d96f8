"""Profile blocks: a segment carrying several profiles (csi_edge.bundle, network, head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from csi_cloud.model.compression import CloudModel
from csi_cloud.model.context_head import ContextHead
from csi_cloud.model.fitting import fit
from csi_cloud.model.network import CSICodecNet, ModelConfig
from csi_cloud.model.pipeline import prepare
from csi_cloud.model.rocket import WindowLayout, series
from csi_cloud.model.train import TrainOptions
from csi_cloud.model.window import Windows
from csi_edge import entropy
from csi_edge.bundle import (
    BundleError,
    BundleManifest,
    EdgeEncoder,
    SegmentCodes,
    decode_segment_codes,
    encode_segment_codes,
    load_manifest,
)

ROOT = Path(__file__).resolve().parents[1]
R = 15  # the shipped bundles' profile range


def _blocked(blocks: int, components: int = 4) -> tuple[BundleManifest,
                                                        tuple[entropy.EntropyTable, ...]]:
    """The shipped WiAR manifest with ``blocks`` profiles a segment, level 0 sending
    ``components`` coefficients of each and no latent group, and a fixed delta table."""
    manifest = load_manifest(ROOT / "models" / "wiar")
    levels = [lv.model_copy(update={"groups": 0, "profile_components": components})
              if lv.level == 0 else lv for lv in manifest.levels]
    values = np.ones((16, 2 * R + 1), np.int64)
    values[:, R - 3 : R + 4] = [2, 4, 8, 10, 8, 4, 2]
    counts = np.ones((16, 4 * R + 1), np.int64)
    counts[:, 2 * R - 2 : 2 * R + 3] = [5, 20, 60, 20, 5]  # small differences are common
    latent = np.array([[3, 5, 9, 5, 3]] * 16, np.int64)
    tables = {"latent": entropy.EntropyTable("latent", latent).to_dict(),
              "profile": entropy.EntropyTable("profile", values).to_dict(),
              "profile_delta": entropy.EntropyTable("profile_delta", counts).to_dict()}
    blocked = manifest.model_copy(update={
        "levels": levels, "model": {**manifest.model, "profile_blocks": blocks},
        "entropy": {**manifest.entropy, **tables}})
    return blocked, blocked.tables()


def test_block_codes_go_as_differences_and_round_trip() -> None:
    manifest, tables = _blocked(3)
    profile = np.array([[3, -2, 0, 15], [4, -2, 0, 14], [4, -3, 1, -15]], np.int64)
    codes = SegmentCodes(0, np.zeros((0, 4), np.int64), profile.reshape(-1))
    blob = encode_segment_codes(codes, manifest, tables)
    # Golden bytes: block 0 with the profile table, blocks 1 and 2 as differences (the last
    # component's -29 is in range: -2R..2R) with the delta table, one ANS stream.
    assert blob.hex() == GOLDEN_BLOCKS_HEX
    back = decode_segment_codes(blob, 0, manifest, tables)
    assert back.profile.tolist() == profile.reshape(-1).tolist()
    # The same 12 values coded as values (one block of 12) cost more: differences are cheap.
    slow = SegmentCodes(0, np.zeros((0, 4), np.int64),
                        np.array([[3, -2, 0, 5], [4, -2, 0, 5], [4, -3, 1, 6]]).reshape(-1))
    as_values = encode_segment_codes(slow, *_blocked(1, components=12))
    assert len(encode_segment_codes(slow, manifest, tables)) < len(as_values)


GOLDEN_BLOCKS_HEX = "ec4eca998a1b54"


def test_one_profile_a_segment_codes_as_before_blocks() -> None:
    """Golden bytes of a segment of a bundle without blocks (the layout every bundle had
    before them): latent groups, then the coefficients with the profile table, no delta."""
    manifest, tables = _blocked(1, components=4)
    codes = SegmentCodes(1, np.array([[0, 1, 2, 3]] * 4, np.int64),
                         np.array([3, -2, 0, 15] + [1] * 12, np.int64))
    blob = encode_segment_codes(codes, manifest, tables)
    assert blob.hex() == GOLDEN_ONE_BLOCK_HEX
    back = decode_segment_codes(blob, 1, manifest, tables)
    assert back.profile.tolist() == codes.profile.tolist()
    assert back.latent.tolist() == codes.latent.tolist()


GOLDEN_ONE_BLOCK_HEX = "bbcffe8bd891932b88471ef1393f"  # what the encoder before blocks gave


def test_codes_beyond_the_range_are_refused_when_encoding() -> None:
    manifest, tables = _blocked(2, components=1)
    codes = SegmentCodes(0, np.zeros((0, 4), np.int64), np.array([15, 16], np.int64))
    with pytest.raises(ValueError, match="profile code 16 is beyond the range 15"):
        encode_segment_codes(codes, manifest, tables)


def test_a_manifest_with_bad_blocks_or_delta_table_is_refused() -> None:
    manifest, _ = _blocked(3)
    for bad in (0, -2, 1.5, "3"):
        broken = manifest.model_copy(update={"model": {**manifest.model,
                                                       "profile_blocks": bad}})
        with pytest.raises(BundleError, match=f"profile_blocks {bad!r} is not"):
            broken.tables()
    small = entropy.EntropyTable("profile_delta", np.ones((16, 2 * R + 1), np.int64))
    broken = manifest.model_copy(update={"entropy": {**manifest.entropy,
                                                     "profile_delta": small.to_dict()}})
    with pytest.raises(BundleError, match="profile_delta table of 16 rows x 31 symbols"):
        broken.tables()


def test_a_config_without_blocks_is_stored_as_before_them() -> None:
    cfg = ModelConfig(antennas=1, subcarriers=8, segment_frames=50, activities=2)
    assert "profile_blocks" not in cfg.stored()
    assert ModelConfig.model_validate(cfg.stored()) == cfg
    blocked = cfg.model_copy(update={"profile_blocks": 5})
    assert blocked.stored()["profile_blocks"] == 5


def test_block_differences_that_add_up_beyond_the_range_are_rejected() -> None:
    manifest, tables = _blocked(2, components=1)
    # Block 0 at +15 and a difference of +10: each symbol valid, the sum 25 is not.
    blob = entropy.encode([(np.array([15 + R]), np.arange(1), tables[1]),
                           (np.array([10 + 2 * R]), np.arange(1), tables[2])])
    with pytest.raises(entropy.EntropyDecodeError, match="add up to 25 steps"):
        decode_segment_codes(blob, 0, manifest, tables)


def test_a_blocked_bundle_without_its_delta_table_is_refused() -> None:
    manifest, _ = _blocked(5)
    entropy_tables = {k: v for k, v in manifest.entropy.items() if k != "profile_delta"}
    with pytest.raises(BundleError, match="profile_delta"):
        manifest.model_copy(update={"entropy": entropy_tables}).tables()


def test_level_profile_takes_each_blocks_first_components() -> None:
    manifest, _ = _blocked(3, components=2)
    full = np.arange(3 * 16)  # (P * Kmax,) block-major
    assert manifest.level_profile(full, 0).tolist() == [0, 1, 16, 17, 32, 33]
    assert manifest.level_profile(full, 3).tolist() == full.tolist()


def test_blocks_must_divide_the_segment() -> None:
    with pytest.raises(ValidationError, match="profile_blocks 7 does not divide a segment of "
                                              "50 frames"):
        ModelConfig(antennas=1, subcarriers=8, segment_frames=50, activities=2,
                    profile_blocks=7)


def test_the_encoder_splits_each_block_into_its_mean_and_dynamics() -> None:
    cfg = ModelConfig(antennas=2, subcarriers=3, segment_frames=12, activities=2,
                      profile_blocks=4, profile_components=(6, 6, 6, 6))
    net = CSICodecNet(cfg).eval()
    x = torch.randn(5, 12, 2, 3)
    dynamics, profile = net.encoder.standardise(x)
    assert dynamics.shape == (5, 6, 12) and profile.shape == (5, 4 * 6)
    frames = x.reshape(5, 12, 6).transpose(1, 2)  # standardisation is the identity here
    assert torch.allclose(dynamics + net.profile_frames(profile), frames, atol=1e-6)
    assert torch.allclose(profile.view(5, 4, 6)[:, 1], frames[:, :, 3:6].mean(dim=-1))
    # Codes and decoding: each block projected on its own, block-major.
    net.profile_basis.copy_(torch.eye(6))
    codes = net.profile_codes(profile, 0)
    assert codes.shape == (5, 4 * 6)
    assert torch.equal(codes.view(5, 4, 6)[:, 2],
                       torch.round(profile.view(5, 4, 6)[:, 2]).clamp(-15, 15).long())
    assert torch.allclose(net.profile_decode(codes), torch.round(profile).clamp(-15, 15))
    # A level sending fewer components than the top one sends each block's first ones.
    few = ModelConfig(antennas=2, subcarriers=3, segment_frames=12, activities=2,
                      profile_blocks=4, profile_components=(2, 6, 6, 6))
    net_few = CSICodecNet(few).eval()
    net_few.load_state_dict(net.state_dict())
    low = net_few.profile_codes(profile, 0)
    assert low.shape == (5, 4 * 2)
    assert torch.equal(low.view(5, 4, 2), codes.view(5, 4, 6)[:, :, :2])
    decoded = net_few.profile_decode(low).view(5, 4, 6)
    assert torch.equal(decoded[..., 2:], torch.zeros(5, 4, 4))  # the training mean (0 here)


def test_the_head_reads_each_block_as_one_step() -> None:
    w, n, p, k = 2, 3, 4, 5
    coeff = np.arange(w * n * p * k, dtype=np.float32).reshape(w, n, p * k)
    present = np.ones((w, n), bool)
    present[1, 0] = False
    z_q = np.zeros((w, n, 1, 7), np.float32)
    layout = WindowLayout(0, 2, 1.0, profile_mean=True, profile_blocks=p)
    x = series(z_q, coeff, present, layout)
    assert x.shape == (w, 2 * 2 * 2, n * p)  # (values, window means) x (series, difference)
    blocks = coeff.reshape(w, n, p, k)
    assert x[0, 1].tolist() == blocks[0, :, :, 1].reshape(-1).tolist()  # component 1
    assert x[1, 0, :p].tolist() == [0.0] * p  # a missing slot is zeros
    assert x[1, 2, p:].tolist() == [blocks[1, 1:, :, 0].mean()] * (2 * p)  # window mean
    with pytest.raises(ValueError, match="not 1 latent channels"):
        series(z_q, coeff, present, WindowLayout(1, 2, profile_blocks=p))


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    """A bundle with 5 profiles a segment, trained for one epoch on the committed samples."""
    data, spec, activities, identities = prepare("fition", samples / "fition")
    recs = np.arange(len(data))
    out = tmp_path_factory.mktemp("bundle") / "blocked"
    fit(data, spec, activities, identities, recs, recs, TrainOptions(epochs=1, threads=1), out,
        name="blocked", model={"profile_blocks": 5, "level_channels": (0, 4, 8, 16),
                               "profile_components": (4, 16, 16, 16)}, calibrate=False)
    return out


def test_a_bundle_with_profile_blocks_compresses_decodes_and_classifies(
        blocked: Path, samples: Path) -> None:
    data, *_ = prepare("fition", samples / "fition")
    edge, cloud = EdgeEncoder(blocked), CloudModel.load(blocked)
    assert edge.manifest.profile_blocks == 5 and "profile_delta" in edge.manifest.entropy
    segments = data.x[:4]
    _, profile = edge.encode(segments)
    assert profile.shape == (4, 5 * 16)
    _, float_profile = cloud.encode(data.x)
    assert (edge.encode(data.x)[1] == float_profile).mean() >= 0.99
    for level in range(4):
        decoded = cloud.decompress(edge.compress(segments, level=level, first_seq=0, epoch=1,
                                                 timestamp_ms=0))
        for i, d in enumerate(decoded):
            assert np.array_equal(d.codes.profile, edge.manifest.level_profile(profile[i], level))
            assert d.profile.shape == (5 * cloud.net.cfg.channels,)
            assert d.reconstruction.shape == segments.shape[1:]
    # Level 0's reconstruction follows the profile within the second: 5 different blocks.
    recon = cloud.decompress(edge.compress(segments, level=0, first_seq=0, epoch=1,
                                           timestamp_ms=0))[0].reconstruction
    assert len({recon[j].tobytes() for j in range(0, len(recon), len(recon) // 5)}) == 5
    # An idle segment repeats the last one's blocks, cut to the level.
    last = cloud.decompress(edge.compress(segments[:1], level=3, first_seq=0, epoch=1,
                                          timestamp_ms=0))[0].codes
    idle = cloud.idle_codes(0, last)
    assert idle.profile.tolist() == edge.manifest.level_profile(last.profile, 0).tolist()
    # The head reads one step a block, and stores it.
    head = cloud.net.context_head
    assert head is not None and {part.layout.profile_blocks for part in head.levels} == {5}
    again = ContextHead.from_arrays(head.arrays())
    assert again is not None and again.levels[0].layout == head.levels[0].layout
    z_q, prof = cloud.decode_latent([d.codes for d in decoded])
    rows = np.array([[-1] * (cloud.net.cfg.context_segments - 4) + [0, 1, 2, 3]])
    prediction = cloud.classify(Windows.gather(rows, z_q, prof, 3))
    assert prediction.activity.shape == (1, cloud.net.cfg.activities)
    assert np.isclose(prediction.activity.sum(), 1.0, atol=1e-4)


def test_heads_stored_before_profile_blocks_read_one_profile_a_slot() -> None:
    head = CloudModel.load(ROOT / "models" / "wiar").net.context_head
    assert head is not None
    arrays = head.arrays()
    with np.load(ROOT / "models" / "wiar" / "cloud.npz") as stored:  # stored as before
        assert all(np.array_equal(arrays[k], stored[k]) for k in arrays if k.endswith(".layout"))
    legacy = {k: (v[:4] if k.endswith(".layout") else v) for k, v in arrays.items()}
    again = ContextHead.from_arrays(legacy)
    assert again is not None
    assert [p.layout for p in again.levels] == [p.layout for p in head.levels]
    assert {p.layout.profile_blocks for p in again.levels} == {0}
