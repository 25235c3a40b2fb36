"""Generation after a trained prune (tiny HF Qwen2.5-VL, Qwen3-VL, InternVL; random weights, fp32), batched and
left-padded, against an explicit recomputation: the stock model over prompt + generated tokens,
no cache, with per-layer masks that say what the pruned model attends to. Layers 0..K: prompt
tokens see the whole prompt; every later query, and every query of layers K+1.., sees only the
kept prompt tokens and the generated ones. Positions are the original ones throughout."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, centered_predictor, recompute_pruned

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.glimpseprune import GlimpsePredictor  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402

K, VIT_LEVELS, STEPS = 3, (1, 0), 5
# a generated image placeholder would read as a missing image feature in the recomputation
SPECIAL = [testing.IMAGE, testing.VIDEO, testing.VISION_START, testing.VISION_END]

# (atol, rtol) of logits by dtype: cached decoding against the uncached recomputation
TOLERANCES = {torch.float32: (1e-4, 1e-4)}


def _qwen_images(seed):
    return testing.qwen_image_inputs([[(8, 8)], [(4, 8), (4, 4)], [(8, 8)]], text_lengths=[2, 6, 4], seed=seed)


FAMILIES = {
    "qwen2_5_vl": (testing.tiny_qwen2_5_vl, K, _qwen_images),
    "qwen3_vl": (testing.tiny_qwen3_vl, K, _qwen_images),
    "qwen3_vl-deepstack-after-prune": (testing.tiny_qwen3_vl, 1, _qwen_images),  # DeepStack after layers 0, 1
    "internvl": (testing.tiny_internvl, K, lambda seed: testing.internvl_inputs(3, [2, 6, 4], seed)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("rule", [dict(), dict(max_remain_ratio=0.25), dict(fixed_keep_ratio=0.4, caps_per="image")])
def test_decoding_after_a_trained_prune_matches_the_explicit_recomputation(seed, rule, family):
    build, layer, inputs = FAMILIES[family]
    model = build(seed=seed % 1000)
    torch.manual_seed(seed)
    predictor = GlimpsePredictor.for_model(model, layer, VIT_LEVELS, width=32, cond=32, fuse_heads=2)
    x = inputs(seed)
    predictor = centered_predictor(model, predictor, x)  # the default threshold then drops about half
    positions = []
    with hf.pruned(model, predictor=predictor, **rule) as handle:
        hook = hf.adapters.adapter_for(model).text_model.register_forward_pre_hook(
            lambda m, a, k: positions.append(k.get("position_ids")), with_kwargs=True
        )
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 suppress_tokens=SPECIAL)  # fmt: skip
        hook.remove()
        index = handle.last_index
    prompt_len = x["input_ids"].shape[1]
    kept_prompt = torch.zeros(len(index), prompt_len, dtype=torch.bool)
    for b, row in enumerate(index):
        kept_prompt[b, row[row >= 0]] = True
    visual = x["input_ids"] == testing.IMAGE
    assert bool((kept_prompt | visual | ~x["attention_mask"].bool()).all()), "text is never dropped"
    assert bool((kept_prompt & visual).sum(1).lt(visual.sum(1)).any()), "the prune dropped something"

    want = recompute_pruned(model, x, out.sequences, kept_prompt, layer)
    for t, got in enumerate(out.logits):
        assert_close(f"step {t}", got, want[:, prompt_len - 1 + t], TOLERANCES[torch.float32])

    # decode steps run at the original positions: last prompt position + 1, + 2, ...
    stock_positions = []
    hook = hf.adapters.adapter_for(model).text_model.register_forward_pre_hook(
        lambda m, a, k: stock_positions.append(k.get("position_ids")), with_kwargs=True
    )
    with torch.no_grad():
        model.generate(**x, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, suppress_tokens=SPECIAL)
    hook.remove()
    assert len(positions) == STEPS
    for step, (a, b) in enumerate(zip(positions[1:], stock_positions[1:])):
        assert torch.equal(a, b), f"decode step {step + 1}"
