"""attention_column_scores: the reference against an independent row-by-row fp64 softmax,
every backend against the reference at odd sizes, GQA, causal or not, ragged masks; the
native CPU kernel at 4099 keys."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, attention_qkv, backend_device_params, dtypes_for, non_contiguous, tolerance_for

from glimpse_ops import attention_column_scores
from glimpse_ops._backend import REGISTRY
from glimpse_ops.reference import attention_column_scores_reference

COLUMNS = backend_device_params("attention_column_scores")

# (atol, rtol) of the fp32 column sums against the fp64 reference of the same rounded inputs:
# each sums up to S probabilities, positive terms without cancellation, so the comparison is
# relative for every entry (atol 0: a column that should be exactly 0, a key no selected row
# sees, must be). Measured with `python tests/error_survey.py --ops attention_column_scores
# --seeds 6` (TRITON_INTERPRET=1 for triton-cpu) at de7ec04: rel 1.7e-6 (native), 1.2e-6
# (reference) over every nonzero entry, every input dtype; margin 5x. The CUDA rows are
# provisional until bench/gpu_check.py's survey calibrates them.
COLUMNS_TOLERANCE = (0.0, 8e-6)
TOLERANCES = {
    key: {dtype: COLUMNS_TOLERANCE for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    for key in ("reference-cpu", "native-cpu", "triton-cpu", "reference-cuda")
} | {"triton-cuda": {dtype: (0.0, 3e-5) for dtype in (torch.float32, torch.float16, torch.bfloat16)}}
# the fp32 reference against the fp64 loops
REFERENCE_TOLERANCE = (1e-5, 1e-5)


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
    q, k, _ = attention_qkv(2, 4, 2, 13, 8, torch.float32, "cpu")
    query_mask = torch.rand(2, 13) < 0.6
    key_mask = torch.rand(2, 13) < 0.8
    got = attention_column_scores_reference(q, k, query_mask, key_mask, causal)
    assert_close("columns", got, loop_column_scores(q, k, query_mask, key_mask, causal).float(), REFERENCE_TOLERANCE)


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
        q, k, _ = attention_qkv(2, heads, kv_heads, seq, 64, dtype, device)
        query_mask = torch.rand(2, seq, device=device) < 0.3
        key_mask = torch.ones(2, seq, dtype=torch.bool, device=device)
        key_mask[1, : seq // 3] = False
        got = attention_column_scores(non_contiguous(q), k, query_mask, key_mask, causal=causal, backend=backend)
        want = attention_column_scores_reference(q.double(), k.double(), query_mask, key_mask, causal)
        assert_close(f"columns {dtype}", got, want, tolerance_for(TOLERANCES, bd, dtype))


@pytest.mark.skipif(
    "native" not in REGISTRY["attention_column_scores"].available("cpu"), reason="the native extension is not built"
)
@pytest.mark.parametrize("causal", [True, False])
def test_column_scores_native_cpu_long_every_row_and_no_row(seed, causal):
    """4099 keys, bf16: every row selected (query_mask None) and a batch with no selected
    row (all zeros), against the reference."""
    q, k, _ = attention_qkv(2, 4, 2, 4099, 64, torch.bfloat16, "cpu")
    key_mask = torch.rand(2, 4099) < 0.9
    got = attention_column_scores(q, k, None, key_mask, causal=causal, backend="native")
    # the fp32 reference stands in for fp64 at this size (its own rel error, 1.2e-6, is within
    # the margin); fp64 would double the test's time
    tolerance = tolerance_for(TOLERANCES, ("native", "cpu"), torch.bfloat16)
    want = attention_column_scores_reference(q, k, None, key_mask, causal)
    assert_close("every row", got, want, tolerance)
    query_mask = torch.rand(2, 4099) < 0.1
    query_mask[1] = False
    got = attention_column_scores(q, k, query_mask, key_mask, causal=causal, backend="native")
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    want = attention_column_scores_reference(q, k, query_mask, key_mask, causal)
    assert_close("selected rows", got, want, tolerance)
