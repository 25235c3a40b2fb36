"""ATP-LLaVA's stage: redundancy and spatial scores of the visual tokens at one decoder
layer, per-instance thresholds from a small MLP, and the keep margins. Shared by the
reference LVLM (``glimpse_ops.lvlm.atp``) and the Hugging Face integration
(``glimpse_ops.hf.atp``); the choices made where ATP's sources are silent are listed in
``glimpse_ops/lvlm/atp.py``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .ops import attention_column_scores

TAU = 10.0


def spatial_scores(height: int, width: int | None = None) -> Tensor:
    """fp32 [height * width] in (0, 1], raster order (``width`` defaults to ``height``): the
    coarsest power-of-two stride whose grid contains the token, over the coarsest stride
    that fits the shorter side."""
    width = height if width is None else width
    coarsest = 1 << (min(height, width).bit_length() - 1)
    rows, cols = torch.arange(height).repeat_interleave(width), torch.arange(width).repeat(height)
    stride = torch.ones(height * width)
    s = 2
    while s <= coarsest:
        stride = torch.where((rows % s == 0) & (cols % s == 0), torch.tensor(float(s)), stride)
        s *= 2
    return stride / coarsest


def _shares(columns: Tensor, live: Tensor) -> Tensor:
    """Column mass [B, S] -> share over the live visual tokens (0 elsewhere)."""
    mass = columns * live
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-20)


def _normalized_entropy(p: Tensor, live: Tensor) -> Tensor:
    n = live.sum(dim=1).clamp_min(2).float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=1) / torch.log(n)


class ATPStage(nn.Module):
    """Scores, thresholds and keep margins at one decoder layer."""

    def __init__(self, layer: int, width: int = 32) -> None:
        super().__init__()
        self.layer = layer
        self.mlp = nn.Sequential(nn.Linear(4, width), nn.SiLU(), nn.Linear(width, 2))
        with torch.no_grad():  # start permissive: theta_r ~ 0.1, theta_s ~ 0.9
            self.mlp[2].bias.copy_(torch.tensor([math.log(0.1 / 0.9), math.log(0.9 / 0.1)]))

    def forward(
        self, q: Tensor, k: Tensor, valid: Tensor, visual: Tensor, live: Tensor, spatial: Tensor
    ) -> tuple[Tensor, Tensor]:
        """q [B, H, S, D], k [B, Hkv, S, D], masks bool [B, S] (``live``: visual tokens not yet
        pruned), spatial fp32 [B, S] -> (margins z fp32 [B, S], thresholds fp32 [B, 2])."""
        keys = valid & (live | ~visual)
        q, k = q.detach(), k.detach()
        cross = attention_column_scores(q, k, valid & ~visual, keys, causal=True).mean(dim=1)
        self_ = attention_column_scores(q, k, live, keys, causal=True).mean(dim=1)
        p_cross, p_self = _shares(cross, live), _shares(self_, live)
        red = (p_cross + p_self) / 2
        red = red / red.amax(dim=1, keepdim=True).clamp_min(1e-20)
        stats = torch.stack(
            [
                _normalized_entropy(p_cross, live),
                _normalized_entropy(p_self, live),
                p_cross.amax(dim=1),
                p_self.amax(dim=1),
            ],
            dim=1,
        )
        theta = torch.sigmoid(self.mlp(stats))
        z = torch.maximum(red - theta[:, :1], spatial - theta[:, 1:])
        return z, theta
