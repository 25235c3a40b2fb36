"""glimpse_prune against its reference: scores within tolerance, and the selection, index,
lengths and compacted caches exactly the contract applied to the scores the op returned."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close,
    assert_equal,
    backend_device_params,
    dtypes_for,
    glimpse_qk,
    left_padding_mask,
    tolerance_for,
)

from glimpse_ops import glimpse_prune
from glimpse_ops.reference import (
    compact_kv_reference,
    glimpse_prune_reference,
    glimpse_scores_reference,
    keep_index_reference,
    select_tokens_reference,
)

PRUNE = backend_device_params("glimpse_prune")

# (atol, rtol) of the fp32 scores (head-averaged probabilities, about 1/S each) against the fp64
# reference of the same rounded inputs, by input dtype: relative (atol 0), so a kernel that drops
# small probabilities fails. Measured with `python tests/error_survey.py --ops glimpse_prune
# --seeds 6` (TRITON_INTERPRET=1 for triton-cpu) at de7ec04: rel 1.6e-6 over every entry and
# backend, margin 5x. The CUDA rows are provisional until bench/gpu_check.py's survey runs.
SCORES = (0.0, 8e-6)
TOLERANCES = {
    key: {dtype: SCORES for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    for key in ("reference-cpu", "native-cpu", "triton-cpu", "reference-cuda")
} | {"triton-cuda": {dtype: (0.0, 3e-5) for dtype in (torch.float32, torch.float16, torch.bfloat16)}}


@pytest.mark.parametrize("bd", PRUNE)
@pytest.mark.parametrize("seq", [1, 577, 4099])
@pytest.mark.parametrize("max_len", [None, 4200])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_glimpse_prune_consistent_with_reference(bd, seed, seq, max_len, padding_side):
    backend, device = bd
    dtype = dtypes_for(backend, device)[-1]
    q, k = glimpse_qk(3, 8, 2, 1, seq, 64, dtype, device)
    keys = [torch.randn_like(k), k, torch.randn_like(k)]  # scored at layer 1: not the first, not the last
    values = [torch.randn_like(k) for _ in range(3)]
    mask = left_padding_mask(3, seq, device)
    cand = torch.rand(3, seq, device=device) < 0.9
    caps = torch.tensor([max(seq // 10, 1), max(seq // 4, 1), 0], device=device)
    got_k, got_v, index, lengths, scores = glimpse_prune(
        q,
        keys,
        values,
        mask,
        cand,
        1,
        scale=None,
        threshold=1.0 / seq if seq > 1 else None,
        max_keep=caps,
        min_keep=1,
        max_len=max_len,
        padding_side=padding_side,
        backend=backend,
    )
    want = glimpse_prune_reference(
        q, keys, values, mask, cand, 1, None, 1.0 / seq if seq > 1 else None, caps, 1, max_len, padding_side
    )
    exact = glimpse_scores_reference(q.double(), k.double(), mask, None, "probs").mean(dim=(1, 2))
    assert_close("scores", scores, exact, tolerance_for(TOLERANCES, bd, dtype))
    assert_close("reference scores", want[4], exact, tolerance_for(TOLERANCES, ("reference", device), dtype))
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
    q, k = glimpse_qk(2, 4, 4, 2, 50, 16, torch.float32, device)
    mask = torch.ones(2, 50, dtype=torch.bool, device=device)
    mask[1, :7] = False
    out_k, out_v, index, lengths, scores = glimpse_prune(q, [k], [k.clone()], mask, None, 0, backend=backend)
    assert lengths.tolist() == [50, 43]
    assert index[1, :7].tolist() == [-1] * 7 and index[1, 7:].tolist() == list(range(7, 50))
    assert_close("row sums", scores.sum(1), torch.ones(2, device=device), tolerance_for(TOLERANCES, bd, torch.float32))
    assert bool((scores[1, :7] == 0).all()), "padding scores exactly 0"
