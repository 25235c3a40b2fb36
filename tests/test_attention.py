"""attention_column_scores and soft_mask_attention: the references against independent
fp64 formulas, every backend against the references, gradients, hard-pruning equivalence."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, backend_device_params, dtypes_for, non_contiguous

from glimpse_ops import attention_column_scores, compact_kv, gather_tokens, keep_index, soft_mask_attention
from glimpse_ops.reference import (
    attention_column_scores_reference,
    soft_mask_attention_backward_reference,
    soft_mask_attention_reference,
)

COLUMNS = backend_device_params("attention_column_scores")
SOFT = backend_device_params("soft_mask_attention")


def qkv(batch, heads, kv_heads, seq, dim, dtype, device):
    make = lambda h: torch.randn(batch, h, seq, dim, device=device).to(dtype)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def loop_column_scores(q, k, query_mask, key_mask, causal):
    """Row-by-row fp64 softmax: independent of the reference's vectorized masking."""
    B, H, S, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros(B, H, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                if not query_mask[b, i]:
                    continue
                cols = [j for j in range(S) if key_mask[b, j] and (not causal or j <= i)]
                if not cols:
                    continue
                s = (q[b, h, i].double() @ k[b, h // group, cols].double().T) / D**0.5
                out[b, h, cols] += torch.softmax(s, dim=0)
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_column_scores_reference_against_loops(seed, causal):
    q, k, _ = qkv(2, 4, 2, 13, 8, torch.float32, "cpu")
    query_mask = torch.rand(2, 13) < 0.6
    key_mask = torch.rand(2, 13) < 0.8
    got = attention_column_scores_reference(q, k, query_mask, key_mask, causal)
    assert_close("columns", got, loop_column_scores(q, k, query_mask, key_mask, causal).float(), torch.float32)


@pytest.mark.parametrize("bd", COLUMNS)
@pytest.mark.parametrize("size", ["one", "mid", "large"])
@pytest.mark.parametrize("causal", [True, False])
def test_column_scores_backends_match_reference(bd, seed, size, causal):
    backend, device = bd
    # O(S^2) work: the Triton interpreter gets smaller odd sizes than compiled backends.
    interpreted = backend == "triton" and device == "cpu"
    sizes = {
        "one": (1, 4, 4),
        "mid": (129 if interpreted else 577, 8, 2),
        "large": (257 if interpreted else 1031, 7, 1),
    }
    seq, heads, kv_heads = sizes[size]
    for dtype in dtypes_for(backend, device):
        q, k, _ = qkv(2, heads, kv_heads, seq, 64, dtype, device)
        query_mask = torch.rand(2, seq, device=device) < 0.3
        key_mask = torch.ones(2, seq, dtype=torch.bool, device=device)
        key_mask[1, : seq // 3] = False
        got = attention_column_scores(non_contiguous(q), k, query_mask, key_mask, causal=causal, backend=backend)
        want = attention_column_scores_reference(q, k, query_mask, key_mask, causal)
        assert_close(f"columns {dtype}", got, want, torch.float32, scale=100)


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
    q, k, v = qkv(2, 4, 2, 17, 8, torch.float64, "cpu")
    w = torch.rand(2, 17, dtype=torch.float64) * 0.98 + 0.01
    key_mask = torch.rand(2, 17) < 0.8
    key_mask[:, 0] = True
    got = soft_mask_attention_reference(q, k, v, w, key_mask, causal)
    assert_close("out", got, plain_softmax_attention(q, k, v, w, key_mask, causal), torch.float64)


def test_soft_mask_reference_gradcheck_fp64_with_exact_zeros_and_ones(seed):
    q, k, v = qkv(1, 2, 1, 9, 4, torch.float64, "cpu")
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
    q, k, v = qkv(2, 6, 2, 23, 16, torch.float64, "cpu")
    w = torch.rand(2, 23, dtype=torch.float64)
    w[:, ::5] = 0.0
    w[1, :] = 0.0  # a batch whose rows all sum to zero
    key_mask = torch.rand(2, 23) < 0.9
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
    out = soft_mask_attention_reference(*inputs, key_mask, causal)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, inputs, grad)
    got = soft_mask_attention_backward_reference(grad, q, k, v, w, key_mask, causal, None)
    for name, a, b in zip(("dq", "dk", "dv", "dw"), got, expected):
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert_close(name, a, b, torch.float64, scale=1e3)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(got[0][1], torch.zeros_like(got[0][1]))


@pytest.mark.parametrize("bd", SOFT)
@pytest.mark.parametrize("seq,heads,kv_heads", [(1, 2, 2), (67, 4, 1), (130, 7, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_soft_mask_backends_match_reference(bd, seed, seq, heads, kv_heads, causal):
    backend, device = bd
    for dtype in dtypes_for(backend, device):
        q, k, v = qkv(2, heads, kv_heads, seq, 64, dtype, device)
        w = torch.rand(2, seq, device=device)
        w[:, ::3] = 0.0
        w[:, 1::7] = 1.0
        key_mask = torch.ones(2, seq, dtype=torch.bool, device=device)
        key_mask[1, : seq // 4] = False
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
        out = soft_mask_attention(*inputs, key_mask, causal=causal, backend=backend)
        want = soft_mask_attention_reference(q, k, v, w, key_mask, causal)
        assert_close(f"out {dtype}", out, want, dtype, scale=4)
        grad = torch.randn_like(out)
        got_grads = torch.autograd.grad(out, inputs, grad)
        want_grads = soft_mask_attention_backward_reference(grad, q, k, v, w, key_mask, causal, None)
        for name, a, b in zip(("dq", "dk", "dv", "dw"), got_grads, want_grads):
            if name == "dw":  # a sum over heads and rows with cancellation: its error scales with its largest entries
                norm = b.detach().abs().max().clamp_min(1.0)
                a, b = a / norm, b / norm
            assert_close(f"{name} {dtype}", a, b, dtype, scale=20)


@pytest.mark.parametrize("bd", SOFT)
def test_soft_mask_hard_weights_equal_attention_over_kept_keys(bd, seed):
    """w in {0, 1}, non-causal: equals plain attention over only the kept keys, built with
    keep_index + compact_kv (keys) and gather_tokens (a padding mask)."""
    backend, device = bd
    q, k, v = qkv(2, 4, 2, 40, 32, torch.float32, device)
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
    assert_close("hard-pruned", out, want, torch.float32, scale=10)


@pytest.mark.parametrize("bd", SOFT)
def test_soft_mask_zero_rows_give_zero_and_zero_gradients(bd):
    backend, device = bd
    q, k, v = qkv(1, 2, 1, 12, 16, torch.float32, device)
    w = torch.ones(1, 12, device=device)
    w[0, :5] = 0.0  # causal rows 0..4 see only zero weights
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
    out = soft_mask_attention(*inputs, None, causal=True, backend=backend)
    assert torch.equal(out[0, :, :5], torch.zeros_like(out[0, :, :5]))
    dq, dk, dv, dw = torch.autograd.grad(out, inputs, torch.randn_like(out))
    assert torch.equal(dq[0, :, :5], torch.zeros_like(dq[0, :, :5]))
    assert bool(torch.isfinite(dw).all())
