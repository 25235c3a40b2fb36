"""gather_tokens against its reference: every dtype (floats, int64, bool), odd sizes, M-RoPE
position ids through a view, non-contiguous hidden states, inputs untouched."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_equal, backend_device_params, non_contiguous, ragged_index

from glimpse_ops import gather_tokens
from glimpse_ops.reference import gather_tokens_reference

GATHER = backend_device_params("gather_tokens")


@pytest.mark.parametrize("bd", GATHER)
@pytest.mark.parametrize("seq", [1, 577, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_gather_tokens_matches_reference(bd, seed, seq, dtype):
    backend, device = bd
    x = (torch.randn(3, seq, 5, device=device) * 10).to(dtype)
    index = ragged_index(3, seq, device)
    pad = True if dtype == torch.bool else 7
    got = gather_tokens(x, index, pad_value=pad, backend=backend)
    assert_equal("out", got, gather_tokens_reference(x, index, pad))


@pytest.mark.parametrize("bd", GATHER)
def test_gather_tokens_position_ids_view_and_noncontiguous(bd, seed):
    backend, device = bd
    positions = torch.randint(0, 1000, (3, 2, 577), device=device)  # M-RoPE [3, B, S]
    index = ragged_index(2, 577, device, "right")
    got = gather_tokens(positions.permute(1, 2, 0), index, pad_value=1, backend=backend).permute(2, 0, 1)
    want = torch.stack([gather_tokens_reference(p, index, 1) for p in positions])
    assert_equal("positions", got, want)
    hidden = non_contiguous(torch.randn(2, 577, 64, device=device))
    before = hidden.clone()
    assert_equal(
        "hidden",
        gather_tokens(hidden, index, pad_value=0.0, backend=backend),
        gather_tokens_reference(hidden, index, 0.0),
    )
    assert torch.equal(hidden, before)
    mask2d = torch.rand(2, 577, device=device) < 0.5
    assert_equal(
        "mask",
        gather_tokens(mask2d, index, pad_value=False, backend=backend),
        gather_tokens_reference(mask2d, index, False),
    )
