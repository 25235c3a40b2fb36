"""The tiny offline Qwen2.5-VL checkpoint the vLLM tests and the CPU serving benchmark load: it
round-trips through transformers, its tokenizer decodes every id, and the HF pruning path runs
on it (the reference the vLLM plugin is compared with)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.vllm import testing  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return testing.write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2_5_vl"), seed=3)


def test_tokenizer_round_trips_text_and_decodes_every_id(checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = "héllo, wörld! <|image_pad|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == testing.VOCAB
    assert all(isinstance(tokenizer.decode([i]), str) for i in range(testing.VOCAB))


def test_checkpoint_generates_and_prunes_a_mixed_batch(checkpoint):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    assert model.config.text_config.hidden_size // model.config.text_config.num_attention_heads == 32
    x = testing.hf_inputs(
        checkpoint, [("What is shown?", testing.random_image(40, 24, 0)), ("Text only, a longer prompt.", None)]
    )
    n_visual = int((x["input_ids"] == model.config.image_token_id).sum())
    assert n_visual == 20 * 12 // 4  # a 40x24 image: 20x12 patches of 2, merged 2x2
    with torch.no_grad():
        stock = model.generate(**x, max_new_tokens=6, do_sample=False)
    with hf.pruned(model, max_keep_ratio=1.0, threshold=None):
        with torch.no_grad():
            keep_all = model.generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(keep_all, stock)
    with hf.pruned(model, max_keep_ratio=0.1) as handle:
        with torch.no_grad():
            pruned = model.generate(**x, max_new_tokens=6, do_sample=False)
        assert handle.last_kept_visual.tolist() == [6, 0]  # ceil(0.1 * 60); no image in sample 1
    assert pruned.shape == stock.shape
