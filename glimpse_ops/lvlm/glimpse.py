"""GlimpsePrune on the reference LVLM, with the library's ops on the hot path.

* ``GlimpsePruner`` (trained): a learnable glimpse token appended after the prompt, with
  per-layer injections up to layer K; its layer-K query scores every key through
  ``glimpse_scores`` (raw logits, Qwen style, per head); the VIP turns the per-head scores
  of the visual tokens plus multi-level ViT features into keep logits; ``prune_kv``
  selects (sigmoid > threshold, capped, at least min_keep) and compacts layers 0..K once;
  the glimpse is dropped; layers K+1.. run on the kept tokens.
* ``GlimpseTopK`` (training-free baseline): the last prompt token's layer-K query serves
  as the glimpse (FastV style) and ``glimpse_prune`` keeps the top tokens by head-averaged
  probabilities.
* ``RandomPruner``: random keeping at a given budget.

Differences from the paper's VIP, chosen for a 64-token toy: one transformer block instead
of four, a learned 2D position table instead of 2D RoPE, and no LM loss on the glimpse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import glimpse_prune, glimpse_scores, keep_index
from .decoder import RMSNorm
from .model import LVLM, Prefix, compact_and_finish, finish_compacted


class GlimpseToken(nn.Module):
    """Rows [K + 1, d]: row 0 is the glimpse's input embedding, row l is added to its
    residual stream before layer l (deep-prompt injection), each through Linear + RMSNorm."""

    def __init__(self, hidden: int, prune_layer: int) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.randn(prune_layer + 1, hidden) * 0.02)
        self.proj, self.norm = nn.Linear(hidden, hidden), RMSNorm(hidden)

    def embedding(self, layer: int) -> Tensor:
        return self.norm(self.proj(self.rows[layer]))


class VisualImportancePredictor(nn.Module):
    """(per-head glimpse scores [B, Nv, H], ViT taps [B, Nv, C] each) -> keep logits [B, Nv]."""

    def __init__(self, heads: int, vit_dim: int, n_taps: int, width: int, n_visual: int) -> None:
        super().__init__()
        self.scores_in = nn.Sequential(nn.LayerNorm(heads), nn.Linear(heads, width))
        self.taps_in = nn.Linear(vit_dim * n_taps, width)
        self.position = nn.Parameter(torch.zeros(n_visual, width))
        self.block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(width, 1)

    def forward(self, head_scores: Tensor, taps: list[Tensor]) -> Tensor:
        x = self.scores_in(head_scores.float()) + self.taps_in(torch.cat(taps, dim=-1).float()) + self.position
        return self.head(self.block(x)).squeeze(-1)


def _budget(n_visual: int, ratio: float | None) -> int:
    return 0 if ratio is None else max(1, math.ceil(ratio * n_visual))


def _max_len(prefix_len: int, n_visual: int, max_keep: int) -> int | None:
    """Static compacted length when the keep count is capped: no host sync."""
    return prefix_len - n_visual + max_keep if max_keep > 0 else None


class GlimpsePruner(nn.Module):
    def __init__(self, model: LVLM, threshold: float | None = 0.5, max_keep_ratio: float | None = 0.1, min_keep: int = 1) -> None:
        super().__init__()
        c = model.config
        self.glimpse = GlimpseToken(c.hidden, c.prune_layer)
        self.vip = VisualImportancePredictor(c.heads, c.vit_dim, c.vit_layers, c.vip_width, c.visual_tokens)
        self.threshold, self.max_keep_ratio, self.min_keep = threshold, max_keep_ratio, min_keep

    def _append_glimpse(self, h: Tensor, positions: Tensor, valid: Tensor):
        B = h.shape[0]
        h = torch.cat([h, self.glimpse.embedding(0).to(h.dtype).expand(B, 1, -1)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
        last = self.glimpse.rows.shape[0] - 1

        def inject(layer: int, h: Tensor) -> Tensor:
            if layer == 0 or layer > last:
                return h
            return torch.cat([h[:, :-1], h[:, -1:] + self.glimpse.embedding(layer).to(h.dtype)], dim=1)

        return h, positions, valid, inject

    def visual_logits(self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Prefix]:
        """(VIP logits [B, Nv], visual positions int64 [B, Nv], the prefix after layer K)."""
        prefix = model.run_prefix(images, input_ids, attention_mask, extra=self._append_glimpse)
        K, S, n_visual = model.config.prune_layer, input_ids.shape[1], model.config.visual_tokens
        glimpse_q = prefix.glimpse_q[:, :, -1:]  # the glimpse row at layer K, after RoPE
        logits = glimpse_scores(glimpse_q, prefix.caches[K][0], prefix.valid, None, "logits")  # [B, H, 1, S + 1]
        visual_index, _ = keep_index(prefix.visual, n_visual, "right")
        # torch.gather, not gather_tokens: training needs the gradient back to the glimpse.
        per_key = logits[:, :, 0, :S].transpose(1, 2)  # [B, S, H]
        head_scores = per_key.gather(1, visual_index[..., None].expand(-1, -1, per_key.shape[2]))  # [B, Nv, H]
        return self.vip(head_scores, prefix.taps), visual_index, prefix

    def prefill(self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor):
        vip_logits, visual_index, prefix = self.visual_logits(model, images, input_ids, attention_mask)
        B, S = input_ids.shape
        scores = torch.zeros(B, S, device=input_ids.device).scatter(1, visual_index, torch.sigmoid(vip_logits.float()))
        max_keep = _budget(model.config.visual_tokens, self.max_keep_ratio)
        return compact_and_finish(model, prefix, scores, self.threshold, max_keep, self.min_keep,
                                  _max_len(S, model.config.visual_tokens, max_keep))


class GlimpseTopK:
    """Training-free: keep the top ``budget`` visual tokens by head-averaged probabilities of
    the last prompt token's layer-K query (one ``glimpse_prune`` call)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def prefill(self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor):
        prefix = model.run_prefix(images, input_ids, attention_mask)
        K, S, n_visual = model.config.prune_layer, input_ids.shape[1], model.config.visual_tokens
        keys = [k for k, _ in prefix.caches]
        values = [v for _, v in prefix.caches]
        new_k, new_v, index, lengths, _ = glimpse_prune(
            prefix.glimpse_q[:, :, -1:], keys, values, prefix.valid, prefix.visual, K, None, None, self.budget, 1,
            _max_len(S, n_visual, self.budget), "left",
        )
        logits, state, info = finish_compacted(model, prefix, index, new_k, new_v)
        return logits, state, {**info, "lengths": lengths}


class RandomPruner:
    """Keep ``budget`` random visual tokens (the control: the task needs the right ones)."""

    def __init__(self, budget: int, generator: torch.Generator | None = None) -> None:
        self.budget, self.generator = budget, generator

    def prefill(self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor):
        prefix = model.run_prefix(images, input_ids, attention_mask)
        scores = torch.rand(input_ids.shape, generator=self.generator).to(input_ids.device)
        S = input_ids.shape[1]
        return compact_and_finish(model, prefix, scores, None, self.budget, 1, _max_len(S, model.config.visual_tokens, self.budget))


def dice_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """GlimpsePrune's mask loss: Dice + 0.1 BCE between keep logits and the target mask."""
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum(-1) + 1) / (p.sum(-1) + target.sum(-1) + 1)
    return dice.mean() + 0.1 * F.binary_cross_entropy_with_logits(logits, target)
