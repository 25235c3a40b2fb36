"""glimpse_ops.hf.train_glimpse on the tiny HF Qwen2.5-VL (random weights, CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.glimpseprune import GlimpsePredictor  # noqa: E402
from glimpse_ops.hf import (
    testing,  # noqa: E402
    train_glimpse,  # noqa: E402
)
from glimpse_ops.hf.losses import glimpse_training_loss  # noqa: E402

FAMILIES = {
    "qwen2_5_vl": (testing.tiny_qwen2_5_vl, testing.qwen_inputs),
    "qwen3_vl": (testing.tiny_qwen3_vl, testing.qwen_inputs),
    "internvl": (testing.tiny_internvl, testing.internvl_inputs),
}


@pytest.fixture(params=list(FAMILIES))
def setup(seed, request):
    build, inputs = FAMILIES[request.param]
    model = build(seed=seed % 1000)
    torch.manual_seed(seed)
    predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
    return model, predictor, testing.qwen_training_batch(seed=seed, inputs=inputs)


def test_weights_of_one_reproduce_the_stock_model(setup):
    model, predictor, batch = setup
    _, info = glimpse_training_loss(model, predictor, batch, 0.1, force_weight=1.0)
    S, A = batch["input_ids"].shape[1], batch["answer_ids"].shape[1]
    ids = torch.cat([batch["input_ids"], batch["answer_ids"]], dim=1)
    full = dict(
        batch,
        input_ids=ids,
        attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(batch["answer_ids"])], dim=1),
    )
    if "mm_token_type_ids" in batch:
        full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(batch["answer_ids"])], 1)
    del full["answer_ids"]
    with torch.no_grad():
        want = model(**full).logits[:, S - 1 : S - 1 + A]
    torch.testing.assert_close(info["logits"], want, rtol=1e-4, atol=1e-4)


def test_the_answer_loss_reaches_the_glimpse_and_the_vip(setup):
    model, predictor, batch = setup
    model.requires_grad_(False)
    loss, _ = glimpse_training_loss(model, predictor, batch, 0.1, budget_weight=0.0)
    loss.backward()
    for name in (
        "glimpse.learnable_embeddings",
        "glimpse.le_proj.weight",
        "vip.attn_in_proj.weight",
        "vip.cond_in_projs.0.weight",
    ):
        grad = dict(predictor.named_parameters())[name].grad
        assert grad is not None and bool(grad.abs().sum() > 0), name
    assert all(p.grad is None for p in model.parameters()), "the LM stays frozen"


def test_training_moves_the_kept_fraction_and_saves_a_usable_predictor(setup, tmp_path):
    model, predictor, batch = setup
    with torch.no_grad():
        before = glimpse_training_loss(model, predictor, batch, 0.05)[1]["kept_fraction"].item()
    lines = []
    path = tmp_path / "glimpse.safetensors"
    train_glimpse(
        model, predictor, [batch] * 12, keep_ratio=0.05, lr=3e-3, budget_weight=1.0, save_to=path, progress=lines.append
    )
    with torch.no_grad():
        after = glimpse_training_loss(model, predictor, batch, 0.05)[1]["kept_fraction"].item()
    assert abs(after - 0.05) < 0.6 * abs(before - 0.05), (before, after)
    assert len(lines) == 12 and "kept" in lines[-1]
    assert all(p.requires_grad for p in model.parameters()), "train_glimpse restores requires_grad"
    x = {k: v for k, v in batch.items() if k != "answer_ids"}
    with hf.pruned(model, predictor=str(path)) as handle:
        model.generate(**x, max_new_tokens=2, do_sample=False)
        assert handle.last_kept_visual is not None


def test_train_glimpse_refuses_other_families():
    model = testing.tiny_llava()
    with pytest.raises(TypeError, match="needs a Qwen2.5-VL, Qwen3-VL or InternVL"):
        train_glimpse(model, None, [])
