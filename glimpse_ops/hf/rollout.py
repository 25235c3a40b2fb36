"""Pruned rollouts for GlimpsePrune+'s GRPO stage, and the log-probabilities of their tokens.

* A keep set per prompt: ``box_keep`` (the data's ground-truth boxes rasterized onto each
  image's merged token grid, the official stage 1) or ``predictor_keep`` (a trained VIP's
  choice, the later official variant), bool [B, S] over the prompt: True where a visual token
  stays (non-visual positions are always kept).
* ``sample`` draws G completions per prompt from the pruned model: ``generate`` with the
  GlimpsePrune patch (``apply_glimpse_prune`` with ``ForcedSelection``: layer K compacts
  the caches to exactly the keep set), sampling at ``temperature`` with no top-k/top-p.
* ``completion_logps`` computes the completion tokens' log-probabilities with one plain forward
  over prompt + completion whose per-layer masks reproduce the pruned computation exactly:
  in layers 0..K the prompt rows see the whole prompt (the prefill ran them on it) and the
  completion rows do not see pruned visual tokens (they attended to the compacted caches);
  in layers K+1.. no row sees them. Positions are the original ones, as in decoding. The
  gradient flows through every layer (the policy's LoRA), unlike ``generate``.

Rows: N = B x G rollouts ordered prompt-major (rollout g of prompt b at b * G + g), the
layout ``grpo.group_advantages`` reads. The attention masks are 4-D: sdpa or eager only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import attention_mask
from ..ops import prune_kv
from .adapters import adapter_for
from .attention import additive_mask, require_additive_masks
from .prune_hooks import SelectionInputs


class ForcedSelection:
    """A ``selection`` for ``apply_glimpse_prune`` that keeps exactly ``keep`` (bool [B, S],
    set before each prefill): the visual tokens where it is True, every other position."""

    def __init__(self) -> None:
        self.keep: Tensor | None = None

    def __call__(self, x: SelectionInputs) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        if self.keep is None or self.keep.shape != x.visual.shape:
            shape = None if self.keep is None else tuple(self.keep.shape)
            raise RuntimeError(
                f"glimpse_ops.hf.rollout: the forced keep set {shape} does not match the prompt {tuple(x.visual.shape)}"
            )
        scores = self.keep.to(x.visual.device).float()
        keys, values, index, _, _ = prune_kv(
            scores, x.visual, x.keys, x.values, threshold=0.5, max_keep=0, min_keep=0, padding_side="left"
        )
        return keys, values, index, scores


def image_grids(model: nn.Module, prompt: dict) -> list[tuple[int, int]]:
    """Each image's merged token grid (h, w), in the prompt's order (Qwen: from
    ``image_grid_thw``; LLaVA-1.5 and single-tile InternVL: the square of ``image_seq_length``)."""
    model_type = model.config.model_type
    if model_type in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"):
        merge = model.config.vision_config.spatial_merge_size
        return [(h // merge, w // merge) for t, h, w in prompt["image_grid_thw"].tolist() for _ in range(t)]
    if model_type in ("llava", "internvl"):
        side = math.isqrt(model.config.image_seq_length)
        n = int((prompt["input_ids"] == adapter_for(model).image_token_id).sum()) // (side * side)
        return [(side, side)] * n
    raise TypeError(f"glimpse_ops.hf.rollout: box keep sets need the token grid of {model_type} images (not known)")


def box_token_mask(boxes: Sequence[Sequence[float]], grid: tuple[int, int]) -> Tensor:
    """bool [h, w]: the merged-grid tokens the boxes cover (normalized xyxy in [0, 1]), as the
    official ``get_ref_token_mask``: from int(x1 * w) to min(int(x2 * w), w - 1), inclusive."""
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    for box in boxes:
        if len(box) != 4 or not all(0.0 <= float(v) <= 1.0 for v in box) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"glimpse_ops.hf.rollout: a box must be normalized xyxy in [0, 1], got {list(box)}")
        x1, y1, x2, y2 = (float(v) for v in box)
        mask[int(y1 * h) : min(int(y2 * h), h - 1) + 1, int(x1 * w) : min(int(x2 * w), w - 1) + 1] = True
    return mask


def box_keep(model: nn.Module, prompt: dict, boxes: Sequence[Sequence[Sequence[float]]]) -> Tensor:
    """The keep set [B, S] of the data's boxes: ``boxes[i]`` the normalized boxes of image i
    of the batch (in prompt order); an image with no box keeps nothing but one token, its
    first (the official masks keep none; a sample with no visual token left is refused by
    the data filter there)."""
    grids = image_grids(model, prompt)
    if len(boxes) != len(grids):
        raise ValueError(f"glimpse_ops.hf.rollout: {len(grids)} images in the batch but boxes for {len(boxes)}")
    flat = []
    for image_boxes, grid in zip(boxes, grids):
        m = box_token_mask(image_boxes, grid).flatten()
        if not bool(m.any()):
            m[0] = True
        flat.append(m)
    visual = (prompt["input_ids"] == adapter_for(model).image_token_id) & prompt["attention_mask"].bool()
    keep = torch.zeros_like(visual)
    keep[visual] = torch.cat(flat).to(visual.device)
    return keep


def predictor_keep(model: nn.Module, predictor, prompt: dict, **keep_rule) -> Tensor:
    """The keep set [B, S] a trained VIP chooses (``apply_glimpse_prune(model, predictor,
    **keep_rule)``, eval mode, no gradient). Call it with the policy's adapter disabled for the
    official later variant (the VIP was trained on the base LLM)."""
    from .prune import pruned

    training = model.training
    model.eval()
    try:
        with pruned(model, predictor=predictor, **keep_rule) as handle, torch.no_grad():
            model(**prompt, use_cache=True, logits_to_keep=1)
            index, visual = handle.last_index, handle.last_visual
    finally:
        model.train(training)
    keep = torch.zeros_like(visual)
    rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
    kept = index >= 0
    keep[rows[kept], index[kept]] = True
    return keep & visual


def split_prompt(model: nn.Module, prompt: dict) -> list[dict]:
    """The B prompts of a batch as B batches of one, left padding dropped (Qwen families:
    pixel rows and grids by image; LLaVA-1.5 and single-tile InternVL: one pixel row per image)."""
    model_type = model.config.model_type
    ids, mask = prompt["input_ids"], prompt["attention_mask"].bool()
    image = adapter_for(model).image_token_id
    out = []
    if model_type in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"):
        if "pixel_values_videos" in prompt:
            raise TypeError("glimpse_ops.hf.rollout.split_prompt: video prompts are not split (use batched sampling)")
        merge = model.config.vision_config.spatial_merge_size**2
        grids = prompt["image_grid_thw"].tolist()
        image_i, row = 0, 0
        for b in range(ids.shape[0]):
            tokens, first_image, first_row = int((ids[b] == image).sum()), image_i, row
            while tokens > 0:
                t, h, w = grids[image_i]
                tokens -= t * h * w // merge
                row += t * h * w
                image_i += 1
            one = {k: v[b : b + 1, mask[b]] for k, v in prompt.items() if k in ("input_ids", "attention_mask",
                   "mm_token_type_ids")}  # fmt: skip
            one["pixel_values"] = prompt["pixel_values"][first_row:row]
            one["image_grid_thw"] = prompt["image_grid_thw"][first_image:image_i]
            out.append(one)
        return out
    if model_type in ("llava", "internvl"):
        per_image = model.config.image_seq_length
        image_i = 0
        for b in range(ids.shape[0]):
            n = int((ids[b] == image).sum()) // per_image
            one = {k: v[b : b + 1, mask[b]] for k, v in prompt.items() if k in ("input_ids", "attention_mask")}
            one["pixel_values"] = prompt["pixel_values"][image_i : image_i + n]
            image_i += n
            out.append(one)
        return out
    raise TypeError(f"glimpse_ops.hf.rollout.split_prompt: {model_type} prompts are not split (use batched sampling)")


@dataclass
class Rollouts:
    """G sampled completions per prompt, prompt-major (rollout g of prompt b at b * G + g)."""

    completion_ids: Tensor  # int64 [N, T] (generate pads after EOS with the pad or EOS id)
    sampler_logps: Tensor  # fp32 [N, T]: log-probabilities of the sampled tokens under the sampler
    kept_visual: Tensor  # int64 [N] visual tokens the prefill kept
    group_size: int


def sample(
    model: nn.Module,
    prompt: dict,
    keep: Tensor,
    group_size: int,
    max_new_tokens: int,
    layer: int | None = None,
    temperature: float = 1.0,
    generator_seed: int | None = None,
) -> Rollouts:
    """``group_size`` completions per prompt from the model pruned at ``layer`` (default the
    family's, as ``apply_glimpse_prune``) to ``keep``: one ``generate`` of the B prompts per
    rollout index, sampling at ``temperature`` with top-k and top-p off, in eval mode (no
    dropout), without gradients; the checkpoint's repetition penalty and n-gram ban are off, so
    the sampler is the policy (at ``temperature``). The visual placeholder ids are suppressed (a sampled image
    token would be read as an image slot by the next forward). ``sampler_logps`` are of the
    raw logits, as ``completion_logps``. ``generator_seed`` seeds torch's global RNG first."""
    from .prune import apply_glimpse_prune

    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    selection = ForcedSelection()
    selection.keep = keep
    training = model.training
    model.eval()
    handle = apply_glimpse_prune(model, layer=layer, threshold=None, max_keep_ratio=1.0, selection=selection)
    ids, logps, kept = [], [], []
    try:
        with torch.no_grad():
            for _ in range(group_size):
                out = model.generate(
                    **prompt, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    max_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
                    suppress_tokens=list(adapter_for(model).visual_token_ids),
                    repetition_penalty=1.0, no_repeat_ngram_size=0,  # a checkpoint's defaults would reshape it
                )  # fmt: skip
                completion = out.sequences[:, prompt["input_ids"].shape[1] :]
                logits = torch.stack(out.logits, dim=1).float() / temperature  # [B, T, V]
                ids.append(completion)
                logps.append(torch.log_softmax(logits, dim=-1).gather(-1, completion[..., None]).squeeze(-1))
                kept.append(handle.last_kept_visual.clone())
    finally:
        handle.remove()
        model.train(training)
    T = max(c.shape[1] for c in ids)
    ids = [F.pad(c, (0, T - c.shape[1]), value=pad_id(model)) for c in ids]
    logps = [F.pad(lp, (0, T - lp.shape[1])) for lp in logps]
    # [G, B, ...] -> prompt-major [B * G, ...]
    return Rollouts(
        torch.stack(ids, dim=1).flatten(0, 1),
        torch.stack(logps, dim=1).flatten(0, 1),
        torch.stack(kept, dim=1).flatten(0, 1),
        group_size,
    )


def pad_id(model: nn.Module) -> int:
    """What generate pads a finished completion with: the pad id, else the (first) EOS id."""
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    return int(pad[0] if isinstance(pad, (list, tuple)) else pad)


def sample_per_prompt(
    model: nn.Module,
    prompt: dict,
    keep: Tensor,
    group_size: int,
    max_new_tokens: int,
    layer: int | None,
    temperature: float,
    seed: int,
) -> Rollouts:
    """``sample`` one prompt at a time (``split_prompt``), each from a seed of ``seed`` and its
    own token ids and pixels: a prompt's rollouts do not depend on the batch it came in, so 2 ranks x b
    prompts sample what 1 process x 2b does."""
    parts = []
    mask = prompt["attention_mask"].bool()
    for b, one in enumerate(split_prompt(model, prompt)):
        content = zlib.crc32(one["input_ids"].cpu().numpy().tobytes())
        content = zlib.crc32(one["pixel_values"].detach().float().cpu().numpy().tobytes(), content)  # the image too
        own = (seed + content) % 2**63
        parts.append(sample(model, one, keep[b : b + 1, mask[b]], group_size, max_new_tokens, layer, temperature, own))
    T = max(p.completion_ids.shape[1] for p in parts)
    return Rollouts(
        torch.cat([F.pad(p.completion_ids, (0, T - p.completion_ids.shape[1]), value=pad_id(model)) for p in parts]),
        torch.cat([F.pad(p.sampler_logps, (0, T - p.sampler_logps.shape[1])) for p in parts]),
        torch.cat([p.kept_visual for p in parts]),
        group_size,
    )


def pruned_masks(valid: Tensor, pruned: Tensor, prompt_len: int) -> tuple[Tensor, Tensor]:
    """bool [B, 1, T, T] masks for layers 0..K and K+1.. over prompt + completion (valid,
    pruned bool [B, T]; pruned marks the visual tokens the prefill dropped): causal, no padding
    keys; completion rows never see pruned keys; in layers K+1.. no row does; every row sees
    itself (a pruned row's output is then finite and read by nobody)."""
    T = valid.shape[1]
    allowed = attention_mask(valid, T)
    rows = torch.arange(T, device=valid.device)
    diagonal = (rows[:, None] == rows[None, :])[None, None]
    hidden_key = pruned[:, None, None, :]
    completion_rows = (rows >= prompt_len)[None, None, :, None]
    early = (allowed & ~(completion_rows & hidden_key)) | diagonal
    late = (allowed & ~hidden_key) | diagonal
    return early, late


MODES = ("pruned", "input_pruned", "unpruned")


def completion_logps(
    model: nn.Module,
    prompt: dict,
    completion_ids: Tensor,
    keep: Tensor | None,
    layer: int,
    temperature: float = 1.0,
    mode: str = "pruned",
) -> Tensor:
    """Log-probabilities fp32 [B, T] of ``completion_ids`` [B, T] after ``prompt`` (B rows),
    with the gradients of whatever requires them. ``mode``: "pruned", the computation of the
    model pruned to ``keep`` [B, S] after ``layer`` (what ``sample`` ran); "input_pruned",
    the visual tokens outside ``keep`` hidden at every layer (as if removed from the input:
    the official reference for tokens 2..); "unpruned"."""
    if mode not in MODES:
        raise ValueError(f"glimpse_ops.hf.rollout.completion_logps: mode must be one of {MODES}, got {mode!r}")
    adapter = adapter_for(model)
    kind = require_additive_masks(adapter.attn_implementation, "glimpse_ops.hf.rollout.completion_logps")
    S = prompt["input_ids"].shape[1]
    ids = torch.cat([prompt["input_ids"], completion_ids], dim=1)
    valid = torch.cat([prompt["attention_mask"].bool(), torch.ones_like(completion_ids, dtype=torch.bool)], dim=1)
    inputs = dict(prompt, input_ids=ids, attention_mask=valid.long())
    if "mm_token_type_ids" in prompt:
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1)
    visual = torch.isin(prompt["input_ids"], torch.tensor(adapter.visual_token_ids, device=ids.device))
    hidden = torch.zeros_like(valid)
    if keep is not None and mode != "unpruned":
        hidden[:, :S] = visual & prompt["attention_mask"].bool() & ~keep
    early, late = pruned_masks(valid, hidden, S)
    if mode == "input_pruned":
        early = late
    if kind == "eager":
        dtype = next(model.parameters()).dtype
        early, late = additive_mask(early, dtype), additive_mask(late, dtype)
    masks = [early if i <= layer else late for i in range(len(adapter.layers))]

    def set_mask(i: int):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = masks[i]
            return args, kwargs

        return hook

    hooks = [lay.register_forward_pre_hook(set_mask(i), with_kwargs=True) for i, lay in enumerate(adapter.layers)]
    try:
        T = completion_ids.shape[1]
        logits = model(**inputs, use_cache=False, logits_to_keep=T + 1).logits[:, :T].float() / temperature
    finally:
        for h in hooks:
            h.remove()
    return torch.log_softmax(logits, dim=-1).gather(-1, completion_ids[..., None]).squeeze(-1)


def official_reference_logps(
    model: nn.Module, prompt: dict, completion_ids: Tensor, keep: Tensor, layer: int, temperature: float = 1.0
) -> Tensor:
    """The official stage 1's reference (call it with the adapter disabled): the first
    completion token unpruned, the others input-level pruned (``mode="input_pruned"``)."""
    first = completion_logps(model, prompt, completion_ids[:, :1], None, layer, temperature, mode="unpruned")
    rest = completion_logps(model, prompt, completion_ids, keep, layer, temperature, mode="input_pruned")
    return torch.cat([first, rest[:, 1:]], dim=1)
