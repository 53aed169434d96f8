"""bench/coder_overhead.py: the coder's bytes beyond the information, and the per-message
stream it measures as an alternative (which must decode back to the same codes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from _bench import bench_module

from csi_cloud.model.pipeline import prepare
from csi_edge import entropy
from csi_edge.bundle import EdgeEncoder, encode_segment_codes, segment_symbol_groups

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with bench_module("coder_overhead") as module:
        yield module


def test_overhead_is_measured_on_the_wires_own_streams(bench: ModuleType, samples: Path) -> None:
    edge = EdgeEncoder(ROOT / "models" / "wiar")
    data, *_ = prepare("wiar", samples / "wiar")
    symbols, profile = edge.encode(data.x[:12])
    rows = bench.measure(edge.manifest, edge.tables, symbols, profile)
    assert [r["level"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        level = row["level"]
        wire = [encode_segment_codes(edge.codes(s, p, level), edge.manifest, edge.tables)
                for s, p in zip(symbols, profile, strict=True)]
        assert row["bytes"] == round(float(np.mean([len(w) for w in wire])), 2)
        assert 0 < row["overhead"] < row["bytes"]
        assert row["one_stream_per_message"] <= row["with_length_varint"]
    assert rows[0]["saved_bytes_per_s"] > 1.0  # 4 segments a message share one coder state


def test_one_stream_per_message_decodes_back(bench: ModuleType, samples: Path) -> None:
    edge = EdgeEncoder(ROOT / "models" / "fition")
    data, *_ = prepare("fition", samples / "fition")
    symbols, profile = edge.encode(data.x[:4])
    groups = [grp for s, p in zip(symbols, profile, strict=True)
              for grp in segment_symbol_groups(edge.codes(s, p, 0), edge.manifest, edge.tables)]
    decoded = entropy.decode(entropy.encode(groups), [(rows, table) for _, rows, table in groups])
    assert all(np.array_equal(d, sym) for d, (sym, _, _) in zip(decoded, groups, strict=True))
    assert bench.varint_bytes(0) == 1 and bench.varint_bytes(127) == 1
    assert bench.varint_bytes(128) == 2 and bench.varint_bytes(16384) == 3
