"""Fixtures shared by the vLLM plugin tests: a tiny checkpoint, its
HF model, a predictor file for it, the test prompts, and the HF path's answers."""

from __future__ import annotations

import pytest
import torch

STEPS, LAYER, VIT_LEVELS = 5, 3, (1, 0)
# (text, [(width, height, seed) of each image]): two images, none, one
CASES = [
    ("Two pictures: which is brighter?", [(40, 24, 4), (32, 32, 5)]),
    ("Text only, no picture at all.", []),
    ("What is shown?", [(64, 48, 6)]),
]


def case_images(specs):
    from glimpse_ops.vllm import testing

    return [testing.random_image(*spec) for spec in specs] or None


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from glimpse_ops.vllm import testing

    return testing.write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2_5_vl"), seed=5)


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="session")
def predictor_file(checkpoint, hf_model, tmp_path_factory):
    """A random predictor whose threshold splits the test images' tokens about in half."""
    from helpers import centered_predictor

    from glimpse_ops.glimpseprune import GlimpsePredictor
    from glimpse_ops.vllm import testing

    torch.manual_seed(0)
    predictor = GlimpsePredictor.for_model(hf_model, LAYER, VIT_LEVELS, width=32, cond=32, fuse_heads=2)
    inputs = testing.hf_inputs(checkpoint, [(text, case_images(specs)) for text, specs in CASES])
    centered_predictor(hf_model, predictor, inputs, image_token_id=hf_model.config.image_token_id)
    path = tmp_path_factory.mktemp("predictor") / "predictor.safetensors"
    predictor.save(path)
    return path


@pytest.fixture(scope="session")
def hf_answers(checkpoint, hf_model):
    """``answers(**prune)``: per case, the HF path's greedy tokens, and the sorted prompt
    lengths after the prune of the cases with images."""
    from glimpse_ops import hf
    from glimpse_ops.vllm import testing

    def answers(**prune) -> tuple[list[list[int]], list[int]]:
        tokens, kept = [], []
        for text, specs in CASES:
            x = testing.hf_inputs(checkpoint, [(text, case_images(specs))])
            S = x["input_ids"].shape[1]
            with hf.pruned(hf_model, **prune) as handle, torch.no_grad():
                out = hf_model.generate(**x, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
            tokens.append(out[0, S:].tolist())
            if specs:
                kept.append(handle.last_index.shape[1])
                assert kept[-1] < S, "the rule prunes something"
        return tokens, sorted(kept)

    return answers
