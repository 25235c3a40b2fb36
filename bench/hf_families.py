"""The model families of ``bench/run.py --e2e --hf --model NAME``: for each, a random-weight
model at a preset ("small": a CPU-sized model; "7b_shapes": the family's ~7-8B geometry in
bf16, for GPUs) and inputs with a given number of visual tokens per sample.

LLaVA-NeXT / OneVision: the token count follows the image's tiling (a base tile, an r x c grid
of tiles, an image-newline token after each row of tokens), so their inputs take the grid whose
count is nearest the case's and the benchmark records the count it got (``anyres_grid``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

VISION_START, VISION_END = 151652, 151653
QWEN_IMAGE, QWEN_VIDEO, INTERNVL_IMAGE = 151655, 151656, 151667
LLAVA_NEXT_IMAGE, ONEVISION_IMAGE = 32000, 151646
ANYRES_MAX_GRID = 8  # image_grid_pinpoints: every r x c tile grid up to 8 x 8

SMALL_TEXT = dict(
    vocab_size=152064,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=9,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=32768,
)
TEXT_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
)


@dataclass(frozen=True)
class Family:
    build: Callable[[str], object]  # preset -> an untrained model (fp32, sdpa) on the current device
    inputs: Callable[..., dict]  # (visual, batch, text, generator, preset) -> CPU tensors
    image_token_id: int


def _qwen2_5_vl(preset: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if preset == "7b_shapes":
        text = {
            **TEXT_7B,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        }
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
    else:
        text = {
            **SMALL_TEXT,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
        }
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                      fullatt_block_indexes=[1])  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            **vision,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": 112,
        },
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen3_vl(preset: str):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if preset == "7b_shapes":  # Qwen3-VL-8B
        text = dict(TEXT_7B, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128)  # fmt: skip
        sections = [24, 20, 20]
        vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                      deepstack_visual_indexes=[8, 16, 24])  # fmt: skip
    else:
        text, sections = dict(SMALL_TEXT, head_dim=32), [4, 6, 6]
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                      deepstack_visual_indexes=[0, 1])  # fmt: skip
    rope = {"rope_type": "default", "mrope_section": sections, "mrope_interleaved": True, "rope_theta": 5e6}
    config = Qwen3VLConfig(
        text_config={**text, "rope_parameters": rope},
        vision_config={
            **vision,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "num_position_embeddings": 2304,
        },  # fmt: skip
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return Qwen3VLForConditionalGeneration(config)


def _qwen_inputs(patch: int) -> Callable:
    def inputs(visual: int, batch: int, text: int, g: torch.Generator, preset: str) -> dict:
        side = 2 * math.isqrt(visual)  # patches per side; 2x2 patches merge into one token
        words = torch.randint(1000, 100000, (batch, text), generator=g)
        image = torch.tensor([VISION_START] + [QWEN_IMAGE] * visual + [VISION_END]).expand(batch, -1)
        ids = torch.cat([image, words], dim=1)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch * side * side, 3 * 2 * patch * patch, generator=g),
            "image_grid_thw": torch.tensor([[1, side, side]] * batch),
            "mm_token_type_ids": (ids == QWEN_IMAGE).long(),
        }

    return inputs


def _internvl(preset: str):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    if preset == "7b_shapes":  # InternVL3-8B: InternViT-300M and a Qwen2.5-7B
        text, vision = TEXT_7B, dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096)  # fmt: skip
    else:
        text, vision = (
            SMALL_TEXT,
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
        )
    config = InternVLConfig(
        vision_config={**vision, "image_size": [448, 448], "patch_size": [14, 14]},
        text_config={**text, "model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
        image_token_id=INTERNVL_IMAGE,
        image_seq_length=256,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
    )
    return InternVLForConditionalGeneration(config)


def _internvl_inputs(visual: int, batch: int, text: int, g: torch.Generator, preset: str) -> dict:
    """Each sample's image as ``visual / 256`` tiles of 448 x 448 pixels (256 tokens each)."""
    if visual % 256:
        raise ValueError(f"bench --model internvl: visual tokens come in tiles of 256, got {visual}")
    tiles = visual // 256
    words = torch.randint(1000, 100000, (batch, text), generator=g)
    ids = torch.cat([torch.full((batch, visual), INTERNVL_IMAGE), words], dim=1)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch * tiles, 3, 448, 448, generator=g),
    }


# (tile pixels, patch pixels, vision tower) per any-resolution family and preset; 7B shapes:
# LLaVA-NeXT-7B (CLIP ViT-L/14-336 and a Llama-7B), LLaVA-OneVision-7B (SigLIP-400M/14-384, Qwen2-7B)
ANYRES_VISION = {
    ("llava_next", "7b_shapes"): (336, 14, dict(model_type="clip_vision_model", hidden_size=1024,
                                                intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)),
    ("llava_onevision", "7b_shapes"): (384, 14, dict(model_type="siglip_vision_model", hidden_size=1152,
                                                     intermediate_size=4304, num_hidden_layers=27,
                                                     num_attention_heads=16)),
    ("llava_next", "small"): (64, 8, dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=2)),
    ("llava_onevision", "small"): (64, 8, dict(model_type="siglip_vision_model", hidden_size=64,
                                               intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)),
}  # fmt: skip


def anyres_grid(family: str, preset: str, visual: int) -> tuple[int, int, int]:
    """(rows, cols, tokens): the tile grid whose packed image is nearest ``visual`` tokens. An
    image exactly the grid's size is not unpadded, so it packs side^2 base tokens, then
    (rows * side) rows of (cols * side) tokens each followed by an image-newline token."""
    tile, patch, _ = ANYRES_VISION[(family, preset)]
    side = tile // patch
    grids = [(r, c) for r in range(1, ANYRES_MAX_GRID + 1) for c in range(r, ANYRES_MAX_GRID + 1)]
    counts = {(r, c): side * side + r * side * (c * side + 1) for r, c in grids}
    r, c = min(grids, key=lambda g: (abs(counts[g] - visual), g))
    return r, c, counts[(r, c)]


def _anyres(family: str) -> Callable[[str], object]:
    def build(preset: str):
        from transformers import (
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
        )

        tile, patch, vision = ANYRES_VISION[(family, preset)]
        pinpoints = [[r * tile, c * tile] for r in range(1, ANYRES_MAX_GRID + 1)
                     for c in range(1, ANYRES_MAX_GRID + 1)]  # fmt: skip
        common = dict(
            vision_config={**vision, "image_size": tile, "patch_size": patch},
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full" if vision["model_type"] == "siglip_vision_model" else "default",
        )
        text = TEXT_7B if preset == "7b_shapes" else SMALL_TEXT
        if family == "llava_next":
            if preset == "7b_shapes":
                text = dict(text, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32)  # fmt: skip
            text = dict(text, vocab_size=32064, model_type="llama", rope_parameters={"rope_type": "default",
                                                                                     "rope_theta": 1e4})  # fmt: skip
            config = LlavaNextConfig(**common, text_config=text, image_token_index=LLAVA_NEXT_IMAGE)
            return LlavaNextForConditionalGeneration(config)
        text = dict(text, model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        # no downsampling of large grids (OneVision's default averages grids above 9 tiles' worth)
        config = LlavaOnevisionConfig(**common, text_config=text, image_token_index=ONEVISION_IMAGE,
                                      vision_aspect_ratio=f"anyres_max_{ANYRES_MAX_GRID**2}")  # fmt: skip
        return LlavaOnevisionForConditionalGeneration(config)

    def inputs(visual: int, batch: int, text: int, g: torch.Generator, preset: str) -> dict:
        tile = ANYRES_VISION[(family, preset)][0]
        rows, cols, tokens = anyres_grid(family, preset, visual)
        image = LLAVA_NEXT_IMAGE if family == "llava_next" else ONEVISION_IMAGE
        words = torch.randint(1000, 30000, (batch, text), generator=g)
        ids = torch.cat([torch.full((batch, tokens), image), words], dim=1)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 1 + rows * cols, 3, tile, tile, generator=g),
            "image_sizes": torch.tensor([[rows * tile, cols * tile]] * batch),
        }

    return build, inputs


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family(_qwen2_5_vl, _qwen_inputs(14), QWEN_IMAGE),
    "qwen3_vl": Family(_qwen3_vl, _qwen_inputs(16), QWEN_IMAGE),
    "internvl": Family(_internvl, _internvl_inputs, INTERNVL_IMAGE),
    "llava_next": Family(*_anyres("llava_next"), LLAVA_NEXT_IMAGE),
    "llava_onevision": Family(*_anyres("llava_onevision"), ONEVISION_IMAGE),
}
