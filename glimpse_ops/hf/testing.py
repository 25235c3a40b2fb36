"""Tiny random HF models and input builders for tests and docs (no processor, no download)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._compat import require_transformers

VOCAB = 256
IMAGE, VIDEO, VISION_START, VISION_END = 250, 251, 252, 253
BOS, EOS, PAD = 1, 2, 0

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)


def tiny_qwen2_5_vl(attn_implementation: str = "sdpa", seed: int = 0):
    """A random Qwen2_5_VLForConditionalGeneration: 6 text layers (hidden 64, 4/2 heads of
    dim 16, M-RoPE sections [2, 3, 3]), a 2-block ViT with 2x2 patches, fp32, eval mode."""
    require_transformers()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            **_TEXT,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        },
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=2,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=8,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen2_vl(attn_implementation: str = "sdpa", seed: int = 0):
    """A random Qwen2VLForConditionalGeneration with the same shapes as ``tiny_qwen2_5_vl``
    (Qwen2-VL's ViT: ``embed_dim`` is its width, ``hidden_size`` the LLM's); same inputs."""
    require_transformers()
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={
            **_TEXT,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        },
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=2,
            temporal_patch_size=2,
            spatial_merge_size=2,
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def tiny_llava(attn_implementation: str = "sdpa", seed: int = 0):
    """A random LlavaForConditionalGeneration: CLIP 16x16 images in 2x2 patches (64 image
    tokens), a 6-layer Llama (hidden 64, 4/2 heads), fp32, eval mode."""
    require_transformers()
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            image_size=16,
            patch_size=2,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        ),
        text_config={**_TEXT, "model_type": "llama"},
        image_token_id=IMAGE,
        image_seq_length=64,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def _left_pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = torch.tensor(r)
    return ids, ids != PAD


def qwen_inputs(batch: int = 1, grid: int = 8, text_lengths: list[int] | None = None, seed: int = 0) -> dict:
    """Inputs for ``tiny_qwen2_5_vl`` and ``tiny_qwen2_vl``: one image per sample of ``grid`` x ``grid`` patches
    (grid**2 / 4 image tokens), random text after it, left padding for unequal lengths."""
    return qwen_image_inputs([[(grid, grid)]] * batch, text_lengths, seed)


def qwen_image_inputs(
    images: list[list[tuple[int, int]]], text_lengths: list[int] | None = None, seed: int = 0
) -> dict:
    """Inputs for the tiny Qwen models with any images per sample: ``images[b]`` lists sample
    b's images as (h, w) in patches (even numbers: h * w / 4 image tokens each), each image
    between its vision start and end tokens, random text after them, left padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = text_lengths or [4] * len(images)
    rows = []
    for sample, n_text in zip(images, lengths):
        row = [BOS]
        for h, w in sample:
            if h % 2 or w % 2:
                raise ValueError(f"qwen_image_inputs: image sides must be even (2x2 merge), got {h}x{w}")
            row += [VISION_START] + [IMAGE] * (h * w // 4) + [VISION_END]
        rows.append(row + torch.randint(3, 200, (n_text,), generator=g).tolist())
    ids, mask = _left_pad(rows)
    grids = [[1, h, w] for sample in images for h, w in sample]
    return {
        "input_ids": ids,
        "attention_mask": mask.long(),
        "pixel_values": torch.randn(sum(h * w for _, h, w in grids), 3 * 2 * 2 * 2, generator=g),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": (ids == IMAGE).long(),
    }


def qwen_training_batch(batch: int = 2, answer_length: int = 3, seed: int = 0) -> dict:
    """``qwen_inputs`` plus random ``answer_ids`` [B, answer_length] (a train_glimpse batch)."""
    x = qwen_inputs(batch=batch, text_lengths=[2 + b for b in range(batch)], seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return {**x, "answer_ids": torch.randint(3, 200, (batch, answer_length), generator=g)}


def llava_inputs(batch: int = 1, text_lengths: list[int] | None = None, seed: int = 0) -> dict:
    """Inputs for ``tiny_llava``: one 16x16 image per sample (64 image tokens), random text."""
    g = torch.Generator().manual_seed(seed)
    lengths = text_lengths or [4] * batch
    rows = [[BOS] + [IMAGE] * 64 + torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]
    ids, mask = _left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask.long(), "pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
