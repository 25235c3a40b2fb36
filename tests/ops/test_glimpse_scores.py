"""glimpse_scores against its reference for every normalization, odd sizes, GQA, padding
masks, strided inputs and rows without a valid key; gradients against autograd of the
reference and a fp64 gradcheck."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close,
    backend_device_params,
    dtypes_for,
    glimpse_qk,
    left_padding_mask,
    non_contiguous,
    tolerance_for,
)

from glimpse_ops import glimpse_scores
from glimpse_ops.reference import glimpse_scores_reference

SCORES = backend_device_params("glimpse_scores")

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (atol, rtol) of the fp32 scores against the fp64 reference of the same rounded inputs, by
# normalization (the same for every input dtype: half inputs are widened, products exact in fp32).
# probs are compared relatively (atol 0): at S = 4099 a quarter of them lie below 1e-4, and a
# kernel that drops or flushes small probabilities must fail. Measured with
# `python tests/error_survey.py --ops glimpse_scores --seeds 6` (TRITON_INTERPRET=1, 3 seeds,
# for triton-cpu) at de7ec04 over every backend and dtype: logits abs 1.7e-6, probs rel 2.0e-6
# (every entry), log_probs abs 2.1e-6; margins 3-4x. triton-cuda is provisional (4x the CPU
# margin: the GPU's exp2 approximation) until bench/gpu_check.py's survey calibrates it.
CPU_SCORES = {"logits": (5e-6, 0.0), "probs": (0.0, 8e-6), "log_probs": (8e-6, 0.0)}
CUDA_SCORES = {"logits": (2e-5, 0.0), "probs": (0.0, 3e-5), "log_probs": (3e-5, 0.0)}  # provisional
TOLERANCES = {
    key: {dtype: table for dtype in (FP32, FP16, BF16)}
    for key, table in (
        ("reference-cpu", CPU_SCORES),
        ("native-cpu", CPU_SCORES),
        ("triton-cpu", CPU_SCORES),
        ("reference-cuda", CPU_SCORES),  # provisional
        ("triton-cuda", CUDA_SCORES),
    )
}
# dq and dk of fp32 inputs, atol relative to max |want| (sums over S keys with cancellation):
# measured 1.6e-6 (log_probs dq), margin 5x; a gradient scaled by 3% fails at its largest entry
GRAD_TOLERANCE = (8e-6, 0.0)


def exact_scores(q, k, mask, scale, normalize):
    """The reference in fp64 on the same (rounded) inputs."""
    return glimpse_scores_reference(q.double(), k.double(), mask, scale, normalize)


@pytest.mark.parametrize("bd", SCORES)
@pytest.mark.parametrize("seq", [1, 577, 4099])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("normalize", ["logits", "probs", "log_probs"])
def test_glimpse_scores_matches_reference(bd, seed, seq, heads, kv_heads, normalize):
    backend, device = bd
    for dtype in dtypes_for(backend, device):
        q, k = glimpse_qk(3, heads, kv_heads, 2, seq, 64, dtype, device)
        mask = left_padding_mask(3, seq, device)
        got = glimpse_scores(q, k, mask, scale=None, normalize=normalize, backend=backend)
        assert got.dtype == torch.float32
        tolerance = tolerance_for(TOLERANCES, bd, dtype)[normalize]
        assert_close(f"{normalize} {dtype}", got, exact_scores(q, k, mask, None, normalize), tolerance)


@pytest.mark.parametrize("bd", SCORES)
def test_glimpse_scores_no_mask_noncontiguous_and_all_invalid_rows(bd, seed):
    backend, device = bd
    q, k = glimpse_qk(2, 4, 2, 1, 577, 128, torch.float32, device)
    k_view = non_contiguous(k)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # heads strided
    got = glimpse_scores(q_view, k_view, None, scale=0.3, normalize="probs", backend=backend)
    tolerance = tolerance_for(TOLERANCES, bd, FP32)["probs"]
    assert_close("probs", got, exact_scores(q, k, None, 0.3, "probs"), tolerance)
    mask = torch.zeros(2, 577, dtype=torch.bool, device=device)
    mask[0, 5] = True
    probs = glimpse_scores(q, k, mask, scale=None, normalize="probs", backend=backend)
    log_probs = glimpse_scores(q, k, mask, scale=None, normalize="log_probs", backend=backend)
    assert torch.equal(probs[1], torch.zeros_like(probs[1]))
    assert bool(torch.isneginf(log_probs[1]).all())
    assert_close("one valid key", probs[0, :, :, 5], torch.ones_like(probs[0, :, :, 5]), tolerance)
    assert bool((probs[0, :, :, :5] == 0).all()) and bool((probs[0, :, :, 6:] == 0).all())


@pytest.mark.parametrize("bd", SCORES)
@pytest.mark.parametrize("normalize", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("seq,dim", [(97, 32), (1000, 80)])  # 1000 x 80: several key chunks and head-dim slices
def test_glimpse_scores_gradients_match_autograd_of_reference(bd, seed, normalize, seq, dim):
    backend, device = bd
    q, k = glimpse_qk(2, 6, 2, 3, seq, dim, torch.float32, device)
    mask = left_padding_mask(2, seq, device)
    q.requires_grad_(True)
    k.requires_grad_(True)
    out = glimpse_scores(q, k, mask, scale=None, normalize=normalize, backend=backend)
    grad = torch.randn_like(out)
    dq, dk = torch.autograd.grad(out, (q, k), torch.where(torch.isfinite(out), grad, 0.0))
    exact = [t.detach().double().requires_grad_(True) for t in (q, k)]
    ref = glimpse_scores_reference(*exact, mask, None, normalize)
    rq, rk = torch.autograd.grad(ref, exact, torch.where(torch.isfinite(ref), grad.double(), 0.0))
    assert_close("dq", dq, rq, GRAD_TOLERANCE, scale=rq.abs().max())
    assert_close("dk", dk, rk, GRAD_TOLERANCE, scale=rk.abs().max())


@pytest.mark.parametrize("normalize", ["logits", "probs", "log_probs"])
def test_glimpse_scores_gradcheck_fp64(seed, normalize):
    q = torch.randn(2, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 11) < 0.8
    mask[:, 0] = True

    # -inf logits of invalid keys are constants: compare only the finite outputs.
    def fn(q, k):
        return torch.nan_to_num(glimpse_scores(q, k, mask, normalize=normalize, backend="reference"), neginf=0.0)

    assert torch.autograd.gradcheck(fn, (q, k))
