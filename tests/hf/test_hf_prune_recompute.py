"""Training-free GlimpsePrune on every supported family, images and video, batched and
left-padded, against an explicit recomputation (``helpers.recompute_pruned``: the stock model
over prompt + generated tokens, no cache, with masks that say what the pruned model attends
to). Checks the kept tokens of layers K+1.. at their original positions, Qwen3-VL's DeepStack
injections reaching the kept tokens after the prune (K = 1 < the two DeepStack layers), and
one budget per sample across images and video frames."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, recompute_pruned

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402

STEPS, RATIO = 4, 0.3
# a generated image/video placeholder would read as a missing visual feature in the recomputation
SPECIAL = [testing.IMAGE, testing.VIDEO, testing.VISION_START, testing.VISION_END]
TOLERANCES = {torch.float32: (1e-4, 1e-4)}  # (atol, rtol): cached decoding against the recomputation


def _images(seed):
    return testing.qwen_image_inputs([[(8, 8)], [(4, 8), (4, 4)]], text_lengths=[2, 5], seed=seed)


CASES = {
    "qwen2_5_vl-images": (testing.tiny_qwen2_5_vl, _images, 3),
    "qwen2_vl-images": (testing.tiny_qwen2_vl, _images, 3),
    "qwen3_vl-images": (testing.tiny_qwen3_vl, _images, 3),
    "qwen3_vl-images-deepstack-after-prune": (testing.tiny_qwen3_vl, _images, 1),
    # the longest row is text only and keeps everything: the compacted batch is as wide as the
    # prompt, yet the image row was compacted and its DeepStack features must follow it
    "qwen3_vl-deepstack-full-width": (
        testing.tiny_qwen3_vl, lambda seed: testing.qwen_image_inputs([[(8, 8)], []], [2, 30], seed), 1,
    ),
    "llava": (testing.tiny_llava, lambda seed: testing.llava_inputs(batch=2, text_lengths=[2, 5], seed=seed), 3),
    "internvl": (testing.tiny_internvl, lambda seed: testing.internvl_inputs(2, [2, 5], seed), 3),
    "llava_next": (testing.tiny_llava_next, lambda seed: testing.anyres_inputs(2, [2, 5], seed), 3),
    "llava_onevision": (testing.tiny_llava_onevision, lambda seed: testing.anyres_inputs(2, [2, 5], seed), 3),
    "llava_onevision-image-and-video": (
        testing.tiny_llava_onevision, lambda seed: testing.onevision_video_inputs(3, [2, 5], seed), 3,
    ),
    "qwen2_5_vl-video": (
        testing.tiny_qwen2_5_vl, lambda seed: testing.qwen_video_inputs([(2, 4, 4), (3, 4, 8)], [3, 5], seed), 3,
    ),
    "qwen3_vl-video": (
        testing.tiny_qwen3_vl,
        lambda seed: testing.qwen_video_inputs([(2, 4, 4), (3, 4, 8)], [3, 5], seed, frames_apart=True), 1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_generation_equals_the_explicit_recomputation(case, seed):
    build, inputs, K = CASES[case]
    model, x = build(seed=seed % 1000), inputs(seed)
    with hf.pruned(model, layer=K, max_keep_ratio=RATIO) as handle:
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 suppress_tokens=SPECIAL)  # fmt: skip
        index, candidates = handle.last_index, handle.last_visual
    prompt_len = x["input_ids"].shape[1]
    kept_prompt = torch.zeros(len(index), prompt_len, dtype=torch.bool)
    for b, row in enumerate(index):
        kept_prompt[b, row[row >= 0]] = True
    visual = torch.isin(x["input_ids"], torch.tensor([testing.IMAGE, testing.VIDEO]))
    assert bool((kept_prompt | visual | ~x["attention_mask"].bool()).all()), "text is never dropped"
    assert bool((kept_prompt | candidates | ~visual).all()), "image newlines (not candidates) are never dropped"
    kept_visual = (kept_prompt & candidates).sum(1).tolist()
    assert kept_visual == [math.ceil(RATIO * int(n)) for n in candidates.sum(1)], "one budget per sample"

    want = recompute_pruned(model, x, out.sequences, kept_prompt, K)
    for t, got in enumerate(out.logits):
        assert_close(f"step {t}", got, want[:, prompt_len - 1 + t], TOLERANCES[torch.float32])


def test_video_with_a_trained_predictor_is_refused():
    from glimpse_ops.glimpseprune import GlimpsePredictor

    model = testing.tiny_qwen2_5_vl()
    predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
    x = testing.qwen_video_inputs([(2, 4, 4)])
    with hf.pruned(model, predictor=predictor), pytest.raises(ValueError, match="video inputs"):
        with torch.no_grad():
            model(**x)
