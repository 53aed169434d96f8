"""Random-convolution features and closed-form ridge heads over decoded context windows.

The cloud classifies a context window of ``N`` decoded segments by

1. laying the window out as one multichannel series: the decoded latent channels of the
   window's rate level (``D_l`` channels, ``T`` steps a segment) and the decoded profile's
   PCA coefficients (``K_l`` channels, each held for the segment's ``T`` steps), side by side
   over the ``N`` segments (``N * T`` steps; missing segments are zeros), plus the first
   difference of every channel;
2. turning it into fixed features with MiniRocket's random convolutions (Dempster et al.,
   2021): the 84 length-9 kernels with weights {-1, 2}, exponentially spaced dilations, each
   kernel summing a random subset of channels, biases drawn from quantiles of the training
   windows' convolution outputs, and the proportion of positive values (PPV) as the feature;
3. a linear (ridge) layer on the standardised features, fitted in closed form.

Why this and not a trained head: on the data we have, no model transfers to a new room,
session or antenna height; accuracy there comes from a few labelled recordings of that
setting, so the cloud classifier must be a fast and strong few-shot learner. A linear model on
random-convolution features is both (bench/model.py, docs/model.md): refitting it on K
recordings takes a second, and ``adapt`` can shrink it towards the parent's weights instead of
forgetting them.

The transform is written in torch (batched ``conv1d``) rather than called from aeon, whose
MiniRocket we use for the uncompressed anchors in bench/: a fitted aeon transformer can only
be stored by pickling, and bundles are loaded without unpickling (``cloud.npz``). Every
parameter here is a plain array in that file.

Shapes: W windows, N context slots, D latent channels, T latent steps a segment, C profile
channels, K profile components, F features, A classes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.nn import functional as F

from .window import window_mean

__all__ = ["ALPHAS", "KERNELS", "RidgeHead", "RocketTransform", "WindowLayout", "fit_ridge",
           "fit_temperature", "lone_recording_classes", "one_blas_thread", "ridge_path",
           "ridge_to_prior", "series"]

# The 84 MiniRocket kernels: length 9, weight 2 at three positions, -1 elsewhere.
KERNELS = np.array([[2.0 if i in combo else -1.0 for i in range(9)]
                    for combo in itertools.combinations(range(9), 3)], dtype=np.float32)
_PHI = (np.sqrt(5.0) - 1) / 2  # low-discrepancy quantile positions, as MiniRocket draws them
# A convolution output within this of a bias is a tie (see RocketTransform.ties). The decoded
# series are whole quantisation steps over 5 (and window means of them), so distinct outputs
# lie at least ~3e-3 apart, and sums of the same values in another order (the biases were
# drawn from torch's convolution, the features come from the compiled kernel) within ~2e-5.
TIE_TOLERANCE = np.float32(1e-4)


@dataclass(frozen=True, slots=True)
class WindowLayout:
    """Which decoded channels a level's features read, and how they are scaled."""

    latent_channels: int  # D_l: the first D_l latent channels
    profile_components: int  # K_l: the first K_l profile PCA coefficients
    profile_scale: float = 5.0  # coefficients are in quantisation steps (+-R): to O(1)
    # Also each coefficient's mean over the window's present segments, held over the window.
    # A level sends coefficients rounded to whole steps; the static profile moves by a few
    # steps a second, so the rounding errors of the segments are nearly independent and
    # their mean over N segments recovers the sub-step value the rounding took away.
    profile_mean: bool = False
    # 0: one profile a slot, its coefficients held over the slot's T latent steps (every
    # bundle without profile blocks). P >= 1: the coefficients are P profile blocks a slot
    # (ModelConfig.profile_blocks), one step each, a series of N * P steps; such a layout
    # reads the profile alone (the latent part has its own layout and length).
    profile_blocks: int = 0

    def segment_coefficients(self, coeff: np.ndarray) -> np.ndarray:
        """Coefficients (W, N, P * K) -> each slot's mean over its blocks (W, N, K): one
        profile a segment, what the identity neighbours read (as is without blocks)."""
        if self.profile_blocks <= 1:
            return coeff
        w, n = coeff.shape[:2]
        return coeff.reshape(w, n, self.profile_blocks, -1).mean(axis=2)


def series(z_q: np.ndarray, coeff: np.ndarray, present: np.ndarray,
           layout: WindowLayout) -> np.ndarray:
    """Windows -> one multichannel series each, with first differences.

    ``z_q`` (W, N, D, T), ``coeff`` (W, N, K) profile coefficients in steps, ``present``
    (W, N). Returns (W, 2 * (D_l + K_l), N * T) float32 (``2 * (D_l + 2 K_l)`` with
    ``profile_mean``); missing slots are zeros. With ``layout.profile_blocks`` P >= 1,
    ``coeff`` is (W, N, P * K) and the series (W, 2 * K_l (or 4 K_l), N * P).
    """
    w, n, _, t = z_q.shape
    if layout.profile_blocks:
        return _block_series(coeff, present, layout)
    lat = z_q[:, :, : layout.latent_channels]
    coeff = coeff[:, :, : layout.profile_components]
    if layout.profile_mean:
        mean = window_mean(coeff, present)  # (W, K_l)
        coeff = np.concatenate([coeff, np.broadcast_to(mean[:, None], coeff.shape)], axis=2)
    prof = np.repeat(coeff[:, :, :, None], t, axis=3)
    x = np.concatenate([lat, prof / layout.profile_scale], axis=2)
    x = x * present[:, :, None, None]
    x = x.transpose(0, 2, 1, 3).reshape(w, x.shape[2], n * t)
    diff = np.diff(x, axis=2, prepend=x[:, :, :1])
    return np.concatenate([x, diff], axis=1).astype(np.float32)


def _block_series(coeff: np.ndarray, present: np.ndarray, layout: WindowLayout) -> np.ndarray:
    """:func:`series` of a layout with profile blocks: each block one step."""
    if layout.latent_channels:
        raise ValueError(f"a layout with profile blocks reads the profile alone, not "
                         f"{layout.latent_channels} latent channels")
    w, n = present.shape
    p = layout.profile_blocks
    blocks = coeff.reshape(w, n, p, -1)[..., : layout.profile_components]  # (W, N, P, K_l)
    if layout.profile_mean:
        mean = window_mean(blocks.mean(axis=2), present)  # (W, K_l)
        blocks = np.concatenate([blocks, np.broadcast_to(mean[:, None, None], blocks.shape)],
                                axis=3)
    x = blocks / layout.profile_scale * present[:, :, None, None]
    x = x.transpose(0, 3, 1, 2).reshape(w, x.shape[3], n * p)
    diff = np.diff(x, axis=2, prepend=x[:, :, :1])
    return np.concatenate([x, diff], axis=1).astype(np.float32)


class RocketTransform:
    """MiniRocket-style features of (W, channels, length) series (see the module docstring)."""

    def __init__(self, dilations: np.ndarray, channel_mask: np.ndarray,
                 biases: np.ndarray, counts: np.ndarray, ties: bool = False) -> None:
        self.dilations = np.asarray(dilations, np.int64)  # (G,)
        self.channel_mask = np.asarray(channel_mask, np.float32)  # (G, 84, channels)
        self.biases = np.asarray(biases, np.float32)  # (G, 84, Fmax), padded with +inf
        self.counts = np.asarray(counts, np.int64)  # (G,) features per kernel at dilation g
        # Ties count half: the feature is (outputs above the bias + half the outputs within
        # TIE_TOLERANCE of it) / length, instead of the outputs above it: what float noise
        # gave on average to whole-step series, which land exactly on biases drawn from
        # them. Measured and not used (bench/exact_inputs.py: 0.5 to 2.2 points per second
        # below counting strictly on whole steps, docs/model.md "Exact inputs"); heads count
        # strictly above, on whole steps.
        self.ties = bool(ties)
        self._channels: tuple[np.ndarray, np.ndarray] | None = None  # see _channel_lists

    @property
    def features(self) -> int:
        return int(84 * self.counts.sum())

    @classmethod
    def fit(cls, x: np.ndarray, features: int = 5000, max_dilations: int = 32,
            seed: int = 0, ties: bool = False) -> RocketTransform:
        """Dilations from the series length, random channel subsets, biases from quantiles of
        the convolution outputs of random training series ``x`` (W, channels, length)."""
        rng = np.random.default_rng(seed)
        _, channels, length = x.shape
        per_kernel = max(1, features // 84)
        true_max = max(1, min(per_kernel, max_dilations))
        top = np.log2(max((length - 1) / 8, 1))
        dilations, counts = np.unique(
            np.floor(2 ** np.linspace(0, top, true_max)).astype(np.int64), return_counts=True)
        counts = counts * (per_kernel // true_max)
        counts[: per_kernel % true_max] += 1 if len(counts) > per_kernel % true_max else 0
        counts = np.maximum(counts, 1)
        g = len(dilations)
        mask = np.zeros((g, 84, channels), np.float32)
        limit = np.log2(min(channels, 9) + 1)
        for i in range(g):
            for k in range(84):
                size = int(2 ** rng.uniform(0, limit))
                mask[i, k, rng.choice(channels, size, replace=False)] = 1.0
        fmax = int(counts.max())
        biases = np.full((g, 84, fmax), np.inf, np.float32)
        quantiles = (np.arange(1, fmax + 1) * _PHI) % 1
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        for i, d in enumerate(dilations.tolist()):
            # Kernel k's output on one random training series each.
            pick = torch.from_numpy(rng.integers(0, len(x), 84))
            summed = torch.einsum("kcl,kc->kl", tensor[pick], torch.from_numpy(mask[i]))
            out = F.conv1d(summed[None], torch.from_numpy(KERNELS)[:, None, :],
                           dilation=int(d), padding=4 * int(d), groups=84)[0].numpy()
            c = int(counts[i])
            # With ties counted half, each bias is one of the outputs (the lower one, not an
            # interpolation between two): on whole-step series it then sits on an output value
            # up to float noise, never a hair's breadth off one, where noise would decide
            # whether that output ties.
            biases[i, :, :c] = np.quantile(out, quantiles[:c], axis=1,
                                           method="lower" if ties else "linear").T
        return cls(dilations, mask, biases, counts, ties)

    @staticmethod
    def _conv(x: torch.Tensor, dilation: int, mask: torch.Tensor) -> torch.Tensor:
        """(W, channels, L) -> every kernel summed over its channels: (W, 84, L).

        The kernels are linear, so summing the channels first and convolving once per kernel
        equals summing the per-channel convolutions (and costs a channel count less)."""
        summed = torch.einsum("wcl,kc->wkl", x, mask)
        return F.conv1d(summed, torch.from_numpy(KERNELS)[:, None, :], dilation=dilation,
                        padding=4 * dilation, groups=84)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(W, channels, L) -> (W, F) float32 features (the compiled kernel, on as many
        threads as torch may use; bit for bit :meth:`reference`)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((len(x), self.features), np.float32)
        if not len(x):
            return out
        kernel = _compiled_kernel()
        table = _half_table(x.shape[2]) if self.ties else _ppv_table(x.shape[2])
        args = (self.dilations, *self._channel_lists(), self.biases, self.counts,
                table, KERNELS, self.ties, TIE_TOLERANCE)
        # Windows are independent: split them over threads (the kernel releases the GIL).
        # Small batches (the live service: a few windows a message) run on the caller's.
        threads = min(torch.get_num_threads(), len(x) // _MIN_WINDOWS_PER_THREAD)
        if threads <= 1:
            kernel(x, *args, out)
            return out
        bounds = np.linspace(0, len(x), threads + 1).astype(int).tolist()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda lo, hi: kernel(x[lo:hi], *args, out[lo:hi]),
                          bounds[:-1], bounds[1:]))
        return out

    def _channel_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """The channel mask as index lists: (G, 84, max channels) indices, (G, 84) counts."""
        if self._channels is None:
            mask = self.channel_mask > 0
            sizes = mask.sum(axis=2).astype(np.int64)
            index = np.zeros((*mask.shape[:2], max(1, int(sizes.max(initial=0)))), np.int64)
            for i, k in np.ndindex(*mask.shape[:2]):
                chosen = np.flatnonzero(mask[i, k])
                index[i, k, : len(chosen)] = chosen
            self._channels = (index, sizes)
        return self._channels

    @torch.no_grad()
    def reference(self, x: np.ndarray, batch: int = 128) -> np.ndarray:
        """The features as defined in torch (batched ``conv1d``): what :meth:`__call__`
        computes faster, kept as its specification (tests compare the two bit for bit)."""
        tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        out = []
        for start in range(0, len(tensor), batch):
            chunk = tensor[start : start + batch]
            feats = []
            for i, d in enumerate(self.dilations.tolist()):
                conv = self._conv(chunk, int(d), torch.from_numpy(self.channel_mask[i]))
                c = int(self.counts[i])
                bias = torch.from_numpy(self.biases[i, :, :c])[None, :, :, None]  # (84, c)
                if self.ties:
                    tol = torch.tensor(TIE_TOLERANCE)
                    high, low = bias + tol, bias - tol
                    out4 = conv[:, :, None, :]
                    n = (2 * (out4 > high).sum(-1)
                         + ((out4 >= low) & (out4 <= high)).sum(-1))
                    ppv = torch.from_numpy(_half_table(conv.shape[-1]))[n]
                else:
                    ppv = (conv[:, :, None, :] > bias).float().mean(-1)
                feats.append(ppv.reshape(len(chunk), -1))
            out.append(torch.cat(feats, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.features), np.float32)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {
            f"{prefix}dilations": self.dilations, f"{prefix}channel_mask": self.channel_mask,
            f"{prefix}biases": self.biases, f"{prefix}counts": self.counts}
        if self.ties:  # absent: a head stored before ties counted half
            out[f"{prefix}ties"] = np.array(1, np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> RocketTransform:
        return cls(arrays[f"{prefix}dilations"], arrays[f"{prefix}channel_mask"],
                   arrays[f"{prefix}biases"], arrays[f"{prefix}counts"],
                   bool(arrays[f"{prefix}ties"]) if f"{prefix}ties" in arrays else False)


# -- the compiled transform ----------------------------------------------------------------
#
# The torch definition (RocketTransform.reference) spends its time in small batched einsums,
# a grouped conv1d and a (W, 84, c, L) comparison tensor; for the short series of a context
# window (56 steps on the shipped bundles) that is mostly overhead. The kernel below computes
# the same numbers window by window in one pass. It keeps the reference's float32 arithmetic
# in the same order: channels summed in ascending order, the nine kernel taps in ascending
# order (the taps are -1 or 2, so every product is exact and fused or separate multiply-adds
# round alike; padded taps add nothing), the proportion taken from the count of positive
# values through the table torch's mean gives (_ppv_table). Tests check it equals the
# reference bit for bit.

_MIN_WINDOWS_PER_THREAD = 32  # below this, a thread costs more than it saves


def _features_kernel(x: np.ndarray, dilations: np.ndarray, channels: np.ndarray,
                     sizes: np.ndarray, biases: np.ndarray, counts: np.ndarray,
                     table: np.ndarray, kernels: np.ndarray, ties: bool, tolerance: Any,
                     out: np.ndarray) -> None:
    """(W, channels, L) series -> PPV features into ``out`` (W, F); see the section above.

    The summed channels sit in a buffer with ``4 * max dilation`` zeros on either side, so
    every output takes all nine taps with no test of the series' ends (a tap past an end
    adds 2 * 0 or -1 * 0, which changes no sum: the reference's zero padding), and the
    loop over the steps is straight-line code the compiler vectorises (the Fition bundle's
    head on 64 windows: 12.2 ms of CPU testing each tap's position, 7.2 ms so;
    bench/results/live_cpu.json)."""
    length = x.shape[2]
    pad = 4 * dilations.max()
    buf = np.zeros(length + 2 * pad, np.float32)
    summed = buf[pad : pad + length]
    conv = np.empty(length, np.float32)
    for w in range(x.shape[0]):
        col = 0
        for i in range(len(dilations)):
            d = dilations[i]
            c = counts[i]
            for k in range(84):
                summed[:] = 0
                for m in range(sizes[i, k]):
                    ch = channels[i, k, m]
                    for t in range(length):
                        summed[t] += x[w, ch, t]
                # Tap j reads the summed series shifted by (j - 4) * d, in ascending j.
                k0, k1, k2 = kernels[k, 0], kernels[k, 1], kernels[k, 2]
                k3, k4, k5 = kernels[k, 3], kernels[k, 4], kernels[k, 5]
                k6, k7, k8 = kernels[k, 6], kernels[k, 7], kernels[k, 8]
                s0, s1, s2 = buf[pad - 4 * d :], buf[pad - 3 * d :], buf[pad - 2 * d :]
                s3, s4, s5 = buf[pad - d :], buf[pad:], buf[pad + d :]
                s6, s7, s8 = buf[pad + 2 * d :], buf[pad + 3 * d :], buf[pad + 4 * d :]
                for t in range(length):
                    acc = np.float32(0.0)
                    acc += k0 * s0[t]
                    acc += k1 * s1[t]
                    acc += k2 * s2[t]
                    acc += k3 * s3[t]
                    acc += k4 * s4[t]
                    acc += k5 * s5[t]
                    acc += k6 * s6[t]
                    acc += k7 * s7[t]
                    acc += k8 * s8[t]
                    conv[t] = acc
                for b in range(c):
                    bias = biases[i, k, b]
                    n = 0
                    if ties:  # twice the outputs above, plus the ties (RocketTransform.ties)
                        high = bias + tolerance
                        low = bias - tolerance
                        for t in range(length):
                            if conv[t] > high:
                                n += 2
                            elif conv[t] >= low:
                                n += 1
                    else:
                        for t in range(length):
                            if conv[t] > bias:
                                n += 1
                    out[w, col + k * c + b] = table[n]
            col += 84 * c


@functools.cache
def _compiled_kernel() -> Callable[..., Any]:
    """:func:`_features_kernel` compiled by numba (once a process; cached on disk where the
    package or the user's cache folder is writable), releasing the GIL."""
    import numba

    try:
        return numba.njit(nogil=True, cache=True)(_features_kernel)
    except RuntimeError:  # no writable cache location: compile in memory
        return numba.njit(nogil=True)(_features_kernel)


@functools.cache
def _ppv_table(length: int) -> np.ndarray:
    """PPV of a series of ``length`` steps by its count of positive values, as the
    reference's ``(conv > bias).float().mean(-1)`` rounds it: (length + 1,) float32."""
    count = torch.arange(length + 1)[:, None, None, None]
    return (torch.arange(length)[None, None, None, :] < count).float().mean(-1).reshape(-1).numpy()


@functools.cache
def _half_table(length: int) -> np.ndarray:
    """The feature of a series of ``length`` steps by twice its count above the bias plus its
    ties (RocketTransform.ties): (2 * length + 1,) float32, ``n / (2 * length)``."""
    return (np.arange(2 * length + 1, dtype=np.float64) / (2 * length)).astype(np.float32)


@functools.cache
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()  # inspects the loaded libraries once (milliseconds)


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """numpy's BLAS on one thread while in effect (some microseconds to enter).

    The ridge layer's product, (W, F) features by (F, A) weights with A a few classes, is
    small: on several threads, OpenBLAS wakes them for it and they spin waiting for work
    after it, which on a busy machine costs more processor time than the product (the WiAR
    bundle's head on 64 windows: 15.7 ms of CPU before, 3.8 ms with this and the kernel below;
    bench/results/live_cpu.json). Threaded OpenBLAS splits the sums differently, so results
    agree with it to float32 rounding, not bit for bit."""
    return cast(contextlib.AbstractContextManager[Any],
                _blas_controller().limit(limits=1, user_api="blas"))


@dataclass(slots=True)
class RidgeHead:
    """Standardised features -> class scores ``x_std @ coef.T + intercept`` -> softmax."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (A, F)
    intercept: np.ndarray  # (A,)
    temperature: float = 1.0  # softmax(scores / temperature)
    alpha: float = 1.0
    # Adapted heads: how much of the parent's weights the fit was shrunk towards (0: none,
    # the support alone; 1: the parent's); None without a parent. Reported, not stored.
    prior_weight: float | None = None

    def scores(self, features: np.ndarray) -> np.ndarray:
        # On one BLAS thread wherever it is called (the service, csi adapt, the evaluation):
        # cheaper for the service's runs (one_blas_thread), and the same rounding everywhere.
        with one_blas_thread():
            return ((features - self.mean) / self.scale) @ self.coef.T + self.intercept

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        s = self.scores(features) / self.temperature
        s = s - s.max(axis=1, keepdims=True)
        e = np.exp(s)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean, f"{prefix}scale": self.scale,
                f"{prefix}coef": self.coef, f"{prefix}intercept": self.intercept,
                f"{prefix}temperature": np.array(self.temperature, np.float32),
                f"{prefix}alpha": np.array(self.alpha, np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> RidgeHead:
        return cls(arrays[f"{prefix}mean"], arrays[f"{prefix}scale"], arrays[f"{prefix}coef"],
                   arrays[f"{prefix}intercept"], float(arrays[f"{prefix}temperature"]),
                   float(arrays[f"{prefix}alpha"]))


ALPHAS = np.logspace(-1, 5, 13)


def _targets(y: np.ndarray, classes: int) -> np.ndarray:
    """Labels -> +-1 one-vs-rest targets (what RidgeClassifier regresses on)."""
    t = -np.ones((len(y), classes), np.float64)
    t[np.arange(len(y)), y] = 1.0
    return t


def _solve(x: np.ndarray, t: np.ndarray, weight: np.ndarray, alphas: np.ndarray,
           groups: np.ndarray | None, offset: np.ndarray | None = None
           ) -> tuple[np.ndarray, float, float]:
    """Weighted ridge ``min sum_i w_i |t_i - x_i W|^2 + alpha |W - lam W_0|^2`` with alpha
    (and, given ``offset`` W_0 (F, A), the prior weight lam in [0, 1]) chosen by
    leave-one-group-out error (the groups are recordings: windows of one recording overlap,
    so leaving single windows out picks too little shrinkage where another recording of the
    activity is there to test it; :func:`fit_ridge` does so only where none is). With
    ``offset`` and a single alpha, lam alone is chosen. ``x``, ``t`` centred by
    the weighted means. Returns (W (F, A), alpha, lam).

    lam = 0 is the ridge on the new data alone, lam = 1 shrinks towards W_0 itself; in
    between, towards a damped W_0. The fit is ``lam W_0`` plus a ridge on the residual targets
    ``t - lam x W_0``, so a window's left-out residual is linear in lam (``e0 + lam e1``) and
    the lam that minimises the summed squared left-out error has a closed form per alpha."""
    sw = np.sqrt(weight)[:, None]
    xs, ts = x * sw, t * sw
    # Dual form: windows are fewer than features.
    gram = xs @ xs.T
    evals, evecs = np.linalg.eigh(gram)
    evals = np.clip(evals, 0, None)
    # Targets of the two parts: the labels (lam = 0) and minus the prior's scores (per lam).
    us = ts if offset is None else np.concatenate([ts, -(xs @ offset)], axis=1)
    proj = evecs.T @ us
    a = t.shape[1]
    best, best_alpha, best_lam = np.inf, float(alphas[0]), 0.0 if offset is None else 1.0
    if groups is not None and len(np.unique(groups)) > 2 and (len(alphas) > 1
                                                              or offset is not None):
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        # The intercept's part of the hat matrix (x and t are centred): without it, the
        # left-out error of a nearly interpolating fit (small alpha; windows are fewer than
        # features) comes out near zero, and the smallest alpha would always win.
        mean_hat = sw @ sw.T / weight.sum()
        for alpha in alphas:
            shrink = evals / (evals + alpha)
            resid = us - evecs @ (proj * shrink[:, None])
            # Leave each recording out: (I - H_gg)^-1 times its residuals, with the hat
            # matrix H = G (G + alpha I)^-1 + the intercept's, restricted to its windows.
            loo = np.empty_like(resid)
            for rows in members:
                v = evecs[rows]
                block = np.eye(len(rows)) - (v * shrink) @ v.T - mean_hat[np.ix_(rows, rows)]
                loo[rows] = np.linalg.solve(block, resid[rows])
            e0, e1 = loo[:, :a], loo[:, a:]
            lam = 0.0
            if offset is not None and (e1**2).sum() > 0:
                lam = float(np.clip(-(e0 * e1).sum() / (e1**2).sum(), 0.0, 1.0))
            err = float(((e0 + lam * e1) ** 2).sum()) if offset is not None else float(
                (e0**2).sum())
            if err < best:
                best, best_alpha, best_lam = err, float(alpha), lam
    elif len(alphas) > 1:
        best_alpha = float(alphas[len(alphas) // 2])
    target = proj[:, :a] + best_lam * proj[:, a:] if offset is not None else proj
    dual = evecs @ (target / (evals + best_alpha)[:, None])
    coef = xs.T @ dual
    if offset is not None:
        coef = coef + best_lam * offset
    return coef, best_alpha, best_lam


def fit_ridge(features: np.ndarray, labels: np.ndarray, classes: int, *,
              groups: np.ndarray | None = None, weight: np.ndarray | None = None,
              alphas: np.ndarray = ALPHAS, prior: RidgeHead | None = None,
              alpha: float | None = None, prior_weight: float | None = None) -> RidgeHead:
    """Fit a ridge head in closed form on (W, F) features and (W,) labels.

    ``groups`` (W,): recording of each window, for choosing alpha by leave-one-recording-out
    (``alpha`` fixes it instead). ``weight`` (W,): per-window weights (e.g. to balance
    classes). ``prior``: shrink towards ``lam`` times this head's weights instead of towards
    zero (the parent's head when adapting: ``|W - lam W_prior|^2``), lam in [0, 1] chosen
    with alpha by leave-one-recording-out (``prior_weight`` fixes it): lam = 0 is the fit
    on the new data alone, so the choice includes ignoring a prior that does not fit. The
    features are standardised by their own (weighted) spread either way; the prior's weights
    are carried into that standardisation (same scores, up to the intercept, which is refitted).
    Where some label has a single group (one support recording of an activity: K = 1), alpha
    is chosen by leaving single windows out of the fit on the new data alone, and only lam by
    leave-one-recording-out (:func:`lone_recording_classes`).
    """
    labels = np.asarray(labels)
    weight = np.ones(len(labels)) if weight is None else np.asarray(weight, np.float64)
    mean = np.average(features, axis=0, weights=weight).astype(np.float32)
    spread = np.sqrt(np.average((features - mean) ** 2, axis=0, weights=weight))
    scale = np.where(spread > 1e-6, spread, 1.0).astype(np.float32)
    x = ((features - mean) / scale).astype(np.float64)
    t = _targets(labels, classes)
    offset = None
    if prior is not None:
        # The prior scores (f - m_p) / s_p @ W_p.T: in this standardisation, W_p * s / s_p.
        offset = (prior.coef.astype(np.float64) * (scale / prior.scale)).T
    xm = np.average(x, axis=0, weights=weight)
    tm = np.average(t, axis=0, weights=weight)
    fixed = alpha is not None
    chosen_alphas = np.array([alpha]) if fixed else alphas
    if not fixed and groups is not None and lone_recording_classes(labels, groups):
        # A held-out recording whose activity has no other recording in the support (K = 1)
        # cannot be predicted by the support at any penalty, so leave-one-recording-out
        # scores the penalty on nothing it can learn and picks the strongest one (the fit
        # then ignores the support). The penalty of the support's own fit is chosen by
        # leaving single windows out instead, and with a prior only the prior weight is
        # chosen by leave-one-recording-out, at that penalty: the held-out recording tests
        # the parent's weights, which are not fitted on it (docs/model.md, Adaptation).
        windows = np.arange(len(labels))
        chosen_alphas = np.array([_solve(x - xm, t - tm, weight, alphas, windows)[1]])
        if offset is None:
            groups = None
    if offset is not None and prior_weight is not None:
        # A fixed prior weight: the ridge on the residual targets, towards zero.
        coef, chosen, _ = _solve(x - xm, t - tm - prior_weight * ((x - xm) @ offset), weight,
                                 chosen_alphas, None if fixed else groups)
        coef, lam = coef + prior_weight * offset, float(prior_weight)
    else:
        coef, chosen, lam = _solve(x - xm, t - tm, weight, chosen_alphas,
                                   None if fixed else groups, offset)
    coef = coef.T
    intercept = tm - xm @ coef.T
    return RidgeHead(mean, scale, coef.astype(np.float32), intercept.astype(np.float32),
                     1.0, chosen, lam if prior is not None else None)


def lone_recording_classes(labels: np.ndarray, groups: np.ndarray) -> list[int]:
    """The labels (>= 0) whose windows all come from one group (recording)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    return [int(c) for c in np.unique(labels[labels >= 0])
            if len(np.unique(groups[labels == c])) < 2]


def ridge_path(features: np.ndarray, labels: np.ndarray, classes: int,
               alphas: np.ndarray = ALPHAS) -> list[RidgeHead]:
    """One ridge head per alpha from a single decomposition (to pick alpha on validation
    windows when there are too many training windows for leave-one-recording-out)."""
    labels = np.asarray(labels)
    mean = features.mean(axis=0).astype(np.float32)
    spread = features.std(axis=0)
    scale = np.where(spread > 1e-6, spread, 1.0).astype(np.float32)
    x = ((features - mean) / scale).astype(np.float64)
    t = _targets(labels, classes)
    xm, tm = x.mean(axis=0), t.mean(axis=0)
    xc, tc = x - xm, t - tm
    if xc.shape[0] <= xc.shape[1]:  # dual: W x W
        evals, evecs = np.linalg.eigh(xc @ xc.T)
        proj = evecs.T @ tc
        coefs = [xc.T @ (evecs @ (proj / (np.clip(evals, 0, None) + a)[:, None]))
                 for a in alphas]
    else:  # primal: F x F
        evals, evecs = np.linalg.eigh(xc.T @ xc)
        proj = evecs.T @ (xc.T @ tc)
        coefs = [evecs @ (proj / (np.clip(evals, 0, None) + a)[:, None]) for a in alphas]
    return [RidgeHead(mean, scale, c.T.astype(np.float32),
                      (tm - xm @ c).astype(np.float32), 1.0, float(a))
            for c, a in zip(coefs, alphas, strict=True)]


def ridge_to_prior(features: np.ndarray, labels: np.ndarray, prior: RidgeHead, *,
                   groups: np.ndarray | None = None, weight: np.ndarray | None = None,
                   alphas: np.ndarray = ALPHAS, prior_weight: float | None = None
                   ) -> RidgeHead:
    """Few-shot adaptation: a ridge head fitted on the support windows, shrunk towards the
    parent's head as far as leave-one-recording-out on the support says it helps (not at
    all, when the parent does not fit the new setting; see :func:`fit_ridge`); keeps the
    parent's temperature."""
    head = fit_ridge(features, labels, prior.coef.shape[0], groups=groups, weight=weight,
                     alphas=alphas, prior=prior, prior_weight=prior_weight)
    head.temperature = prior.temperature
    return head


def fit_temperature(head: RidgeHead, features: np.ndarray, labels: np.ndarray) -> float:
    """The softmax temperature that minimises the negative log-likelihood of ``labels``."""
    scores = head.scores(features)
    best, best_t = np.inf, 1.0
    for t in np.logspace(-2, 1, 31):
        s = scores / t
        s = s - s.max(axis=1, keepdims=True)
        nll = float(-(s[np.arange(len(s)), labels] - np.log(np.exp(s).sum(1))).mean())
        if nll < best:
            best, best_t = nll, float(t)
    return best_t
