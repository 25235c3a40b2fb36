"""ATP-LLaVA (adaptive token pruning) on the reference LVLM.

ATP's code is not public; this follows the ATP-LLaVA paper. What this
module does, and the choices made where the sources are silent:

* **Stages.** An ``ATPStage`` sits at a chosen decoder layer l. It scores the visual tokens
  from layer l's own queries and keys (computed from the layer's input, before its
  attention), and the mask applies from layer l on. (ATP reads the preceding layer's
  attention; reading layer l's instead costs the same one ``attention_column_scores``
  pass and, in a late-fusion model, sees the first text->vision attention.) A stage's
  layer must be at or after ``config.text_sees_image_from``.
* **Redundancy score.** Head-averaged attention mass each visual key receives from the
  text rows (cross) and from the visual rows (self), each from ``attention_column_scores``
  (causal, padding and already-pruned keys excluded), each normalized to a share over the
  live visual tokens; their mean, divided by its maximum, lies in (0, 1].
* **Spatial score.** Uniform sampling at nested strides: a token on the stride-2^k grid
  (largest k) scores 2^k / 2^K, 2^K being the coarsest stride that fits the shorter
  side, so lowering the spatial threshold keeps a denser uniform subsample.
* **Thresholds.** Per instance from an MLP over four statistics of the shares (the
  normalized entropies and the maxima of the cross and self shares): (theta_r, theta_s) =
  sigmoid(MLP(.)).
* **Mask.** Kept if either criterion passes: with the margin z = max(red - theta_r,
  spatial - theta_s), the soft mask is sigmoid(tau z) (tau = 10) and the hard mask z > 0,
  so that the soft mask at w in {0, 1} is the hard one. Masks compound: a token's weight
  is the product over the stages so far; non-visual tokens always weigh 1. For scoring,
  a token whose running weight is at most 0.5 counts as pruned (exact at w in {0, 1}).
* **Training.** The weights enter every later layer's attention as a soft key mask
  (``soft_mask_attention``: P ~ w exp(s), renormalized), so the answer loss reaches the
  thresholds; a budget loss |mean kept - target| / Nv pulls the kept count toward a target.
  The LM may be frozen (default) or tuned.
* **Inference.** At each stage ``prune_kv`` selects (score z, threshold 0, the visual
  tokens as candidates) and compacts that layer's keys and values; hidden states, queries,
  positions and masks follow through ``gather_tokens``. Tokens pruned at a stage are gone
  from every later layer; each layer's cache keeps its own length, and decoding appends
  to every layer at the original last position + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import gather_tokens, prune_kv
from ..atp_stage import TAU, ATPStage, spatial_scores
from ..layers import rope
from .model import LVLM, DecodeState


class ATPPruner(nn.Module):
    """ATP stages at the given decoder layers (see the module docstring)."""

    def __init__(self, model: LVLM, layers: tuple[int, ...], width: int = 32) -> None:
        super().__init__()
        c = model.config
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"ATPPruner: layers must be a non-empty increasing tuple, got {layers}")
        if layers[0] < c.text_sees_image_from or layers[-1] >= c.layers:
            raise ValueError(
                f"ATPPruner: stage layers must lie in [{c.text_sees_image_from}, {c.layers}) "
                f"(text_sees_image_from .. layers - 1), got {layers}"
            )
        self.stages = nn.ModuleDict({str(layer): ATPStage(layer, width) for layer in layers})
        self.register_buffer("spatial_table", spatial_scores(c.grid), persistent=False)
        self.first = layers[0]

    def _front(self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor):
        """Layers before the first stage on the full prompt, plus the per-position cell ids."""
        p = model.run_prefix(images, input_ids, attention_mask, end=self.first)
        cell = torch.where(p.visual, p.visual.long().cumsum(dim=1) - 1, -1)
        return p.hidden, p.positions, p.valid, p.visual, cell, p.caches

    def _spatial(self, cell: Tensor) -> Tensor:
        return torch.where(cell >= 0, self.spatial_table[cell.clamp(min=0)], 0.0)

    def soft_forward(
        self,
        model: LVLM,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        hard: bool = False,
        soft_attention=None,
    ):
        """Training forward: every layer from the first stage on runs ``soft_mask_attention``
        with the running weights. ``hard`` uses the 0/1 masks (z > 0) instead of sigmoid(tau z);
        ``soft_attention`` replaces the op (same signature; the benchmark's peers).
        Returns (logits of the last slot [B, V], info: ``weights`` fp32 [B, S] after the last
        stage, ``kept`` fp32 [B] (sum of the visual weights), ``kept_per_layer`` fp32 [L, B])."""
        h, positions, valid, visual, cell, _ = self._front(model, images, input_ids, attention_mask)
        c = model.config
        cos, sin = rope(positions, c.head_dim, c.rope_theta)
        spatial = self._spatial(cell)
        weight = torch.ones(visual.shape, device=h.device)
        kept_per_layer = [visual.sum(dim=1).float()] * self.first
        for index in range(self.first, c.layers):
            layer = model.decoder.layers[index]
            q, k, v = layer.attn.project(layer.attn_norm(h), cos, sin)
            if str(index) in self.stages:
                z, _ = self.stages[str(index)](q, k, valid, visual, visual & (weight > 0.5), spatial)
                mask = (z > 0).float() if hard else torch.sigmoid(TAU * z)
                weight = weight * torch.where(visual, mask, torch.ones_like(mask))
            out, _ = layer.attn.attend(
                q, k, v, None, valid, None, key_weight=weight.to(q.dtype), soft_attention=soft_attention
            )
            h = layer.mlp(h + out)
            kept_per_layer.append((weight * visual).sum(dim=1))
        logits = model.decoder.logits(h[:, -1])
        kept = (weight * visual).sum(dim=1)
        return logits, {"weights": weight, "kept": kept, "kept_per_layer": torch.stack(kept_per_layer)}

    @torch.no_grad()
    def prefill(
        self, model: LVLM, images: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> tuple[Tensor, DecodeState, dict]:
        """Inference: hard pruning with ``prune_kv`` at every stage. Returns (logits of the
        last prompt slot [B, V], the decode state with per-layer cache lengths, info with
        ``kept_visual`` [B] after the last stage and ``kept_per_layer`` [L, B])."""
        h, positions, valid, visual, cell, caches = self._front(model, images, input_ids, attention_mask)
        c = model.config
        key_valid, key_visual = [valid] * self.first, [visual] * self.first
        kept_per_layer = [visual.sum(dim=1)] * self.first
        cos, sin = rope(positions, c.head_dim, c.rope_theta)
        for index in range(self.first, c.layers):
            layer = model.decoder.layers[index]
            q, k, v = layer.attn.project(layer.attn_norm(h), cos, sin)
            if str(index) in self.stages:
                z, _ = self.stages[str(index)](q, k, valid, visual, visual, self._spatial(cell))
                scores = torch.where(visual, z, torch.zeros_like(z))
                (k,), (v,), kept_index, _, _ = prune_kv(
                    scores, visual, [k], [v], threshold=0.0, max_keep=0, min_keep=0, max_len=None, padding_side="left"
                )
                h = gather_tokens(h, kept_index, pad_value=0.0)
                q = gather_tokens(q.transpose(1, 2), kept_index, pad_value=0.0).transpose(1, 2)
                positions = gather_tokens(positions, kept_index, pad_value=0)
                valid = gather_tokens(valid, kept_index, pad_value=False)
                visual = gather_tokens(visual, kept_index, pad_value=False)
                cell = gather_tokens(cell, kept_index, pad_value=-1)
                cos, sin = rope(positions, c.head_dim, c.rope_theta)
            out, kv = layer.attn.attend(q, k, v, None, valid)
            h = layer.mlp(h + out)
            caches.append(kv)
            key_valid.append(valid)
            key_visual.append(visual)
            kept_per_layer.append(visual.sum(dim=1))
        state = DecodeState(caches, key_valid, positions[:, -1] + 1, key_visual)
        info = {"kept_visual": visual.sum(dim=1), "kept_per_layer": torch.stack(kept_per_layer)}
        return model.decoder.logits(h[:, -1]), state, info


def budget_loss(kept: Tensor, target: float, n_visual: int) -> Tensor:
    """|mean kept visual tokens - target| / Nv (kept: soft counts [B])."""
    return (kept.mean() - target).abs() / n_visual


def answer_and_budget_loss(
    model: LVLM,
    atp: ATPPruner,
    images: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    answers: Tensor,
    target: float,
    budget_weight: float = 1.0,
) -> tuple[Tensor, dict]:
    """Cross entropy of the answer under the soft masks + budget_weight x budget_loss."""
    logits, info = atp.soft_forward(model, images, input_ids, attention_mask)
    loss = F.cross_entropy(logits, answers) + budget_weight * budget_loss(
        info["kept"], target, model.config.visual_tokens
    )
    return loss, info
