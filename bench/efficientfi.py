"""An EfficientFi-style reference codec (Yang et al., IEEE IoT-J 2022), for the baselines.

A 2-D convolutional VQ-VAE over a whole context window (subcarriers x frames): two conv +
MaxPool stages that keep their pooling indices, a 32-dim latent on a 6 x 6 grid quantized
against one 512-entry codebook, and a decoder that upsamples with MaxUnpool, which needs the
encoder's pooling indices. The classifier reads the quantized grid. The honest bitrate counts
the 36 codebook indices (9 bits each) AND the pooling indices (2 bits per pooled output of
each 2 x 2 pool), because the decoder cannot run without them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class EfficientFiReference(nn.Module):
    GRID = 6
    CODEBOOK = 512
    DIM = 32

    def __init__(self, subcarriers: int, frames: int, activities: int, identities: int) -> None:
        super().__init__()
        self.shape = (subcarriers, frames)
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, self.DIM, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.codebook = nn.Embedding(self.CODEBOOK, self.DIM)
        self.codebook.weight.data.uniform_(-1 / self.CODEBOOK, 1 / self.CODEBOOK)
        self.dec3 = nn.Conv2d(self.DIM, 32, 3, padding=1)
        self.dec2 = nn.Conv2d(32, 16, 3, padding=1)
        self.dec1 = nn.Conv2d(16, 1, 3, padding=1)
        flat = self.DIM * self.GRID * self.GRID
        self.activity = nn.Sequential(nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.3),
                                      nn.Linear(128, activities))
        self.identity = (nn.Sequential(nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.3),
                                       nn.Linear(128, identities)) if identities else None)

    def side_bits(self) -> int:
        """Pooling-index bits per window: 2 bits for each output of both 2 x 2 pools."""
        s, t = self.shape
        first = 16 * (s // 2) * (t // 2)
        second = 32 * (s // 4) * (t // 4)
        return 2 * (first + second)

    def code_bits(self) -> int:
        return self.GRID * self.GRID * math.ceil(math.log2(self.CODEBOOK))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 1, S, T) standardised log amplitude."""
        h1, i1 = self.pool(F.relu(self.conv1(x)))
        h2, i2 = self.pool(F.relu(self.conv2(h1)))
        z = F.adaptive_avg_pool2d(self.conv3(h2), self.GRID)  # (B, DIM, 6, 6)
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.DIM)
        index = torch.cdist(flat, self.codebook.weight).argmin(dim=1)
        q = self.codebook(index).view(z.shape[0], self.GRID, self.GRID, self.DIM)
        q = q.permute(0, 3, 1, 2)
        vq_loss = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        z_q = z + (q - z).detach()
        up = F.interpolate(F.relu(self.dec3(z_q)), size=h2.shape[-2:], mode="nearest")
        up = self.unpool(up, i2, output_size=h1.shape[-2:])
        up = self.unpool(F.relu(self.dec2(up)), i1, output_size=x.shape[-2:])
        recon = self.dec1(up)
        flat_q = z_q.flatten(1)
        return {"recon": recon, "vq_loss": vq_loss, "activity": self.activity(flat_q),
                "identity": self.identity(flat_q) if self.identity is not None else None,
                "index": index.view(z.shape[0], -1)}
