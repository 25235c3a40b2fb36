"""One module per op: schema, fake kernel, CPU/CUDA router, autograd and typed wrapper.

Importing this package defines every ``torch.ops.glimpse.<op>``.
"""

from .attention_column_scores import attention_column_scores
from .compact_kv import compact_kv, compact_kv_into
from .compact_kv_paged import compact_kv_paged
from .gather_tokens import gather_tokens
from .glimpse_prune import glimpse_prune
from .glimpse_scores import glimpse_scores
from .keep_index import keep_index
from .prune_kv import prune_kv
from .select_tokens import select_tokens
from .soft_mask_attention import soft_mask_attention

__all__ = [
    "glimpse_scores",
    "attention_column_scores",
    "select_tokens",
    "keep_index",
    "gather_tokens",
    "compact_kv",
    "compact_kv_into",
    "compact_kv_paged",
    "prune_kv",
    "glimpse_prune",
    "soft_mask_attention",
]
