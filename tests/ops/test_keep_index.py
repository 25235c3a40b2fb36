"""keep_index against its reference: left/right padding, max_len, overflow, ragged rows."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_equal, backend_device_params, non_contiguous
from hypothesis import given, settings
from hypothesis import strategies as st

from glimpse_ops import keep_index
from glimpse_ops.reference import keep_index_reference

PARAMS = backend_device_params("keep_index")


@pytest.mark.parametrize("bd", PARAMS)
@pytest.mark.parametrize("seq", [1, 577, 4099])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("with_max_len", [False, True])
def test_matches_reference(bd, seed, seq, padding_side, with_max_len):
    backend, device = bd
    ratios = torch.tensor([0.05, 0.5, 0.9, 1.0])[:, None]
    keep = torch.rand(4, seq, device=device) < ratios.to(device)
    keep[0, 0] = True
    max_len = seq + 3 if with_max_len else None
    index, lengths = keep_index(keep, max_len=max_len, padding_side=padding_side, backend=backend)
    want_index, want_lengths = keep_index_reference(keep, max_len, padding_side)
    assert_equal("index", index, want_index)
    assert_equal("lengths", lengths, want_lengths)


@pytest.mark.parametrize("bd", PARAMS)
def test_layout_by_hand(bd):
    backend, device = bd
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]], device=device)
    index, lengths = keep_index(keep, max_len=None, padding_side="left", backend=backend)
    assert index.cpu().tolist() == [[0, 2], [-1, 3]]
    assert lengths.cpu().tolist() == [2, 1]
    index, _ = keep_index(keep, max_len=3, padding_side="right", backend=backend)
    assert index.cpu().tolist() == [[0, 2, -1], [3, -1, -1]]


@pytest.mark.parametrize("bd", [p for p in PARAMS if p.values[0][1] == "cpu"])
def test_row_longer_than_max_len_raises_on_cpu(bd):
    backend, device = bd
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, :4] = False
    with pytest.raises(
        ValueError, match=r"glimpse.keep_index: every row must keep at most max_len=8 tokens, got 10 in row 0"
    ):
        keep_index(keep, max_len=8, backend=backend)


@pytest.mark.parametrize("bd", PARAMS)
def test_non_contiguous_keep(bd, seed):
    backend, device = bd
    keep = non_contiguous(torch.rand(3, 100, device=device) < 0.3)
    index, lengths = keep_index(keep, max_len=100, padding_side="left", backend=backend)
    want = keep_index_reference(keep.contiguous(), 100, "left")
    assert_equal("index", index, want[0])
    assert_equal("lengths", lengths, want[1])


@pytest.mark.parametrize("bd", PARAMS)
@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    seq=st.integers(1, 50),
    side=st.sampled_from(["left", "right"]),
    slack=st.integers(0, 3),
)
def test_property_positions_are_the_kept_tokens_in_order(bd, data, batch, seq, side, slack):
    """The reference against a row-by-row oracle, and this backend against the reference."""
    flags = data.draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    keep = torch.tensor(flags).view(batch, seq)
    keep[:, 0] |= ~keep.any(1)
    max_len = int(keep.sum(1).max()) + slack
    want_index, want_lengths = keep_index_reference(keep, max_len, side)
    for b in range(batch):
        row = want_index[b][want_index[b] >= 0]
        assert row.tolist() == keep[b].nonzero().squeeze(1).tolist()
        pads = (want_index[b] < 0).nonzero().squeeze(1)
        expected_pads = range(max_len - len(row)) if side == "left" else range(len(row), max_len)
        assert pads.tolist() == list(expected_pads)
    backend, device = bd
    index, lengths = keep_index(keep.to(device), max_len=max_len, padding_side=side, backend=backend)
    assert_equal(f"index[{backend}-{device}]", index, want_index.to(device))
    assert_equal(f"lengths[{backend}-{device}]", lengths, want_lengths.to(device))
