"""How much memory a reader may allocate for one file, checked before it allocates.

Recording formats declare their sizes up front: an HDF5 dataset its shape (a chunked
dataset may declare 40 million frames and store none of them: HDF5 fills the gaps), a MAT
file its array dimensions and the byte counts of its zlib-compressed elements, an ``.npz``
member its uncompressed size and ``.npy`` header. A reader trusts none of them: it computes
the bytes the declared sizes would make it allocate and refuses the file with
:class:`DeclaredSizeError` (naming the declared value and the limit) when they exceed the
limit in force, before allocating or decompressing anything beyond it.

The limit is :data:`DEFAULT_MAX_DECODED_BYTES` unless a caller narrows it for a block with
:func:`decoded_limit` (the cloud's upload parser does, for files it did not choose to read).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path

from ._errors import FormatError

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "DeclaredSizeError",
    "check_declared",
    "decoded_limit",
    "max_decoded_bytes",
]

#: Default for reading local files (edge CLI, datasets, training): more than a day-long
#: recording needs, far less than what a forged header can declare.
DEFAULT_MAX_DECODED_BYTES = 4 * 2**30

_limit: ContextVar[int] = ContextVar("csi_max_decoded_bytes", default=DEFAULT_MAX_DECODED_BYTES)


class DeclaredSizeError(FormatError):
    """A file declares more decoded data than a reader may allocate for it."""

    def __init__(self, path: str | Path, what: str, declared: int, limit: int, *,
                 stopped: bool = False) -> None:
        self.what = what
        self.declared = declared
        self.limit = limit
        if stopped:  # a stream inflated until it passed the limit: its size is unknown
            problem = (f"{what} decompress to more than the limit of {limit:,} bytes for one "
                       f"file (stopped after {declared:,})")
        else:
            problem = (f"{what} declares {declared:,} bytes once decoded, over the limit of "
                       f"{limit:,} bytes for one file")
        super().__init__(path, problem)


def max_decoded_bytes() -> int:
    """The limit in force here (this thread / task)."""
    return _limit.get()


@contextlib.contextmanager
def decoded_limit(limit: int) -> Iterator[int]:
    """Read files under ``limit`` decoded bytes each within the block."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        raise ValueError(f"decoded byte limit must be a positive integer, got {limit!r}")
    token = _limit.set(limit)
    try:
        yield limit
    finally:
        _limit.reset(token)


def check_declared(path: str | Path, what: str, shape: Sequence[int], itemsize: int) -> int:
    """``prod(shape) * itemsize`` bytes if within the limit, else :class:`DeclaredSizeError`.

    ``what`` describes the value for the message, e.g. ``"dataset 'amplitude' (40000000, 2,
    52) float32"``. Computed with Python integers: a forged shape cannot overflow it.
    """
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise FormatError(path, f"{what} has a negative dimension: {tuple(dims)}")
    declared = math.prod(dims) * int(itemsize)
    limit = _limit.get()
    if declared > limit:
        raise DeclaredSizeError(path, what, declared, limit)
    return declared
