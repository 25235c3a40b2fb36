"""What every patch of an HF model shares: the handle machinery (its hooks, one patch per
model, ``remove()``) and the readers and builders the pruning hooks use at a prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ops import gather_tokens
from ._compat import cache_kwarg
from .adapters import Adapter

PATCH_ATTR = "_glimpse_ops_patch"  # the model's current patch, so that no second one goes on top


@dataclass
class PatchHandle:
    """One patch of one model instance. Subclasses register hooks into ``hooks`` and undo
    anything else they changed in ``_restore``; ``remove()`` restores the model exactly."""

    model: nn.Module
    adapter: Adapter
    hooks: list = field(default_factory=list, kw_only=True)

    def claim(self, caller: str) -> None:
        """Mark the model as patched by this handle; refuse a model that already is."""
        ensure_unpatched(self.model, caller)
        setattr(self.model, PATCH_ATTR, self)

    def remove(self) -> None:
        """Remove every hook and whatever else the patch changed; idempotent."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self._restore()
        if getattr(self.model, PATCH_ATTR, None) is self:
            delattr(self.model, PATCH_ATTR)

    def _restore(self) -> None:
        """Undo what the subclass changed besides registering hooks."""


def ensure_unpatched(model: nn.Module, caller: str) -> None:
    """Refuse a model that carries a patch already (before any other check reads the model)."""
    if getattr(model, PATCH_ATTR, None) is not None:
        raise RuntimeError(f"glimpse_ops.hf.{caller}: the model is already patched; call remove() on its handle first")


def prefill_masks(adapter: Adapter, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
    """At the multimodal model's call: (visual bool [B, S] (image and video tokens that are
    not padding), valid bool [B, S]) for a prefill (empty cache, more than one new token), else
    None (a decode step)."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    cache = cache_kwarg(kwargs)
    if input_ids is None or input_ids.shape[1] < 2 or (cache is not None and cache.get_seq_length() > 0):
        return None
    mask = kwargs.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    ids = torch.tensor(adapter.visual_token_ids, device=input_ids.device)
    return torch.isin(input_ids, ids) & valid, valid


def vit_grid(args: tuple, kwargs: dict):
    """``grid_thw`` [n_images, 3] from the Qwen ViT's call (None when absent)."""
    return kwargs.get("grid_thw", args[1] if len(args) > 1 else None)


def gather_rope(table: Tensor, index: Tensor) -> Tensor:
    """cos/sin [B or 1, S, D] (or [3, B, S, D] on older Qwen layouts) gathered along S."""
    if table.dim() == 4:
        return torch.stack([gather_rope(t, index) for t in table])
    return gather_tokens(table.expand(index.shape[0], -1, -1), index, pad_value=0.0)
