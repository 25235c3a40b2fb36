"""glimpse-ops: fast kernels for dynamic visual-token pruning in vision-language models.

Importing this package defines the ops ``torch.ops.glimpse.<name>`` (see docs/DESIGN.md and the
typed wrappers below). It never fails because the C++ extension or Triton is missing:
those backends are then simply unavailable; ``python -m glimpse_ops.env`` says why.
"""

from ._triton_kernels_path import map_source_checkout_kernels

map_source_checkout_kernels()

from ._backend import HAS_NATIVE, REGISTRY  # noqa: E402
from .ops import (  # noqa: E402
    attention_column_scores,
    compact_kv,
    compact_kv_into,
    compact_kv_paged,
    gather_tokens,
    glimpse_prune,
    glimpse_scores,
    keep_index,
    prune_kv,
    select_tokens,
    soft_mask_attention,
)

__version__ = "0.1.0"

OPS = (
    "glimpse_scores",
    "attention_column_scores",
    "select_tokens",
    "keep_index",
    "gather_tokens",
    "compact_kv",
    "compact_kv_paged",
    "prune_kv",
    "glimpse_prune",
    "soft_mask_attention",
)


def available_backends(op: str, device_type: str = "cpu") -> list[str]:
    """The backends that can run ``op`` on ``device_type`` in this environment."""
    if op not in REGISTRY:
        raise ValueError(f"glimpse: op must be one of {', '.join(OPS)}, got {op!r}")
    return REGISTRY[op].available(device_type)


__all__ = [
    "HAS_NATIVE",
    "OPS",
    "available_backends",
    "attention_column_scores",
    "compact_kv",
    "compact_kv_into",
    "compact_kv_paged",
    "gather_tokens",
    "glimpse_prune",
    "glimpse_scores",
    "keep_index",
    "prune_kv",
    "select_tokens",
    "soft_mask_attention",
]
