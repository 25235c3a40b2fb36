"""glimpse_prune against its reference: scores within tolerance, and the selection, index,
lengths and compacted caches exactly the contract applied to the scores the op returned."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_equal, backend_device_params, dtypes_for, glimpse_qk, left_padding_mask

from glimpse_ops import glimpse_prune
from glimpse_ops.reference import (
    compact_kv_reference,
    glimpse_prune_reference,
    keep_index_reference,
    select_tokens_reference,
)

PRUNE = backend_device_params("glimpse_prune")

# (atol, rtol) of the fp32 scores, by input dtype (the reference scores the same rounded inputs)
TOLERANCES = {dtype: (1e-4, 1e-4) for dtype in (torch.float32, torch.float16, torch.bfloat16)}


@pytest.mark.parametrize("bd", PRUNE)
@pytest.mark.parametrize("seq", [1, 577, 4099])
@pytest.mark.parametrize("max_len", [None, 4200])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_glimpse_prune_consistent_with_reference(bd, seed, seq, max_len, padding_side):
    backend, device = bd
    dtype = dtypes_for(backend, device)[-1]
    q, k = glimpse_qk(3, 8, 2, 1, seq, 64, dtype, device)
    keys = [k] + [torch.randn_like(k) for _ in range(2)]
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
    assert_close("scores", scores, want[4], TOLERANCES[dtype])
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
    assert_close("row sums", scores.sum(1), torch.ones(2, device=device), TOLERANCES[torch.float32])
