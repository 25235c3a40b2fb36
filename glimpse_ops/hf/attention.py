"""The attention implementations the pruning patches run under, by the kind of mask transformers
hands them, and the mask of a compacted prompt in each kind.

* ``"sdpa"``: a 4-D bool mask [B, 1, Q, K];
* ``"eager"``: a 4-D additive mask (0 or the dtype's minimum);
* ``"flash"``: the 2-D padding mask [B, K] (None without padding), which transformers' flash
  path unpads into ``cu_seqlens`` for the varlen kernel: ``flash_attention_2``,
  ``flash_attention_3``, ``flash_attention_4`` and flash kernels of the ``kernels`` hub
  (``kernels-community/flash-attn2``, ... : what FA2/FA3 resolve to where the ``flash_attn``
  package is not installed), whatever is registered with transformers' flash wrapper and mask.

Others (``flex_attention``'s block masks, paged attention, custom functions) are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers import attention_mask

KINDS = ("sdpa", "eager", "flash")
SUPPORTED_TEXT = "sdpa, eager and FlashAttention (flash_attention_2/3/4 or a kernels-hub flash kernel)"


def attention_kind(implementation: str | None) -> str | None:
    """``"sdpa"``, ``"eager"`` or ``"flash"`` for an implementation pruning runs under, else None."""
    if implementation == "eager":
        return "eager"
    if not implementation:
        return None
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mask, attend = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation), ALL_ATTENTION_FUNCTIONS.get(implementation)
    if mask is sdpa_mask and attend is sdpa_attention_forward:
        return "sdpa"
    if mask is flash_attention_mask and attend is flash_attention_forward:
        return "flash"
    return None


def require_attention_kind(implementation: str | None, where: str) -> str:
    """The kind of ``implementation``; a ValueError naming it and the supported ones otherwise."""
    kind = attention_kind(implementation)
    if kind is None:
        named = "is not set" if implementation is None else f"{implementation!r} is not supported"
        raise ValueError(
            f"{where}: attention implementation {named} (supported: {SUPPORTED_TEXT}); "
            "load the model with attn_implementation='sdpa' or 'flash_attention_2'"
        )
    return kind


def require_additive_masks(implementation: str | None, where: str) -> str:
    """The kind of ``implementation`` for the glimpse trainer, whose soft mask is added to the
    attention logits: sdpa or eager; a ValueError with the way out otherwise."""
    kind = require_attention_kind(implementation, where)
    if kind == "flash":
        raise ValueError(
            f"{where}: the glimpse trainer adds a soft mask (log w on the visual keys) to the attention logits, "
            f"which FlashAttention cannot take; the model's text attention is {implementation!r}: load it with "
            "attn_implementation='sdpa' to train, or call model.set_attn_implementation('sdpa') before and "
            "model.set_attn_implementation('flash_attention_2') after (the trained predictor prunes under "
            "FlashAttention; mode='atp' trains under it too)"
        )
    return kind


def layer_mask(valid: Tensor, dtype: torch.dtype, kind: str) -> Tensor | None:
    """The mask of layers K+1.. for the compacted prompt (valid bool [B, L]): for sdpa and eager
    the 4-D [B, 1, L, L] (causal, no padding keys, each row sees itself so that padding rows
    stay finite), bool or additive; for flash the 2-D padding mask, None when no row pads
    (transformers then runs the dense kernel, as it does for an unpadded batch)."""
    if kind == "flash":
        return None if bool(valid.all()) else valid
    allowed = attention_mask(valid, valid.shape[1])
    if kind == "sdpa":
        return allowed
    return additive_mask(allowed, dtype)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as eager attention takes it: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
