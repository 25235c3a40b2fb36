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


# the ViT shape the tiny Qwen2.5-VL and Qwen3-VL share (2 blocks, 2x2 patches, 2x2 merge)
_QWEN_VIT = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=2,
    temporal_patch_size=2,
    spatial_merge_size=2,
)
_QWEN_IDS = dict(
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)


def _build(model_class, config, attn_implementation: str, seed: int):
    """``model_class(config)`` with the attention implementation, seeded weights, eval mode."""
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_class(config).eval()


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
            **_QWEN_VIT,
            window_size=8,
            fullatt_block_indexes=[1],
        ),
        **_QWEN_IDS,
    )
    return _build(Qwen2_5_VLForConditionalGeneration, config, attn_implementation, seed)


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
        **_QWEN_IDS,
    )
    return _build(Qwen2VLForConditionalGeneration, config, attn_implementation, seed)


def tiny_qwen3_vl(attn_implementation: str = "sdpa", seed: int = 0):
    """A random Qwen3VLForConditionalGeneration with the shapes of ``tiny_qwen2_5_vl`` (6 text
    layers with q/k norms, interleaved M-RoPE sections [2, 3, 3]; a 2-block ViT with 2x2
    patches whose blocks 0 and 1 feed DeepStack into text layers 0 and 1); same inputs."""
    require_transformers()
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config={
            **_TEXT,
            "head_dim": 16,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
            },
        },  # fmt: skip
        vision_config=dict(
            **_QWEN_VIT,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        **_QWEN_IDS,
    )
    return _build(Qwen3VLForConditionalGeneration, config, attn_implementation, seed)


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
    return _build(LlavaForConditionalGeneration, config, attn_implementation, seed)


def tiny_internvl(attn_implementation: str = "sdpa", seed: int = 0):
    """A random InternVLForConditionalGeneration: a 2-layer InternViT on 16x16 images in 2x2
    patches, pixel shuffle 0.5 (16 image tokens), a 6-layer Qwen2 (hidden 64, 4/2 heads)."""
    require_transformers()
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=[16, 16],
            patch_size=[2, 2],
        ),
        text_config={**_TEXT, "model_type": "qwen2"},
        image_token_id=IMAGE,
        image_seq_length=16,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )  # fmt: skip
    return _build(InternVLForConditionalGeneration, config, attn_implementation, seed)


_ANYRES = dict(
    vision_config=dict(
        model_type="clip_vision_model", image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
    ),
    image_token_id=IMAGE,
    image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    vision_feature_layer=-1,
    vision_feature_select_strategy="default",
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)  # fmt: skip


def tiny_llava_next(attn_implementation: str = "sdpa", seed: int = 0):
    """A random LlavaNextForConditionalGeneration: CLIP tiles of 16x16 pixels in 4x4 patches
    (16 tokens each), any-resolution grids up to 2x2 tiles with image-newline tokens, a 6-layer
    Qwen2 (hidden 64, 4/2 heads). Inputs: ``anyres_inputs``."""
    require_transformers()
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    config = LlavaNextConfig(**_ANYRES, text_config={**_TEXT, "model_type": "qwen2"})
    return _build(LlavaNextForConditionalGeneration, config, attn_implementation, seed)


def tiny_llava_onevision(attn_implementation: str = "sdpa", seed: int = 0):
    """A random LlavaOnevisionForConditionalGeneration with the shapes of ``tiny_llava_next``."""
    require_transformers()
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(**_ANYRES, text_config={**_TEXT, "model_type": "qwen2"}, video_token_id=VIDEO)
    return _build(LlavaOnevisionForConditionalGeneration, config, attn_implementation, seed)


# (height, width) in pixels of each sample's image: one tiled 2x2, one 1x2, then repeating
ANYRES_SIZES = [(30, 20), (16, 32), (32, 32)]


def anyres_inputs(batch: int = 1, text_lengths: list[int] | None = None, seed: int = 0, model=None) -> dict:
    """Inputs for ``tiny_llava_next`` / ``tiny_llava_onevision``: one image per sample of the
    sizes in ``ANYRES_SIZES`` (base tile + 4 grid tiles of pixels), as many image tokens as
    the model packs for it (base, tiles, image-newline tokens; counted with ``model``, by
    default a ``tiny_llava_next``), random text after it, left padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = text_lengths or [4] * batch
    sizes = torch.tensor([ANYRES_SIZES[b % len(ANYRES_SIZES)] for b in range(batch)])
    pixel_values = torch.randn(batch, 5, 3, 16, 16, generator=g)
    counter = model if model is not None else tiny_llava_next()
    with torch.no_grad():
        features = counter.model.get_image_features(pixel_values=pixel_values, image_sizes=sizes)
    counts = [len(f) for f in getattr(features, "pooler_output", features)]
    rows = [[BOS] + [IMAGE] * n + torch.randint(3, 200, (k,), generator=g).tolist() for n, k in zip(counts, lengths)]
    ids, mask = _left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask.long(), "pixel_values": pixel_values, "image_sizes": sizes}


def onevision_video_inputs(frames: int = 3, text_lengths: list[int] | None = None, seed: int = 0) -> dict:
    """Inputs for ``tiny_llava_onevision`` with an image and a video per sample: the image as in
    ``anyres_inputs``, then a video of ``frames`` 16x16 frames (4 tokens each after the model's
    2x2 pooling, and one image-newline token after the last frame), random text, left padding."""
    x = anyres_inputs(len(text_lengths or [4]), [0] * len(text_lengths or [4]), seed, tiny_llava_onevision())
    g = torch.Generator().manual_seed(seed + 1)
    lengths = text_lengths or [4]
    video = [VIDEO] * (frames * 4 + 1)
    rows = [[t for t in row.tolist() if t != PAD] + video + torch.randint(3, 200, (k,), generator=g).tolist()
            for row, k in zip(x["input_ids"], lengths)]  # fmt: skip
    ids, mask = _left_pad(rows)
    videos = torch.randn(len(rows), frames, 3, 16, 16, generator=g)
    return dict(x, input_ids=ids, attention_mask=mask.long(), pixel_values_videos=videos)


def _left_pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = torch.tensor(r)
    return ids, ids != PAD


def internvl_inputs(batch: int = 1, text_lengths: list[int] | None = None, seed: int = 0) -> dict:
    """Inputs for ``tiny_internvl``: one 16x16 image per sample (16 image tokens), random text."""
    return llava_inputs(batch, text_lengths, seed, image_tokens=16)


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


def qwen_video_inputs(
    videos: list[tuple[int, int, int]],
    text_lengths: list[int] | None = None,
    seed: int = 0,
    *,
    frames_apart: bool = False,
) -> dict:
    """Inputs for the tiny Qwen models with one video per sample: ``videos[b]`` = (t, h, w),
    t temporal patches (2 frames each) of h x w patches (even sides: t * h * w / 4 video
    tokens), then random text, left padding. ``frames_apart``: each temporal patch between
    its own vision start and end tokens, as Qwen3-VL's processor lays out a video (there with
    a timestamp before each); else one block, as Qwen2-VL and Qwen2.5-VL's."""
    g = torch.Generator().manual_seed(seed)
    lengths = text_lengths or [4] * len(videos)
    rows = []
    for (t, h, w), n_text in zip(videos, lengths):
        if h % 2 or w % 2:
            raise ValueError(f"qwen_video_inputs: frame sides must be even (2x2 merge), got {h}x{w}")
        frame = h * w // 4
        blocks = [[VISION_START] + [VIDEO] * frame + [VISION_END]] * t if frames_apart else [
            [VISION_START] + [VIDEO] * (t * frame) + [VISION_END]
        ]  # fmt: skip
        rows.append([BOS] + sum(blocks, []) + torch.randint(3, 200, (n_text,), generator=g).tolist())
    ids, mask = _left_pad(rows)
    return {
        "input_ids": ids,
        "attention_mask": mask.long(),
        "pixel_values_videos": torch.randn(sum(t * h * w for t, h, w in videos), 3 * 2 * 2 * 2, generator=g),
        "video_grid_thw": torch.tensor([list(v) for v in videos]),
        "mm_token_type_ids": 2 * (ids == VIDEO).long(),
    }


def qwen_training_batch(batch: int = 2, answer_length: int = 3, seed: int = 0, inputs=None) -> dict:
    """``qwen_inputs`` (or ``inputs``, a builder of the same signature, e.g.
    ``internvl_inputs``) plus random ``answer_ids`` [B, answer_length] (a train_glimpse batch)."""
    x = (inputs or qwen_inputs)(batch=batch, text_lengths=[2 + b for b in range(batch)], seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return {**x, "answer_ids": torch.randint(3, 200, (batch, answer_length), generator=g)}


def llava_inputs(batch: int = 1, text_lengths: list[int] | None = None, seed: int = 0, image_tokens: int = 64) -> dict:
    """Inputs for ``tiny_llava`` (and, with ``image_tokens=16``, ``tiny_internvl``): one 16x16
    image per sample (``image_tokens`` image tokens), random text, left padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = text_lengths or [4] * batch
    rows = [[BOS] + [IMAGE] * image_tokens + torch.randint(3, 200, (n,), generator=g).tolist() for n in lengths]
    ids, mask = _left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask.long(), "pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}


def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids 4..98) with the tiny models'
    special ids: <pad> 0, <s> 1, </s> 2, <unk> 3, <image> / <|image_pad|> 250, <|video_pad|>
    251, <|vision_start|> 252, <|vision_end|> 253. Left padding. Needs the tokenizers package."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    vocab.update({c: 4 + i for i, c in enumerate(string.printable[:95])})
    specials = {
        "<image>": IMAGE,
        "<|video_pad|>": VIDEO,
        "<|vision_start|>": VISION_START,
        "<|vision_end|>": VISION_END,
    }
    vocab.update(specials)
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=list(specials), padding_side="left",
    )  # fmt: skip


def save_tiny_llava(path, seed: int = 0) -> None:
    """``tiny_llava`` and a processor for it (``tiny_tokenizer`` + a 16x16 CLIP image
    processor; no torchvision needed) in a folder ``from_pretrained`` and ``AutoProcessor``
    load: a stand-in checkpoint for the training CLI's tests."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    model = tiny_llava(seed=seed)
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=2,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    processor.save_pretrained(path)
