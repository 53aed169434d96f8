"""The live output's readings at several context lengths: the one-pass computation
(CloudModel.readings, ContextHead.predict_lengths) gives what classifying each length's
windows on its own gives (CloudModel.readings_one_by_one), on real decoded windows of both
shipped bundles."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from csi_cloud.model.compression import CloudModel
from csi_cloud.model.context_head import profile_coefficients
from csi_cloud.model.rocket import series
from csi_cloud.model.window import Windows, slot_rows
from csi_edge import read_recording
from csi_edge.bundle import EdgeEncoder
from csi_edge.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = {"fition": "*.pcap", "wiar": "*.dat"}
# Float32 rounding: the one-pass path runs the ridge product on other shapes (BLAS sums in
# another order), so the probabilities agree to a few units in the last place, not bit for bit.
TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


@functools.cache
def decoded(name: str) -> tuple[CloudModel, Windows]:
    """Every window of the bundle's committed samples, coded by its int8 edge encoder at rate
    levels 0-3 (one per recording, in turn) and decoded as the cloud decodes them; every third
    window also loses its sixth slot (a gap inside the window)."""
    edge = EdgeEncoder(ROOT / "models" / name)
    cloud = CloudModel.load(ROOT / "models" / name)
    n = cloud.net.cfg.context_segments
    parts = []
    for i, path in enumerate(sorted((ROOT / "datasets" / "samples" / name).rglob(BUNDLES[name]))):
        batch = Preprocessor(edge.spec).process(read_recording(path))
        payload = edge.compress(batch.data, level=i % 4, first_seq=0, epoch=1, timestamp_ms=0)
        z_q, profile = cloud.decode_latent(cloud.decode_codes(payload)[1])
        slots = (batch.index - batch.index[0]).tolist()
        by_slot = {int(k): j for j, k in enumerate(slots)}
        rows = np.stack([slot_rows(by_slot, int(k), n) for k in slots])
        rows[::3, 5] = -1
        parts.append(Windows.gather(rows, z_q, profile, i % 4))
    return cloud, Windows(*(np.concatenate([getattr(p, k) for p in parts])
                            for k in ("z_q", "profile", "present", "level")))


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_readings_in_one_pass_are_the_readings_one_by_one(name: str) -> None:
    cloud, windows = decoded(name)
    # More than one run of 64 windows, every rate level, stream starts and gaps: the cases
    # where masking, chunking or the level split could go wrong.
    assert len(windows) > 64 and set(windows.level.tolist()) == {0, 1, 2, 3}
    assert (~windows.present[:, 0]).any() and (~windows.present[:, 5]).any()
    # The bundle's own lengths (the default), then a fixed set of three.
    assert len(cloud.lengths.lengths) >= 3
    own = cloud.lengths.lengths[:-1]
    fast, slow = cloud.readings(windows), cloud.readings_one_by_one(windows)
    assert len(fast) == len(slow) == len(own)
    for k, f, s in zip(own, fast, slow, strict=True):
        np.testing.assert_allclose(f, s, **TOLERANCE, err_msg=f"length {k}")
    fast, slow = cloud.readings(windows, [1, 2, 4]), cloud.readings_one_by_one(windows, [1, 2, 4])
    assert len(fast) == len(slow) == 3
    for k, f, s in zip((1, 2, 4), fast, slow, strict=True):
        assert f.shape == s.shape == (len(windows), cloud.net.cfg.activities), k
        np.testing.assert_allclose(f, s, **TOLERANCE, err_msg=f"length {k}")
        assert np.array_equal(f.argmax(1), s.argmax(1)), k
    # The lengths differ from each other (a reading that ignored its mask would not).
    assert not np.allclose(fast[0], fast[2], **TOLERANCE)
    # Any lengths, the full one included (= the full window's activity).
    full = cloud.readings(windows, [3, 8])
    np.testing.assert_allclose(full[0], cloud.readings_one_by_one(windows, [3])[0],
                               **TOLERANCE)
    np.testing.assert_allclose(full[1], cloud.classify(windows, calibrated=False).activity,
                               **TOLERANCE)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_the_live_output_is_the_reference_computation(name: str) -> None:
    """classify_live = the bundle's combination (the most confident calibrated reading, or
    their pool) of the one-by-one readings."""
    cloud, windows = decoded(name)
    live = cloud.classify_live(windows)
    full = cloud.classify(windows, calibrated=False)
    expected, raw = cloud.lengths.read([*cloud.readings_one_by_one(windows), full.activity])
    np.testing.assert_allclose(live.activity, expected, **TOLERANCE)
    assert live.activity_raw is not None
    np.testing.assert_allclose(live.activity_raw, raw, **TOLERANCE)
    assert np.array_equal(live.activity.argmax(1), expected.argmax(1))
    assert np.array_equal(live.unknown, full.unknown)


def test_predict_lengths_refuses_lengths_the_window_does_not_have() -> None:
    cloud, windows = decoded("wiar")
    head = cloud.net.context_head
    assert head is not None
    coeff = profile_coefficients(cloud.net, windows.profile,
                                 transmitted=windows.level < cloud.net.cfg.levels)
    for bad in (0, 9):
        with pytest.raises(ValueError, match=f"no last {bad} slots"):
            head.predict_lengths(windows.z_q, coeff, windows.present, windows.level, [bad])


def test_classifying_leaves_the_thread_settings_as_they_were() -> None:
    """The network classifier runs on one torch thread and the ridge product on one BLAS
    thread, each only while it runs: the caller's settings come back."""
    cloud, windows = decoded("fition")  # its open-set score runs the network classifier
    blas = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()
            if i["user_api"] == "blas"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cloud.classify_live(windows)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert [(i["internal_api"], i["num_threads"]) for i in threadpool_info()
            if i["user_api"] == "blas"] == blas


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_the_compiled_transform_is_the_definition_on_the_readings_series(name: str) -> None:
    """The shorter readings' series are zeros over their masked slots (a kernel's taps then
    reach past the first present step into zeros): the compiled transform still gives the
    torch definition's numbers bit for bit, at every level's transforms."""
    cloud, windows = decoded(name)
    head = cloud.net.context_head
    assert head is not None
    coeff = profile_coefficients(cloud.net, windows.profile,
                                 transmitted=windows.level < cloud.net.cfg.levels)
    for lv in range(4):
        rows = windows.level == lv
        part = head.levels[lv]
        for k in (1, 2, 4, 8):
            short = Windows(windows.z_q[rows], windows.profile[rows], windows.present[rows],
                            windows.level[rows]).last(k)
            for transform, layout in zip(part.transforms, part.parts(), strict=True):
                x = series(short.z_q, coeff[rows], short.present, layout)
                assert np.array_equal(transform(x), transform.reference(x)), (lv, k)


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_float_noise_on_decoded_profiles_changes_no_output(name: str) -> None:
    """The head reads the transmitted profile coefficients as the whole steps that were sent:
    decoded profiles that differ in their last float digits (as another machine's kernels
    give them) are classified bit for bit alike. Read as floats, noise of this size moved
    the head's threshold features (docs/model.md, "Exact inputs")."""
    cloud, windows = decoded(name)
    rng = np.random.default_rng(0)
    noise = (1 + 1e-6 * rng.standard_normal(windows.profile.shape)).astype(np.float32)
    noisy = Windows(windows.z_q, (windows.profile * noise).astype(np.float32),
                    windows.present, windows.level)
    assert not np.array_equal(noisy.profile, windows.profile)
    levels = cloud.net.cfg.levels
    exact = profile_coefficients(cloud.net, windows.profile, transmitted=True)
    assert np.array_equal(exact, np.rint(exact))  # whole steps
    assert np.array_equal(exact, profile_coefficients(cloud.net, noisy.profile,
                                                      transmitted=True))
    floats = profile_coefficients(cloud.net, windows.profile)
    assert 0 < np.abs(floats - exact).max() < 0.01  # what rounding takes away: float noise
    head = cloud.net.context_head
    assert head is not None
    as_floats = [head.predict(windows.z_q, c, windows.present, windows.level)[0]
                 for c in (floats, profile_coefficients(cloud.net, noisy.profile))]
    assert not np.array_equal(*as_floats), "read as floats, the noise moves the outputs"
    for a, b in zip(cloud.readings(windows), cloud.readings(noisy), strict=True):
        assert np.array_equal(a, b)
    full, again = cloud.classify(windows), cloud.classify(noisy)
    assert np.array_equal(full.activity, again.activity)
    if full.identity is not None:
        assert again.identity is not None and np.array_equal(full.identity, again.identity)
    # The unquantized path's exact profiles (a row at level ``levels``) are projected as
    # they are.
    unquantized = np.where(np.arange(len(windows)) % 2 == 0, windows.level, levels)
    mixed = profile_coefficients(cloud.net, windows.profile,
                                 transmitted=unquantized < levels)
    assert np.array_equal(mixed[::2], exact[::2]) and np.array_equal(mixed[1::2], floats[1::2])
