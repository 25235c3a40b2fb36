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
)

from glimpse_ops import glimpse_scores
from glimpse_ops.reference import glimpse_scores_reference

SCORES = backend_device_params("glimpse_scores")

# (atol, rtol) by input dtype; the scores are fp32 whatever the input dtype, and the reference
# scores the same (rounded) inputs, so half inputs get the fp32 tolerance too.
TOLERANCES = {dtype: (1e-4, 1e-4) for dtype in (torch.float32, torch.float16, torch.bfloat16)}


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
        want = glimpse_scores_reference(q, k, mask, None, normalize)
        assert got.dtype == torch.float32
        assert_close(f"{normalize} {dtype}", got, want, TOLERANCES[dtype])


@pytest.mark.parametrize("bd", SCORES)
def test_glimpse_scores_no_mask_noncontiguous_and_all_invalid_rows(bd, seed):
    backend, device = bd
    q, k = glimpse_qk(2, 4, 2, 1, 577, 128, torch.float32, device)
    k_view = non_contiguous(k)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # heads strided
    got = glimpse_scores(q_view, k_view, None, scale=0.3, normalize="probs", backend=backend)
    assert_close("probs", got, glimpse_scores_reference(q, k, None, 0.3, "probs"), TOLERANCES[torch.float32])
    mask = torch.zeros(2, 577, dtype=torch.bool, device=device)
    mask[0, 5] = True
    probs = glimpse_scores(q, k, mask, scale=None, normalize="probs", backend=backend)
    log_probs = glimpse_scores(q, k, mask, scale=None, normalize="log_probs", backend=backend)
    assert torch.equal(probs[1], torch.zeros_like(probs[1]))
    assert bool(torch.isneginf(log_probs[1]).all())
    assert_close("one valid key", probs[0, :, :, 5], torch.ones_like(probs[0, :, :, 5]), TOLERANCES[torch.float32])


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
    ref = glimpse_scores_reference(q, k, mask, None, normalize)
    rq, rk = torch.autograd.grad(ref, (q, k), torch.where(torch.isfinite(ref), grad, 0.0))
    assert_close("dq", dq, rq, TOLERANCES[torch.float32])
    assert_close("dk", dk, rk, TOLERANCES[torch.float32])


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
