"""A compact reference LVLM in plain PyTorch, wired to the glimpse ops (GlimpsePrune).

``LVLM(tiny())`` is a ViT with a 2x2 patch merger and a decoder-only LM (RMSNorm, RoPE on
arbitrary position ids, GQA, SwiGLU, a per-layer KV cache); ``GlimpsePruner``,
``GlimpseTopK`` and ``RandomPruner`` prune its visual tokens once after layer K;
``ATPPruner`` prunes at several layers with learned per-instance thresholds (ATP-LLaVA).
"""

from .atp import ATPPruner
from .config import LVLMConfig, qwen2_5_vl_7b_shapes, tiny
from .glimpse import GlimpsePruner, GlimpseTopK, LVLMImportancePredictor, RandomPruner
from .model import LVLM, Compacted, DecodeState, Prefix
from .task import Batch, make_batch
from .train import evaluate, train_atp, train_glimpse_pruner, train_lvlm

__all__ = [
    "ATPPruner",
    "LVLM",
    "LVLMConfig",
    "DecodeState",
    "GlimpsePruner",
    "GlimpseTopK",
    "RandomPruner",
    "LVLMImportancePredictor",
    "Batch",
    "make_batch",
    "Compacted",
    "Prefix",
    "evaluate",
    "train_atp",
    "train_glimpse_pruner",
    "train_lvlm",
    "tiny",
    "qwen2_5_vl_7b_shapes",
]
