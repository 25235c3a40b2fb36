"""ATP-LLaVA (adaptive token pruning) on the reference LVLM.

ATP's code is not public; ``research/peer_pruners.md`` lists what is known. What this
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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import attention_column_scores, gather_tokens, prune_kv
from .decoder import rope
from .model import LVLM, DecodeState

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
