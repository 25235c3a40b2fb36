"""GlimpsePrune on a Hugging Face model instance, with hooks only (no HF class replaced).

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

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import gather_tokens
from .. import glimpse_prune as glimpse_prune_op
from ..lvlm.decoder import attention_mask
from ._compat import require_transformers
from .adapters import Adapter, adapter_for

_HANDLE_ATTR = "_glimpse_ops_handle"
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class _Prefill:
    """What one prefill carries from the hooks that record to the hooks that use it."""

    visual: Tensor  # bool [B, S]
    valid: Tensor  # bool [B, S]
    cos_sin: tuple[Tensor, Tensor] | None = None
    glimpse_q: Tensor | None = None  # [B, H, 1, D] after RoPE
    index: Tensor | None = None  # [B, L] kept positions, -1 pads
    mask: Tensor | None = None  # the 4-D mask for layers K+1..
    kept_visual: Tensor | None = None  # [B]


@dataclass
class GlimpsePruneHandle:
    """Returned by ``apply_glimpse_prune``; ``remove()`` restores the model exactly."""

    model: nn.Module
    adapter: Adapter
    layer: int
    threshold: float | None
    max_keep_ratio: float | None
    min_keep: int
    hooks: list = field(default_factory=list)
    prefill: _Prefill | None = None
    last_kept_visual: Tensor | None = None  # [B] visual tokens kept by the latest prefill
    last_index: Tensor | None = None  # [B, L] kept positions of the latest prefill
    last_scores: Tensor | None = None  # fp32 [B, S] head-averaged glimpse probabilities of the latest prefill
    _compacted_valid: Tensor | None = None  # [B, L] bool, the latest compacted prompt's validity

    def remove(self) -> None:
        """Remove every hook and the generate wrapper; idempotent."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.model.__dict__.pop("_update_model_kwargs_for_generation", None)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.prefill = None

    # --- hooks ----------------------------------------------------------------------------
    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        masks = prefill_masks(self.adapter, args, kwargs)
        self.prefill = None if masks is None else _Prefill(*masks)

    def _before_layer_k(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.prefill is not None:
            self.prefill.cos_sin = kwargs["position_embeddings"]

    def _on_q_proj(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        p = self.prefill
        if p is None or p.cos_sin is None:
            return
        a = self.adapter
        B = output.shape[0]
        q = output[:, -1:].view(B, 1, a.heads, a.head_dim).transpose(1, 2)  # the last prompt token
        cos, sin = p.cos_sin
        p.glimpse_q = a.apply_rope(q, q, cos[..., -1:, :], sin[..., -1:, :])[0]

    def _after_layer_k(self, module: nn.Module, args: tuple, kwargs: dict, output):
        p = self.prefill
        if p is None or p.glimpse_q is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        cache = kwargs["past_key_values"]
        layers = [cache.layers[i] for i in range(self.layer + 1)]
        new_keys, new_values, index, scores = self._select_and_compact(
            p, [lay.keys for lay in layers], [lay.values for lay in layers]
        )
        for lay, k, v in zip(layers, new_keys, new_values):
            lay.keys, lay.values = k, v
        p.index = index
        valid = gather_tokens(p.valid, index, pad_value=False)
        p.kept_visual = gather_tokens(p.visual, index, pad_value=False).sum(dim=1)
        p.mask = layer_mask(valid, hidden.dtype, self.adapter.attn_implementation)
        cos, sin = p.cos_sin
        p.cos_sin = (gather_rope(cos, index), gather_rope(sin, index))
        self.last_kept_visual, self.last_index, self.last_scores = p.kept_visual, index, scores
        self._compacted_valid = valid
        hidden = gather_tokens(hidden, index, pad_value=0.0)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _select_and_compact(self, p: _Prefill, keys: list[Tensor], values: list[Tensor]):
        """One ``glimpse_prune``: (compacted keys and values of layers 0..K, index [B, L],
        head-averaged glimpse probabilities fp32 [B, S])."""
        caps = None
        if self.max_keep_ratio is not None:
            caps = (
                torch.ceil(p.visual.sum(dim=1).double() * self.max_keep_ratio).long().clamp(min=min(1, self.min_keep))
            )
        new_keys, new_values, index, _, scores = glimpse_prune_op(
            p.glimpse_q,
            keys,
            values,
            p.valid,
            p.visual,
            self.layer,
            scale=None,
            threshold=self.threshold,
            max_keep=0 if caps is None else caps,
            min_keep=self.min_keep,
            max_len=None,
            padding_side="left",
        )
        return new_keys, new_values, index, scores

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
            if p is not None and p.index is not None and mask_before is not None and "attention_mask" in result:
                # The prefill was compacted: from now on the mask indexes the compacted cache.
                grown = result["attention_mask"]
                extra = grown[:, mask_before.shape[1] :]
                result["attention_mask"] = torch.cat([handle._compacted_valid.to(grown.dtype), extra], dim=1)
                handle.prefill = None
            return result

        self.model._update_model_kwargs_for_generation = update


def prefill_masks(adapter: Adapter, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
    """At the multimodal model's call: (visual bool [B, S] (image tokens that are not
    padding), valid bool [B, S]) for a prefill (empty cache, more than one new token), else
    None (a decode step)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = kwargs.get("past_key_values")
    if input_ids is None or input_ids.shape[1] < 2 or (cache is not None and cache.get_seq_length() > 0):
        return None
    mask = kwargs.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    return (input_ids == adapter.image_token_id) & valid, valid


def vit_grid(args: tuple, kwargs: dict):
    """``grid_thw`` [n_images, 3] from the Qwen ViT's call (None when absent)."""
    return kwargs.get("grid_thw", args[1] if len(args) > 1 else None)


def gather_rope(table: Tensor, index: Tensor) -> Tensor:
    """cos/sin [B or 1, S, D] (or [3, B, S, D] on older Qwen layouts) gathered along S."""
    if table.dim() == 4:
        return torch.stack([gather_rope(t, index) for t in table])
    return gather_tokens(table.expand(index.shape[0], -1, -1), index, pad_value=0.0)


def layer_mask(valid: Tensor, dtype: torch.dtype, implementation: str) -> Tensor:
    """The 4-D mask [B, 1, L, L] for the compacted prompt: causal, no padding keys, and
    each row sees itself (padding rows stay finite). bool for sdpa, additive for eager."""
    allowed = attention_mask(valid, valid.shape[1])
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def apply_glimpse_prune(
    model: nn.Module,
    predictor=None,
    layer: int | None = None,
    threshold: float | None = None,
    max_keep_ratio: float | None = None,
    min_keep: int = 1,
    _handle_class: type | None = None,
) -> GlimpsePruneHandle:
    """Patch one Qwen2.5-VL / Qwen2-VL / LLaVA model instance to prune its visual tokens
    after decoder layer ``layer`` at every prefill. Returns a handle whose ``remove()``
    restores the model.

    Training-free mode (``predictor=None``; ``layer`` defaults to about 2/3 of the depth):
    the last prompt token's layer-K query is the glimpse; visual tokens are ranked by its
    head-averaged attention probabilities and the top ``ceil(max_keep_ratio * Nv)`` per
    sample are kept (default ratio 0.1; ``threshold`` on that probability keeps fewer).

    Trained mode (Qwen2.5-VL): ``predictor`` is a ``GlimpsePredictor``, a ``.safetensors``
    file written by ``GlimpsePredictor.save``, or a folder of the GlimpsePrune release
    (``config.json`` + ``new_modules_gp.pt``). The layer is the predictor's; tokens with
    sigmoid(VIP) > ``threshold`` (default 0.5) are kept, at most ``floor(max_keep_ratio *
    Nv)``, at least ``min_keep``.

    ``threshold=None`` with ``max_keep_ratio=1.0`` keeps every token.
    """
    require_transformers()
    if getattr(model, _HANDLE_ATTR, None) is not None or getattr(model, "_glimpse_ops_atp_handle", None) is not None:
        raise RuntimeError(
            "glimpse_ops.hf.apply_glimpse_prune: the model is already patched; call remove() on its handle first"
        )
    adapter = adapter_for(model)
    if adapter.attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"glimpse_ops.hf.apply_glimpse_prune: attention implementation {adapter.attn_implementation!r} "
            "is not supported yet "
            f"(supported: {', '.join(SUPPORTED_ATTENTION)})"
        )
    if predictor is not None:
        from .predictor_hooks import PredictorPruneHandle, load_predictor

        if adapter.model_type != "qwen2_5_vl":
            raise TypeError(
                f"glimpse_ops.hf.apply_glimpse_prune: a trained predictor needs Qwen2.5-VL, got {adapter.model_type}"
            )
        predictor = load_predictor(predictor, model)
        if layer is not None and layer != predictor.config.score_layer:
            raise ValueError(
                "glimpse_ops.hf.apply_glimpse_prune: the predictor was trained for layer "
                f"{predictor.config.score_layer}, got layer={layer}"
            )
        layer = predictor.config.score_layer
        if threshold is None and max_keep_ratio is None:
            threshold = 0.5
        _handle_class = _handle_class or PredictorPruneHandle
    elif threshold is None and max_keep_ratio is None:
        max_keep_ratio = 0.1
    n_layers = len(adapter.layers)
    if layer is None:
        layer = max(0, math.ceil(2 * n_layers / 3) - 1)
    if not 0 <= layer < n_layers - 1:
        raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: layer must be in [0, {n_layers - 1}), got {layer}")
    if max_keep_ratio is not None and not 0 < max_keep_ratio <= 1:
        raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: max_keep_ratio must be in (0, 1], got {max_keep_ratio}")
    if min_keep < 0:
        raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: min_keep must be >= 0, got {min_keep}")
    handle = (_handle_class or GlimpsePruneHandle)(model, adapter, layer, threshold, max_keep_ratio, min_keep)
    target = adapter.layers[layer]
    handle.hooks += [
        adapter.multimodal.register_forward_pre_hook(handle._on_multimodal, with_kwargs=True),
        target.register_forward_pre_hook(handle._before_layer_k, with_kwargs=True),
        target.self_attn.q_proj.register_forward_hook(handle._on_q_proj),
        target.register_forward_hook(handle._after_layer_k, with_kwargs=True),
    ]
    handle.hooks += [
        adapter.layers[i].register_forward_pre_hook(handle._before_later_layer, with_kwargs=True)
        for i in range(layer + 1, n_layers)
    ]
    if predictor is not None:
        handle.predictor = predictor.to(next(model.parameters()).device)
        handle.attach_predictor_hooks(model)
    handle._wrap_generate_kwargs()
    setattr(model, _HANDLE_ATTR, handle)
    return handle


@contextmanager
def glimpse_prune(model: nn.Module, **kwargs) -> Iterator[GlimpsePruneHandle]:
    """``apply_glimpse_prune`` for the duration of a ``with`` block."""
    handle = apply_glimpse_prune(model, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
