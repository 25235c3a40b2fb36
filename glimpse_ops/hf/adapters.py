"""Where things live in each supported HF model family (chosen by ``config.model_type``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "internvl", "llava", "llava_next", "llava_onevision")


@dataclass
class Adapter:
    """The pieces of one model instance the hooks attach to.

    ``multimodal``: the module called with ``input_ids`` and the 2-D ``attention_mask``
    (the text model below it only sees embeddings); ``layers``: the decoder layers;
    ``image_token_id``: the placeholder id of an image token; ``visual_token_ids``: the ids
    pruning chooses among (image, and video where the family has video inputs);
    ``apply_rope(q, k, cos, sin)``: the family's rotary function; head geometry for the
    glimpse row."""

    model_type: str
    multimodal: nn.Module
    text_model: nn.Module
    layers: nn.ModuleList
    image_token_id: int
    visual_token_ids: tuple[int, ...]
    apply_rope: Callable
    heads: int
    kv_heads: int
    head_dim: int
    attn_implementation: str


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a Qwen2.5-VL, Qwen2-VL, Qwen3-VL, InternVL, LLaVA, LLaVA-NeXT or
    LLaVA-OneVision ``...ForConditionalGeneration``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"glimpse_ops.hf: unsupported model {type(model).__name__} (config.model_type={model_type!r}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    multimodal = model.model
    text_model = multimodal.language_model
    text_config = config.text_config
    layers = text_model.layers
    attention = layers[0].self_attn
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    heads = text_config.num_attention_heads
    head_dim = getattr(attention, "head_dim", None) or text_config.hidden_size // heads
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = config.image_token_index
    video_token_id = getattr(config, "video_token_id", None)
    visual = (int(image_token_id),) + (() if video_token_id is None else (int(video_token_id),))
    return Adapter(
        model_type=model_type,
        multimodal=multimodal,
        text_model=text_model,
        layers=layers,
        image_token_id=int(image_token_id),
        visual_token_ids=visual,
        apply_rope=rope,
        heads=heads,
        kv_heads=text_config.num_key_value_heads,
        head_dim=head_dim,
        attn_implementation=text_config._attn_implementation,
    )
