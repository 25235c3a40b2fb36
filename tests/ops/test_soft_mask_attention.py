"""soft_mask_attention: the reference against softmax(s + log w) in fp64 and gradcheck, the
explicit backward against autograd, every backend's outputs and gradients against the
reference, hard weights against attention over only the kept keys, all-zero rows; the
native CPU kernel at 4099 keys, on non-contiguous inputs and without BLAS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    assert_close,
    attention_qkv,
    backend_device_params,
    dtypes_for,
    non_contiguous,
    soft_mask_term_scales,
    tolerance_for,
)

from glimpse_ops import compact_kv, gather_tokens, keep_index, soft_mask_attention
from glimpse_ops._backend import REGISTRY
from glimpse_ops.reference import soft_mask_attention_backward_reference, soft_mask_attention_reference

SOFT = backend_device_params("soft_mask_attention")

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (atol relative to T, rtol) against the fp64 reference of the same rounded inputs, by
# backend-device and dtype: |got - want| <= atol * T + rtol * |want|, T the magnitude of the
# terms each entry sums (helpers.soft_mask_term_scales), so an entry small by cancellation (dk,
# dw) is held to its own bound and a key with a tiny weight (large dw) does not loosen the
# others'. rtol is twice the dtype's unit roundoff (rounding the result); atol covers what a
# kernel adds beyond it. Two tables, as the kernels round two kinds of products: out and dv sum
# P (the Triton kernels round P to the input dtype for the dot), dq, dk and dw sum dS.
# Measured with `python tests/error_survey.py --ops soft_mask_attention --seeds 6`
# (TRITON_INTERPRET=1, 2 seeds, for triton-cpu) at de7ec04, the largest `scaled` figure:
#   out, dv:    fp32 7.8e-7 (every backend); fp16 6.1e-5 (reference and native: fp16 subnormals),
#               2.7e-4 (triton: P in fp16); bf16 6.4e-8 (reference and native: fp32 inside)
#   dq, dk, dw: fp32 2.1e-7; fp16 5.1e-5 (native dq), 4.5e-5 (triton dq); bf16 4.5e-4 (native dq:
#               delta = rowsum(dO * O) from the rounded bf16 output, as FlashAttention's is)
# Margins 3x-5x (bf16 gradients 2.2x). A bf16 gradient scaled by 3% fails wherever
# |want| / T > 0.045, which dq, dk and dw reach at these sizes (their largest |want| / T is
# 0.09-0.24, 0.02-0.2 and 0.01-0.1). reference-cuda and triton-cuda are provisional until
# bench/gpu_check.py's survey calibrates them; triton's bf16 rows there are 8x its fp16 figures
# (bf16 keeps 3 fewer mantissa bits where P and dS are rounded for the tensor-core dots).
OUTPUT_TOLERANCES = {
    "reference-cpu": {FP32: (4e-6, 2.0**-23), FP16: (2e-4, 2.0**-10), BF16: (4e-6, 2.0**-7)},
    "native-cpu": {FP32: (4e-6, 2.0**-23), FP16: (2e-4, 2.0**-10), BF16: (4e-6, 2.0**-7)},
    "triton-cpu": {FP32: (4e-6, 2.0**-23), FP16: (8e-4, 2.0**-10)},
    "reference-cuda": {FP32: (4e-6, 2.0**-23), FP16: (2e-4, 2.0**-10), BF16: (4e-6, 2.0**-7)},  # provisional
    "triton-cuda": {FP32: (4e-6, 2.0**-23), FP16: (8e-4, 2.0**-10), BF16: (6e-3, 2.0**-7)},  # provisional
}
GRAD_TOLERANCES = {
    "reference-cpu": {FP32: (1e-6, 2.0**-23), FP16: (2e-4, 2.0**-10), BF16: (1e-3, 2.0**-7)},
    "native-cpu": {FP32: (1e-6, 2.0**-23), FP16: (2e-4, 2.0**-10), BF16: (1e-3, 2.0**-7)},
    "triton-cpu": {FP32: (1e-6, 2.0**-23), FP16: (2e-4, 2.0**-10)},
    "reference-cuda": {FP32: (1e-6, 2.0**-23), FP16: (2e-4, 2.0**-10), BF16: (1e-3, 2.0**-7)},  # provisional
    "triton-cuda": {FP32: (1e-6, 2.0**-23), FP16: (2e-4, 2.0**-10), BF16: (1e-3, 2.0**-7)},  # provisional
}
QUANTITIES = ("out", "dq", "dk", "dv", "dw")


def tolerances(bd: tuple[str, str], dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """The (atol relative to T, rtol) of each of QUANTITIES for this backend-device and dtype."""
    output, grad = tolerance_for(OUTPUT_TOLERANCES, bd, dtype), tolerance_for(GRAD_TOLERANCES, bd, dtype)
    return {name: output if name in ("out", "dv") else grad for name in QUANTITIES}


# fp64: the reference against the plain formula, and its explicit backward against autograd
FP64_TOLERANCE = (1e-10, 1e-10)


def plain_softmax_attention(q, k, v, w, key_mask, causal):
    """fp64 softmax(s + log w) with -inf for disallowed keys: the definition for w > 0."""
    B, H, N, D = q.shape
    group = H // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = q.double() @ kk.transpose(-1, -2) / D**0.5 + torch.log(w.double())[:, None, None, :]
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ vv


@pytest.mark.parametrize("causal", [True, False])
def test_soft_mask_reference_matches_log_weight_softmax(seed, causal):
    q, k, v = attention_qkv(2, 4, 2, 17, 8, torch.float64, "cpu")
    w = torch.rand(2, 17, dtype=torch.float64) * 0.98 + 0.01
    key_mask = torch.rand(2, 17) < 0.8
    key_mask[:, 0] = True
    got = soft_mask_attention_reference(q, k, v, w, key_mask, causal)
    assert_close("out", got, plain_softmax_attention(q, k, v, w, key_mask, causal), FP64_TOLERANCE)


def test_soft_mask_reference_gradcheck_fp64_with_exact_zeros_and_ones(seed):
    q, k, v = attention_qkv(1, 2, 1, 9, 4, torch.float64, "cpu")
    w = torch.rand(1, 9, dtype=torch.float64)
    w[0, 2], w[0, 5] = 0.0, 1.0
    inputs = [t.requires_grad_(True) for t in (q, k, v, w)]
    assert torch.autograd.gradcheck(lambda *a: soft_mask_attention_reference(*a, None, True), inputs)
    # The op validates w in [0, 1], so its finite differences need weights off the edges.
    inside = (torch.rand(1, 9, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    op_inputs = [q, k, v, inside]
    assert torch.autograd.gradcheck(
        lambda *a: soft_mask_attention(*a, None, causal=False, backend="reference"), op_inputs
    )


@pytest.mark.parametrize("causal", [True, False])
def test_soft_mask_explicit_backward_matches_autograd(seed, causal):
    q, k, v = attention_qkv(2, 6, 2, 23, 16, torch.float64, "cpu")
    w = torch.rand(2, 23, dtype=torch.float64)
    w[:, ::5] = 0.0
    w[1, :] = 0.0  # a batch whose rows all sum to zero
    key_mask = torch.rand(2, 23) < 0.9
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
    out = soft_mask_attention_reference(*inputs, key_mask, causal)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, inputs, grad)
    got = soft_mask_attention_backward_reference(grad, q, k, v, w, key_mask, causal, None)
    scales = soft_mask_term_scales(grad, q, k, v, w, key_mask, causal)[1:]
    for name, a, b, terms in zip(("dq", "dk", "dv", "dw"), got, expected, scales):
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert_close(name, a, b, FP64_TOLERANCE, scale=terms)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(got[0][1], torch.zeros_like(got[0][1]))


@pytest.mark.parametrize("bd", SOFT)
@pytest.mark.parametrize("seq,heads,kv_heads", [(1, 2, 2), (67, 4, 1), (130, 7, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_soft_mask_backends_match_reference(bd, seed, seq, heads, kv_heads, causal):
    """Output and all four gradients against the fp64 reference of the same rounded inputs,
    every entry within the backend's measured error relative to its own terms. Key 0 keeps a
    random nonzero weight, so at seq = 1 the only key is not zeroed (dq, dk and dw then vanish:
    their rounding is held to the terms' scale)."""
    backend, device = bd
    for dtype in dtypes_for(backend, device):
        tolerance = tolerances(bd, dtype)
        q, k, v = attention_qkv(2, heads, kv_heads, seq, 64, dtype, device)
        w = torch.rand(2, seq, device=device)
        w[:, 1::3] = 0.0
        w[:, 2::7] = 1.0
        key_mask = torch.ones(2, seq, dtype=torch.bool, device=device)
        key_mask[1, : seq // 4] = False
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
        out = soft_mask_attention(*inputs, key_mask, causal=causal, backend=backend)
        exact = [t.double() for t in (q, k, v, w)]
        grad = torch.randn_like(out)
        got = (out, *torch.autograd.grad(out, inputs, grad))
        want = (
            soft_mask_attention_reference(*exact, key_mask, causal),
            *soft_mask_attention_backward_reference(grad.double(), *exact, key_mask, causal, None),
        )
        scales = soft_mask_term_scales(grad, q, k, v, w, key_mask, causal)
        floor = subnormal_sum_floor(dtype, seq, grad, v)
        for name, a, b, terms in zip(QUANTITIES, got, want, scales):
            assert_close(
                f"{name} {dtype}", a, b, tolerance[name], scale=terms, floor=floor if name in ("out", "dv") else 0
            )


def subnormal_sum_floor(dtype: torch.dtype, n_terms: int, *factors: torch.Tensor) -> float:
    """The absolute error of a sum of ``n_terms`` products whose P factor was rounded to
    ``dtype`` (the Triton kernels round P for the dot): a key with a tiny weight has P entries
    below fp16's smallest normal, rounded with an absolute spacing that no bound relative to the
    terms covers, and the roundings add like a random walk: 2 sqrt(n) x spacing x the largest
    other factor. CI failed twice without it (dv of such keys, fp16: 8e-7 off at 1e-5)."""
    if dtype != FP16:
        return 0.0
    spacing = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    return 2.0 * n_terms**0.5 * spacing * max(float(f.detach().abs().max()) for f in factors)


@pytest.mark.parametrize("bd", SOFT)
def test_soft_mask_hard_weights_equal_attention_over_kept_keys(bd, seed):
    """w in {0, 1}, non-causal: equals plain attention over only the kept keys, built with
    keep_index + compact_kv (keys) and gather_tokens (a padding mask)."""
    backend, device = bd
    q, k, v = attention_qkv(2, 4, 2, 40, 32, torch.float32, device)
    keep = torch.rand(2, 40, device=device) < 0.4
    keep[:, 3] = True
    out = soft_mask_attention(q, k, v, keep.float(), None, causal=False, backend=backend)
    index, lengths = keep_index(keep, max_len=None, padding_side="right")
    (k_kept,), (v_kept,) = compact_kv([k], [v], index)
    kept_mask = gather_tokens(keep, index, pad_value=False)
    group = q.shape[1] // k.shape[1]
    logits = q @ k_kept.repeat_interleave(group, 1).transpose(-1, -2) / 32**0.5
    logits = logits.masked_fill(~kept_mask[:, None, None, :], float("-inf"))
    want = torch.softmax(logits, -1) @ v_kept.repeat_interleave(group, 1)
    assert_close("hard-pruned", out, want, tolerances(bd, torch.float32)["out"], scale=want.abs().max())


@pytest.mark.parametrize("bd", SOFT)
def test_soft_mask_zero_rows_give_zero_and_zero_gradients(bd):
    backend, device = bd
    q, k, v = attention_qkv(1, 2, 1, 12, 16, torch.float32, device)
    w = torch.ones(1, 12, device=device)
    w[0, :5] = 0.0  # causal rows 0..4 see only zero weights
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
    out = soft_mask_attention(*inputs, None, causal=True, backend=backend)
    assert torch.equal(out[0, :, :5], torch.zeros_like(out[0, :, :5]))
    dq, dk, dv, dw = torch.autograd.grad(out, inputs, torch.randn_like(out))
    assert torch.equal(dq[0, :, :5], torch.zeros_like(dq[0, :, :5]))
    assert bool(torch.isfinite(dw).all())


native_cpu = pytest.mark.skipif(
    "native" not in REGISTRY["soft_mask_attention"].available("cpu"), reason="the native extension is not built"
)


@native_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_mask_native_cpu_long_odd_non_contiguous(seed, dtype):
    """4099 keys (tiles of 64 and 128 with ragged ends), non-contiguous q and v, a padded
    batch, and weights with exact zeros: outputs and all four gradients against the fp32
    reference."""
    seq = 4099
    q, k, v = attention_qkv(2, 2, 1, seq, 32, dtype, "cpu")
    w = torch.rand(2, seq)
    w[:, ::4] = 0.0
    key_mask = torch.ones(2, seq, dtype=torch.bool)
    key_mask[1, 1000:1700] = False
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
    out = soft_mask_attention(
        non_contiguous(leaves[0]), leaves[1], non_contiguous(leaves[2]), leaves[3], key_mask, backend="native"
    )
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    # the fp32 reference stands in for fp64 here (4099^2 fp64 tiles would take gigabytes): its
    # own error (below 1e-6 T) is far below the bf16 tolerance and 4x below the fp32 one
    fp32 = [t.float() for t in (q, k, v)] + [w]
    tolerance = tolerances(("native", "cpu"), dtype)
    want = (
        soft_mask_attention_reference(*fp32, key_mask, True),
        *soft_mask_attention_backward_reference(grad.float(), *fp32, key_mask, True, None),
    )
    scales = soft_mask_term_scales(grad.float(), *fp32, key_mask, True)
    for name, a, b, terms in zip(QUANTITIES, (out, *got), want, scales):
        assert_close(f"{name} {dtype}", a, b, tolerance[name], scale=terms)


@native_cpu
def test_soft_mask_native_cpu_without_blas_matches_reference():
    """GLIMPSE_CPU_GEMM=aten: the tiles' products through at::mm instead of sgemm (what
    runs on a torch without an exported BLAS) give the same results."""
    script = textwrap.dedent(
        """
        import torch
        from glimpse_ops import attention_column_scores, soft_mask_attention
        from glimpse_ops.reference import attention_column_scores_reference, soft_mask_attention_backward_reference
        from glimpse_ops.reference import soft_mask_attention_reference
        torch.manual_seed(0)
        q, k, v = torch.randn(2, 6, 150, 32), torch.randn(2, 2, 150, 32), torch.randn(2, 2, 150, 32)
        w = torch.rand(2, 150)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
        out = soft_mask_attention(*leaves, None, backend="native")
        grad = torch.randn_like(out)
        got = (out,) + torch.autograd.grad(out, leaves, grad)
        want = (soft_mask_attention_reference(q, k, v, w),) + soft_mask_attention_backward_reference(
            grad, q, k, v, w, None, True, None)
        errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
        query_mask = torch.rand(2, 150) < 0.5
        columns = attention_column_scores(q, k, query_mask, backend="native")
        errors.append((columns - attention_column_scores_reference(q, k, query_mask)).abs().max().item())
        print(max(errors))
        """
    )
    env = {**os.environ, "GLIMPSE_CPU_GEMM": "aten"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-4


@pytest.mark.parametrize("bd", SOFT)
def test_soft_mask_zero_weight_on_a_dominant_key_keeps_gradients_finite(bd):
    """A key with w = 0 whose logit exceeds the row's log-sum-exp by more than fp32's exp
    range (here by 100): its P is 0, so out, dq, dk and dv are finite and equal the
    reference (P = w E must not become 0 * inf); only that key's dw saturates."""
    backend, device = bd
    q = torch.zeros(1, 1, 9, 8, device=device)
    q[..., 0] = 10.0
    k = torch.zeros(1, 1, 9, 8, device=device)
    k[0, 0, 1, 0] = 10.0 * 8**0.5  # s = scale q.k = 100 on key 1 from every row, 0 elsewhere
    v = torch.randn(1, 1, 9, 8, device=device)
    w = torch.ones(1, 9, device=device)
    w[0, 1] = 0.0
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
    out = soft_mask_attention(*inputs, None, causal=False, backend=backend)
    grad = torch.randn_like(out)
    dq, dk, dv, dw = torch.autograd.grad(out, inputs, grad)
    want = soft_mask_attention_reference(q, k, v, w, None, False)
    want_grads = soft_mask_attention_backward_reference(grad, q, k, v, w, None, False, None)
    assert bool(torch.isfinite(want).all()) and bool(torch.isfinite(out).all())
    tolerance = tolerances(bd, torch.float32)
    scales = soft_mask_term_scales(grad, q, k, v, w, None, False)
    assert_close("out", out, want, tolerance["out"], scale=scales[0])
    for name, a, b, terms in zip(("dq", "dk", "dv"), (dq, dk, dv), want_grads[:3], scales[1:4]):
        assert bool(torch.isfinite(a).all()), f"{name} is not finite"
        assert_close(name, a, b, tolerance[name], scale=terms)
    keep = (torch.arange(9) != 1)[None]
    others = (dw.cpu()[keep], want_grads[3].cpu()[keep])
    assert_close("dw of the other keys", *others, tolerance["dw"], scale=scales[4][keep])


@native_cpu
def test_soft_mask_native_cpu_private_ops_refuse_empty_inputs():
    """The private native ops (reachable without the public op's validation) refuse a batch
    of 0 with an error instead of dividing by it."""
    q, k, v = attention_qkv(0, 2, 1, 5, 8, torch.float32, "cpu")
    w = torch.rand(0, 5)
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.glimpse._soft_mask_attention_forward_native(q, k, v, w, None, True, 0.3)
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.glimpse._soft_mask_attention_backward_native(q, q, k, v, w, None, True, 0.3, q, q[..., 0])
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.glimpse._attention_column_scores_native(q, k, None, None, True, 0.3)
