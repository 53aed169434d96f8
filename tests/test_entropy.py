"""Entropy model and ANS coding (csi_edge.entropy): round trips, size, determinism, corruption."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import constriction
import numpy as np
import pytest

from csi_edge.entropy import MAX_ALPHABET, EntropyDecodeError, EntropyTable, decode, encode


def _table(rng: np.random.Generator, n_rows: int, alphabet: int, name: str = "t") -> EntropyTable:
    """A skewed table fitted on samples from random per-row distributions."""
    p = rng.dirichlet(np.full(alphabet, 0.4), size=n_rows)
    rows = rng.integers(0, n_rows, 4000)
    symbols = np.array([rng.choice(alphabet, p=p[r]) for r in rows])
    return EntropyTable.fit(name, symbols, rows, n_rows, alphabet)


def _sample(rng: np.random.Generator, table: EntropyTable, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n symbols drawn from the table's own distributions (so the coded size ~ entropy)."""
    rows = rng.integers(0, table.rows, n)
    cdf = np.cumsum(table.probabilities(), axis=1)
    u = rng.random(n)
    symbols = np.minimum((u[:, None] > cdf[rows]).sum(axis=1), table.alphabet - 1)
    return symbols, rows


def test_fit_counts_are_smoothed_integers() -> None:
    t = EntropyTable.fit("c", np.array([0, 0, 2, 1]), np.array([0, 0, 0, 1]), 2, 3)
    # smoothing 0.5 = 1/2: counts = 2 * occurrences + 1
    assert t.counts.dtype == np.int64
    assert t.counts.tolist() == [[5, 1, 3], [1, 3, 1]]
    assert np.allclose(t.probabilities()[0], np.array([2.5, 0.5, 1.5]) / 4.5)
    t1 = EntropyTable.fit("c", np.array([1]), np.array([0]), 1, 2, smoothing=1)
    assert t1.counts.tolist() == [[1, 2]]
    assert not t.counts.flags.writeable and not t.probabilities().flags.writeable


def test_probabilities_are_counts_over_row_sums_bit_for_bit() -> None:
    t = _table(np.random.default_rng(0), 5, 7)
    expected = t.counts.astype(np.float64) / t.counts.sum(axis=1, keepdims=True)
    assert t.probabilities().dtype == np.float64
    assert t.probabilities().tobytes() == expected.tobytes()


def test_table_json_round_trip() -> None:
    t = _table(np.random.default_rng(1), 4, 9, name="latent")
    text = json.dumps(t.to_dict())
    back = EntropyTable.from_dict(json.loads(text))
    assert back == t and hash(back) == hash(t)
    assert back.probabilities().tobytes() == t.probabilities().tobytes()


def test_probabilities_identical_in_a_fresh_process() -> None:
    # Both sides (edge, cloud) compute the model from the counts alone.
    t = _table(np.random.default_rng(2), 3, 33)
    code = (
        "import json, sys, hashlib\n"
        "from csi_edge.entropy import EntropyTable\n"
        "t = EntropyTable.from_dict(json.loads(sys.stdin.read()))\n"
        "print(hashlib.sha256(t.probabilities().tobytes()).hexdigest())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(t.to_dict()),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == hashlib.sha256(t.probabilities().tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"name": ""}, "'name' must be a non-empty string"),
        ({"rows": "2"}, "'rows' must be an int"),
        ({"alphabet": 3.0}, "'alphabet' must be an int"),
        ({"rows": 3}, "'counts' has 2 rows but 'rows' is 3"),
        ({"counts": [[1, 2], [1, 2, 3]]}, r"counts\[0\] has 2 entries"),
        ({"counts": [[1, 0, 1], [1, 1, 1]]}, r"counts\[0\]\[1\] = 0 is outside"),
        ({"counts": [[1, 1.5, 1], [1, 1, 1]]}, r"counts\[0\]\[1\] = 1.5 is not an int"),
        ({"counts": [[1, True, 1], [1, 1, 1]]}, r"counts\[0\]\[1\] = True is not an int"),
        ({"counts": [[1, 1, 1], [1, 2**53, 1]]}, "row 1 sums to"),
        ({"counts": "abc"}, "'counts' must be a list"),
        ({"alphabet": 1, "counts": [[1], [1]]}, "alphabet 1 is outside"),
    ],
)
def test_from_dict_names_the_bad_value(change: dict, match: str) -> None:
    good = {"name": "x", "rows": 2, "alphabet": 3, "counts": [[1, 2, 3], [4, 5, 6]]}
    with pytest.raises(ValueError, match=match):
        EntropyTable.from_dict({**good, **change})
    bad = dict(good)
    del bad["counts"]
    with pytest.raises(ValueError, match="lacks key"):
        EntropyTable.from_dict(bad)


def test_fit_rejects_bad_arguments() -> None:
    s, r = np.array([0, 1]), np.array([0, 0])
    with pytest.raises(ValueError, match="smoothing must be"):
        EntropyTable.fit("x", s, r, 1, 2, smoothing=0)
    with pytest.raises(ValueError, match=r"symbols\[1\] = 5 is outside \[0, 2\)"):
        EntropyTable.fit("x", np.array([0, 5]), r, 1, 2)
    with pytest.raises(ValueError, match="alphabet 1 is outside"):
        EntropyTable.fit("x", s, r, 1, 1)
    with pytest.raises(ValueError, match=f"alphabet {MAX_ALPHABET + 1} is outside"):
        EntropyTable.fit("x", s, r, 1, MAX_ALPHABET + 1)


def test_round_trip_many_random_groups() -> None:
    rng = np.random.default_rng(3)
    tables = [_table(rng, n_rows, a, f"t{a}") for n_rows, a in [(1, 2), (4, 5), (8, 16), (3, 300)]]
    for _ in range(300):
        groups = []
        for _ in range(int(rng.integers(1, 5))):
            t = tables[int(rng.integers(len(tables)))]
            n = int(rng.choice([0, 1, 2, 7, int(rng.integers(0, 400))]))
            groups.append((*_sample(rng, t, n), t))
        data = encode(groups)
        out = decode(data, [(rows, t) for _, rows, t in groups])
        assert len(out) == len(groups)
        for got, (symbols, _, _) in zip(out, groups, strict=True):
            assert got.dtype == np.int32
            assert np.array_equal(got, symbols)


def test_empty_and_single_symbol_streams() -> None:
    t = _table(np.random.default_rng(4), 2, 4)
    empty = np.zeros(0, dtype=np.int64)
    assert encode([]) == b""
    assert encode([(empty, empty, t)]) == b""
    assert decode(b"", []) == []
    assert [a.size for a in decode(b"", [(empty, t), (empty, t)])] == [0, 0]
    for s in range(4):
        data = encode([(np.array([s]), np.array([1]), t)])
        assert decode(data, [(np.array([1]), t)])[0].tolist() == [s]
    # Symbol 0 pushed onto an empty coder leaves it empty: all-zero groups cost no byte, which
    # is why an empty stream cannot be rejected as corrupt.
    zeros = np.zeros(50, dtype=np.int64)
    assert encode([(zeros, zeros, t)]) == b""
    assert decode(b"", [(zeros, t)])[0].tolist() == [0] * 50
    with pytest.raises(TypeError, match="bytes-like"):
        decode("abc", [])  # type: ignore[arg-type]


def test_trailing_zero_stripping_is_lossless_on_2000_cases() -> None:
    rng = np.random.default_rng(5)
    tables = [_table(rng, 2, a) for a in (2, 3, 6, 40)]
    family = constriction.stream.model.Categorical(perfect=False)
    stripped = 0
    for i in range(2000):
        t = tables[i % len(tables)]
        symbols, rows = _sample(rng, t, int(rng.integers(0, 60)))
        data = encode([(symbols, rows, t)])
        assert not data.endswith(b"\x00")
        # The unstripped words, straight from constriction.
        coder = constriction.stream.stack.AnsCoder()
        if symbols.size:
            coder.encode_reverse(symbols.astype(np.int32), family, t.probabilities()[rows])
        words = coder.get_compressed().astype("<u4").tobytes()
        assert data == words.rstrip(b"\x00") and len(words) - len(data) <= 3
        stripped += len(data) != len(words)
        assert np.array_equal(decode(data, [(rows, t)])[0], symbols)
    assert stripped > 1000  # most streams do lose high zero bytes


def test_long_groups_are_chunked_into_the_same_stream() -> None:
    # alphabet 2**16 -> 16 symbols per constriction call; the bytes must not depend on that.
    rng = np.random.default_rng(6)
    t = EntropyTable("wide", rng.integers(1, 50, size=(2, MAX_ALPHABET)))
    symbols, rows = rng.integers(0, MAX_ALPHABET, 100), rng.integers(0, 2, 100)
    data = encode([(symbols, rows, t)])
    coder = constriction.stream.stack.AnsCoder()
    family = constriction.stream.model.Categorical(perfect=False)
    coder.encode_reverse(symbols.astype(np.int32), family, t.probabilities()[rows])
    assert data == coder.get_compressed().astype("<u4").tobytes().rstrip(b"\x00")
    assert np.array_equal(decode(data, [(rows, t)])[0], symbols)


@pytest.mark.parametrize(("n_rows", "alphabet"), [(1, 2), (8, 16), (32, 256)])
def test_size_close_to_ideal_code_length(n_rows: int, alphabet: int) -> None:
    rng = np.random.default_rng(7)
    t = _table(rng, n_rows, alphabet)
    symbols, rows = _sample(rng, t, 10_000)
    ideal_bytes = t.entropy_bits(symbols, rows) / 8
    data = encode([(symbols, rows, t)])
    assert len(data) <= ideal_bytes * 1.005 + 8
    assert len(data) >= ideal_bytes - 8  # no free lunch: sanity of entropy_bits


def test_deterministic_bytes() -> None:
    rng = np.random.default_rng(8)
    t = _table(rng, 4, 11)
    symbols, rows = _sample(rng, t, 3000)
    first = encode([(symbols, rows, t), (symbols[:10], rows[:10], t)])
    again = encode(
        [
            (symbols.astype(np.int16), rows.astype(np.uint8), EntropyTable.from_dict(t.to_dict())),
            (symbols[:10], rows[:10], t),
        ]
    )
    assert first == again


@pytest.mark.parametrize(
    ("symbols", "rows", "match"),
    [
        (np.array([0, 4]), np.array([0, 0]), r"symbols\[1\] = 4 is outside \[0, 4\)"),
        (np.array([-1]), np.array([0]), r"symbols\[0\] = -1 is outside"),
        (np.array([0]), np.array([2]), r"rows\[0\] = 2 is outside \[0, 2\)"),
        (np.array([0.0]), np.array([0]), "must hold integers"),
        (np.array([0, 1]), np.array([0]), "2 symbols but 1 rows"),
        (np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int), "must be 1-D"),
    ],
)
def test_encode_rejects_out_of_range(symbols: np.ndarray, rows: np.ndarray, match: str) -> None:
    t = _table(np.random.default_rng(9), 2, 4)
    with pytest.raises(ValueError, match=match):
        encode([(np.array([1]), np.array([0]), t), (symbols, rows, t)])


def test_decode_rejects_bad_rows_and_non_canonical_data() -> None:
    t = _table(np.random.default_rng(10), 2, 4)
    with pytest.raises(ValueError, match=r"rows\[0\] = 5"):
        decode(b"\x01", [(np.array([5]), t)])
    with pytest.raises(EntropyDecodeError) as info:
        decode(b"\x12\x00", [(np.array([0]), t)])
    assert info.value.reason == "non_canonical"


def test_corrupted_data_is_reported_never_crashes() -> None:
    rng = np.random.default_rng(11)
    t = _table(rng, 4, 8)
    counts = {"flip": [0, 0], "truncate": [0, 0], "extend": [0, 0]}  # [detected, undetected]
    for i in range(3000):
        symbols, rows = _sample(rng, t, int(rng.integers(20, 300)))
        data = bytearray(encode([(symbols, rows, t)]))
        kind = ("flip", "truncate", "extend")[i % 3]
        if kind == "flip":
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        elif kind == "truncate":
            del data[int(rng.integers(len(data))) :]
        else:
            data += rng.integers(0, 256, int(rng.integers(1, 5))).astype(np.uint8).tobytes()
        try:
            out = decode(bytes(data), [(rows, t)])
        except EntropyDecodeError as exc:
            assert exc.reason in {"non_canonical", "leftover_data", "decode_failed"}
            counts[kind][0] += 1
            continue
        counts[kind][1] += 1
        assert out[0].shape == symbols.shape and out[0].min() >= 0 and out[0].max() < 8
    # Measured (seeded): every bit flip and extension is caught; a few truncations decode
    # to wrong symbols unnoticed, which is why the payload carries a CRC.
    assert counts["flip"][1] == 0 and counts["extend"][1] == 0
    assert counts["truncate"][1] < 0.1 * sum(counts["truncate"])


def test_garbage_bytes_never_crash() -> None:
    rng = np.random.default_rng(12)
    t = _table(rng, 2, 300)
    for _ in range(500):
        data = rng.integers(0, 256, int(rng.integers(0, 40))).astype(np.uint8).tobytes()
        rows = rng.integers(0, 2, int(rng.integers(0, 50)))
        try:
            out = decode(data, [(rows, t)])
        except EntropyDecodeError:
            continue
        assert out[0].size == rows.size


def test_entropy_bits() -> None:
    t = EntropyTable("half", np.array([[1, 1], [1, 3]]))
    assert t.entropy_bits(np.array([0, 1, 0]), np.array([0, 0, 1])) == pytest.approx(1 + 1 + 2)
    assert t.entropy_bits(np.zeros(0, int), np.zeros(0, int)) == 0.0
