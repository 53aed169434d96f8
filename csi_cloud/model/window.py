"""The context window: what the classifier reads for one prediction.

A stream's segments sit on slots: a segment's start time on the stream's segment grid (within
one epoch). The window of a segment is the ``N`` slots ending at its slot, oldest first; a
slot without a segment (a gap, a lost or low-quality segment, a slot before the stream began,
a segment another edge encoder coded, the start of a new epoch) is *missing*: ``present``
False and zeros in its place, masked by the classifier, never filled in.

Every caller builds windows here: the service (csi_cloud.ingest, per arriving segment), the
offline evaluation, training, fitting and the benches (per recording's segments), so the
service's prediction and the offline evaluation's are one computation on the same inputs.
Two steps: :func:`slot_rows` picks the rows of a window from a stream's ``slot -> row`` map,
:meth:`Windows.gather` stacks the rows' decoded codes.

Shapes: W windows, N slots (``context_segments``), M segments, D latent channels, T latent
steps, C profile channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Windows", "slot_rows", "take", "window_mean"]


def window_mean(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per-slot values (W, N, K) and present slots (W, N) -> each window's mean over its
    present slots (W, K); zeros for a window with none. (What the head holds beside the
    profile coefficients, csi_cloud.model.rocket.series, and what the identity neighbours
    compare, csi_cloud.model.neighbours.)"""
    count = np.maximum(present.sum(axis=1), 1)[:, None]
    return (values * present[:, :, None]).sum(axis=1) / count


def slot_rows(rows_by_slot: Mapping[int, int], end: int, n: int) -> np.ndarray:
    """The rows (N,) of the ``n`` slots ending at slot ``end``, oldest first; -1 where the
    stream has no segment in that slot (``rows_by_slot`` maps a slot to its segment's row)."""
    return np.array([rows_by_slot.get(s, -1) for s in range(end - n + 1, end + 1)],
                    dtype=np.int64)


def take(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per-segment ``values`` (M, ...) at window rows (W, N) (-1 missing) -> (W, N, ...),
    zeros in the missing slots."""
    present = rows >= 0
    out = np.zeros((*rows.shape, *values.shape[1:]), values.dtype)
    out[present] = values[rows[present]]
    return out


@dataclass(frozen=True, slots=True)
class Windows:
    """Classifier inputs of W windows."""

    z_q: np.ndarray  # (W, N, D, T) float32 decoded latents, zeros where missing
    profile: np.ndarray  # (W, N, P * C) float32 decoded profiles (P profile blocks), zeros
    # where missing
    present: np.ndarray  # (W, N) bool
    level: np.ndarray  # (W,) int64 rate level

    def __len__(self) -> int:
        return len(self.present)

    def last(self, k: int) -> Windows:
        """The same windows reading only their last ``k`` slots: the older ones missing, as
        in a window at the start of a stream (csi_cloud.model.lengths)."""
        n = self.present.shape[1]
        if not 1 <= k <= n:
            raise ValueError(f"a window of {n} slots has no last {k!r} slots (1..{n})")
        if k == n:
            return self
        present = self.present.copy()
        present[:, : n - k] = False
        return Windows(np.where(present[:, :, None, None], self.z_q, 0).astype(np.float32),
                       np.where(present[:, :, None], self.profile, 0).astype(np.float32),
                       present, self.level)

    @classmethod
    def gather(cls, rows: np.ndarray, z_q: np.ndarray, profile: np.ndarray,
               level: int | np.ndarray) -> Windows:
        """Window rows (W, N) (-1 missing) into per-segment z_q (M, D, T) and profile (M, P * C);
        ``level``: the rate level of every window, or of each window (W,)."""
        rows = np.asarray(rows, dtype=np.int64)
        levels = np.broadcast_to(np.asarray(level, dtype=np.int64), (len(rows),)).copy()
        return cls(take(rows, np.asarray(z_q, np.float32)),
                   take(rows, np.asarray(profile, np.float32)), rows >= 0, levels)
