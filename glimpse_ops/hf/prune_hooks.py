"""The hooks of training-free GlimpsePrune on a Hugging Face model instance (no HF class replaced).

At a prefill that holds image tokens (empty cache, more than one new token):

1. a pre-hook on the multimodal model records which positions are image tokens and the
   2-D attention mask;
2. at layer K, a pre-hook keeps the layer's ``position_embeddings`` and a hook on
   ``q_proj`` keeps the last prompt token's query (the glimpse, FastV style), rotated with
   the family's own RoPE;
3. after layer K runs, one ``glimpse_prune`` call scores every key with that row, keeps the
   top visual tokens per sample (head-averaged probabilities) and compacts the caches of
   layers 0..K in place (``cache.layers[l].keys/values``); the layer's output hidden states
   are gathered the same way;
4. pre-hooks on layers K+1.. swap in the compacted attention mask and the gathered
   ``position_embeddings`` (the kept tokens keep their original M-RoPE / RoPE positions);
5. during ``generate`` the 2-D attention mask of the next steps is replaced by the
   compacted one plus the new tokens; positions are left to generate, which continues at
   the original last position + 1.

Decode steps (a non-empty cache) pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..glimpseprune.settings import PruneSettings
from ..ops import gather_tokens
from ..ops import glimpse_prune as glimpse_prune_op
from ._compat import cache_kwarg
from .attention import layer_mask
from .patch import PatchHandle, gather_rope, prefill_masks


@dataclass
class _Prefill:
    """What one prefill carries from the hooks that record to the hooks that use it."""

    visual: Tensor  # bool [B, S]
    valid: Tensor  # bool [B, S]
    cos_sin: tuple[Tensor, Tensor] | None = None
    glimpse_q: Tensor | None = None  # [B, H, 1, D] after RoPE
    index: Tensor | None = None  # [B, L] kept positions, -1 pads
    mask: Tensor | None = None  # the mask for layers K+1.. (4-D; 2-D or None under flash)
    kept_visual: Tensor | None = None  # [B]


@dataclass
class SelectionInputs:
    """What a selection strategy gets at layer K of a prefill (see ``apply_glimpse_prune``)."""

    glimpse_q: Tensor  # [B, H, 1, D], the last prompt token's layer-K query after RoPE
    keys: list[Tensor]  # layers 0..K, [B, Hkv, S, D]
    values: list[Tensor]
    valid: Tensor  # bool [B, S], False for padding
    visual: Tensor  # bool [B, S], the image tokens (not padding)
    layer: int  # K, the index in ``keys`` the glimpse scores against
    head_dim: int
    threshold: float | None
    max_keep: Tensor | None  # int64 [B]: ceil(max_keep_ratio * Nv) per sample, None without a ratio
    min_keep: int


# -> (compacted keys and values of layers 0..K, index int64 [B, L] (-1 pads), scores fp32 [B, S])
Selection = Callable[[SelectionInputs], tuple[list[Tensor], list[Tensor], Tensor, Tensor]]


def glimpse_prune_selection(x: SelectionInputs) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """The default: one ``glimpse_prune`` call (head-averaged glimpse probabilities, top
    ``max_keep`` per sample, ``threshold`` on the probability, compaction of every layer)."""
    new_keys, new_values, index, _, scores = glimpse_prune_op(
        x.glimpse_q, x.keys, x.values, x.valid, x.visual, x.layer,
        threshold=x.threshold, max_keep=0 if x.max_keep is None else x.max_keep, min_keep=x.min_keep,
    )  # fmt: skip
    return new_keys, new_values, index, scores


@dataclass
class GlimpsePruneHandle(PatchHandle):
    """Returned by ``apply_glimpse_prune``; ``remove()`` restores the model exactly.
    ``settings``: the layer and the keep rule (``glimpseprune.PruneSettings``)."""

    settings: PruneSettings
    selection: Selection = glimpse_prune_selection
    attention: str = "sdpa"  # the kind of the text model's attention (attention.KINDS)
    prefill: _Prefill | None = None
    last_kept_visual: Tensor | None = None  # [B] visual tokens kept by the latest prefill
    last_index: Tensor | None = None  # [B, L] kept positions of the latest prefill
    last_scores: Tensor | None = None  # fp32 [B, S] head-averaged glimpse probabilities of the latest prefill
    last_visual: Tensor | None = None  # bool [B, S] the candidates of the latest prefill (image-newline tokens not)
    _compacted_valid: Tensor | None = None  # [B, L] bool, the latest compacted prompt's validity

    @property
    def layer(self) -> int:
        """K: the decoder layer after which the prompt is pruned."""
        return self.settings.layer

    def attach(self, after_layer_k: Callable | None = None) -> None:
        """Register every hook of the patch (the one place that does). ``after_layer_k``
        replaces the prune after layer K with the caller's forward hook (training reads the
        keep probabilities there and stops the forward): then nothing after layer K is hooked
        and ``generate`` is not wrapped."""
        a = self.adapter
        target = a.layers[self.layer]
        self.hooks += [
            a.multimodal.register_forward_pre_hook(self._on_multimodal, with_kwargs=True),
            target.register_forward_pre_hook(self._before_layer_k, with_kwargs=True),
            target.self_attn.q_proj.register_forward_hook(self._on_q_proj),
            target.register_forward_hook(after_layer_k or self._after_layer_k, with_kwargs=True),
        ]
        self._attach_inputs()
        if after_layer_k is not None:
            return
        self.hooks += [
            a.layers[i].register_forward_pre_hook(self._before_later_layer, with_kwargs=True)
            for i in range(self.layer + 1, len(a.layers))
        ]
        if getattr(a.multimodal, "image_newline", None) is not None:
            self.hooks.append(a.text_model.register_forward_pre_hook(self._keep_image_newlines, with_kwargs=True))
        self._wrap_generate_kwargs()
        self._wrap_deepstack()

    def _attach_inputs(self) -> None:
        """Hooks a subclass needs on the way to layer K (the trained predictor: ViT taps, the
        glimpse token)."""

    def _restore(self) -> None:
        self.model.__dict__.pop("_update_model_kwargs_for_generation", None)
        self.adapter.text_model.__dict__.pop("_deepstack_process", None)
        self.prefill = None

    def _wrap_deepstack(self) -> None:
        """Qwen3-VL adds ViT features to the visual tokens' hidden states after its first
        layers (DeepStack): after the prune, the kept tokens get theirs, at their new places."""
        text_model = self.adapter.text_model
        original = getattr(text_model, "_deepstack_process", None)
        if original is None:
            return
        handle = self

        def deepstack(hidden: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
            p = handle.prefill
            if p is not None and p.index is not None:  # compacted (its length may still equal S)
                B, S = visual_pos_masks.shape
                index = p.index.where(p.index >= 0, S)  # padding slots land in a column cut off below
                kept = torch.zeros(B, S + 1, dtype=torch.bool, device=index.device).scatter_(1, index, True)[:, :S]
                visual_embeds = visual_embeds[kept.to(visual_pos_masks.device)[visual_pos_masks]]
                visual_pos_masks = gather_tokens(visual_pos_masks, p.index, pad_value=False)
            return original(hidden, visual_pos_masks, visual_embeds)

        text_model._deepstack_process = deepstack

    # --- hooks ----------------------------------------------------------------------------
    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        masks = prefill_masks(self.adapter, args, kwargs)
        self.prefill = None if masks is None else _Prefill(*masks)

    def _keep_image_newlines(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """LLaVA-NeXT / OneVision: the image-newline embeddings that end each row of an image's
        tiles sit at image-token positions; they mark the layout, so they are never pruned
        (not candidates). They are the rows equal to the model's ``image_newline`` vector."""
        p = self.prefill
        embeds = kwargs.get("inputs_embeds")
        if p is None or embeds is None:
            return
        newline = self.adapter.multimodal.image_newline.to(embeds.device, embeds.dtype)
        p.visual = p.visual & ~(embeds == newline).all(dim=-1)

    def _before_layer_k(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.prefill is not None:
            self.prefill.cos_sin = kwargs["position_embeddings"]

    def _on_q_proj(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        p = self.prefill
        if p is None or p.cos_sin is None:
            return
        a = self.adapter
        B = output.shape[0]
        q = output[:, -1:].view(B, 1, a.heads, a.head_dim)  # the last prompt token
        q_norm = getattr(a.layers[self.layer].self_attn, "q_norm", None)  # Qwen3: RMSNorm per head before RoPE
        q = (q if q_norm is None else q_norm(q)).transpose(1, 2)
        cos, sin = p.cos_sin
        p.glimpse_q = a.apply_rope(q, q, cos[..., -1:, :], sin[..., -1:, :])[0]

    def _after_layer_k(self, module: nn.Module, args: tuple, kwargs: dict, output):
        p = self.prefill
        if p is None or p.glimpse_q is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        cache = cache_kwarg(kwargs)
        layers = [cache.layers[i] for i in range(self.layer + 1)]
        new_keys, new_values, index, scores = self._select_and_compact(
            p, [lay.keys for lay in layers], [lay.values for lay in layers]
        )
        for lay, k, v in zip(layers, new_keys, new_values):
            lay.keys, lay.values = k, v
        p.index = index
        valid = gather_tokens(p.valid, index, pad_value=False)
        p.kept_visual = gather_tokens(p.visual, index, pad_value=False).sum(dim=1)
        p.mask = layer_mask(valid, hidden.dtype, self.attention)
        cos, sin = p.cos_sin
        p.cos_sin = (gather_rope(cos, index), gather_rope(sin, index))
        self.last_kept_visual, self.last_index, self.last_scores = p.kept_visual, index, scores
        self.last_visual = p.visual
        self._compacted_valid = valid
        hidden = gather_tokens(hidden, index, pad_value=0.0)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _select_and_compact(self, p: _Prefill, keys: list[Tensor], values: list[Tensor]):
        """(compacted keys and values of layers 0..K, index [B, L], scores fp32 [B, S])."""
        rule = self.settings.rule
        inputs = SelectionInputs(p.glimpse_q, keys, values, p.valid, p.visual, self.layer, self.adapter.head_dim,
                                 rule.threshold, rule.caps(p.visual.sum(dim=1)), rule.min_keep)  # fmt: skip
        return self.selection(inputs)

    def _before_later_layer(self, module: nn.Module, args: tuple, kwargs: dict):
        p = self.prefill
        if p is None or p.index is None:
            return None
        kwargs["attention_mask"] = p.mask
        kwargs["position_embeddings"] = p.cos_sin
        kwargs["position_ids"] = None  # gapped ids must feed RoPE only (FA2 packing detection)
        return args, kwargs

    def _wrap_generate_kwargs(self) -> None:
        original = self.model._update_model_kwargs_for_generation
        handle = self

        def update(outputs, model_kwargs, *args, **kwargs):
            mask_before = model_kwargs.get("attention_mask")
            result = original(outputs, model_kwargs, *args, **kwargs)
            p = handle.prefill
            if p is not None and p.index is not None:
                # The prefill was compacted: from now on the mask indexes the compacted cache.
                valid = handle._compacted_valid
                if mask_before is not None and result.get("attention_mask") is not None:
                    grown = result["attention_mask"]
                    extra = grown[:, mask_before.shape[1] :]
                    result["attention_mask"] = torch.cat([valid.to(grown.dtype), extra], dim=1)
                elif mask_before is None and not bool(valid.all()):
                    # generate() drops an all-ones prompt mask; rows that kept fewer tokens than
                    # others still pad the compacted cache: a mask again, with the step's token
                    result["attention_mask"] = torch.cat([valid.long(), valid.new_ones(valid.shape[0], 1).long()], 1)
                handle.prefill = None
            return result

        self.model._update_model_kwargs_for_generation = update
