"""Layers shared by the reference LVLM and the Hugging Face integration: RMSNorm, RoPE on
arbitrary position ids (rotate-half), and the causal attention mask with padding."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, S, head_dim] for int64 positions [B, S] (gaps allowed)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention_mask(key_valid: Tensor, n_queries: int, key_visual: Tensor | None = None) -> Tensor:
    """bool [B, 1, Sq, Sk]: queries are the last Sq of the Sk keys, in order. A query sees
    valid keys at or before its own slot, and always itself (padding rows then stay finite
    instead of NaN, and no valid row ever sees a padding key). With ``key_visual`` [B, Sk],
    text queries do not see visual keys (the early layers of a late-fusion model)."""
    B, n_keys = key_valid.shape
    offset = n_keys - n_queries
    rows = torch.arange(n_queries, device=key_valid.device)[:, None] + offset
    cols = torch.arange(n_keys, device=key_valid.device)[None, :]
    visible = key_valid[:, None, :] & (cols <= rows)
    if key_visual is not None:
        query_visual = key_visual[:, offset:]
        visible = visible & (query_visual[:, :, None] | ~key_visual[:, None, :])
    return (visible | (cols == rows))[:, None]
