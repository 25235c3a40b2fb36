"""Visual-token pruning on Hugging Face transformers models (``SUPPORTED_MODEL_TYPES``: Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA, LLaVA-NeXT, LLaVA-OneVision).

transformers is an optional extra (``pip install 'glimpse-ops[hf]'``, versions 5.17 to
5.25); importing ``glimpse_ops`` never imports it, and this package imports it only when a
patch is applied or a tiny test model is built.

    handle = glimpse_ops.hf.apply_glimpse_prune(model, max_keep_ratio=0.1)
    model.generate(**inputs)    # prefill keeps 10% of the visual tokens after layer ~2/3
    handle.remove()
"""

from ..glimpseprune import GlimpsePredictor, load_release
from . import gp_plus
from .adapters import SUPPORTED_MODEL_TYPES
from .atp import ATPHandle, apply_atp
from .grpo_step import GRPOConfig
from .lora import apply_lora, read_adapter
from .prune import apply_glimpse_prune, pruned
from .prune_hooks import GlimpsePruneHandle, SelectionInputs, glimpse_prune_selection
from .rewards import LLMJudge, exact_match
from .trainer import TrainConfig, Trainer, train_glimpse

__all__ = [
    "ATPHandle",
    "SUPPORTED_MODEL_TYPES",
    "apply_atp",
    "apply_lora",
    "gp_plus",
    "exact_match",
    "GRPOConfig",
    "LLMJudge",
    "read_adapter",
    "GlimpsePredictor",
    "GlimpsePruneHandle",
    "apply_glimpse_prune",
    "glimpse_prune_selection",
    "load_release",
    "pruned",
    "SelectionInputs",
    "TrainConfig",
    "Trainer",
    "train_glimpse",
]
