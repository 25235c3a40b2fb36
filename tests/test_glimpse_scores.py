"""glimpse_scores and glimpse_prune against their references; gradients in fp64."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_equal, backend_device_params, dtypes_for, non_contiguous

from glimpse_ops import glimpse_prune, glimpse_scores
from glimpse_ops.reference import (
    compact_kv_reference,
    glimpse_prune_reference,
    glimpse_scores_reference,
    keep_index_reference,
    select_tokens_reference,
)

SCORES = backend_device_params("glimpse_scores")
PRUNE = backend_device_params("glimpse_prune")


def qk(batch, heads, kv_heads, glimpses, seq, dim, dtype, device):
    q = torch.randn(batch, heads, glimpses, dim, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim, device=device).to(dtype)
    return q, k


def padding_mask(batch: int, seq: int, device: str) -> torch.Tensor:
    """Left padding of different lengths; the last row has no valid key at all when seq > 1."""
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    for b in range(batch):
        mask[b, : (b * seq) // max(batch - 1, 1) // 2] = False
    return mask


@pytest.mark.parametrize("bd", SCORES)
@pytest.mark.parametrize("seq", [1, 577, 4099])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (7, 1)])
@pytest.mark.parametrize("normalize", ["logits", "probs", "log_probs"])
def test_glimpse_scores_matches_reference(bd, seed, seq, heads, kv_heads, normalize):
    backend, device = bd
    for dtype in dtypes_for(backend, device):
        q, k = qk(3, heads, kv_heads, 2, seq, 64, dtype, device)
        mask = padding_mask(3, seq, device)
        got = glimpse_scores(q, k, mask, scale=None, normalize=normalize, backend=backend)
        want = glimpse_scores_reference(q, k, mask, None, normalize)
        assert got.dtype == torch.float32
        assert_close(f"{normalize} {dtype}", got, want, torch.float32, scale=10)


@pytest.mark.parametrize("bd", SCORES)
def test_glimpse_scores_no_mask_noncontiguous_and_all_invalid_rows(bd, seed):
    backend, device = bd
    q, k = qk(2, 4, 2, 1, 577, 128, torch.float32, device)
    k_view = non_contiguous(k)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # heads strided
    got = glimpse_scores(q_view, k_view, None, scale=0.3, normalize="probs", backend=backend)
    assert_close("probs", got, glimpse_scores_reference(q, k, None, 0.3, "probs"), torch.float32, scale=10)
    mask = torch.zeros(2, 577, dtype=torch.bool, device=device)
    mask[0, 5] = True
    probs = glimpse_scores(q, k, mask, scale=None, normalize="probs", backend=backend)
    log_probs = glimpse_scores(q, k, mask, scale=None, normalize="log_probs", backend=backend)
    assert torch.equal(probs[1], torch.zeros_like(probs[1]))
    assert bool(torch.isneginf(log_probs[1]).all())
    assert_close("one valid key", probs[0, :, :, 5], torch.ones_like(probs[0, :, :, 5]), torch.float32)


@pytest.mark.parametrize("bd", SCORES)
@pytest.mark.parametrize("normalize", ["logits", "probs", "log_probs"])
@pytest.mark.parametrize("seq,dim", [(97, 32), (1000, 80)])  # 1000 x 80: several key chunks and head-dim slices
def test_glimpse_scores_gradients_match_autograd_of_reference(bd, seed, normalize, seq, dim):
    backend, device = bd
    q, k = qk(2, 6, 2, 3, seq, dim, torch.float32, device)
    mask = padding_mask(2, seq, device)
    q.requires_grad_(True)
    k.requires_grad_(True)
    out = glimpse_scores(q, k, mask, scale=None, normalize=normalize, backend=backend)
    grad = torch.randn_like(out)
    dq, dk = torch.autograd.grad(out, (q, k), torch.where(torch.isfinite(out), grad, 0.0))
    ref = glimpse_scores_reference(q, k, mask, None, normalize)
    rq, rk = torch.autograd.grad(ref, (q, k), torch.where(torch.isfinite(ref), grad, 0.0))
    assert_close("dq", dq, rq, torch.float32, scale=10)
    assert_close("dk", dk, rk, torch.float32, scale=10)


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


@pytest.mark.parametrize("bd", PRUNE)
@pytest.mark.parametrize("seq", [1, 577, 4099])
@pytest.mark.parametrize("max_len", [None, 4200])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_glimpse_prune_consistent_with_reference(bd, seed, seq, max_len, padding_side):
    backend, device = bd
    dtype = dtypes_for(backend, device)[-1]
    q, k = qk(3, 8, 2, 1, seq, 64, dtype, device)
    keys = [k] + [torch.randn_like(k) for _ in range(2)]
    values = [torch.randn_like(k) for _ in range(3)]
    mask = padding_mask(3, seq, device)
    cand = torch.rand(3, seq, device=device) < 0.9
    caps = torch.tensor([max(seq // 10, 1), max(seq // 4, 1), 0], device=device)
    got_k, got_v, index, lengths, scores = glimpse_prune(
        q,
        keys,
        values,
        mask,
        cand,
        0,
        scale=None,
        threshold=1.0 / seq if seq > 1 else None,
        max_keep=caps,
        min_keep=1,
        max_len=max_len,
        padding_side=padding_side,
        backend=backend,
    )
    want = glimpse_prune_reference(
        q, keys, values, mask, cand, 0, None, 1.0 / seq if seq > 1 else None, caps, 1, max_len, padding_side
    )
    assert_close("scores", scores, want[4], torch.float32, scale=10)
    # Selection must be exactly the spec applied to the scores the op returned.
    keep = select_tokens_reference(scores, cand & mask, 1.0 / seq if seq > 1 else None, caps, 1) & mask
    want_index, want_lengths = keep_index_reference(keep, max_len, padding_side)
    assert_equal("index", index, want_index)
    assert_equal("lengths", lengths, want_lengths)
    want_k, want_v = compact_kv_reference(keys, values, want_index)
    for a, b in zip(got_k + got_v, want_k + want_v):
        assert_equal("kv", a, b)


@pytest.mark.parametrize("bd", PRUNE)
def test_glimpse_prune_keep_everything_drops_only_padding(bd, seed):
    backend, device = bd
    q, k = qk(2, 4, 4, 2, 50, 16, torch.float32, device)
    mask = torch.ones(2, 50, dtype=torch.bool, device=device)
    mask[1, :7] = False
    out_k, out_v, index, lengths, scores = glimpse_prune(q, [k], [k.clone()], mask, None, 0, backend=backend)
    assert lengths.tolist() == [50, 43]
    assert index[1, :7].tolist() == [-1] * 7 and index[1, 7:].tolist() == list(range(7, 50))
    assert_close("row sums", scores.sum(1), torch.ones(2, device=device), torch.float32, scale=10)
