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

Differences from the paper, chosen for a 16-token toy:

* The VIP has one transformer block instead of four and a learned position table instead
  of 2D RoPE; it standardizes each head's glimpse logits over the visual tokens before its
  input projection. (A LayerNorm over the heads of each token, tried first, erased the
  per-token magnitude that marks the named cell; training then stalled near 60% hits.)
* Instead of the paper's LM loss through the glimpse, ``train_glimpse_pruner`` adds a cross
  entropy on the glimpse's own per-head logits over the visual tokens (``score_loss``).
  The toy LM is late-fusion (text sees the image only after layer K), so its layer-K text
  queries were never trained to match visual keys; this loss gives the glimpse a direct
  signal and cuts the steps to a perfect pick from ~5000 to ~2000.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import glimpse_prune, glimpse_scores, keep_index
from ..glimpseprune.keep_rule import ceil_caps
from ..layers import RMSNorm
from .model import LVLM, Compacted, DecodeState, Prefix


class LVLMGlimpseToken(nn.Module):
    """Rows [K + 1, d]: row 0 is the glimpse's input embedding, row l is added to its
    residual stream before layer l (deep-prompt injection), each through Linear + RMSNorm."""

    def __init__(self, hidden: int, prune_layer: int) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.randn(prune_layer + 1, hidden) * 0.02)
        self.proj, self.norm = nn.Linear(hidden, hidden), RMSNorm(hidden)

    def embedding(self, layer: int) -> Tensor:
        return self.norm(self.proj(self.rows[layer]))


class LVLMImportancePredictor(nn.Module):
    """(per-head glimpse scores [B, Nv, H], ViT taps [B, Nv, C] each) -> keep logits [B, Nv]."""

    def __init__(self, heads: int, vit_dim: int, n_taps: int, width: int, n_visual: int) -> None:
        super().__init__()
        self.scores_in = nn.Linear(heads, width)
        self.taps_in = nn.Linear(vit_dim * n_taps, width)
        self.position = nn.Parameter(torch.zeros(n_visual, width))
        self.block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(width, 1)

    def forward(self, head_scores: Tensor, taps: list[Tensor]) -> Tensor:
        s = head_scores.float()
        s = (s - s.mean(dim=1, keepdim=True)) / (s.std(dim=1, keepdim=True) + 1e-5)  # per head, over tokens
        x = self.scores_in(s) + self.taps_in(torch.cat(taps, dim=-1).float()) + self.position
        return self.head(self.block(x)).squeeze(-1)


def _budget(n_visual: int, ratio: float | None) -> int:
    """The training-free cap of ``glimpseprune.ceil_caps`` (0: no cap), as a Python int."""
    caps = ceil_caps(torch.tensor([n_visual]), ratio, min_keep=1)
    return 0 if caps is None else int(caps[0])


def _max_len(prefix_len: int, n_visual: int, max_keep: int) -> int | None:
    """Static compacted length when the keep count is capped: no host sync."""
    return prefix_len - n_visual + max_keep if max_keep > 0 else None


class GlimpsePruner(nn.Module):
    def __init__(
        self, model: LVLM, threshold: float | None = 0.5, max_keep_ratio: float | None = 0.1, min_keep: int = 1
    ) -> None:
        super().__init__()
        c = model.config
        self.glimpse = LVLMGlimpseToken(c.hidden, c.prune_layer)
        self.vip = LVLMImportancePredictor(c.heads, c.vit_dim, c.vit_layers, c.vip_width, c.visual_tokens)
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

    def glimpse_prefix(self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Prefix:
        """Layers 0..K on the prompt with the glimpse appended (and injected)."""
        return model.run_prefix(images, input_ids, attention_mask, extra=self._append_glimpse)

    def score_visual(self, model: LVLM, prefix: Prefix) -> tuple[Tensor, Tensor]:
        """The glimpse's layer-K logits over the visual keys: (per-head scores [B, Nv, H]
        fp32, visual positions int64 [B, Nv])."""
        K, n_visual = model.config.prune_layer, model.config.visual_tokens
        S = prefix.visual.shape[1]
        glimpse_q = prefix.glimpse_q[:, :, -1:]  # the glimpse row at layer K, after RoPE
        logits = glimpse_scores(
            glimpse_q, prefix.caches[K][0], prefix.valid, scale=None, normalize="logits"
        )  # [B, H, 1, S + 1]
        visual_index, _ = keep_index(prefix.visual, max_len=n_visual, padding_side="right")
        # torch.gather, not gather_tokens: training needs the gradient back to the glimpse.
        per_key = logits[:, :, 0, :S].transpose(1, 2)  # [B, S, H]
        return per_key.gather(1, visual_index[..., None].expand(-1, -1, per_key.shape[2])), visual_index

    def head_scores(
        self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor, Prefix]:
        """``glimpse_prefix`` then ``score_visual``: (head scores, visual positions, prefix)."""
        prefix = self.glimpse_prefix(model, images, input_ids, attention_mask)
        return (*self.score_visual(model, prefix), prefix)

    def visual_logits(
        self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, Tensor, Prefix]:
        """(VIP logits [B, Nv], visual positions int64 [B, Nv], the prefix after layer K)."""
        head_scores, visual_index, prefix = self.head_scores(model, images, input_ids, attention_mask)
        return self.vip(head_scores, prefix.taps), visual_index, prefix

    def keep_scores(self, vip_logits: Tensor, visual_index: Tensor, seq_len: int) -> Tensor:
        """VIP logits [B, Nv] -> keep probabilities fp32 [B, S] at the visual positions."""
        B = vip_logits.shape[0]
        return torch.zeros(B, seq_len, device=vip_logits.device).scatter(
            1, visual_index, torch.sigmoid(vip_logits.float())
        )

    def prune_prefix(self, model: LVLM, prefix: Prefix) -> Compacted:
        """The whole pruning step on a prefix: glimpse scores, VIP, selection, compaction."""
        head_scores, visual_index = self.score_visual(model, prefix)
        S, n_visual = prefix.visual.shape[1], model.config.visual_tokens
        scores = self.keep_scores(self.vip(head_scores, prefix.taps), visual_index, S)
        max_keep = _budget(n_visual, self.max_keep_ratio)
        return prefix.prune(scores, self.threshold, max_keep, self.min_keep, _max_len(S, n_visual, max_keep))

    def prefill(
        self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, DecodeState, dict]:
        """Pruned prefill: (logits of the last prompt slot [B, V], decode state, info)."""
        prefix = self.glimpse_prefix(model, images, input_ids, attention_mask)
        return self.prune_prefix(model, prefix).finish(model)


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
            prefix.glimpse_q[:, :, -1:],
            keys,
            values,
            prefix.valid,
            prefix.visual,
            K,
            scale=None,
            threshold=None,
            max_keep=self.budget,
            min_keep=1,
            max_len=_max_len(S, n_visual, self.budget),
            padding_side="left",
        )
        return prefix.gather(index, lengths, new_k, new_v).finish(model)


class RandomPruner:
    """Keep ``budget`` random visual tokens (the control: the task needs the right ones)."""

    def __init__(self, budget: int, generator: torch.Generator | None = None) -> None:
        self.budget, self.generator = budget, generator

    def prefill(self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor):
        prefix = model.run_prefix(images, input_ids, attention_mask)
        scores = torch.rand(input_ids.shape, generator=self.generator).to(input_ids.device)
        S = input_ids.shape[1]
        max_len = _max_len(S, model.config.visual_tokens, self.budget)
        return prefix.prune(scores, None, self.budget, 1, max_len).finish(model)


def score_loss(head_scores: Tensor, target_cell: Tensor) -> Tensor:
    """Cross entropy of each head's glimpse logits [B, Nv, H] over the visual tokens
    against the named cell [B], averaged over heads (see the module docstring)."""
    H = head_scores.shape[2]
    return F.cross_entropy(
        head_scores.float().permute(0, 2, 1).reshape(-1, head_scores.shape[1]), target_cell.repeat_interleave(H)
    )


def dice_bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """GlimpsePrune's mask loss: Dice + 0.1 BCE between keep logits and the target mask."""
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum(-1) + 1) / (p.sum(-1) + target.sum(-1) + 1)
    return dice.mean() + 0.1 * F.binary_cross_entropy_with_logits(logits, target)
