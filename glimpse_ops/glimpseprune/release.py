"""Reading predictors: the public GlimpsePrune release (``config.json`` + ``new_modules_gp.pt``)
for Qwen2.5-VL, and ``load_predictor`` / ``predictor_config`` for any of the forms a caller may
pass (a module, our ``.safetensors``, a release folder).

Every field of the release's ``Qwen2_5_VL_GPConfig`` that changes what inference computes is
either honored or refused with the field, its value and what this code supports. A missing
key takes the release class's own default, as the release's loader does (its
``save_pretrained`` writes only the values that differ from those defaults).

Honored: ``selected_layers`` (one layer), ``selected_visual_layers``, ``attn_fuse_size``,
``visual_cond_size``, ``attn_fuse_num_heads``, ``le_layers`` (row i is added before layer
``le_layers[i]``), ``rms_norm_eps`` (the glimpse's RMSNorm), ``use_attention_logits`` (raw
logits or log-softmax over the valid keys), ``deep_supervision`` (only the last head runs at
inference), ``reduce_threshold``, ``min_remain_num``, ``max_remain_ratio`` and
``fixed_remain_ratio`` (the keep rule's defaults). Without effect at inference:
``ori_attn_supervision``, ``le_dropout_prob``, ``attn_fuse_use_flash_attn`` (the same
attention through another kernel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .predictor import GlimpsePredictor, PredictorConfig

# The release class's defaults (transformers_gp/models/qwen2_5_vl/configuration.py).
RELEASE_DEFAULTS: dict[str, Any] = {
    "selected_layers": (),
    "use_attention_logits": False,
    "attn_fuse_size": 256,
    "selected_visual_layers": (8,),
    "visual_cond_size": 256,
    "attn_fuse_type": "AttnFuserV1",
    "attn_fuse_num_heads": 4,
    "attn_fuse_hidden_act": "silu",
    "attn_fuse_global": False,
    "deep_supervision": True,
    "le_layers": (0,),
    "le_length": 1,
    "le_norm_type": "rmsnorm",
    "reduce_threshold": 0.5,
    "use_ref_masks": False,
    "use_zero_masks": False,
    "reduce_layer": 1000,
    "min_remain_num": 1,
    "max_remain_ratio": None,
    "fixed_remain_ratio": None,
    "rms_norm_eps": 1e-05,
}

# field -> the only value this code computes with (any other is refused)
REQUIRED = {
    "attn_fuse_type": "AttnFuserV1",
    "attn_fuse_hidden_act": "silu",
    "attn_fuse_global": True,  # False: window attention in the VIP
    "le_length": 1,
    "le_norm_type": "rmsnorm",
    "use_ref_masks": False,  # reference masks instead of the VIP (an evaluation setting)
    "use_zero_masks": False,
}


def _refuse(field: str, value: Any, supported: str) -> ValueError:
    return ValueError(
        f"glimpse_ops.glimpseprune.load_release: the release's {field}={value!r} is not supported ({supported})"
    )


def release_setting(release: dict, field: str) -> Any:
    return release.get(field, RELEASE_DEFAULTS[field])


def predictor_config_from_release(release: dict, model: nn.Module) -> PredictorConfig:
    """The release's config dict -> a PredictorConfig for ``model`` (a Qwen2.5-VL), or a
    ValueError naming the first field this code cannot honor."""
    text, vision = model.config.text_config, model.config.vision_config
    for field, supported in REQUIRED.items():
        value = release_setting(release, field)
        if value != supported:
            raise _refuse(field, value, f"this code supports {supported!r} only")
    layers = list(release_setting(release, "selected_layers"))
    if len(layers) != 1:
        raise _refuse("selected_layers", layers, "one score layer is supported")
    score_layer = int(layers[0])
    n_layers = text.num_hidden_layers
    if not 0 <= score_layer < n_layers - 1:
        raise _refuse("selected_layers", layers, f"the layer must be in [0, {n_layers - 1})")
    reduce_layer = release_setting(release, "reduce_layer")
    if reduce_layer != score_layer:
        raise _refuse("reduce_layer", reduce_layer, f"the caches are compacted after the score layer {score_layer}")
    le_layers = tuple(int(x) for x in release_setting(release, "le_layers"))
    if 0 not in le_layers or len(set(le_layers)) != len(le_layers) or max(le_layers) >= n_layers:
        raise _refuse("le_layers", list(le_layers), f"distinct layers in [0, {n_layers}) including 0")
    vit_layers = tuple(int(x) for x in release_setting(release, "selected_visual_layers"))
    if not vit_layers:
        raise _refuse("selected_visual_layers", [], "at least one ViT level")
    heads = release.get("num_attention_heads", text.num_attention_heads)
    if heads != text.num_attention_heads:
        raise _refuse("num_attention_heads", heads, f"the model has {text.num_attention_heads}")
    anchors = release.get("anchor_positions")
    if anchors:
        raise _refuse("anchor_positions", anchors, "no forced corner tokens: null or []")
    keep = {field: release_setting(release, field) for field in ("max_remain_ratio", "fixed_remain_ratio")}
    for field, ratio in keep.items():
        if ratio is not None and not 0 < float(ratio) <= 1:
            raise _refuse(field, ratio, "a ratio in (0, 1] or null")
    return PredictorConfig(
        score_layer=score_layer,
        vit_layers=vit_layers,
        heads=text.num_attention_heads,
        hidden=text.hidden_size,
        vit_dim=vision.hidden_size,
        width=release_setting(release, "attn_fuse_size"),
        cond=release_setting(release, "visual_cond_size"),
        fuse_heads=release_setting(release, "attn_fuse_num_heads"),
        glimpse_layers=tuple(layer for layer in le_layers if layer <= score_layer),
        le_norm_eps=float(release_setting(release, "rms_norm_eps")),
        use_attention_logits=bool(release_setting(release, "use_attention_logits")),
        reduce_threshold=float(release_setting(release, "reduce_threshold")),
        min_remain_num=int(release_setting(release, "min_remain_num") or 0),
        max_remain_ratio=None if keep["max_remain_ratio"] is None else float(keep["max_remain_ratio"]),
        fixed_remain_ratio=None if keep["fixed_remain_ratio"] is None else float(keep["fixed_remain_ratio"]),
    )


def predictor_state_from_release(release: dict, modules: dict, config: PredictorConfig) -> dict[str, Tensor]:
    """The release's module dict (``attn_fuser``, ``learnable_embeddings``, ``le_proj``,
    ``le_norm``) -> a GlimpsePredictor state dict: the embedding rows of the layers up to the
    score layer (in ``le_layers`` order), the VIP without the intermediate heads of deep
    supervision (they do not run at inference) and without RoPE buffers."""
    for key in ("attn_fuser", "learnable_embeddings", "le_proj", "le_norm"):
        if key not in modules:
            raise ValueError(
                f"glimpse_ops.glimpseprune.load_release: the release's modules lack {key!r} (found {sorted(modules)})"
            )
    le_layers = [int(x) for x in release_setting(release, "le_layers")]
    embeddings = modules["learnable_embeddings"]
    if embeddings.shape[0] != len(le_layers):
        raise ValueError(
            f"glimpse_ops.glimpseprune.load_release: learnable_embeddings has {embeddings.shape[0]} rows, "
            f"le_layers lists {len(le_layers)}"
        )
    rows = [le_layers.index(layer) for layer in config.glimpse_layers]
    state = {"glimpse.learnable_embeddings": embeddings[rows]}
    state.update({f"glimpse.le_proj.{k}": v for k, v in modules["le_proj"].items()})
    state.update({f"glimpse.le_norm.{k}": v for k, v in modules["le_norm"].items()})
    last_head = f"attn_out_projs.{len(config.vit_layers) - 1}."
    for key, value in modules["attn_fuser"].items():
        if "rotary" in key or (key.startswith("attn_out_projs.") and not key.startswith(last_head)):
            continue
        state[f"vip.{key}"] = value
    return state


def load_release(folder: str | Path, model: nn.Module) -> GlimpsePredictor:
    """A GlimpsePredictor for ``model`` from a folder of the release (``config.json`` and
    ``new_modules_gp.pt``)."""
    folder = Path(folder)
    release = json.loads((folder / "config.json").read_text())
    modules = torch.load(folder / "new_modules_gp.pt", map_location="cpu", weights_only=True)
    return predictor_from_release(release, modules, model)


def predictor_from_release(release: dict, modules: dict, model: nn.Module) -> GlimpsePredictor:
    """The release's config dict and module dict -> a GlimpsePredictor (strict: every weight
    the predictor has must be in the release, and nothing else but what is skipped above)."""
    config = predictor_config_from_release(release, model)
    predictor = GlimpsePredictor(config)
    predictor.load_state_dict(predictor_state_from_release(release, modules, config), strict=True)
    return predictor


def _predictor_path(predictor, where: str) -> Path:
    path = Path(predictor)
    if path.is_dir() or (path.suffix == ".safetensors" and path.exists()):
        return path
    raise ValueError(
        f"{where}: predictor must be a GlimpsePredictor, a .safetensors file or a release folder, got {predictor!r}"
    )


def load_predictor(
    predictor, model: nn.Module, where: str = "glimpse_ops.hf.apply_glimpse_prune", adapter_checked: bool = False
) -> GlimpsePredictor:
    """A GlimpsePredictor from itself, a .safetensors file (``GlimpsePredictor.save``) or a
    folder of the GlimpsePrune release (``model``: anything with the model's ``config``). A
    GlimpsePrune+ folder (with a LoRA adapter beside the modules) is refused unless the caller
    has dealt with its adapter (``adapter_checked``): its modules need the adapter merged."""
    if isinstance(predictor, GlimpsePredictor):
        return predictor
    path = _predictor_path(predictor, where)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not adapter_checked:
        raise ValueError(
            f"{where}: {path} is a GlimpsePrune+ release: its glimpse modules were trained on the LLM with the "
            "LoRA adapter beside them merged, and lose accuracy without it (the official code's issue #7); write "
            "the merged checkpoint with `python -m glimpse_ops.hf.gp_plus --model BASE --release FOLDER --out OUT` "
            "and use OUT/glimpse with it (or apply_glimpse_prune(..., adapter='merge'))"
        )
    # built in fp32 whatever the default dtype (vLLM builds models under the model's dtype):
    # weights loaded into bf16 parameters would be rounded before any later cast
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return load_release(path, model) if path.is_dir() else GlimpsePredictor.load(path)
    finally:
        torch.set_default_dtype(previous)


def predictor_config(predictor, model: nn.Module, where: str) -> PredictorConfig:
    """The config of the predictor ``load_predictor`` would load, without reading its weights."""
    if isinstance(predictor, GlimpsePredictor):
        return predictor.config
    path = _predictor_path(predictor, where)
    if path.is_dir():
        return predictor_config_from_release(json.loads((path / "config.json").read_text()), model)
    return GlimpsePredictor.read_config(path)
