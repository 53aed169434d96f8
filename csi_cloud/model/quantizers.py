"""Quantizers turning the encoder's latent grid into integer codes.

Both map ``z`` of shape (B, D, T) to ``z_q`` of the same shape (the value the decoder and the
classifier see) and integer ``symbols`` of shape (B, G, T), one symbol per group of channels
and time step. Rate levels transmit the first ``g`` groups only (nested channels), so each
group is one row of the entropy tables.

- :class:`FSQ` (finite scalar quantization, Mentzer et al. 2023): each channel bounded with
  tanh to ``(L-1)/2`` and rounded; one group per channel, alphabet L. No codebook to collapse.
- :class:`EMAVectorQuantizer`: channels in groups of ``dim``, each group a vector quantized
  against its own codebook, updated by exponential moving averages, with dead codes restarted
  from random encoder outputs.

Gradients: the straight-through estimator ``z + (q - z).detach()`` makes ``z_q`` equal the
quantized value in the forward pass and the identity in the backward pass, so classification
and reconstruction losses reach the encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FSQ", "EMAVectorQuantizer", "QuantizerOutput", "straight_through"]


def straight_through(z: Tensor, q: Tensor) -> Tensor:
    """Forward: ``q``. Backward: identity to ``z``."""
    return z + (q - z).detach()


class QuantizerOutput(tuple):
    """(z_q (B,D,T), symbols (B,G,T) int64, aux loss scalar, perplexity per group (G,))."""

    __slots__ = ()

    def __new__(cls, z_q: Tensor, symbols: Tensor, loss: Tensor, perplexity: Tensor):
        return super().__new__(cls, (z_q, symbols, loss, perplexity))

    z_q = property(lambda self: self[0])
    symbols = property(lambda self: self[1])
    loss = property(lambda self: self[2])
    perplexity = property(lambda self: self[3])


def _perplexity(symbols: Tensor, alphabet: int) -> Tensor:
    """exp(entropy) of each group's symbol histogram in the batch: (G,)."""
    one_hot = torch.nn.functional.one_hot(symbols.transpose(0, 1).reshape(symbols.shape[1], -1),
                                          alphabet).float()
    p = one_hot.mean(dim=1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum(dim=-1))


class FSQ(nn.Module):
    """Finite scalar quantization with ``levels`` (odd) values per channel.

    The latent is bounded to ``[-half_width, half_width]``, ``half_width = (levels - 1) // 2``
    (the bundle manifest's ``half``; not named ``half``, which would shadow ``nn.Module.half()``).
    """

    def __init__(self, channels: int, levels: int = 5) -> None:
        super().__init__()
        if levels % 2 == 0 or levels < 3:
            raise ValueError(f"FSQ levels must be odd and >= 3, got {levels}")
        self.channels = channels
        self.groups = channels
        self.alphabet = levels
        self.half_width = (levels - 1) // 2

    def bound(self, z: Tensor) -> Tensor:
        """Latent bounded to [-half_width, half_width]: the edge encoder's output, unrounded."""
        return torch.tanh(z) * self.half_width

    def forward(self, z: Tensor) -> QuantizerOutput:
        bounded = self.bound(z)
        q = torch.round(bounded)
        z_q = straight_through(bounded, q) / self.half_width  # values in [-1, 1]
        symbols = (q + self.half_width).long()
        return QuantizerOutput(z_q, symbols, z.new_zeros(()), _perplexity(symbols, self.alphabet))

    def dequantize(self, symbols: Tensor) -> Tensor:
        """symbols (B,G,T) -> z_q (B,D,T)."""
        return (symbols.float() - self.half_width) / self.half_width


class EMAVectorQuantizer(nn.Module):
    """Grouped VQ: channels split in groups of ``dim``, one EMA codebook of ``size`` per group."""

    # Buffers (registered in __init__; their names are state_dict keys of the shipped bundles).
    codebook: Tensor
    ema_sum: Tensor
    ema_count: Tensor
    unused_steps: Tensor

    def __init__(self, channels: int, dim: int = 2, size: int = 25, decay: float = 0.99,
                 commitment: float = 0.25, dead_after: int = 50) -> None:
        super().__init__()
        if channels % dim:
            raise ValueError(f"{channels} channels do not split into groups of {dim}")
        self.channels, self.dim, self.alphabet = channels, dim, size
        self.groups = channels // dim
        self.decay, self.commitment, self.dead_after = decay, commitment, dead_after
        init = torch.randn(self.groups, size, dim) * 0.5
        self.register_buffer("codebook", init)
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("ema_count", torch.ones(self.groups, size))
        self.register_buffer("unused_steps", torch.zeros(self.groups, size))

    def _vectors(self, z: Tensor) -> Tensor:  # (B,D,T) -> (G, B*T, dim)
        b, _, t = z.shape
        return z.view(b, self.groups, self.dim, t).permute(1, 0, 3, 2).reshape(
            self.groups, b * t, self.dim)

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, _, t = z.shape
        vectors = self._vectors(z)
        distance = torch.cdist(vectors, self.codebook)  # (G, B*T, size)
        index = distance.argmin(dim=-1)  # (G, B*T)
        chosen = torch.gather(self.codebook, 1, index.unsqueeze(-1).expand(-1, -1, self.dim))
        if self.training:
            self._update(vectors.detach(), index)
        loss = self.commitment * ((vectors - chosen.detach()) ** 2).mean()
        q = straight_through(vectors, chosen)
        z_q = q.reshape(self.groups, b, t, self.dim).permute(1, 0, 3, 2).reshape(b, -1, t)
        symbols = index.view(self.groups, b, t).permute(1, 0, 2)
        return QuantizerOutput(z_q, symbols, loss, _perplexity(symbols, self.alphabet))

    @torch.no_grad()
    def _update(self, vectors: Tensor, index: Tensor) -> None:
        one_hot = torch.nn.functional.one_hot(index, self.alphabet).float()  # (G, N, size)
        count = one_hot.sum(dim=1)
        total = torch.einsum("gns,gnd->gsd", one_hot, vectors)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        n = self.ema_count.sum(dim=1, keepdim=True)
        smoothed = (self.ema_count + 1e-5) / (n + self.alphabet * 1e-5) * n
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(-1))
        # Dead-code restart: a code unused for a while jumps to a random recent encoder output.
        self.unused_steps.add_(1).mul_((count == 0).float())
        dead = self.unused_steps >= self.dead_after
        if dead.any():
            for g in torch.nonzero(dead.any(dim=1)).flatten().tolist():
                slots = torch.nonzero(dead[g]).flatten()
                pick = torch.randint(0, vectors.shape[1], (slots.numel(),), device=vectors.device)
                self.codebook[g, slots] = vectors[g, pick]
                self.ema_sum[g, slots] = vectors[g, pick]
                self.ema_count[g, slots] = 1.0
                self.unused_steps[g, slots] = 0

    def dequantize(self, symbols: Tensor) -> Tensor:
        b, g, t = symbols.shape
        flat = symbols.permute(1, 0, 2).reshape(g, -1)
        chosen = torch.gather(self.codebook, 1, flat.unsqueeze(-1).expand(-1, -1, self.dim))
        return chosen.reshape(g, b, t, self.dim).permute(1, 0, 3, 2).reshape(b, -1, t)
