"""The vision encoder: patch embedding, pre-norm transformer blocks, 2x2 patch merger."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LVLMConfig


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        B, P, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, P, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, P, C))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """images [B, 3, H, W] -> (visual tokens [B, Nv, hidden], taps: per block [B, Nv, vit_dim]).

    Patches carry a learned position embedding. Visual token (i, j) merges patches
    (2i..2i+1, 2j..2j+1) in raster order; each block's output, averaged over the same 2x2
    groups, is a tap (multi-level features for the VIP), deepest first.
    """

    def __init__(self, config: LVLMConfig) -> None:
        super().__init__()
        self.config = config
        side = config.image_size // config.patch
        self.embed = nn.Linear(3 * config.patch * config.patch, config.vit_dim)
        self.position = nn.Parameter(torch.randn(side * side, config.vit_dim) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(config.vit_dim, config.vit_heads) for _ in range(config.vit_layers))
        self.merger = nn.Sequential(
            nn.LayerNorm(4 * config.vit_dim),
            nn.Linear(4 * config.vit_dim, config.hidden),
            nn.GELU(),
            nn.Linear(config.hidden, config.hidden),
        )

    def _groups(self, x: Tensor) -> Tensor:
        """[B, side*side, C] patches -> [B, Nv, 4, C] 2x2 groups in raster order."""
        B, _, C = x.shape
        g = self.config.grid
        return x.view(B, g, 2, g, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, g * g, 4, C)

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        p = self.config.patch
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # [B, side*side, 3*p*p]
        x = self.embed(patches) + self.position
        B, C = x.shape[0], x.shape[2]
        if self.config.vit_window:  # blocks see one 2x2 group at a time: [B * Nv, 4, C]
            x = self._groups(x).reshape(-1, 4, C)
        taps = []
        for block in self.blocks:
            x = block(x)
            groups = x.view(B, -1, 4, C) if self.config.vit_window else self._groups(x)
            taps.append(groups.mean(dim=2))
        return self.merger(groups.flatten(2)), taps[::-1]
