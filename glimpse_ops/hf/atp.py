"""ATP (adaptive token pruning) on HF Qwen2.5-VL / Qwen2-VL / Qwen3-VL / InternVL / LLaVA instances
(the families its tests run; LLaVA-NeXT and OneVision are not tested with ATP).

The stages are ``glimpse_ops.atp_stage.ATPStage`` (redundancy from ``attention_column_scores``,
nested-grid spatial score, per-instance thresholds; see that module for the choices). The
text model's attention runs through a registered attention function, ``glimpse_atp``
(with ``sdpa_mask`` registered as its mask function; ``glimpse_atp_varlen`` with
``flash_attention_mask`` on a model loaded with a FlashAttention implementation), which the
handle switches on. Layers before the first stage run the model's own attention (sdpa, or the
FlashAttention kernel it was loaded with); from the first stage on, ATP's own attention runs
(the layers' keys differ in length and validity per sample):

* ``mode="train"``: from the first stage layer on, attention is ``soft_mask_attention``
  with the running keep weights (a stage multiplies in sigmoid(tau z) for the visual
  tokens); gradients reach the threshold MLPs; ``handle.kept`` holds the soft kept counts
  of the last forward and ``handle.budget_loss(keep_ratio=r)`` the budget term.
* ``mode="infer"``: at each stage ``prune_kv`` compacts that layer's cache and the layer's
  output hidden states are gathered; later layers run on the kept tokens with their
  original positions; each layer's cache keeps its own length and decoding masks each
  layer with its own validity.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import gather_tokens, prune_kv, soft_mask_attention
from ..atp_stage import TAU, ATPStage, spatial_scores
from ..layers import attention_mask
from ._compat import cache_kwarg, require_transformers
from .adapters import adapter_for
from .attention import require_attention_kind
from .patch import PatchHandle, ensure_unpatched, gather_rope, prefill_masks, vit_grid

ATTENTION_NAME = "glimpse_atp"
# the same with transformers' flash masks and kernel before the first stage; no "flash" in the name:
# transformers would take it for a FlashAttention kernel to load
FLASH_ATTENTION_NAME = "glimpse_atp_varlen"
_ATTENTION_ATTR = "_glimpse_ops_atp_handle"  # on each attention module: the handle its attention asks


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _atp_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    AttentionInterface.register(FLASH_ATTENTION_NAME, _atp_attention)
    AttentionMaskInterface.register(FLASH_ATTENTION_NAME, flash_attention_mask)


def _atp_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None, **kwargs
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    handle = getattr(module, _ATTENTION_ATTR, None)
    if handle is None or handle.state is None or module.layer_idx < handle.first:
        if handle is not None and handle.flash_config is not None:
            from transformers.integrations.flash_attention import flash_attention_forward

            as_loaded = _WithConfig(module, handle.flash_config)
            return flash_attention_forward(as_loaded, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return handle.attend(module.layer_idx, query, key, value, scaling), None


class _WithConfig:
    """An attention module as transformers' flash wrapper sees it, with another config: the
    wrapper loads the kernel named by ``module.config._attn_implementation``, which under ATP
    names ATP's attention function rather than the kernel the model was loaded with."""

    def __init__(self, module: nn.Module, config) -> None:
        self._module, self.config = module, config

    def __getattr__(self, name: str):
        return getattr(self._module, name)


@dataclass
class _State:
    """One prompt's running state (created at prefill, kept through decoding)."""

    valid: Tensor  # [B, S] for the current (possibly compacted) sequence
    visual: Tensor
    spatial: Tensor | None  # fp32 [B, S], filled at the first stage
    weight: Tensor | None = None  # soft keep weights [B, S] (train)
    weight_seen: dict = field(default_factory=dict)  # layer -> the weights it attended with (train)
    cos_sin: tuple | None = None  # position embeddings of the current sequence (infer)
    index: Tensor | None = None  # the latest stage's kept positions (infer)
    layer_valid: dict = field(default_factory=dict)  # per-layer key validity for decoding (infer)


@dataclass
class ATPHandle(PatchHandle):
    """Returned by ``apply_atp``; ``remove()`` restores the model exactly."""

    stages: nn.ModuleDict
    mode: str
    previous_attention: str
    flash_config: object = None  # under FlashAttention: a copy of the text config naming the loaded kernel
    state: _State | None = None
    cache: object = None
    grid: list | None = None
    kept: Tensor | None = None  # [B] visual tokens kept after the last stage (soft sums in train mode)
    kept_per_layer: list = field(default_factory=list)
    hard: bool = False  # train mode with 0/1 masks (z > 0): equals mode="infer" on the kept tokens

    @property
    def first(self) -> int:
        return min(int(k) for k in self.stages)

    def parameters(self):
        return self.stages.parameters()

    def budget_loss(self, target: float | None = None, *, keep_ratio: float | None = None) -> Tensor:
        """|mean kept fraction - keep_ratio| of the last training forward: the mean kept visual
        tokens over the mean visual tokens per sample, against ``keep_ratio`` (a fraction, as
        ``TrainConfig.keep_ratio``). ``target``, a token count (|mean kept - target| / Nv), is
        the old form: it works for this release with a DeprecationWarning."""
        n_visual = self.state.visual.sum(dim=1).float().mean()
        if (target is None) == (keep_ratio is None):
            raise ValueError("glimpse_ops.hf.ATPHandle.budget_loss: pass keep_ratio= (a fraction of the visual tokens)")
        if target is not None:
            warnings.warn(
                "glimpse_ops.hf.ATPHandle.budget_loss(target): a token count; pass keep_ratio= (a fraction) instead",
                DeprecationWarning,
                stacklevel=2,
            )
            return (self.kept.float().mean() - target).abs() / n_visual
        return (self.kept.float().mean() / n_visual - keep_ratio).abs()

    def _restore(self) -> None:
        for layer in self.adapter.layers:
            layer.self_attn.__dict__.pop(_ATTENTION_ATTR, None)
        self.model.set_attn_implementation({"text_config": self.previous_attention})
        self.state = None

    # --- prefill bookkeeping ------------------------------------------------------------------
    def _on_vit(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = vit_grid(args, kwargs)
        merge = self.model.config.vision_config.spatial_merge_size
        self.grid = None if grid is None else [(h // merge, w // merge) for _, h, w in grid.tolist()]

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        masks = prefill_masks(self.adapter, args, kwargs)
        if masks is None:
            return  # decoding: keep the prompt's state
        visual, valid = masks
        self.state = _State(valid=valid, visual=visual, spatial=None)
        self.kept_per_layer = []

    def _spatial(self, visual: Tensor) -> Tensor:
        """Spatial scores [B, S] at the visual positions (the ViT has run by the first stage)."""
        n = int(visual.sum())
        if self.adapter.model_type in ("llava", "internvl"):  # square images of image_seq_length tokens
            side = math.isqrt(self.model.config.image_seq_length)
            per_image = [(side, side)] * (n // (side * side))
        else:
            per_image = self.grid or []
        spatial_visual = torch.cat([spatial_scores(h, w) for h, w in per_image]) if per_image else torch.zeros(0)
        if spatial_visual.numel() != n:
            raise RuntimeError(
                f"glimpse_ops.hf.apply_atp: {n} image tokens but the image grids give {spatial_visual.numel()}"
            )
        spatial = torch.zeros(visual.shape, device=visual.device)
        spatial[visual] = spatial_visual.to(visual.device)
        return spatial

    def _before_layer(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            self.cache = cache_kwarg(kwargs)
            s = self.state
            if self.mode != "infer" or s is None or not _is_prefill(args, kwargs) or index < self.first:
                return None
            if index == self.first:
                s.cos_sin = kwargs["position_embeddings"]
                return None
            kwargs["position_embeddings"] = s.cos_sin  # the kept tokens' original positions
            kwargs["position_ids"] = None
            return args, kwargs

        return hook

    def _after_stage(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            s = self.state
            if self.mode != "infer" or s is None or s.index is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = gather_tokens(hidden, s.index, pad_value=0.0)
            s.index = None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    # --- attention ----------------------------------------------------------------------------
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scaling) -> Tensor:
        """[B, H, Sq, D] queries against this layer's keys -> [B, Sq, H, D] (HF's layout)."""
        s = self.state
        if s.spatial is None:
            s.spatial = self._spatial(s.visual)
        if self.mode == "train":
            if q.shape[2] != k.shape[2]:
                raise RuntimeError("glimpse_ops.hf.apply_atp: mode='train' runs whole sequences (no cache reuse)")
            if s.weight is None:
                s.weight = torch.ones(s.visual.shape, device=q.device)
            # Activation checkpointing calls a layer again during backward, after later stages
            # changed s.weight: a second call of the same layer in one forward is that
            # recomputation and must see the weights this layer saw the first time.
            recomputing = layer in s.weight_seen
            weight = s.weight_seen.setdefault(layer, s.weight)
            if str(layer) in self.stages:
                z, _ = self.stages[str(layer)](q, k, s.valid, s.visual, s.visual & (weight > 0.5), s.spatial)
                mask = (z > 0).float() if self.hard else torch.sigmoid(TAU * z)
                weight = weight * torch.where(s.visual, mask, torch.ones_like(z))
            kept = (weight * s.visual).sum(dim=1)  # also when recomputing: the same saved tensors
            if not recomputing:
                s.weight, self.kept = weight, kept
                self.kept_per_layer.append(kept)
            out = soft_mask_attention(q, k, v, weight.to(q.dtype), s.valid, causal=True, scale=scaling)
            return out.transpose(1, 2)
        if q.shape[2] == 1 and k.shape[2] > 1 and layer in s.layer_valid:  # decoding
            valid = torch.cat([s.layer_valid[layer], torch.ones_like(s.layer_valid[layer][:, :1])], dim=1)
            s.layer_valid[layer] = valid
            return _sdpa(q, k, v, valid[:, None, None, :], scaling)
        if str(layer) in self.stages:
            # Prune this layer's keys and values; every incoming row still gets an output
            # (the layer's forward hook then keeps the rows of the kept tokens).
            z, _ = self.stages[str(layer)](q, k, s.valid, s.visual, s.visual, s.spatial)
            scores = torch.where(s.visual, z, torch.zeros_like(z))
            (k,), (v,), index, _, _ = prune_kv(
                scores, s.visual, [k], [v], threshold=0.0, max_keep=0, min_keep=0, max_len=None, padding_side="left"
            )
            cache_layer = self.cache.layers[layer]
            cache_layer.keys, cache_layer.values = k, v
            S = q.shape[2]
            rows = torch.arange(S, device=q.device)[:, None]
            key_valid = gather_tokens(s.valid, index, pad_value=False)
            allowed = (key_valid[:, None, :] & (index[:, None, :] <= rows)) | (index[:, None, :] == rows)
            s.index = index
            s.valid, s.visual = key_valid, gather_tokens(s.visual, index, pad_value=False)
            s.spatial = gather_tokens(s.spatial, index, pad_value=0.0)
            cos, sin = s.cos_sin
            s.cos_sin = (gather_rope(cos, index), gather_rope(sin, index))
            s.layer_valid[layer] = s.valid
            self.kept = s.visual.sum(dim=1)
            self.kept_per_layer.append(self.kept)
            return _sdpa(q, k, v, allowed[:, None], scaling)
        allowed = attention_mask(s.valid, k.shape[2])
        s.layer_valid[layer] = s.valid
        self.kept_per_layer.append(s.visual.sum(dim=1))
        return _sdpa(q, k, v, allowed, scaling)


def _is_prefill(args: tuple, kwargs: dict) -> bool:
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.shape[1] > 1


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scaling) -> Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def apply_atp(
    model: nn.Module, layers: tuple[int, ...], mode: str = "infer", stages: nn.ModuleDict | None = None
) -> ATPHandle:
    """Patch a Qwen2.5-VL / Qwen2-VL / Qwen3-VL / InternVL / LLaVA instance with ATP stages at the given decoder
    ``layers``. ``mode``: "train" (soft masks, differentiable) or "infer" (hard pruning).
    ``stages`` reuses trained stages (``handle.stages`` of an earlier handle). Returns a
    handle whose ``remove()`` restores the model."""
    require_transformers()
    if mode not in ("train", "infer"):
        raise ValueError(f"glimpse_ops.hf.apply_atp: mode must be 'train' or 'infer', got {mode!r}")
    ensure_unpatched(model, "apply_atp")
    adapter = adapter_for(model)
    n_layers = len(adapter.layers)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(
            f"glimpse_ops.hf.apply_atp: layers must be increasing decoder layers in [0, {n_layers}), got {layers}"
        )
    if adapter.model_type in ("llava_next", "llava_onevision"):
        raise TypeError(
            f"glimpse_ops.hf.apply_atp: {adapter.model_type} is not supported: ATP's spatial scores need each "
            "image's token grid, and any-resolution layouts (tiles, image-newline tokens) have none yet"
        )
    deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())
    if mode == "infer" and layers[0] < deepstack:
        raise ValueError(
            f"glimpse_ops.hf.apply_atp: Qwen3-VL adds DeepStack features to the visual tokens after its first "
            f"{deepstack} layers; a hard-pruning stage must come at layer {deepstack} or later, got {layers[0]}"
        )
    if stages is None:
        device = next(model.parameters()).device
        stages = nn.ModuleDict({str(layer): ATPStage(layer) for layer in layers}).to(device)
    elif sorted(int(k) for k in stages) != list(layers):
        raise ValueError(
            f"glimpse_ops.hf.apply_atp: the given stages are for layers {sorted(int(k) for k in stages)}, not {layers}"
        )
    kind = require_attention_kind(adapter.attn_implementation, "glimpse_ops.hf.apply_atp")
    _register_attention()
    handle = ATPHandle(model, adapter, stages, mode, adapter.attn_implementation)
    if kind == "flash":
        handle.flash_config = copy.copy(adapter.layers[0].self_attn.config)
    handle.claim("apply_atp")
    model.set_attn_implementation({"text_config": FLASH_ATTENTION_NAME if kind == "flash" else ATTENTION_NAME})
    for layer in adapter.layers:
        layer.self_attn.__dict__[_ATTENTION_ATTR] = handle
    handle.hooks.append(adapter.multimodal.register_forward_pre_hook(handle._on_multimodal, with_kwargs=True))
    visual = getattr(model.model, "visual", None)
    if visual is not None:
        handle.hooks.append(visual.register_forward_pre_hook(handle._on_vit, with_kwargs=True))
    for index, layer in enumerate(adapter.layers):
        handle.hooks.append(layer.register_forward_pre_hook(handle._before_layer(index), with_kwargs=True))
        if str(index) in stages:
            handle.hooks.append(layer.register_forward_hook(handle._after_stage(index), with_kwargs=True))
    return handle
