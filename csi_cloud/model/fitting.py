"""Fitting one bundle: train the network, freeze the entropy tables, fit the context head on
the int8 edge codes, calibrate (open-set identity, idle), write the bundle.

Called by the ``csi train`` orchestration (:mod:`.pipeline`) and by the cross-validated
protocols (:mod:`.protocols`), which both sit above it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csi_edge.bundle import Bundle, EdgeEncoder, write_manifest

from .bundle import save_bundle, update
from .compression import CloudModel
from .data import SegmentData
from .network import ModelConfig
from .train import EpochLog, TrainOptions, TrainResult, train

__all__ = ["SEGMENTS_PER_MESSAGE", "calibrate_bundle", "fit", "fit_bundle_head"]

SEGMENTS_PER_MESSAGE = (4, 2, 1, 1)


def fit(data: SegmentData, spec: Any, activities: list[str], identities: list[str],
        train_recs: np.ndarray, val_recs: np.ndarray, opts: TrainOptions, out: Path, *,
        name: str, model: dict[str, Any] | None = None, training: dict[str, Any] | None = None,
        progress: Callable[[EpochLog], None] | None = None,
        checkpoints: Path | None = None, calibrate: bool = True) -> tuple[TrainResult, Any]:
    """Train, freeze the entropy tables, fit the context head, write the bundle; returns
    (result, manifest). ``calibrate`` False skips the open-set and idle calibrations (a
    benchmark that only measures accuracy and bytes does not need them)."""
    cfg = ModelConfig(antennas=spec.antennas, subcarriers=len(spec.subcarriers),
                      segment_frames=spec.segment_frames, activities=len(activities),
                      identities=len(identities), **(model or {}))
    result = train(cfg, data, train_recs, val_recs, opts, progress=progress,
                   checkpoints=checkpoints)
    tables = update(result.net, data, train_recs)
    calibration_rows = np.flatnonzero(np.isin(data.recording, train_recs))
    rng = np.random.default_rng(opts.seed)
    calibration = data.x[rng.choice(calibration_rows, min(1024, calibration_rows.size),
                                    replace=False)]
    info = {**(training or {}), "seconds": round(result.seconds, 1),
            "best_epoch": result.best_epoch, "options": opts.model_dump()}
    # The bundle is handed down as written: nothing below reads its manifest back.
    bundle = Bundle(out, save_bundle(
        out, name=name, net=result.net, spec=spec, tables=tables, activities=activities,
        identities=identities or None, calibration=calibration,
        segments_per_message=SEGMENTS_PER_MESSAGE[: cfg.levels], training=info))
    if cfg.head == "rocket":
        t0 = time.perf_counter()
        result.net.context_head, bundle = _fit_head(
            bundle, data, train_recs, val_recs, features=opts.head_features, seed=opts.seed,
            lengths=[k for k in opts.head_lengths if k < cfg.context_segments],
            complete=opts.head_complete)
        info["head_seconds"] = round(time.perf_counter() - t0, 1)
    if not calibrate:
        return result, bundle.manifest
    return result, calibrate_bundle(bundle, data, train_recs, val_recs)


def _some_windows(codes: Any, recordings: np.ndarray, n: int, per_recording: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each recording's last window and up to ``per_recording - 1`` other windows the service
    would classify (partial contexts at the start included), drawn at random."""
    from .data import segment_windows

    rows, owners, last = segment_windows(codes, recordings, n)
    return _draw(rows, owners, last, per_recording, rng)


def _complete_windows(codes: Any, recordings: np.ndarray, n: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Every window of ``recordings`` whose ``n`` slots are all present (rows (W, n), owners
    (W,)): those a complete-window layer is fitted on (context_head.fit_level)."""
    from .data import segment_windows

    rows, owners, _ = segment_windows(codes, recordings, n)
    keep = (rows >= 0).all(axis=1)
    return rows[keep], owners[keep]


def _draw(rows: np.ndarray, owners: np.ndarray, last: np.ndarray, per_recording: int,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Of windows ``rows`` (W, n) owned by ``owners`` (W,): each recording's last one
    (``last`` (W,)) and up to ``per_recording - 1`` others, drawn at random."""
    keep = last.copy()
    for r in np.unique(owners).tolist():
        others = np.flatnonzero((owners == r) & ~last)
        keep[rng.permutation(others)[: per_recording - 1]] = True
    return rows[keep], owners[keep]


def _joined_windows(codes: Any, recordings: np.ndarray, n: int, per_recording: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``recordings`` streamed end to end in a random order, as a person changing
    activity streams them (csi_cloud.model.trust.stream_layout, ``joined``): a window in a
    recording's first ``n - 1`` seconds holds the end of the previous one. Each recording's
    last window and up to ``per_recording - 1`` others, drawn at random; each window's
    owner is the recording its last slot belongs to."""
    from .trust import stream_layout

    rows, owners, _, _ = stream_layout(codes, recordings, n, "joined", rng)
    return _draw(rows, owners, np.r_[owners[1:] != owners[:-1], True], per_recording, rng)


def fit_bundle_head(folder: Path | Bundle, data: SegmentData, train_recs: np.ndarray,
                    val_recs: np.ndarray, *, features: int = 4000, seed: int = 0,
                    per_recording: int = 5, lengths: Sequence[int] = (),
                    per_length: bool = False, short_per_recording: int | None = None,
                    short_joined: bool = False, complete: bool = False) -> Any:
    """Fit the bundle's context head on the codes its int8 edge encoder produces for the
    training recordings (``per_recording`` of the windows the service would classify in each,
    the last one included, at every rate level, and the unquantized path), choose the ridge
    penalties on the validation recordings, and write it into ``cloud.npz`` (the bundle id is
    recomputed). ``lengths``: the live output's shorter readings a short-reading activity
    layer is fitted on (csi_cloud.model.context_head.fit_level; none without them).
    ``short_joined``: that layer truncates windows of the recordings streamed end to end
    (:func:`_joined_windows`) rather than of each recording alone. ``complete``: a
    complete-window activity layer too, fitted on every training window whose context is
    whole (csi_cloud.model.context_head.fit_level). Returns the head."""
    return _fit_head(folder, data, train_recs, val_recs, features=features, seed=seed,
                     per_recording=per_recording, lengths=lengths, per_length=per_length,
                     short_per_recording=short_per_recording, short_joined=short_joined,
                     complete=complete)[0]


def _fit_head(folder: Path | Bundle, data: SegmentData, train_recs: np.ndarray,
              val_recs: np.ndarray, *, features: int, seed: int,
              per_recording: int = 5, lengths: Sequence[int] = (),
              per_length: bool = False, short_per_recording: int | None = None,
              short_joined: bool = False, complete: bool = False) -> tuple[Any, Bundle]:
    """:func:`fit_bundle_head`; also returns the bundle as rewritten."""
    from .bundle import CLOUD_FILE, write_cloud
    from .context_head import fit_context_head, profile_coefficients, unquantized_windows
    from .heads import codes_from_segments
    from .rocket import WindowLayout
    from .window import take

    bundle = Bundle.load(folder)
    model = CloudModel.load(bundle)
    net, cfg = model.net, model.net.cfg
    codes = codes_from_segments(model, EdgeEncoder(bundle), data)
    coeff = profile_coefficients(net, codes.profile, transmitted=True)
    n = cfg.context_segments
    rng = np.random.default_rng(seed)
    rows_tr, own_tr = _some_windows(codes, train_recs, n, per_recording, rng)
    rows_va, own_va = _some_windows(codes, val_recs, n, per_recording, rng)

    def decoded(variant: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return take(rows, codes.z_q[variant]), take(rows, coeff[variant]), rows >= 0

    # Every head, the unquantized path's too, also reads the window mean of the profile
    # coefficients (rocket.WindowLayout.profile_mean); profile blocks one step each.
    blocks = cfg.profile_blocks if cfg.profile_blocks > 1 else 0
    levels: list[Any] = [
        (WindowLayout(cfg.level_channels[lv], cfg.profile_components[lv], profile_mean=True,
                      profile_blocks=blocks),
         decoded(lv, rows_tr), decoded(lv, rows_va)) for lv in range(cfg.levels)]
    levels.append((WindowLayout(cfg.latent_channels, max(cfg.profile_components),
                                profile_mean=True, profile_blocks=blocks),
                   unquantized_windows(net, data.x, rows_tr),
                   unquantized_windows(net, data.x, rows_va)))
    identity = ((data.identity[own_tr], cfg.identities, data.identity[own_va])
                if cfg.identities else None)
    short: dict[str, Any] = {}
    if lengths and (short_per_recording or short_joined):
        # Other windows for the short-reading layers alone, drawn with their own generator so
        # the full window's layers see exactly the windows they see without it.
        short_rng = np.random.default_rng([seed, 1])
        draw = _joined_windows if short_joined else _some_windows
        count = short_per_recording or per_recording
        srows_tr, sown_tr = draw(codes, train_recs, n, count, short_rng)
        srows_va, sown_va = draw(codes, val_recs, n, count, short_rng)
        short = {"short_levels": [(decoded(lv, srows_tr), decoded(lv, srows_va))
                                  for lv in range(cfg.levels)]
                 + [(unquantized_windows(net, data.x, srows_tr),
                     unquantized_windows(net, data.x, srows_va))],
                 "short_labels": (data.activity[sown_tr], data.activity[sown_va])}
    if complete:
        # Every complete window, not a draw: it takes no generator, so the other layers see
        # exactly the windows they see without it.
        crows_tr, cown_tr = _complete_windows(codes, train_recs, n)
        crows_va, cown_va = _complete_windows(codes, val_recs, n)
        short |= {"complete_levels": [(decoded(lv, crows_tr), decoded(lv, crows_va))
                                      for lv in range(cfg.levels)]
                  + [(unquantized_windows(net, data.x, crows_tr),
                      unquantized_windows(net, data.x, crows_va))],
                  "complete_labels": (data.activity[cown_tr], data.activity[cown_va])}
    head = fit_context_head(levels, data.activity[own_tr], cfg.activities, features=features,
                            seed=seed, val_labels=data.activity[own_va], identity=identity,
                            lengths=lengths, per_length=per_length, **short)
    net.context_head = head
    manifest = model.manifest
    entry = write_cloud(net, bundle.folder / CLOUD_FILE)
    update: dict[str, Any] = {"files": {**manifest.files, "cloud": entry}}
    if isinstance(manifest.training.get("options"), dict):
        # The manifest says what the head was fitted with (a refit of an older bundle too).
        update["training"] = {**manifest.training, "options": {
            **manifest.training["options"], "head_lengths": [int(k) for k in lengths],
            "head_complete": bool(complete)}}
    manifest = manifest.model_copy(update=update)
    return head, write_manifest(bundle.folder, manifest)


def calibrate_bundle(folder: Path | Bundle, data: SegmentData, train_recs: np.ndarray,
                     val_recs: np.ndarray) -> Any:
    """Add the calibrations that need the finished bundle (its int8 codes) to its manifest:
    the open-set identity threshold and feature statistics, the edge's idle threshold, and
    the live output's activity temperature, filter and abstention threshold.
    The calibration is part of the bundle id, which is recomputed."""
    from .heads import calibrate_identity, codes_from_segments
    from .idle import calibrate_idle

    bundle = Bundle.load(folder)
    model = CloudModel.load(bundle)
    edge = EdgeEncoder(bundle)
    calibration = dict(model.manifest.calibration)
    if model.net.cfg.identities:
        codes = codes_from_segments(model, edge, data)
        calibration["identity"] = calibrate_identity(model.net, codes, train_recs, codes,
                                                     val_recs)
    idle = calibrate_idle(data, train_recs, val_recs, model=model)
    if idle:
        calibration["idle"] = idle
    # The live output's temperature, filter and abstention threshold (csi_cloud.model.trust),
    # only on validation recordings the weights were not fitted on (a tiny dataset validates
    # on its training recordings: then the bundle keeps the defaults, temperature 1).
    held_out = np.setdiff1d(val_recs, train_recs)
    if len(held_out) and (data.activity[held_out] >= 0).any():
        from .trust import fit_activity_calibration

        calibration["activity"] = fit_activity_calibration(
            model, edge, data, held_out,
            fitted_on=f"{len(held_out)} validation recordings of the training split")
    manifest = model.manifest.model_copy(update={"calibration": calibration})
    return write_manifest(bundle.folder, manifest).manifest
