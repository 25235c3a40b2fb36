"""gather_tokens, compact_kv and prune_kv against their references."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_equal, backend_device_params, dtypes_for, non_contiguous, random_keep_scores
from hypothesis import given, settings
from hypothesis import strategies as st

from glimpse_ops import compact_kv, compact_kv_into, gather_tokens, keep_index, prune_kv
from glimpse_ops.reference import (
    compact_kv_reference,
    gather_tokens_reference,
    keep_index_reference,
    prune_kv_reference,
    select_tokens_reference,
)

GATHER = backend_device_params("gather_tokens")
COMPACT = backend_device_params("compact_kv")
PRUNE = backend_device_params("prune_kv")


def ragged_index(batch: int, seq: int, device: str, padding_side: str = "left", max_len: int | None = None):
    """An index from rows that keep 5% .. 100% of their tokens."""
    ratios = torch.linspace(0.05, 1.0, batch)[:, None].to(device)
    keep = torch.rand(batch, seq, device=device) < ratios
    keep[:, -1] = True
    return keep_index_reference(keep, max_len, padding_side)[0]


def kv_layers(n_layers: int, batch: int, kv_heads: int, seq: int, dim: int, dtype, device):
    make = lambda: torch.randn(batch, kv_heads, seq, dim, device=device).to(dtype)  # noqa: E731
    return [make() for _ in range(n_layers)], [make() for _ in range(n_layers)]


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


@pytest.mark.parametrize("bd", COMPACT)
@pytest.mark.parametrize("seq,kv_heads", [(1, 1), (577, 4), (4099, 2)])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_compact_kv_matches_reference(bd, seed, seq, kv_heads, padding_side):
    backend, device = bd
    for dtype in dtypes_for(backend, device):
        keys, values = kv_layers(3, 3, kv_heads, seq, 64, dtype, device)
        index = ragged_index(3, seq, device, padding_side, max_len=seq + 2)
        got_k, got_v = compact_kv(keys, values, index, backend=backend)
        want_k, want_v = compact_kv_reference(keys, values, index)
        for layer in range(3):
            assert_equal(f"keys[{layer}] {dtype}", got_k[layer], want_k[layer])
            assert_equal(f"values[{layer}] {dtype}", got_v[layer], want_v[layer])


@pytest.mark.parametrize("bd", COMPACT)
def test_compact_kv_strided_cache_views(bd, seed):
    backend, device = bd
    big = torch.randn(2, 4, 700, 128, device=device)
    keys = [big[:, :, :577], big[:, :, 100:677]]  # slices of a preallocated cache
    values = [non_contiguous(torch.randn(2, 4, 577, 128, device=device)) for _ in range(2)]
    before = [t.clone() for t in keys + values]
    index = ragged_index(2, 577, device)
    got_k, got_v = compact_kv(keys, values, index, backend=backend)
    want_k, want_v = compact_kv_reference(keys, values, index)
    for got, want in zip(got_k + got_v, want_k + want_v):
        assert_equal("compacted", got, want)
    assert all(torch.equal(a, b) for a, b in zip(keys + values, before))


@pytest.mark.parametrize("bd", COMPACT)
def test_compact_kv_no_layers(bd):
    backend, device = bd
    index = torch.tensor([[0, -1]], device=device)
    assert compact_kv([], [], index, backend=backend) == ([], [])


@pytest.mark.parametrize("bd", PRUNE)
@pytest.mark.parametrize("seq", [577, 4099])
@pytest.mark.parametrize("max_len", [None, 4200])
def test_prune_kv_matches_reference(bd, seed, seq, max_len):
    backend, device = bd
    dtype = dtypes_for(backend, device)[-1]
    scores = random_keep_scores(3, seq, device)
    candidates = torch.zeros(3, seq, dtype=torch.bool, device=device)
    candidates[:, 10 : seq - 10] = True
    keys, values = kv_layers(4, 3, 2, seq, 64, dtype, device)
    caps = torch.tensor([seq // 20, seq // 10, 0], device=device)
    got = prune_kv(
        scores,
        candidates,
        keys,
        values,
        threshold=0.8,
        max_keep=caps,
        min_keep=1,
        max_len=max_len,
        padding_side="left",
        backend=backend,
    )
    want = prune_kv_reference(scores, candidates, keys, values, 0.8, caps, 1, max_len, "left")
    for name, a, b in zip(("index", "lengths", "keep"), got[2:], want[2:]):
        assert_equal(name, a, b)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert_equal("kv", a, b)
    assert len(set(got[3].tolist())) == 3, "the rows keep different counts"


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 30),
    n_layers=st.integers(1, 3),
    side=st.sampled_from(["left", "right"]),
)
def test_property_compact_kv_matches_reference(data, batch, seq, n_layers, side):
    flags = data.draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    keep = torch.tensor(flags).view(batch, seq)
    index, _ = keep_index_reference(keep, seq, side)
    keys, values = kv_layers(n_layers, batch, 2, seq, 8, torch.float32, "cpu")
    want_k, want_v = compact_kv_reference(keys, values, index)
    for backend, device in (p.values[0] for p in COMPACT):
        got_k, got_v = compact_kv(
            [k.to(device) for k in keys], [v.to(device) for v in values], index.to(device), backend=backend
        )
        for a, b in zip(got_k + got_v, want_k + want_v):
            assert_equal(f"kv[{backend}]", a, b.to(device))
    # pad slots are zero, kept slots are the source rows
    for t, src in zip(want_k, keys):
        for b in range(batch):
            for slot, pos in enumerate(index[b].tolist()):
                expected = torch.zeros_like(src[b, :, 0]) if pos < 0 else src[b, :, pos]
                assert torch.equal(t[b, :, slot], expected)


def test_keep_index_and_select_compose_like_prune_kv(seed):
    scores = random_keep_scores(2, 100, "cpu")
    keep = select_tokens_reference(scores, None, None, 10, 0)
    index, lengths = keep_index(keep, max_len=None)
    assert lengths.tolist() == [10, 10] and index.shape == (2, 10)


@pytest.mark.parametrize("bd", COMPACT)
def test_compact_kv_into_caller_outputs(bd, seed):
    backend, device = bd
    keys, values = kv_layers(3, 2, 2, 577, 64, dtypes_for(backend, device)[-1], device)
    index = ragged_index(2, 577, device, "left", max_len=600)
    out_keys = [torch.full((2, 2, 600, 64), float("nan"), dtype=keys[0].dtype, device=device) for _ in keys]
    out_values = [torch.full_like(t, float("nan")) for t in out_keys]
    targets = [t.data_ptr() for t in out_keys + out_values]
    compact_kv_into(keys, values, index, out_keys, out_values, backend=backend)
    want_k, want_v = compact_kv_reference(keys, values, index)
    for got, want in zip(out_keys + out_values, want_k + want_v):
        assert_equal("into", got, want)
    assert [t.data_ptr() for t in out_keys + out_values] == targets
    with pytest.raises(ValueError, match=r"glimpse.compact_kv_into: out_keys\[0\] must be a contiguous"):
        compact_kv_into(keys, values, index, [t[:, :, :10] for t in out_keys], out_values, backend=backend)
