"""Static entropy model and ANS entropy coding of quantized latent codes (no torch).

The model is frozen in the bundle as integer counts: one categorical distribution per row
(e.g. per latent channel), ``counts`` of shape (rows, alphabet). Both sides derive the
probabilities from the counts with one IEEE float64 division per entry (``counts / row sum``,
exact inputs because every row sum is below 2**53), so encoder and decoder feed constriction
bit-identical floats and build identical fixed-point models.

Coding uses constriction's ANS coder (``constriction.stream.stack.AnsCoder``) with the
``Categorical(perfect=False)`` model family and a per-symbol probability matrix. Several symbol
groups (each with its own table and alphabet) go into ONE stream: groups are pushed in reverse
order so they pop off in order.

Byte layout of an encoded stream:
  the ANS words (uint32) in little-endian byte order, then every trailing 0x00 byte removed.
  ANS compressed data never ends in a zero word, so at most 3 bytes (the high bytes of the
  last word) are removed; the decoder pads with 0x00 to a multiple of 4 and recovers the
  words exactly. An empty stream is zero bytes. A stream whose last byte is 0x00 is therefore
  never produced, and the decoder rejects it (``non_canonical``), so every stream has exactly
  one byte form.

What :func:`decode` detects (raising :class:`EntropyDecodeError`) and what it cannot:
  * detected: a last byte of 0x00 (``non_canonical``); data constriction refuses
    (``invalid_stream``); any exception from constriction while decoding (``decode_failed``);
    data left on the coder after the last symbol (``leftover_data``), which catches most
    corrupted, truncated or extended streams because a wrong symbol desynchronises the state.
  * not detected: ANS decoding is total: any words decode to *some* in-range symbols, and a
    corruption can, by chance, still leave an empty coder. In particular the empty stream
    decodes to all-zero symbols without error, and that is a legitimate encoding: symbol 0
    pushed onto an empty coder leaves it empty, so trailing runs of symbol 0 cost nothing.
    Measured (8-symbol tables, 20..300 symbols): 1000/1000 single bit flips and 1000/1000
    appended 1..4 random bytes detected; random truncations 965/1000, the misses being
    cuts to 0 bytes (always missed, see above) and about 1 in 7,000 other cuts. Integrity is
    the job of the payload CRC (``csi_edge.codec``); these checks are a second line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import constriction
import numpy as np

from ._errors import MalformedPacketError

__all__ = [
    "MAX_ALPHABET",
    "EntropyDecodeError",
    "EntropyTable",
    "decode",
    "encode",
]

# constriction's categorical models use 24-bit fixed point; 2**16 symbols leaves every symbol
# at least 256 quanta, and no latent alphabet here comes close.
MAX_ALPHABET = 1 << 16
# Row sums up to 2**53 convert to float64 exactly, which keeps probabilities() deterministic.
_MAX_ROW_SUM = 1 << 53
# Probability-matrix entries materialised per constriction call (8 MiB of float64): long
# groups are pushed in chunks; the stream is identical to one call on the whole group.
_CHUNK_ENTRIES = 1 << 20
_FAMILY = constriction.stream.model.Categorical(perfect=False)
_AnsCoder = constriction.stream.stack.AnsCoder


class EntropyDecodeError(MalformedPacketError):
    """Entropy-coded data that cannot be (or was not correctly) decoded.

    ``reason`` is one of ``non_canonical``, ``invalid_stream``, ``decode_failed``,
    ``leftover_data``.
    """


def _int_array(values: Any, what: str) -> np.ndarray:
    """A 1-D integer array (any integer dtype); rejects floats, bools and other shapes."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr


def _check_range(arr: np.ndarray, limit: int, what: str) -> None:
    """Every value of ``arr`` in [0, limit); the error quotes the first bad one."""
    if arr.size == 0:
        return
    bad = np.flatnonzero((arr < 0) | (arr >= limit))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what}[{i}] = {int(arr[i])} is outside [0, {limit}) "
            f"({bad.size} value(s) out of range)"
        )


@dataclass(frozen=True, eq=False)
class EntropyTable:
    """Frozen categorical model: row ``r`` codes symbols with probabilities ``counts[r] / sum``.

    ``counts`` are positive integer weights (int64, shape (rows, alphabet)), read-only.
    """

    name: str
    counts: np.ndarray
    _probs: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"table name must be a non-empty string, got {self.name!r}")
        counts = np.asarray(self.counts)
        if counts.ndim != 2:
            raise ValueError(f"table {self.name!r}: counts must be 2-D, got shape {counts.shape}")
        rows, alphabet = counts.shape
        if rows < 1:
            raise ValueError(f"table {self.name!r}: needs at least 1 row, got {rows}")
        if not 2 <= alphabet <= MAX_ALPHABET:
            # constriction cannot normalise a one-symbol distribution.
            raise ValueError(
                f"table {self.name!r}: alphabet {alphabet} is outside [2, {MAX_ALPHABET}]"
            )
        if counts.dtype.kind not in "iu":
            raise ValueError(f"table {self.name!r}: counts must be integers, got {counts.dtype}")
        if counts.dtype.kind == "u" and counts.max() > _MAX_ROW_SUM:
            raise ValueError(f"table {self.name!r}: count {int(counts.max())} is too large")
        counts = counts.astype(np.int64)
        if (counts <= 0).any():
            r, s = np.argwhere(counts <= 0)[0]
            raise ValueError(
                f"table {self.name!r}: counts[{r}][{s}] = {int(counts[r, s])}; every count must "
                "be positive (no symbol may have zero probability)"
            )
        # Python ints: the sum itself must not overflow int64 before the check.
        sums = [sum(int(c) for c in row) for row in counts]
        for r, total in enumerate(sums):
            if total > _MAX_ROW_SUM:
                raise ValueError(
                    f"table {self.name!r}: row {r} sums to {total}, above 2**53 (float64 "
                    "would round it)"
                )
        counts.setflags(write=False)
        probs = counts.astype(np.float64) / counts.sum(axis=1, keepdims=True).astype(np.float64)
        probs.setflags(write=False)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "_probs", probs)

    @property
    def rows(self) -> int:
        return int(self.counts.shape[0])

    @property
    def alphabet(self) -> int:
        return int(self.counts.shape[1])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EntropyTable):
            return NotImplemented
        return self.name == other.name and np.array_equal(self.counts, other.counts)

    def __hash__(self) -> int:
        return hash((self.name, self.counts.shape, self.counts.tobytes()))

    @classmethod
    def fit(
        cls,
        name: str,
        symbols: np.ndarray,
        rows: np.ndarray,
        n_rows: int,
        alphabet: int,
        smoothing: float = 0.5,
    ) -> EntropyTable:
        """Fit from observed symbols: ``counts ∝ occurrences + smoothing`` per row.

        ``smoothing`` (> 0) is held as a fraction num/den (denominator up to 1000), and the
        integer counts are ``occurrences * den + num``, the same ratios as the real-valued
        additive smoothing.
        """
        if not (isinstance(smoothing, int | float) and math.isfinite(smoothing) and smoothing > 0):
            raise ValueError(f"smoothing must be a finite number > 0, got {smoothing!r}")
        frac = Fraction(smoothing).limit_denominator(1000)
        if frac <= 0:
            raise ValueError(f"smoothing {smoothing!r} rounds to 0 at denominator 1000")
        n_rows, alphabet = int(n_rows), int(alphabet)
        if n_rows < 1:
            raise ValueError(f"n_rows must be >= 1, got {n_rows}")
        if not 2 <= alphabet <= MAX_ALPHABET:
            raise ValueError(f"alphabet {alphabet} is outside [2, {MAX_ALPHABET}]")
        sym, row = _validate_group(symbols, rows, n_rows, alphabet, name)
        flat = row.astype(np.int64) * alphabet + sym.astype(np.int64)
        seen = np.bincount(flat, minlength=n_rows * alphabet).reshape(n_rows, alphabet)
        counts = seen.astype(np.int64) * frac.denominator + frac.numerator
        return cls(name, counts)

    def probabilities(self) -> np.ndarray:
        """float64 (rows, alphabet), read-only; bit-identical wherever the counts are equal."""
        return self._probs

    def entropy_bits(self, symbols: np.ndarray, rows: np.ndarray) -> float:
        """Ideal code length of ``symbols`` under this table, in bits (diagnostics only)."""
        sym, row = _validate_group(symbols, rows, self.rows, self.alphabet, self.name)
        if sym.size == 0:
            return 0.0
        return float(-np.log2(self._probs[row, sym]).sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: plain ints and lists."""
        return {
            "name": self.name,
            "rows": self.rows,
            "alphabet": self.alphabet,
            "counts": self.counts.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EntropyTable:
        """Inverse of :meth:`to_dict`; every error names the bad key or value."""
        if not isinstance(data, Mapping):
            raise ValueError(f"entropy table must be a mapping, got {type(data).__name__}")
        missing = {"name", "rows", "alphabet", "counts"} - set(data)
        if missing:
            raise ValueError(f"entropy table lacks key(s) {sorted(missing)}")
        name = data["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"entropy table 'name' must be a non-empty string, got {name!r}")
        dims = {}
        for key in ("rows", "alphabet"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"table {name!r}: {key!r} must be an int, got {value!r}")
            dims[key] = value
        raw = data["counts"]
        if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
            raise ValueError(f"table {name!r}: 'counts' must be a list of lists, got {raw!r:.80}")
        if len(raw) != dims["rows"]:
            raise ValueError(
                f"table {name!r}: 'counts' has {len(raw)} rows but 'rows' is {dims['rows']}"
            )
        for r, row in enumerate(raw):
            if not isinstance(row, Sequence) or isinstance(row, str | bytes):
                raise ValueError(f"table {name!r}: counts[{r}] is not a list: {row!r:.80}")
            if len(row) != dims["alphabet"]:
                raise ValueError(
                    f"table {name!r}: counts[{r}] has {len(row)} entries but 'alphabet' is "
                    f"{dims['alphabet']}"
                )
            for s, c in enumerate(row):
                if isinstance(c, bool) or not isinstance(c, int):
                    raise ValueError(f"table {name!r}: counts[{r}][{s}] = {c!r} is not an int")
                if not 0 < c <= _MAX_ROW_SUM:
                    raise ValueError(
                        f"table {name!r}: counts[{r}][{s}] = {c} is outside [1, 2**53]"
                    )
        if dims["rows"] < 1:
            raise ValueError(f"table {name!r}: 'rows' must be >= 1, got {dims['rows']}")
        return cls(name, np.array(raw, dtype=np.int64).reshape(dims["rows"], dims["alphabet"]))


def _validate_group(
    symbols: Any, rows: Any, n_rows: int, alphabet: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(symbols int32, rows intp) after checking shapes and ranges; ValueError otherwise."""
    sym = _int_array(symbols, f"{name}: symbols")
    row = _int_array(rows, f"{name}: rows")
    if sym.shape != row.shape:
        raise ValueError(
            f"{name}: {sym.size} symbols but {row.size} rows (one row index per symbol)"
        )
    _check_range(sym, alphabet, f"{name}: symbols")
    _check_range(row, n_rows, f"{name}: rows")
    return sym.astype(np.int32), row.astype(np.intp)


def _chunks(n: int, alphabet: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ENTRIES // alphabet)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def encode(groups: Sequence[tuple[np.ndarray, np.ndarray, EntropyTable]]) -> bytes:
    """Entropy-code several (symbols, rows, table) groups into one byte string.

    Every group is validated before anything is coded (ValueError naming the bad value).
    """
    checked = []
    for i, group in enumerate(groups):
        symbols, rows, table = group
        if not isinstance(table, EntropyTable):
            raise ValueError(f"group {i}: expected an EntropyTable, got {type(table).__name__}")
        sym, row = _validate_group(
            symbols, rows, table.rows, table.alphabet, f"group {i} ({table.name})"
        )
        checked.append((sym, row, table))
    coder = _AnsCoder()
    # A stack: push the last group (and, within a group, the last chunk) first so that
    # decoding pops everything in forward order.
    for sym, row, table in reversed(checked):
        probs = table.probabilities()
        for lo, hi in reversed(_chunks(sym.size, table.alphabet)):
            coder.encode_reverse(sym[lo:hi], _FAMILY, probs[row[lo:hi]])
    words = coder.get_compressed().astype("<u4")
    return bytes(words.tobytes().rstrip(b"\x00"))


def decode(data: bytes, groups: Sequence[tuple[np.ndarray, EntropyTable]]) -> list[np.ndarray]:
    """Decode what :func:`encode` made; ``groups`` are (rows, table) in the encoding order.

    Returns each group's symbols as int32. Bad ``groups`` raise ValueError; bad ``data``
    raises :class:`EntropyDecodeError` (see the module docstring for what is detected).
    """
    checked = []
    for i, group in enumerate(groups):
        rows, table = group
        if not isinstance(table, EntropyTable):
            raise ValueError(f"group {i}: expected an EntropyTable, got {type(table).__name__}")
        row = _int_array(rows, f"group {i} ({table.name}): rows")
        _check_range(row, table.rows, f"group {i} ({table.name}): rows")
        checked.append((row.astype(np.intp), table))
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
    raw = bytes(data)
    if raw.endswith(b"\x00"):
        raise EntropyDecodeError(
            "non_canonical", f"stream of {len(raw)} bytes ends in 0x00 (encode strips those)"
        )
    padded = raw + b"\x00" * (-len(raw) % 4)
    words = np.frombuffer(padded, dtype="<u4").astype(np.uint32)
    try:
        coder = _AnsCoder(words)
    except BaseException as exc:  # pyo3 panics derive from BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise EntropyDecodeError(
            "invalid_stream", f"constriction rejects {len(raw)} bytes: {exc}"
        ) from exc
    out: list[np.ndarray] = []
    for i, (row, table) in enumerate(checked):
        probs = table.probabilities()
        parts = []
        for lo, hi in _chunks(row.size, table.alphabet):
            try:
                part = coder.decode(_FAMILY, probs[row[lo:hi]])
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                raise EntropyDecodeError(
                    "decode_failed", f"group {i} ({table.name}), symbols {lo}..{hi - 1}: {exc}"
                ) from exc
            parts.append(np.asarray(part, dtype=np.int32))
        sym = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        # Defensive: the categorical model cannot yield out-of-range symbols, but a symbol the
        # caller would index with must never be out of range.
        if sym.size and (sym.min() < 0 or sym.max() >= table.alphabet):
            raise EntropyDecodeError(
                "decode_failed",
                f"group {i} ({table.name}): decoded symbol outside [0, {table.alphabet})",
            )
        out.append(sym)
    if not coder.is_empty():
        raise EntropyDecodeError(
            "leftover_data",
            f"{coder.num_valid_bits()} bits remain after decoding all "
            f"{sum(r.size for r, _ in checked)} symbols of {len(raw)} bytes",
        )
    return out
