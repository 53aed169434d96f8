"""End-to-end training: reconstruction + activity + identity + quantizer losses.

Each batch holds context windows of N segments from training recordings. Every window gets a
random rate level, so one set of weights serves every level; reconstruction is scored on the
segments that are present. With ``segment_dropout`` the classifier also learns to answer when
the link drops segments: each window hides a random share of its present slots from the
classifier (never from the reconstruction loss). Early stopping keeps the weights with the best
validation score (activity accuracy averaged over levels, identity accuracy where there are
identity labels).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F

from .data import SegmentData, windows
from .network import CSICodecNet, ModelConfig

__all__ = ["EpochLog", "TrainOptions", "TrainResult", "drop_segments", "evaluate_windows",
           "train"]


class TrainOptions(BaseModel):
    """Loss weights and schedule; exposed on the command line."""

    model_config = ConfigDict(frozen=True)

    epochs: int = 60
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-3
    seed: int = 0
    recon_weight: float = 1.0
    activity_weight: float = 1.0
    identity_weight: float = 0.5
    quantizer_weight: float = 1.0
    windows_per_recording: int = 4
    patience: int = 15
    augment: bool = True
    threads: int = 2
    # Maximum share of present context slots hidden from the classifier per training window
    # (rate drawn uniformly in [0, segment_dropout) per window); 0 turns it off.
    segment_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Random-convolution features of the context head (ModelConfig.head == "rocket").
    head_features: int = Field(default=4000, ge=168)
    # The live output's shorter readings (the last k context slots; csi_cloud.model.lengths)
    # the context head gets a short-reading activity layer for, fitted on training windows
    # truncated to each length (context_head.fit_level); () for none. A length not below the
    # model's context_segments is left out.
    head_lengths: tuple[Annotated[int, Field(ge=1)], ...] = (1, 2, 4)
    # A complete-window activity layer beside the activity layer: fitted on the training
    # windows whose every context slot is present, it reads those (context_head.fit_level).
    # Off by default: on the k-fold it gained on WiAR and lost on Fition (docs/model.md).
    head_complete: bool = False


@dataclass
class EpochLog:
    epoch: int
    loss: float
    recon: float
    activity: float
    identity: float
    perplexity: float
    val_activity: float
    val_identity: float | None
    val_score: float
    seconds: float


@dataclass
class TrainResult:
    net: CSICodecNet
    history: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def fit_standardisation(net: CSICodecNet, data: SegmentData, recordings: np.ndarray) -> None:
    """Per-channel mean and one global scale of the training segments' log amplitude."""
    rows = np.isin(data.recording, recordings)
    x = torch.from_numpy(data.x[rows]).flatten(2)  # (M, L, C)
    mean = x.mean(dim=(0, 1))
    dynamics = x - x.mean(dim=1, keepdim=True)
    net.encoder.mean.copy_(mean)
    scale = dynamics.std().clamp_min(1e-3)
    net.encoder.scale.copy_(scale)
    p = net.cfg.profile_blocks  # each block's mean is a profile (ModelConfig.profile_blocks)
    blocks = ((x - mean) / scale).reshape(x.shape[0], p, x.shape[1] // p, x.shape[2])
    fit_profile_basis(net, blocks.mean(dim=2).reshape(-1, x.shape[2]))


def fit_profile_basis(net: CSICodecNet, profiles: torch.Tensor) -> None:
    """PCA of the training profiles (M, C); a step per component so that +-R steps span
    +-3 standard deviations of that component."""
    mean = profiles.mean(dim=0)
    centred = profiles - mean
    _, sv, vt = torch.linalg.svd(centred, full_matrices=False)
    k = net.profile_basis.shape[0]
    basis = torch.zeros_like(net.profile_basis)
    basis[: min(k, vt.shape[0])] = vt[:k]
    std = torch.zeros(k)
    std[: min(k, sv.shape[0])] = sv[:k] / max(profiles.shape[0] - 1, 1) ** 0.5
    net.profile_mean.copy_(mean)
    net.profile_basis.copy_(basis)
    net.profile_step.copy_((3 * std / net.cfg.profile_range).clamp_min(1e-4))


def _gather(data: SegmentData, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Window rows (W, N) -> segments (W*N, L, A, S) (zeros where missing) and present mask."""
    present = rows >= 0
    x = data.x[np.where(present, rows, 0).reshape(-1)]
    x = torch.from_numpy(x)
    return x, torch.from_numpy(present)


def drop_segments(present: np.ndarray, max_rate: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Hide present slots of each window (W, N) at a per-window rate r ~ U(0, max_rate).

    Simulates segments lost between the AP and the cloud, so the classifier learns to answer
    from a partial context. The last present slot of each window is always kept: the cloud only
    predicts when a segment arrives, so the newest slot of a served window is never empty.
    Returns a new mask; ``present`` is not modified.
    """
    w, n = present.shape
    rate = rng.uniform(0.0, max_rate, size=(w, 1))
    keep = present & (rng.random((w, n)) >= rate)
    has = present.any(axis=1)
    last = n - 1 - np.argmax(present[:, ::-1], axis=1)
    keep[np.flatnonzero(has), last[has]] = True
    return keep


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scale each segment's dynamics around its profile and add a little noise (log domain).

    People move with different strength and distance in each session; the profile (room,
    session) is removed by the encoder anyway. With profile blocks (ModelConfig.
    profile_blocks) the scaling is still around the segment's mean, so each block's mean
    moves with it: the block profiles are augmented as the dynamics are (what the measured
    bundles with blocks were trained with, docs/model.md).
    """
    profile = x.mean(dim=1, keepdim=True)
    scale = torch.empty(x.shape[0], 1, 1, 1).uniform_(0.6, 1.6, generator=gen)
    noise = torch.randn(x.shape, generator=gen) * 0.02
    return profile + (x - profile) * scale + noise


def forward_windows(net: CSICodecNet, x: torch.Tensor, present: torch.Tensor,
                    level: torch.Tensor, bypass: bool = False,
                    seen: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run the whole network on W windows of N segments.

    ``seen`` (W, N), default ``present``: the slots the classifier may use (segment dropout
    hides some present ones); every segment is still encoded and reconstructed.
    """
    w, n = present.shape
    z, profile = net.encoder(x)
    q = net.quantize(z)
    seg_level = level.repeat_interleave(n)
    if bypass:
        z_q = net.bypass(z)
    else:
        # Level ``levels`` is the unquantized operating point (the quantizer bypassed); it is
        # trained too, so the "unquantized" evaluation measures a trained path.
        unquantized = (seg_level >= net.cfg.levels).view(-1, 1, 1)
        z_q = torch.where(unquantized, net.bypass(z), q.z_q) if unquantized.any() else q.z_q
    z_q = z_q * net.channel_mask(seg_level)
    dynamics_hat = net.decoder(z_q)
    dynamics, _ = net.encoder.standardise(x)
    d, t = z_q.shape[1:]
    profile_hat = net.profile_quantized(profile, seg_level)
    activity, identity = net.classify(z_q.view(w, n, d, t), profile_hat.view(w, n, -1),
                                      present if seen is None else seen, level)
    return {"z": z, "z_q": z_q, "symbols": q.symbols, "qloss": q.loss, "perplexity": q.perplexity,
            "dynamics": dynamics, "dynamics_hat": dynamics_hat, "profile": profile,
            "profile_hat": profile_hat,
            "activity": activity, "identity": identity}


def _losses(out: dict[str, torch.Tensor], present: torch.Tensor, act: torch.Tensor,
            ident: torch.Tensor, opts: TrainOptions) -> dict[str, torch.Tensor]:
    mask = present.reshape(-1).float()
    err = ((out["dynamics_hat"] - out["dynamics"]) ** 2).mean(dim=(1, 2))
    recon = (err * mask).sum() / mask.sum().clamp_min(1.0)
    activity = F.cross_entropy(out["activity"], act, label_smoothing=0.1)
    identity = torch.zeros(())
    if out["identity"] is not None and (ident >= 0).any():
        known = ident >= 0
        identity = F.cross_entropy(out["identity"][known], ident[known], label_smoothing=0.1)
    total = (opts.recon_weight * recon + opts.activity_weight * activity
             + opts.identity_weight * identity + opts.quantizer_weight * out["qloss"])
    return {"total": total, "recon": recon, "activity": activity, "identity": identity}


@torch.no_grad()
def evaluate_windows(net: CSICodecNet, data: SegmentData, recordings: np.ndarray, level: int,
                     bypass: bool = False, batch: int = 64) -> dict[str, np.ndarray]:
    """Predictions for one window per recording (ending at its last segment)."""
    net.eval()
    rows, owners = windows(data, recordings, net.cfg.context_segments)
    act_logits, id_logits, err, energy, full_err, full_energy = [], [], [], [], [], []
    for i in range(0, len(rows), batch):
        x, present = _gather(data, rows[i : i + batch])
        lv = torch.full((present.shape[0],), level)
        out = forward_windows(net, x, present, lv, bypass=bypass)
        act_logits.append(out["activity"])
        if out["identity"] is not None:
            id_logits.append(out["identity"])
        m = present.reshape(-1)
        full = out["dynamics"] + net.profile_frames(out["profile"])
        full_hat = out["dynamics_hat"] + net.profile_frames(out["profile_hat"])
        err.append(((out["dynamics_hat"] - out["dynamics"]) ** 2)[m].sum().item())
        energy.append((out["dynamics"] ** 2)[m].sum().item())
        full_err.append(((full_hat - full) ** 2)[m].sum().item())
        full_energy.append((full**2)[m].sum().item())
    result = {
        "recordings": owners,
        "activity_logits": torch.cat(act_logits).numpy(),
        "activity_true": data.activity[owners],
        "identity_true": data.identity[owners],
        "dynamics_nmse_db": np.array(10 * np.log10(sum(err) / max(sum(energy), 1e-12))),
        "nmse_db": np.array(10 * np.log10(sum(full_err) / max(sum(full_energy), 1e-12))),
    }
    if id_logits:
        result["identity_logits"] = torch.cat(id_logits).numpy()
    return result


def _score(result: dict[str, np.ndarray]) -> tuple[float, float | None]:
    act = float((result["activity_logits"].argmax(1) == result["activity_true"]).mean())
    ident = None
    if "identity_logits" in result and (result["identity_true"] >= 0).any():
        known = result["identity_true"] >= 0
        ident = float((result["identity_logits"][known].argmax(1)
                       == result["identity_true"][known]).mean())
    return act, ident


def save_checkpoint(net: CSICodecNet, path: Path) -> None:
    """Weights as numpy arrays (no pickle), written atomically."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.detach().cpu().numpy() for k, v in net.state_dict().items()})
    tmp.replace(path)


def train(cfg: ModelConfig, data: SegmentData, train_recs: np.ndarray, val_recs: np.ndarray,
          opts: TrainOptions, progress: Callable[[EpochLog], None] | None = None,
          checkpoints: Path | None = None) -> TrainResult:
    """Train a network from scratch; returns the best weights by validation score.

    With ``checkpoints``, ``best.npz`` (on every improvement) and ``last.npz`` (every epoch)
    are written there, so an interrupted run leaves its weights behind.
    """
    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    # Segment dropout draws from its own stream (a child of ``rng``): windows, batches, levels
    # and augmentation stay those of the same run without it, so the two compare cleanly.
    drop_rng = rng.spawn(1)[0] if opts.segment_dropout > 0 else None
    net = CSICodecNet(cfg)
    fit_standardisation(net, data, train_recs)
    optimiser = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=opts.lr, total_steps=opts.epochs * (
            -(-len(train_recs) * opts.windows_per_recording // opts.batch)))
    unquantized = cfg.quantizer == "none"
    levels = [cfg.levels] if unquantized else list(range(cfg.levels + 1))
    result = TrainResult(net=net)
    best_score, best_state, stale = -1.0, None, 0
    started = time.perf_counter()
    for epoch in range(opts.epochs):
        t0 = time.perf_counter()
        net.train()
        rows, owners = windows(data, train_recs, cfg.context_segments, rng,
                               opts.windows_per_recording)
        order = rng.permutation(len(rows))
        sums = np.zeros(5)
        batches = 0
        for i in range(0, len(order), opts.batch):
            pick = order[i : i + opts.batch]
            x, present = _gather(data, rows[pick])
            if opts.augment:
                x = _augment(x, gen)
            level = torch.from_numpy(rng.choice(levels, size=len(pick)))
            seen = (torch.from_numpy(drop_segments(present.numpy(), opts.segment_dropout,
                                                   drop_rng))
                    if drop_rng is not None else None)
            out = forward_windows(net, x, present, level, seen=seen)
            act = torch.from_numpy(data.activity[owners[pick]])
            ident = torch.from_numpy(data.identity[owners[pick]])
            losses = _losses(out, present, act, ident, opts)
            optimiser.zero_grad()
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            sums += [losses["total"].item(), losses["recon"].item(), losses["activity"].item(),
                     losses["identity"].item(), out["perplexity"].mean().item()]
            batches += 1
        val_act, val_id = [], []
        for lv in levels if unquantized else levels[:-1]:
            a, b = _score(evaluate_windows(net, data, val_recs, lv))
            val_act.append(a)
            if b is not None:
                val_id.append(b)
        score = float(np.mean(val_act)) + (0.5 * float(np.mean(val_id)) if val_id else 0.0)
        loss, recon, activity, identity, perplexity = (sums / max(batches, 1)).tolist()
        log = EpochLog(epoch, loss, recon, activity, identity, perplexity,
                       float(np.mean(val_act)), float(np.mean(val_id)) if val_id else None,
                       score, time.perf_counter() - t0)
        result.history.append(log)
        if progress:
            progress(log)
        if checkpoints is not None:
            checkpoints.mkdir(parents=True, exist_ok=True)
            save_checkpoint(net, checkpoints / "last.npz")
        if score > best_score + 1e-6:
            best_score, best_state, stale = score, copy.deepcopy(net.state_dict()), 0
            result.best_epoch = epoch
            if checkpoints is not None:
                save_checkpoint(net, checkpoints / "best.npz")
        else:
            stale += 1
            if stale >= opts.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    result.seconds = time.perf_counter() - started
    return result
