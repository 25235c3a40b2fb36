"""predictor_dtype: the glimpse rows and the VIP in fp32 (the default) or in the model's dtype
as the release runs them; the bf16 option reproduces a bf16 computation written out the
release's way (bf16 weights, RMSNorm statistics in fp32, a RoPE table from a bf16 inverse
frequency, the rotation in fp32, sigmoid in bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.glimpseprune import GlimpsePredictor  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402

K, VIT_LEVELS = 3, (1, 0)
SIZES = dict(width=32, cond=32, fuse_heads=2)

# (atol, rtol) by dtype: one computation against the same one written out independently (bf16
# is compared bit for bit)
TOLERANCES = {torch.float32: (1e-5, 1e-5)}


def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos.float() + rotated.float() * sin.float()).to(x.dtype)


def release_vip(state: dict, scores, features, grid_hw, heads: int, dtype) -> torch.Tensor:
    """The VIP as the release computes it in ``dtype``, from a state dict (keys of ``vip.``)."""
    W = {k: v.to(dtype) for k, v in state.items()}

    def linear(x, name, bias=True):
        return F.linear(x, W[f"{name}.weight"], W[f"{name}.bias"] if bias else None)

    x = linear(scores.to(dtype), "attn_in_proj")
    head_dim = W["layers.0.attn.q_proj.weight"].shape[0] // heads
    dim = head_dim // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)).to(dtype)  # a bf16 buffer
    longest = max(max(h, w) for h, w in grid_hw)
    table = torch.outer(torch.arange(longest, dtype=dtype), inv_freq)
    ids = torch.cat([torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2)
                     for h, w in grid_hw])  # fmt: skip
    emb = table[ids].flatten(1)
    emb = torch.cat([emb, emb], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    sizes = [h * w for h, w in grid_hw]
    N = x.shape[0]
    for i, level in enumerate(features):
        cond = linear(level.to(dtype), f"cond_in_projs.{i}")
        h = _rms(x, W[f"layers.{i}.norm1.weight"], 1e-6)
        qk = torch.cat([h, cond], dim=-1)
        q = _rotate(linear(qk, f"layers.{i}.attn.q_proj", False).view(N, heads, -1), cos, sin)
        k = _rotate(linear(qk, f"layers.{i}.attn.k_proj", False).view(N, heads, -1), cos, sin)
        v = linear(h, f"layers.{i}.attn.v_proj", False).view(N, heads, -1)
        out = torch.cat([
            F.scaled_dot_product_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None], c.transpose(0, 1)[None])[0]
            .transpose(0, 1)
            for a, b, c in zip(q.split(sizes), k.split(sizes), v.split(sizes))
        ])  # fmt: skip
        x = x + linear(out.reshape(N, -1), f"layers.{i}.attn.o_proj", False)
        h = _rms(x, W[f"layers.{i}.norm2.weight"], 1e-6)
        gate = F.silu(linear(h, f"layers.{i}.mlp.gate_proj")) * linear(h, f"layers.{i}.mlp.up_proj")
        x = x + linear(gate, f"layers.{i}.mlp.down_proj")
    return linear(x, f"attn_out_projs.{len(features) - 1}").squeeze(-1)


@pytest.fixture
def bf16_setup(seed):
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000).to(torch.bfloat16)
    torch.manual_seed(seed)
    predictor = GlimpsePredictor.for_model(model, K, VIT_LEVELS, **SIZES)
    return model, predictor, seed


def _run_capturing_vip(model, predictor, x, **options):
    captured = {}
    with hf.pruned(model, predictor=predictor, fixed_keep_ratio=0.5, **options) as handle:
        placed = handle.predictor
        hook = placed.vip.register_forward_hook(lambda m, args, out: captured.update(args=args, out=out.detach()))
        with torch.no_grad():
            model(**x)
        hook.remove()
        captured["probs"] = handle.last_scores[x["input_ids"] == testing.IMAGE]
    return placed, captured


def test_bf16_option_reproduces_the_release_computation(bf16_setup):
    model, predictor, seed = bf16_setup
    x = testing.qwen_image_inputs([[(8, 8), (4, 8)], [(8, 8)]], text_lengths=[3, 5], seed=seed)
    placed, got = _run_capturing_vip(model, predictor, x, predictor_dtype="model")
    assert next(placed.parameters()).dtype == torch.bfloat16
    assert next(predictor.parameters()).dtype == torch.float32, "the caller's predictor is not changed"
    scores, features, grid_hw = got["args"]
    state = {k.removeprefix("vip."): v for k, v in predictor.state_dict().items() if k.startswith("vip.")}
    want = release_vip(state, scores, features, grid_hw, SIZES["fuse_heads"], torch.bfloat16)
    assert got["out"].dtype == torch.bfloat16
    assert torch.equal(got["out"], want), "bit for bit: the same bf16 operations in the same order"
    assert torch.equal(got["probs"], torch.sigmoid(want).float()), "sigmoid in bf16, as the release"
    # the glimpse rows: le_proj and le_norm in bf16, as the release casts its modules
    g = {k.removeprefix("glimpse."): v.to(torch.bfloat16) for k, v in predictor.state_dict().items() if "glimpse" in k}
    with torch.no_grad():
        for layer in range(K + 1):
            row = F.linear(g["learnable_embeddings"][layer], g["le_proj.weight"], g["le_proj.bias"])
            assert torch.equal(placed.row_for_layer(layer), _rms(row, g["le_norm.weight"], 1e-6)), layer


def test_fp32_default_on_a_bf16_model_and_the_decisions_it_changes(bf16_setup):
    model, predictor, seed = bf16_setup
    x = testing.qwen_inputs(batch=2, text_lengths=[3, 5], seed=seed)
    placed, fp32 = _run_capturing_vip(model, predictor, x)
    assert placed is predictor and next(placed.parameters()).dtype == torch.float32
    scores, features, grid_hw = fp32["args"]
    state = {k.removeprefix("vip."): v for k, v in predictor.state_dict().items() if k.startswith("vip.")}
    assert_close("fp32 VIP", fp32["out"], release_vip(state, scores, features, grid_hw, 2, torch.float32),
                 TOLERANCES[torch.float32])  # fmt: skip
    _, bf16 = _run_capturing_vip(model, predictor, x, predictor_dtype=torch.bfloat16)
    gap = (fp32["probs"] - bf16["probs"]).abs().max()
    assert 0 < gap < 0.1, f"bf16 rounding moves the probabilities a little, got {gap}"
