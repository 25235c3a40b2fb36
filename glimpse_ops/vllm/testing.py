"""A tiny offline Qwen2.5-VL checkpoint (random weights, byte-level tokenizer, processor) that
both transformers and vLLM load from a folder, for tests and the CPU benchmark. No download.

vLLM's CPU attention takes head sizes 32, 64, 80, ... so the text model uses head_dim 32.
The tokenizer maps each UTF-8 byte to one token (ids 0..255) and adds Qwen's special tokens;
the chat template renders images as ``<|vision_start|><|image_pad|><|vision_end|>``.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB = 256 + len(SPECIAL_TOKENS)  # every id decodes

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """The printable character ByteLevel pre-tokenization uses for each byte 0..255: printable
    Latin-1 bytes stand for themselves, the others for 256, 257, ... in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Qwen2.5-VL-7B's text widths (its config.json): hidden 3584, 28 query / 4 KV heads of 128, MLP 18944
QWEN2_5_VL_7B_TEXT = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    "max_position_embeddings": 32768, "initializer_range": 0.02,
}  # fmt: skip


def write_tiny_qwen2_5_vl(
    folder: str | Path, seed: int = 0, layers: int = 6, window_size: int = 8, vit_width: int = 64, vit_heads: int = 2,
    text_geometry: dict | None = None, max_pixels: int = 256 * 256,
) -> Path:  # fmt: skip
    """Write a random Qwen2.5-VL (``layers`` text layers, hidden 128, 4/2 heads of dim 32,
    M-RoPE sections [4, 6, 6]; a 2-block ViT with 2x2 patches and 2x2 merge), its tokenizer,
    image processor and chat template to ``folder`` (``processor_config.json`` names the
    processor class, so ``AutoProcessor`` assembles it where torchvision is importable);
    returns the folder. fp32 weights, initializer_range 0.2 so
    greedy outputs vary. ``text_geometry`` overrides text-config keys (e.g.
    ``QWEN2_5_VL_7B_TEXT``, the 7B model's widths, for memory measurements); ``max_pixels`` is
    the image processor's (larger images are resized to it)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    if max(ids.values()) >= VOCAB:
        raise RuntimeError(f"write_tiny_qwen2_5_vl: the tokenizer needs {max(ids.values()) + 1} ids, VOCAB is {VOCAB}")
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "initializer_range": 0.2,
            "rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            **(text_geometry or {}),
        },
        vision_config=dict(
            depth=2,
            hidden_size=vit_width,
            intermediate_size=2 * vit_width,
            num_heads=vit_heads,
            out_hidden_size=(text_geometry or {}).get("hidden_size", 128),
            patch_size=2,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=window_size,
            fullatt_block_indexes=[1],
            initializer_range=0.2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(max_pixels).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text('{"processor_class": "Qwen2_5_VLProcessor"}\n')
    return folder


def image_processor(max_pixels: int = 256 * 256):
    """Qwen2.5-VL's image processor with 2x2 patches, 2 frames per temporal patch and a 2x2 merge
    (the PIL one: it needs no torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=4 * 4, max_pixels=max_pixels
    )


def random_image(width: int, height: int, seed: int):
    """A PIL RGB image of uniform random pixels (sides multiples of 4 need no resize)."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def chat_prompt(tokenizer, text: str, with_image: bool | int) -> str:
    """One user turn (``with_image`` image placeholders first: True is one) and the generation
    prompt, rendered with the checkpoint's chat template."""
    content = [{"type": "image"}] * int(with_image) + [{"type": "text", "text": text}]
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip


def _images(image) -> list:
    return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]


def hf_inputs(folder: str | Path, prompts: list[tuple[str, object | None]]) -> dict:
    """What ``Qwen2_5_VLProcessor`` gives for a batch of (text, PIL image, list of PIL images or
    None) chat prompts with the generation prompt, left-padded, built from the folder's
    tokenizer and image processor (so no video processor, hence no torchvision, is needed)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    images = [image for _, entry in prompts for image in _images(entry)]
    vision = image_processor()(images=images, return_tensors="pt") if images else {}
    grids = iter(vision["image_grid_thw"].tolist()) if images else iter(())
    rows = []
    for text, entry in prompts:
        count = len(_images(entry))
        pieces = chat_prompt(tokenizer, text, count).split("<|image_pad|>")
        rendered = pieces[0]
        for piece in pieces[1:]:
            t, h, w = next(grids)
            rendered += "<|image_pad|>" * (t * h * w // 4) + piece
        rows.append(tokenizer(rendered, add_special_tokens=False).input_ids)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = torch.tensor(row)
        mask[b, length - len(row) :] = 1
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # the processor's token types: transformers computes M-RoPE positions from them
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_pad).long()}
    if images:
        out |= {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
    return out


def record_shrinks() -> dict[str, int]:
    """From now on in this process, each prompt length the pruning scheduler shrinks a request
    to, by the scheduler's request id (for tests and scripts; an engine in this process)."""
    from . import scheduler

    shrunk: dict[str, int] = {}
    shrink = scheduler.GlimpsePruneScheduler._shrink

    def recording(self, request, kept_ids):
        shrunk[request.request_id] = len(kept_ids)
        return shrink(self, request, kept_ids)

    scheduler.GlimpsePruneScheduler._shrink = recording
    return shrunk
