"""GlimpsePrune with a trained glimpse token and VIP inside vLLM's Qwen2.5-VL: the same
computation as ``glimpse_ops.hf``'s predictor hooks, on vLLM's flattened rows.

The glimpse is one extra token after each prompt (at the last prompt position + 1 on every
M-RoPE axis). No prompt token attends to it (it comes last), so the prompt's pass through
layers 0..K is the same with or without it; the glimpse's own pass therefore runs afterwards,
for every pruning request of the step at once, over the prompt keys and values captured in
layers 0..K, and never touches the paged cache (it is dropped at the prune anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather

from ..glimpseprune import GlimpsePredictor, TrainedKeepRule
from ..glimpseprune.predictor import merged_raster, window_index
from .config import PREFIX


@dataclass
class ImageFeatures:
    """One image's ViT features at the predictor's levels (deep to shallow), each [n, C]
    (merge x merge groups averaged, raster order), and its merged grid (h, w)."""

    levels: list[Tensor]
    grid_hw: tuple[int, int]


def image_features(
    taps: dict[int, Tensor], grid_thw: Tensor, vision_config, levels: tuple[int, ...]
) -> list[ImageFeatures]:
    """Per image of one ViT call: ``taps`` holds each level's block output over the batch
    ([T, 1, C] or [T, C], window order); ``grid_thw`` int [I, 3]."""
    merge = vision_config.spatial_merge_size
    missing = [level for level in levels if level not in taps]
    if missing:
        raise RuntimeError(f"{PREFIX}: the ViT ran without the predictor's levels {missing} being seen")
    order = window_index(grid_thw.cpu(), merge, vision_config.window_size, vision_config.patch_size)
    order = order.to(taps[levels[0]].device)
    sizes = (grid_thw.prod(-1) // (merge * merge)).tolist()
    per_level = [merged_raster(taps[level], order, merge).split(sizes) for level in levels]
    return [
        ImageFeatures([level[i] for level in per_level], (h // merge, w // merge))
        for i, (_, h, w) in enumerate(grid_thw.tolist())
    ]


def glimpse_pass(
    layers: nn.ModuleList,
    predictor: GlimpsePredictor,
    keys: dict[int, Tensor],
    values: dict[int, Tensor],
    positions: Tensor,
    token: Tensor,
    valid: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The glimpse of every pruning row through layers 0..K (K = the predictor's score layer).

    ``keys`` / ``values``: layer -> [T, Hkv * D] post-RoPE keys and values of the step's
    tokens; ``positions``: [3, P] (or [P]) the glimpses' positions; ``token`` int [P, Smax]:
    the step token of each prompt slot (``valid`` bool [P, Smax] marks real ones).
    Returns the glimpse's layer-K query [P, H, 1, D] (post-RoPE), the layer-K keys with the
    glimpse's own key appended [P, Hkv, Smax + 1, D], and the matching valid mask."""
    K = predictor.config.score_layer
    P, longest = token.shape
    dtype = keys[0].dtype
    x = predictor.row_for_layer(0).to(dtype).expand(P, -1)
    valid = torch.cat([valid, valid.new_ones(P, 1)], dim=1)
    for index, layer in enumerate(layers[: K + 1]):
        row = predictor.row_for_layer(index) if index > 0 else None
        if row is not None:
            x = x + row.to(dtype)
        attn = layer.self_attn
        if getattr(attn, "qk_norm", False):
            raise NotImplementedError(f"{PREFIX}: a trained predictor on a decoder with q/k norms")
        qkv, _ = attn.qkv_proj(layer.input_layernorm(x))
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q = q.reshape(P, H, 1, D)
        layer_keys = torch.cat([keys[index][token].view(P, longest, Hkv, D), k.view(P, 1, Hkv, D)], dim=1)
        layer_keys = layer_keys.transpose(1, 2)
        if index == K:
            return q, layer_keys, valid
        layer_values = torch.cat([values[index][token].view(P, longest, Hkv, D), v.view(P, 1, Hkv, D)], dim=1)
        out = F.scaled_dot_product_attention(
            q, layer_keys, layer_values.transpose(1, 2), attn_mask=valid[:, None, None, :], scale=attn.scaling,
            enable_gqa=H != Hkv,
        )  # fmt: skip
        out, _ = attn.o_proj(out.reshape(P, H * D))
        x = x + out
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    raise AssertionError("unreachable: the score layer is below the depth")


def trained_keep(
    predictor: GlimpsePredictor,
    rule: TrainedKeepRule,
    glimpse: tuple[Tensor, Tensor, Tensor],
    visual: Tensor,
    images: list[ImageFeatures],
) -> Tensor:
    """bool [P, Smax]: the tokens each pruning row keeps (the release's rule over the VIP's
    keep probabilities). ``glimpse``: what ``glimpse_pass`` returned; ``visual`` bool
    [P, Smax]: image tokens; ``images``: the rows' images in prompt order."""
    q, keys, valid = glimpse
    sizes = [f.grid_hw[0] * f.grid_hw[1] for f in images]
    n_visual = int(visual.sum())
    if sum(sizes) != n_visual:
        raise RuntimeError(
            f"{PREFIX}: the ViT features of the step's images hold {sum(sizes)} tokens, the prompts {n_visual} "
            "image tokens; a trained predictor needs the ViT to run on pixel values (not image embeddings)"
        )
    head_scores = predictor.head_scores(q, keys, valid, visual)  # [N, H on this rank]
    if get_tensor_model_parallel_world_size() > 1:
        # ranks hold consecutive heads: gathered in rank order they are the model's head order,
        # and every rank runs the VIP on the same input, so every rank keeps the same tokens
        head_scores = tensor_model_parallel_all_gather(head_scores.contiguous(), dim=-1)
    levels = [torch.cat([f.levels[i] for f in images]) for i in range(len(predictor.config.vit_layers))]
    probs = predictor.keep_probs(predictor.vip(head_scores, levels, [f.grid_hw for f in images]))
    dtype = next(predictor.parameters()).dtype
    return rule.keep(probs, visual, sizes, dtype)
