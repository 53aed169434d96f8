"""The cloud classifier of a bundle: random-convolution features of the decoded context window
and closed-form ridge heads, one set per rate level (and one for the unquantized path).

What it reads is exactly what the cloud decodes from the wire: the latent channels the
window's level carries and the decoded profile's PCA coefficients of each of the last ``N``
segments (missing segments are zeros), laid out as one multichannel series
(:func:`csi_cloud.model.rocket.series`). The profile part and the latent part get their own
random convolutions, so adding latent channels never dilutes the profile's features (the
ridge layer weighs the two).

The profile coefficients are a slow (1 s) sequence of the static channel; on the recordings
we have they carry most of what identifies an activity over ~8 s (docs/model.md, ablation).

Stored in ``cloud.npz`` under ``head.<part>.`` keys (plain arrays, no pickle); a bundle whose
``cloud.npz`` has no such keys classifies with the network's context classifier instead.

Shapes: W windows, N context slots, D latent channels, T latent steps, C profile channels,
K profile components.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .neighbours import ProfileNeighbours, fit_neighbours
from .rocket import (
    RidgeHead,
    RocketTransform,
    WindowLayout,
    fit_temperature,
    ridge_path,
    series,
)
from .window import take

__all__ = ["ContextHead", "LevelHead", "profile_coefficients", "truncated"]

PREFIX = "head."
# A set of windows: z_q (W, N, D, T), profile coefficients (W, N, K), present (W, N).
Windows3 = tuple[np.ndarray, np.ndarray, np.ndarray]


class CodecNet(Protocol):
    """What the head reads of the network (:class:`csi_cloud.model.network.CSICodecNet`, which
    holds the head: naming that class here would tie the two modules in a circle)."""

    profile_mean: torch.Tensor  # (C,)
    profile_basis: torch.Tensor  # (Kmax, C), orthonormal rows
    profile_step: torch.Tensor  # (Kmax,)
    encoder: Any  # segments (M, L, A, S) -> (latent (M, D, T), profile (M, P * C))

    def bypass(self, z: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> Any: ...


def profile_coefficients(net: CodecNet, profile: np.ndarray, *,
                         transmitted: bool | np.ndarray = False) -> np.ndarray:
    """Profiles (..., P * C) -> their PCA coefficients in quantisation steps (..., P * Kmax),
    each of the P profile blocks' (block-major; P = 1 for most bundles).

    A decoded profile is ``mean + sum_k c_k step_k basis_k`` with orthonormal ``basis`` and
    whole steps ``c_k`` (zeros beyond a level's K), so the projection recovers the
    transmitted coefficients, up to float32 noise (up to 1e-3 steps on the shipped bundles)
    whose last digits depend on the machine's matrix kernels. ``transmitted`` (True, or a
    mask over the leading axes, e.g. a window's rows (W,) with ``level < levels``): those
    profiles were decoded from codes, and their coefficients are rounded to the whole steps
    that were sent. Why: the head's features count how often a convolution of the series
    exceeds a bias, and the series of whole steps hit their biases exactly; noise of 1e-7
    decided such ties differently from one machine to another and moved a recording or two
    in 62 (docs/model.md, "Exact inputs"). The unquantized path's exact profiles (False)
    are projected as they are."""
    mean = net.profile_mean.numpy()
    basis = net.profile_basis.numpy()
    step = net.profile_step.numpy()
    if profile.shape[-1] == mean.shape[0]:
        coeff = ((profile - mean) @ basis.T / step).astype(np.float32)
    else:  # P > 1 profile blocks
        blocks = profile.reshape(*profile.shape[:-1], -1, mean.shape[0])
        coeff = ((blocks - mean) @ basis.T / step).astype(np.float32)
        coeff = coeff.reshape(*profile.shape[:-1], -1)
    mask = np.asarray(transmitted, dtype=bool)
    if not mask.any():
        return coeff
    mask = mask.reshape(mask.shape + (1,) * (coeff.ndim - mask.ndim))
    return np.where(mask, np.rint(coeff), coeff).astype(np.float32)


@dataclass(slots=True)
class LevelHead:
    """Features and heads for the windows of one rate level."""

    layout: WindowLayout
    transforms: list[RocketTransform]  # profile part, then latent part (either may be absent)
    activity: RidgeHead
    identity: RidgeHead | None = None
    # The activity layer of the live output's shorter readings (the last k < N slots, the
    # older ones missing: csi_cloud.model.lengths), fitted on windows truncated that way
    # (fit_level's ``lengths``); None: the activity layer reads them too.
    short: RidgeHead | None = None
    # Layers of single lengths (fit_level's ``per_length``), before ``short`` for those.
    by_length: dict[int, RidgeHead] = field(default_factory=dict)
    # The nearest training windows by window-mean profile, mixed into the identity layer's
    # probabilities (csi_cloud.model.neighbours); None: the identity layer alone.
    neighbours: ProfileNeighbours | None = None
    # The activity layer of complete windows (every slot present), fitted on the training
    # windows that are (fit_level's ``complete``); None: the activity layer reads them too.
    complete: RidgeHead | None = None

    def identity_probabilities(self, feats: np.ndarray, coeff: np.ndarray,
                               present: np.ndarray) -> np.ndarray | None:
        """Identity probabilities (W, I) of windows with features ``feats`` (their
        coefficients (W, N, K) and present slots (W, N) for the neighbours)."""
        if self.identity is None:
            return None
        p = self.identity.probabilities(feats)
        if self.neighbours is None:
            return p
        return self.neighbours.mix(p, self.layout.segment_coefficients(coeff), present)

    def reader(self, reading: int | None) -> RidgeHead:
        """The activity layer of a full window (``reading`` None) or of the live output's
        reading of the last ``reading`` slots."""
        if reading is None:
            return self.activity
        return self.by_length.get(reading) or self.short or self.activity

    def activity_probabilities(self, feats: np.ndarray, complete: np.ndarray, *,
                               reading: int | None = None) -> np.ndarray:
        """Activity probabilities (W, A) of windows with features ``feats``; ``complete``
        (W,): whether each window's every slot is present. A full window (``reading`` None)
        that is complete is read by the complete-window layer where the level has one, any
        other by :meth:`reader`."""
        # The activity layer scores every row, the complete ones too (then replaced): scored
        # on a subset, BLAS rounds the other rows' last bits differently, and a head with the
        # layer would no longer read partial windows exactly as a head without it does.
        p = self.reader(reading).probabilities(feats)
        if reading is not None or self.complete is None:
            return p
        rows = np.flatnonzero(complete)
        if len(rows):
            p[rows] = self.complete.probabilities(feats[rows])
        return p

    def parts(self) -> list[WindowLayout]:
        out = []
        if self.layout.profile_components:
            out.append(WindowLayout(0, self.layout.profile_components,
                                    self.layout.profile_scale, self.layout.profile_mean,
                                    self.layout.profile_blocks))
        if self.layout.latent_channels:
            out.append(WindowLayout(self.layout.latent_channels, 0, self.layout.profile_scale))
        return out

    def features(self, z_q: np.ndarray, coeff: np.ndarray, present: np.ndarray) -> np.ndarray:
        return np.concatenate([tf(series(z_q, coeff, present, part)) for tf, part
                               in zip(self.transforms, self.parts(), strict=True)], axis=1)


@dataclass(slots=True)
class ContextHead:
    """``levels[l]`` classifies windows of rate level ``l``; the last entry is the unquantized
    path (every latent channel continuous, the exact profile)."""

    levels: list[LevelHead] = field(default_factory=list)

    def level_index(self, level: int) -> int:
        return min(int(level), len(self.levels) - 1)

    def features(self, level: int, z_q: np.ndarray, coeff: np.ndarray,
                 present: np.ndarray) -> np.ndarray:
        return self.levels[self.level_index(level)].features(z_q, coeff, present)

    def predict(self, z_q: np.ndarray, coeff: np.ndarray, present: np.ndarray,
                level: np.ndarray, *, reading: int | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Windows (W, N, D, T), (W, N, K), (W, N), level (W,) -> activity probabilities
        (W, A) and identity probabilities (W, I) where the head has an identity part.
        ``reading``: the windows are the live output's shorter readings of their last
        ``reading`` slots (the older ones masked), read by the short-reading layer where the
        head has one."""
        level = np.asarray(level)
        p_act: np.ndarray | None = None
        p_id: np.ndarray | None = None
        for lv in np.unique(level).tolist():
            rows = np.flatnonzero(level == lv)
            part = self.levels[self.level_index(lv)]
            feats = part.features(z_q[rows], coeff[rows], present[rows])
            act = part.activity_probabilities(feats, np.asarray(present[rows].all(axis=1)),
                                              reading=reading)
            ident = part.identity_probabilities(feats, coeff[rows], present[rows])
            if p_act is None:
                p_act = np.zeros((len(level), act.shape[1]), np.float32)
            p_act[rows] = act
            if ident is not None:
                if p_id is None:
                    p_id = np.zeros((len(level), ident.shape[1]), np.float32)
                p_id[rows] = ident
        assert p_act is not None
        return p_act, p_id

    def predict_lengths(self, z_q: np.ndarray, coeff: np.ndarray, present: np.ndarray,
                        level: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
        """Activity probabilities (W, A) of the windows read at each of ``lengths``: their
        last ``k`` slots, the older ones missing (csi_cloud.model.window.Windows.last, the
        live output's readings, csi_cloud.model.lengths); per length what :meth:`predict`
        gives on those windows (``reading=k`` for a length below ``N``: the short-reading
        layer where the level has one), to float32 rounding (tests/test_lengths.py).

        Cheaper than :meth:`predict` once per length: the readings of a level go through
        each transform together (one call, one set of threads), the profile coefficients
        are computed once (the full window's, zeroed in the masked slots), and the identity
        part is not read."""
        level = np.asarray(level)
        n = present.shape[1]
        for k in lengths:
            if not 1 <= k <= n:
                raise ValueError(f"a window of {n} slots has no last {k!r} slots (1..{n})")
        out: list[np.ndarray | None] = [None] * len(lengths)
        for lv in np.unique(level).tolist():
            rows = np.flatnonzero(level == lv)
            part = self.levels[self.level_index(lv)]
            masks = []
            for k in lengths:
                mask = present[rows].copy()
                mask[:, : n - k] = False
                masks.append(mask)
            feats = part.features(
                np.concatenate([np.where(m[:, :, None, None], z_q[rows], 0) for m in masks]),
                np.concatenate([np.where(m[:, :, None], coeff[rows], 0) for m in masks]),
                np.concatenate(masks))
            for i, k in enumerate(lengths):
                act = part.activity_probabilities(
                    feats[i * len(rows):(i + 1) * len(rows)], np.all(masks[i], axis=1),
                    reading=k if k < n else None)
                if out[i] is None:
                    out[i] = np.zeros((len(level), act.shape[1]), np.float32)
                out[i][rows] = act  # type: ignore[index]
        classes = self.levels[0].activity.coef.shape[0]
        return [p if p is not None else np.zeros((len(level), classes), np.float32)
                for p in out]

    # -- storage ---------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, part in enumerate(self.levels):
            p = f"{PREFIX}{i}."
            # The blocks value only where there are blocks: a head without them is stored
            # exactly as before the field existed (same arrays, same bundle id).
            blocks = [float(part.layout.profile_blocks)] if part.layout.profile_blocks else []
            out[f"{p}layout"] = np.array([part.layout.latent_channels,
                                          part.layout.profile_components,
                                          part.layout.profile_scale,
                                          float(part.layout.profile_mean), *blocks], np.float32)
            for j, tf in enumerate(part.transforms):
                out.update(tf.arrays(f"{p}tf{j}."))
            out.update(part.activity.arrays(f"{p}activity."))
            if part.identity is not None:
                out.update(part.identity.arrays(f"{p}identity."))
            if part.short is not None:
                out.update(part.short.arrays(f"{p}short."))
            for k, layer in part.by_length.items():
                out.update(layer.arrays(f"{p}short{k}."))
            if part.neighbours is not None:
                out.update(part.neighbours.arrays(f"{p}nn."))
            if part.complete is not None:
                out.update(part.complete.arrays(f"{p}complete."))
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ContextHead | None:
        """The head stored in ``cloud.npz`` arrays, or None when there is none."""
        indices = sorted({int(k.split(".")[1]) for k in arrays if k.startswith(PREFIX)})
        if not indices:
            return None
        levels = []
        for i in indices:
            p = f"{PREFIX}{i}."
            # Heads stored before the window mean or the profile blocks have fewer values.
            d, k, scale, *rest = arrays[f"{p}layout"].tolist()
            layout = WindowLayout(int(d), int(k), float(scale), bool(rest and rest[0]),
                                  int(rest[1]) if len(rest) > 1 else 0)
            count = len({key.split(".")[2] for key in arrays
                         if key.startswith(p) and key.split(".")[2].startswith("tf")})
            transforms = [RocketTransform.from_arrays(arrays, f"{p}tf{j}.") for j in range(count)]
            identity = (RidgeHead.from_arrays(arrays, f"{p}identity.")
                        if f"{p}identity.coef" in arrays else None)
            short = (RidgeHead.from_arrays(arrays, f"{p}short.")
                     if f"{p}short.coef" in arrays else None)
            by_length = {int(name[len("short"):]): RidgeHead.from_arrays(arrays, f"{p}{name}.")
                         for name in sorted({key.split(".")[2] for key in arrays
                                             if key.startswith(f"{p}short")})
                         if name != "short"}
            neighbours = (ProfileNeighbours.from_arrays(arrays, f"{p}nn.")
                          if f"{p}nn.points" in arrays else None)
            complete = (RidgeHead.from_arrays(arrays, f"{p}complete.")
                        if f"{p}complete.coef" in arrays else None)
            levels.append(LevelHead(layout, transforms,
                                    RidgeHead.from_arrays(arrays, f"{p}activity."), identity,
                                    short, by_length, neighbours, complete))
        return cls(levels)

    @staticmethod
    def split_arrays(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                            dict[str, np.ndarray]]:
        """``cloud.npz`` arrays -> (network state, head arrays)."""
        head = {k: v for k, v in arrays.items() if k.startswith(PREFIX)}
        return {k: v for k, v in arrays.items() if not k.startswith(PREFIX)}, head


# -- fitting -------------------------------------------------------------------------------

ALPHAS = np.logspace(0, 5, 11)


def truncated(windows: tuple[np.ndarray, np.ndarray, np.ndarray], lengths: Sequence[int]
              ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Copies of ``windows`` read at each of ``lengths``: their last ``k`` slots, the older
    ones missing (zeros, not present), as the live output reads them
    (:meth:`ContextHead.predict_lengths`). Returns the copies, one length after another, and
    for each the index of the window it was copied from; a copy with no present slot left is
    dropped (the service never classifies an empty window)."""
    z_q, coeff, present = windows
    n = present.shape[1]
    zs, cs, ps, src = [], [], [], []
    for k in lengths:
        if not 1 <= k < n:
            raise ValueError(f"a window of {n} slots has no shorter reading of {k!r} slots "
                             f"(1..{n - 1})")
        mask = present.copy()
        mask[:, : n - k] = False
        keep = np.flatnonzero(mask.any(axis=1))
        mask = mask[keep]
        zs.append(np.where(mask[:, :, None, None], z_q[keep], 0).astype(z_q.dtype))
        cs.append(np.where(mask[:, :, None], coeff[keep], 0).astype(coeff.dtype))
        ps.append(mask)
        src.append(keep)
    if not src:
        return (z_q[:0], coeff[:0], present[:0]), np.zeros(0, np.int64)
    return ((np.concatenate(zs), np.concatenate(cs), np.concatenate(ps)),
            np.concatenate(src))


def fit_level(windows: tuple[np.ndarray, np.ndarray, np.ndarray], labels: np.ndarray,
              layout: WindowLayout, classes: int, *, features: int, seed: int,
              val: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
              identity: tuple[np.ndarray, int, np.ndarray | None] | None = None,
              lengths: Sequence[int] = (), per_length: bool = False,
              short_source: tuple[Windows3, np.ndarray, Windows3 | None,
                                  np.ndarray | None] | None = None,
              complete: tuple[Windows3, np.ndarray, Windows3 | None,
                              np.ndarray | None] | None = None) -> LevelHead:
    """Fit one level's transforms (on the training windows) and ridge heads.

    ``windows``: z_q (W, N, D, T), coefficients (W, N, K), present (W, N); ``labels`` (W,).
    ``val``: validation windows and labels, to choose the ridge penalty and the softmax
    temperature (without them: the middle penalty, temperature 1). ``identity``: (labels
    (W,) with -1 unknown, classes, validation labels) for an identity head.

    ``lengths``: shorter readings (each ``k`` < N) the live output takes of every window
    (csi_cloud.model.lengths). With them the level gets a short-reading activity layer
    (:attr:`LevelHead.short`), fitted on copies of the training windows truncated to each
    length (:func:`truncated`), its penalty and temperature chosen on the validation windows
    truncated alike. Why: the full-window layer has seen a window of a few present slots
    only at the start of a recording, and reads the live output's short readings less well
    (docs/trust.md); a separate layer leaves the full window's as it was. The transforms,
    the activity layer of full windows and the identity layer are fitted as without
    ``lengths``. ``per_length``: a layer for each length instead, each fitted on the windows
    truncated to it alone (:attr:`LevelHead.by_length`; measured against the one layer by
    bench/head_lengths.py). ``short_source``: the training windows, their labels, the
    validation windows and theirs that the short-reading layers truncate (default: those of
    the full window's layer; bench/head_lengths.py's ``--short-per-recording`` draws more).

    ``complete``: the training windows whose every slot is present, their labels, and the
    validation windows and labels alike. With them the level gets a complete-window activity
    layer (:attr:`LevelHead.complete`) fitted on those windows alone, its penalty and
    temperature chosen on the validation ones (without any: the middle penalty, temperature
    1, as for the other layers); the activity layer keeps reading every other window. Why:
    the activity layer is fitted on windows the service classifies, most of
    them (on recordings of about the context's length) missing their first slots, and reads
    a complete window less well than a layer fitted on complete windows does (docs/model.md,
    "Complete windows"). None where the complete training windows miss an activity the
    others have (the layer could never answer it).
    """
    parts = LevelHead(layout, [], None).parts()  # type: ignore[arg-type]
    xs = [series(*windows, part) for part in parts]
    transforms = [RocketTransform.fit(x, max(84, features // len(parts)), seed=seed + j)
                  for j, x in enumerate(xs)]
    feats = np.concatenate([tf(x) for tf, x in zip(transforms, xs, strict=True)], axis=1)
    head = LevelHead(layout, transforms, None)  # type: ignore[arg-type]
    val_feats = head.features(*val[0]) if val is not None else None

    def choose(x: np.ndarray, y: np.ndarray, n: int,
               validation: tuple[np.ndarray, np.ndarray | None] | None) -> RidgeHead:
        known = y >= 0
        path = ridge_path(x[known], y[known], n, ALPHAS)
        if validation is None or validation[1] is None or not (validation[1] >= 0).any():
            return path[len(path) // 2]
        vk = validation[1] >= 0
        vx, vy = validation[0][vk], validation[1][vk]
        scores = [float((h.scores(vx).argmax(1) == vy).mean()) for h in path]
        best = path[int(np.argmax(scores))]  # first of the best: the least shrinkage
        best.temperature = fit_temperature(best, vx, vy)
        return best

    head.activity = choose(feats, labels, classes,
                           None if val_feats is None or val is None else (val_feats, val[1]))
    s_train, s_labels, s_val, s_val_labels = short_source or (
        windows, labels, None if val is None else val[0], None if val is None else val[1])

    def short_layer(ks: Sequence[int]) -> RidgeHead:
        short, src = truncated(s_train, ks)
        short_val = None
        if s_val is not None and s_val_labels is not None:
            windows_val, src_val = truncated(s_val, ks)
            short_val = (head.features(*windows_val), s_val_labels[src_val])
        return choose(head.features(*short), s_labels[src], classes, short_val)

    if complete is not None:
        c_train, c_labels, c_val, c_val_labels = complete
        seen = set(labels[labels >= 0].tolist())
        if seen and seen <= set(c_labels[c_labels >= 0].tolist()):
            c_validation = (None if c_val is None or c_val_labels is None
                            or not len(c_val_labels)
                            else (head.features(*c_val), c_val_labels))
            head.complete = choose(head.features(*c_train), c_labels, classes, c_validation)
    if lengths:
        head.short = short_layer(lengths)
    for k in lengths if per_length else ():
        head.by_length[int(k)] = short_layer([k])
    if identity is not None:
        head.identity = choose(feats, identity[0], identity[1],
                               None if val_feats is None else (val_feats, identity[2]))
        if val is not None and val_feats is not None and identity[2] is not None:
            head.neighbours = fit_neighbours(
                layout.segment_coefficients(windows[1]), windows[2], identity[0], identity[1],
                layout.profile_components, ridge_val=head.identity.probabilities(val_feats),
                val_coeff=layout.segment_coefficients(val[0][1]), val_present=val[0][2],
                val_labels=identity[2])
    return head


def fit_context_head(levels: Sequence[tuple[WindowLayout,
                                            tuple[np.ndarray, np.ndarray, np.ndarray],
                                            tuple[np.ndarray, np.ndarray, np.ndarray] | None]],
                     labels: np.ndarray, classes: int, *, features: int = 4000, seed: int = 0,
                     val_labels: np.ndarray | None = None,
                     identity: tuple[np.ndarray, int, np.ndarray | None] | None = None,
                     lengths: Sequence[int] = (), per_length: bool = False,
                     short_levels: Sequence[tuple[Windows3, Windows3 | None]] | None = None,
                     short_labels: tuple[np.ndarray, np.ndarray | None] | None = None,
                     complete_levels: Sequence[tuple[Windows3, Windows3 | None]] | None = None,
                     complete_labels: tuple[np.ndarray, np.ndarray | None] | None = None
                     ) -> ContextHead:
    """A head per entry of ``levels``: (layout, training windows, validation windows);
    ``lengths``: the shorter readings a short-reading activity layer is fitted on
    (:func:`fit_level`; none without them); ``short_levels`` (training and validation
    windows per entry of ``levels``) and ``short_labels`` (theirs): the windows those layers
    truncate, when not the same as the full window's layers; ``complete_levels`` and
    ``complete_labels``: the complete windows (every slot present) a complete-window
    activity layer is fitted on, alike (:func:`fit_level`'s ``complete``; none without
    them)."""
    out = []
    for i, (layout, train_windows, val_windows) in enumerate(levels):
        source = (None if short_levels is None or short_labels is None else
                  (short_levels[i][0], short_labels[0], short_levels[i][1], short_labels[1]))
        whole = (None if complete_levels is None or complete_labels is None else
                 (complete_levels[i][0], complete_labels[0], complete_levels[i][1],
                  complete_labels[1]))
        val = ((val_windows, val_labels) if val_windows is not None and val_labels is not None
               else None)
        out.append(fit_level(train_windows, labels, layout, classes, features=features,
                             seed=seed, val=val, identity=identity, lengths=lengths,
                             per_length=per_length, short_source=source, complete=whole))
    return ContextHead(out)


@torch.no_grad()
def unquantized_windows(net: CodecNet, x: np.ndarray, rows: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The unquantized path's windows: segments ``x`` (M, L, A, S) -> continuous latent and
    exact profile coefficients for window rows (W, N) (-1 = missing)."""
    net.eval()
    z_all, p_all = [], []
    for i in range(0, len(x), 512):
        z, profile = net.encoder(torch.from_numpy(x[i : i + 512]))
        z_all.append(net.bypass(z).numpy())
        p_all.append(profile.numpy())
    z_q = np.concatenate(z_all)
    coeff = profile_coefficients(net, np.concatenate(p_all))
    return take(rows, z_q), take(rows, coeff), rows >= 0
