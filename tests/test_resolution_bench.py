"""bench/resolution.py without data: block means, the codes' rounding of the components, and
the two estimates of their bits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from _bench import bench_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resolution() -> Iterator[ModuleType]:
    with bench_module("resolution") as module:
        yield module


class _Segments:
    """Four 6-frame segments of 1 antenna x 2 subcarriers: frame f of segment m is m*10 + f."""

    x = (np.arange(4)[:, None] * 10 + np.arange(6)[None, :])[:, :, None, None] \
        * np.ones((1, 1, 1, 2))


def test_block_means_hold_each_block_and_keep_missing_slots_zero(
        resolution: ModuleType) -> None:
    rows = np.array([[0, 1], [-1, 3]])
    w = resolution.block_means(_Segments, rows, 2)  # two blocks of 3 frames a segment
    assert w.shape == (2, 12, 2)
    assert w[0, :, 0].tolist() == [1, 1, 1, 4, 4, 4, 11, 11, 11, 14, 14, 14]
    assert (w[1, :6] == 0).all() and w[1, 6:, 0].tolist() == [31] * 3 + [34] * 3
    assert (resolution.block_means(_Segments, rows, None)[0, :6, 0] == np.arange(6)).all()
    with pytest.raises(ValueError, match="6 frames a segment do not split into 4 blocks"):
        resolution.block_means(_Segments, rows, 4)


def test_components_are_rounded_like_the_codes_and_differences_cost_less_when_smooth(
        resolution: ModuleType) -> None:
    rng = np.random.default_rng(0)
    n, rate, frames = 3, 5, 10
    slow = np.cumsum(rng.normal(size=(400, n * rate)), axis=1)  # blocks that drift slowly
    w = np.repeat(slow, frames // rate, axis=1)[:, :, None] * np.array([1.0, -2.0, 0.5])
    segments = np.ones((400, n), bool)
    values, step, alone, delta = resolution.quantized_components(w, segments, np.arange(300),
                                                                 1, rate)
    assert values.shape == (400, n * frames, 1) and step.shape == (1,)
    assert np.allclose(values / step, np.round(values / step))  # whole steps
    assert len(np.unique(values)) <= 2 * resolution.PROFILE_RANGE + 1  # clipped
    assert 0 < delta < alone <= rate * np.log2(2 * resolution.PROFILE_RANGE + 1)
    head = resolution.head_series(values / step, segments)
    assert head.shape == (400, 4, n * frames)  # the component and its window mean, + differences
    assert np.allclose(head[:, 0], (values / step)[..., 0])
    assert np.allclose(head[:, 1], head[:, 1, :1])  # the window mean, held
    assert resolution.entropy_bits(np.zeros(10)) == 0.0
    assert resolution.entropy_bits(np.array([0, 1, 2, 3])) == pytest.approx(2.0)


def test_the_report_section_reads_every_variant_from_the_results_file(
        resolution: ModuleType) -> None:
    import json

    results = json.loads((ROOT / "bench" / "results" / "resolution.json").read_text())
    for name, entry in results["datasets"].items():
        section = resolution.render(name, entry)
        rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
        assert len(rows) == len(entry["variants"])
        for row, variant in zip(rows, entry["variants"], strict=True):
            assert f"{variant['activity_accuracy']['mean']:.3f}" in row
        assert section in (ROOT / "models" / name / "report.md").read_text()
