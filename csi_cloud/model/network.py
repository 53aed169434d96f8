"""The compression network: encoder -> quantizer -> (decoder, joint context classifier).

Shapes (B batch, L frames per segment, A antennas, S subcarriers, C = A*S, D latent channels,
T latent steps, N context segments, G symbol groups):

- input segment ``x``: (B, L, A, S), the preprocessed log1p amplitude (InputSpec
  normalisation ``log``);
- :class:`Encoder`: standardises with the training statistics (per-channel mean, one global
  scale), splits the segment into its static *profile* ``p`` (B, C) (the time mean, which is
  mostly the room and session) and its *dynamics* ``x - p`` (B, C, L), and encodes only the
  dynamics into ``z`` (B, D, T). With ``profile_blocks`` P > 1 the segment is cut into P
  equal blocks of frames and ``p`` is each block's mean, (B, P * C) block-major (the
  dynamics are each frame minus its block's mean); P = 1 is the segment's mean (B, C).
  The classifier therefore never sees the session fingerprint through the codes.
- quantizer: ``z`` -> ``z_q`` (B, D, T), ``symbols`` (B, G, T);
- rate levels: level ``l`` transmits the first ``level_channels[l]`` latent channels (their
  symbol groups; the rest of ``z_q`` is zero at the decoder) and ``profile_components[l]``
  PCA coefficients of the profile;
- :class:`Decoder`: ``z_q`` -> dynamics (B, C, L); the reconstruction adds the decoded profile;
- :class:`ContextClassifier`: the last N segments' ``z_q`` (B, N, D, T) and decoded profiles
  (B, N, C), with a mask (B, N) of segments that arrived -> activity logits (from the dynamics
  only, which is what carries across rooms and sessions) and identity logits (dynamics and
  profile: who is in the room shows in how the static channel looks too).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from .context_head import ContextHead
from .quantizers import FSQ, EMAVectorQuantizer, QuantizerOutput

__all__ = ["CSICodecNet", "ContextClassifier", "Decoder", "Encoder", "ModelConfig"]


class ModelConfig(BaseModel):
    """Architecture hyper-parameters; stored in every bundle."""

    model_config = ConfigDict(frozen=True)

    antennas: int
    subcarriers: int
    segment_frames: int
    context_segments: int = 8
    latent_channels: int = 16
    hidden: int = 64
    quantizer: Literal["fsq", "vq", "none"] = "fsq"
    fsq_levels: int = 5
    vq_dim: int = 2
    vq_size: int = 25
    # Latent channels and profile PCA coefficients each level transmits. The profile
    # coefficients, one set a second, carry most of what identifies an activity over ~8 s
    # (docs/model.md, ablation), so every level sends all 16 (99.99 % of the profile's
    # variance); level 0 sends no latent channel: with the network retrained for it, it
    # learned new sessions and rooms better than 1 latent + 12 profile at the same bytes
    # (docs/model.md, "The same layout with the network retrained"). A bundle may choose
    # otherwise (csi train --level0; the WiAR bundle keeps 1 latent + 12 profile: docs/model.md,
    # "Level 0 per bundle").
    level_channels: tuple[int, ...] = (0, 4, 8, 16)
    profile_components: tuple[int, ...] = (16, 16, 16, 16)
    profile_range: int = 15  # profile coefficients are clipped to [-R, R] steps
    # Profiles a segment carries: its frames cut into this many equal blocks, each block's
    # mean projected and coded (1: the segment's mean). Measured on WiAR within level 0's
    # 20 B/s: level per recording, worse per second and live, so the shipped bundles send one
    # (docs/model.md, "Sub-second profiles").
    profile_blocks: int = Field(default=1, ge=1)
    embed: int = 64
    # Feed the encoder the frame-to-frame difference of the dynamics next to the dynamics:
    # motion shows as change, and it carried across sessions (cross-session activity 0.45
    # against 0.34 without it, one seed, four directions).
    input_diff: bool = True
    activities: int = Field(ge=2)
    identities: int = 0  # 0: no identity head
    # The cloud classifier: "context" (the network's context classifier below) or "rocket"
    # (random-convolution features of the decoded window and ridge heads fitted in closed
    # form after training, csi_cloud.model.context_head; see docs/model.md).
    head: Literal["context", "rocket"] = "rocket"

    @model_validator(mode="after")
    def _blocks_divide_the_segment(self) -> ModelConfig:
        if self.segment_frames % self.profile_blocks:
            raise ValueError(f"profile_blocks {self.profile_blocks} does not divide a segment "
                             f"of {self.segment_frames} frames")
        return self

    def stored(self) -> dict[str, Any]:
        """The config as a bundle stores it: ``profile_blocks`` only where it is not 1, so a
        bundle without blocks has the manifest (and id) it had before the field existed."""
        out = self.model_dump(mode="json")
        if self.profile_blocks == 1:
            del out["profile_blocks"]
        return out

    @property
    def channels(self) -> int:
        return self.antennas * self.subcarriers

    @property
    def profile_width(self) -> int:
        """Values of a segment's decoded profile: P blocks x C channels."""
        return self.profile_blocks * self.channels

    @classmethod
    def level0(cls, latent: int, profile: int) -> dict[str, tuple[int, ...]]:
        """The fields of a config whose level 0 sends ``latent`` latent channels and
        ``profile`` profile coefficients, the other levels as by default (a per-bundle
        choice: ``csi train --level0``). ValueError naming a value out of range."""
        channels = cls.model_fields["level_channels"].default
        profiles = cls.model_fields["profile_components"].default
        if not 0 <= latent <= channels[1]:
            raise ValueError(f"level 0 latent channels {latent} not in [0, {channels[1]}] "
                             "(at most level 1's)")
        if not 0 <= profile <= max(profiles):
            raise ValueError(f"level 0 profile coefficients {profile} not in "
                             f"[0, {max(profiles)}]")
        if latent == 0 and profile == 0:
            raise ValueError("level 0 must send latent channels, profile coefficients or both")
        return {"level_channels": (latent, *channels[1:]),
                "profile_components": (profile, *profiles[1:])}

    @property
    def levels(self) -> int:
        return len(self.level_channels)

    def latent_steps(self) -> int:
        t = self.segment_frames
        for kernel, stride, pad in Encoder.STAGES:
            t = (t + 2 * pad - kernel) // stride + 1
        return t


class Encoder(nn.Module):
    """(B, L, A, S) log amplitude -> latent (B, D, T) and profile (B, P * C)."""

    STAGES = ((3, 2, 1), (5, 2, 2), (3, 2, 1))  # (kernel, stride, padding) of the conv stack
    mean: Tensor  # buffers, registered in __init__
    scale: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, h = cfg.channels, cfg.hidden
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("scale", torch.ones(()))
        self.input_diff = cfg.input_diff
        self.blocks = cfg.profile_blocks
        layers: list[nn.Module] = []
        width = 2 * c if cfg.input_diff else c
        for kernel, stride, pad in self.STAGES:
            layers += [nn.Conv1d(width, h, kernel, stride, pad), nn.GELU()]
            width = h
        layers.append(nn.Conv1d(h, cfg.latent_channels, 1))
        self.net = nn.Sequential(*layers)

    def standardise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, A, S) -> dynamics (B, C, L) and profile (B, P * C), standardised."""
        b, length = x.shape[:2]
        xs = (x.reshape(b, length, -1) - self.mean) / self.scale
        xs = xs.transpose(1, 2)
        if self.blocks == 1:
            profile = xs.mean(dim=-1)
            return xs - profile.unsqueeze(-1), profile
        c = xs.shape[1]
        # -1 for the batch: the edge graph is exported with a dynamic batch axis.
        blocks = xs.reshape(-1, c, self.blocks, length // self.blocks)
        means = blocks.mean(dim=-1, keepdim=True)  # (B, C, P, 1)
        dynamics = (blocks - means).reshape(-1, c, length)
        return dynamics, means[..., 0].transpose(1, 2).reshape(-1, self.blocks * c)

    def features(self, dynamics: Tensor) -> Tensor:
        """Dynamics (B, C, L) -> conv input (B, 2C, L): dynamics and their time difference."""
        if not self.input_diff:
            return dynamics
        diff = dynamics[..., 1:] - dynamics[..., :-1]
        return torch.cat([dynamics, F.pad(diff, (1, 0))], dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        dynamics, profile = self.standardise(x)
        return self.net(self.features(dynamics)), profile


class Decoder(nn.Module):
    """z_q (B, D, T) -> dynamics (B, C, L)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.length = cfg.segment_frames
        self.net = nn.Sequential(
            nn.Conv1d(cfg.latent_channels, h, 3, padding=1), nn.GELU(),
            nn.Upsample(scale_factor=2), nn.Conv1d(h, h, 3, padding=1), nn.GELU(),
            nn.Upsample(scale_factor=2), nn.Conv1d(h, h, 5, padding=2), nn.GELU(),
            nn.Upsample(scale_factor=2), nn.Conv1d(h, h, 5, padding=2), nn.GELU(),
            nn.Conv1d(h, cfg.channels, 1),
        )

    def forward(self, z_q: Tensor) -> Tensor:
        y = self.net(z_q)
        return F.interpolate(y, size=self.length, mode="linear", align_corners=False)


class ContextClassifier(nn.Module):
    """Joint activity / identity heads over the last N segments' quantized latents."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e = cfg.embed
        self.segment = nn.Sequential(
            nn.Conv1d(cfg.latent_channels, e, 3, padding=1), nn.GELU(),
            nn.Conv1d(e, e, 3, padding=1), nn.GELU(),
        )
        self.project = nn.Linear(2 * e, e)
        self.level = nn.Embedding(cfg.levels + 1, e)  # last index: unquantized
        self.position = nn.Parameter(torch.zeros(cfg.context_segments, e))
        self.mixer = nn.TransformerEncoderLayer(e, nhead=4, dim_feedforward=2 * e, dropout=0.1,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(e)
        self.activity = nn.Linear(e, cfg.activities)
        self.profile = nn.Sequential(nn.Linear(cfg.profile_width, e), nn.GELU(),
                                     nn.Linear(e, e))
        self.identity = nn.Linear(2 * e, cfg.identities) if cfg.identities else None
        self.dropout = nn.Dropout(0.2)

    def embed(self, z_q: Tensor) -> Tensor:
        """(B, N, D, T) -> (B, N, E): one vector per segment."""
        b, n, d, t = z_q.shape
        h = self.segment(z_q.reshape(b * n, d, t))
        pooled = torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=-1)
        return self.project(pooled).view(b, n, -1)

    def forward(self, z_q: Tensor, profile: Tensor, present: Tensor,
                level: Tensor) -> tuple[Tensor, Tensor | None]:
        """z_q (B,N,D,T); profile (B,N,P*C); present (B,N) bool; level (B,) int -> logits."""
        pooled, identity_features = self.features(z_q, profile, present, level)
        identity = None if self.identity is None else self.identity(identity_features)
        return self.activity(pooled), identity

    def features(self, z_q: Tensor, profile: Tensor, present: Tensor,
                 level: Tensor) -> tuple[Tensor, Tensor]:
        """The heads' inputs: activity features (B, E) and identity features (B, 2E)."""
        n = z_q.shape[1]
        h = self.embed(z_q) + self.position[-n:] + self.level(level).unsqueeze(1)
        # Missing segments are masked out of attention and pooling, never filled in.
        any_present = present.any(dim=1, keepdim=True)
        safe = present | ~any_present
        h = self.mixer(h, src_key_padding_mask=~safe)
        w = safe.float().unsqueeze(-1)
        count = w.sum(dim=1).clamp_min(1.0)
        pooled = self.dropout(self.norm((h * w).sum(dim=1) / count))
        if self.identity is None:
            return pooled, pooled
        static = (self.profile(profile) * w).sum(dim=1) / count
        return pooled, torch.cat([pooled, self.dropout(static)], dim=-1)


class CSICodecNet(nn.Module):
    """Encoder, quantizer, decoder and context classifier with nested rate levels."""

    profile_mean: Tensor  # buffers, registered in __init__
    profile_basis: Tensor
    profile_step: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        if cfg.quantizer == "vq":
            self.quantizer: FSQ | EMAVectorQuantizer | None = EMAVectorQuantizer(
                cfg.latent_channels, cfg.vq_dim, cfg.vq_size)
        elif cfg.quantizer == "fsq":
            self.quantizer = FSQ(cfg.latent_channels, cfg.fsq_levels)
        else:
            self.quantizer = None
        self.decoder = Decoder(cfg)
        self.classifier = ContextClassifier(cfg)
        # The cloud classifier fitted in closed form on decoded windows after training
        # (csi_cloud.model.context_head); None: the context classifier above classifies.
        self.context_head: ContextHead | None = None
        kmax = max(cfg.profile_components)
        self.register_buffer("profile_mean", torch.zeros(cfg.channels))
        self.register_buffer("profile_basis", torch.zeros(kmax, cfg.channels))
        self.register_buffer("profile_step", torch.ones(kmax))

    @property
    def code_quantizer(self) -> FSQ | EMAVectorQuantizer:
        """The quantizer making the integer codes a bundle ships (a model has none without)."""
        if self.quantizer is None:
            raise ValueError(f"a model with quantizer {self.cfg.quantizer!r} makes no codes")
        return self.quantizer

    @property
    def group_size(self) -> int:
        return self.cfg.vq_dim if self.cfg.quantizer == "vq" else 1

    def channel_mask(self, level: Tensor) -> Tensor:
        """(B,) level -> (B, D, 1) float mask of the channels a level transmits."""
        channels = torch.tensor(self.cfg.level_channels, device=level.device)
        kept = channels[level.clamp_max(self.cfg.levels - 1)]
        mask = torch.arange(self.cfg.latent_channels, device=level.device) < kept.unsqueeze(-1)
        unquantized = level >= self.cfg.levels
        mask = mask | unquantized.unsqueeze(-1)
        return mask.float().unsqueeze(-1)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        if self.quantizer is None:
            zero = z.new_zeros(())
            return QuantizerOutput(torch.tanh(z), z.new_zeros(z.shape, dtype=torch.long), zero,
                                   z.new_zeros(z.shape[1]))
        return self.quantizer(z)

    def bypass(self, z: Tensor) -> Tensor:
        """The latent as the decoder would see it with the quantizer bypassed."""
        if isinstance(self.quantizer, FSQ):
            return self.quantizer.bound(z) / self.quantizer.half_width
        return z if self.quantizer is not None else torch.tanh(z)

    def profile_codes(self, profile: Tensor, level: int) -> Tensor:
        """(B, P * C) standardised profile -> (B, P * K) integer PCA coefficients for a level
        (each block's, block-major)."""
        k = self.cfg.profile_components[level]
        blocks = profile.reshape(profile.shape[0], self.cfg.profile_blocks, -1)
        coeff = (blocks - self.profile_mean) @ self.profile_basis[:k].T / self.profile_step[:k]
        r = self.cfg.profile_range
        return torch.round(coeff).clamp(-r, r).long().reshape(profile.shape[0], -1)

    def profile_decode(self, codes: Tensor) -> Tensor:
        """(B, P * K) codes -> (B, P * C) profile (the training mean when K = 0)."""
        p = self.cfg.profile_blocks
        blocks = codes.reshape(codes.shape[0], p, -1)
        k = blocks.shape[2]
        recon = (blocks.float() * self.profile_step[:k]) @ self.profile_basis[:k]
        return (self.profile_mean + recon).reshape(codes.shape[0], -1)

    def profile_frames(self, profile: Tensor) -> Tensor:
        """(B, P * C) profile -> (B, C, L): each frame its block's profile (what the
        reconstruction adds to the dynamics)."""
        b, p, length = profile.shape[0], self.cfg.profile_blocks, self.cfg.segment_frames
        blocks = profile.reshape(b, p, -1).transpose(1, 2)  # (B, C, P)
        return blocks.repeat_interleave(length // p, dim=2)

    def profile_quantized(self, profile: Tensor, level: Tensor) -> Tensor:
        """(B, P * C) profile -> what the decoder gets back at each segment's level."""
        out = profile.clone()  # unquantized (level >= levels): the exact profile
        for lv in level.unique().tolist():
            if lv < self.cfg.levels:
                rows = level == lv
                out[rows] = self.profile_decode(self.profile_codes(profile[rows], lv))
        return out

    def classify(self, z_q: Tensor, profile: Tensor, present: Tensor,
                 level: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.classifier(z_q, profile, present, level)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check() -> None:  # pragma: no cover - quick shape check while developing
    cfg = ModelConfig(antennas=1, subcarriers=56, segment_frames=50, activities=6, identities=4)
    net = CSICodecNet(cfg)
    x = torch.randn(3 * 8, 50, 1, 56)
    z, p = net.encoder(x)
    print(z.shape, cfg.latent_steps(), p.shape, param_count(net.encoder), math.prod(z.shape[1:]))


if __name__ == "__main__":  # pragma: no cover
    _check()
