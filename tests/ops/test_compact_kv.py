"""compact_kv and compact_kv_into against the reference: ragged rows, both padding sides,
strided cache views, caller-provided outputs, and a property test over random keep masks."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_equal, backend_device_params, dtypes_for, kv_layers, non_contiguous, ragged_index
from hypothesis import given, settings
from hypothesis import strategies as st

from glimpse_ops import compact_kv, compact_kv_into
from glimpse_ops._backend import HAS_NATIVE
from glimpse_ops.reference import compact_kv_reference, keep_index_reference

COMPACT = backend_device_params("compact_kv")


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


@pytest.mark.parametrize("bd", COMPACT)
@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 30),
    n_layers=st.integers(1, 3),
    side=st.sampled_from(["left", "right"]),
)
def test_property_compact_kv_matches_reference(bd, data, batch, seq, n_layers, side):
    """This backend against the reference, and the reference against the definition (pad
    slots zero, kept slots the source rows)."""
    flags = data.draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    keep = torch.tensor(flags).view(batch, seq)
    index, _ = keep_index_reference(keep, seq, side)
    keys, values = kv_layers(n_layers, batch, 2, seq, 8, torch.float32, "cpu")
    want_k, want_v = compact_kv_reference(keys, values, index)
    backend, device = bd
    got_k, got_v = compact_kv(
        [k.to(device) for k in keys], [v.to(device) for v in values], index.to(device), backend=backend
    )
    for a, b in zip(got_k + got_v, want_k + want_v):
        assert_equal(f"kv[{backend}-{device}]", a, b.to(device))
    # pad slots are zero, kept slots are the source rows
    for t, src in zip(want_k, keys):
        for b in range(batch):
            for slot, pos in enumerate(index[b].tolist()):
                expected = torch.zeros_like(src[b, :, 0]) if pos < 0 else src[b, :, pos]
                assert torch.equal(t[b, :, slot], expected)


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


@pytest.mark.skipif(not HAS_NATIVE, reason="no native extension")
def test_compact_kv_into_native_writes_strided_sources_directly(seed):
    """The native kernel gathers into the caller's tensors (no temporary): strided and
    non-contiguous sources, fp32/fp16/bf16, and a batch of zero layers."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        big = torch.randn(2, 4, 700, 128).to(dtype)
        keys = [big[:, :, :577], big[:, :, 100:677]]
        values = [non_contiguous(torch.randn(2, 4, 577, 128).to(dtype)) for _ in range(2)]
        before = [t.clone() for t in keys + values]
        index = ragged_index(2, 577, "cpu", "right", max_len=590)
        outs = [torch.full((2, 4, 590, 128), float("nan"), dtype=dtype) for _ in range(4)]
        torch.ops.glimpse._compact_kv_into_native(keys, values, index, outs[:2], outs[2:])
        want_k, want_v = compact_kv_reference(keys, values, index)
        for got, want in zip(outs, want_k + want_v):
            assert_equal(f"into {dtype}", got, want)
        assert all(torch.equal(a, b) for a, b in zip(keys + values, before))
    torch.ops.glimpse._compact_kv_into_native([], [], index, [], [])


@pytest.mark.skipif(not HAS_NATIVE, reason="no native extension")
@pytest.mark.parametrize("dim,offset", [(64, 0), (64, 4), (72, 0), (8, 0)])
def test_compact_kv_into_native_row_widths_and_alignment(seed, dim, offset):
    """Rows of a multiple of 64 bytes into 32-byte aligned outputs take the streaming-store
    path; other widths (72 x 2 and 8 x 4 bytes) and an output 16 bytes off alignment take
    the plain copy. Both must give the reference, pads included."""
    keys, values = kv_layers(2, 3, 2, 577, dim, torch.bfloat16 if dim == 72 else torch.float32, "cpu")
    index = ragged_index(3, 577, "cpu", "left", max_len=600)
    outs = []
    for t in keys + values:
        flat = torch.full((t.shape[0] * t.shape[1] * 600 * dim + offset,), float("nan"), dtype=t.dtype)
        outs.append(flat[offset:].view(t.shape[0], t.shape[1], 600, dim))
    torch.ops.glimpse._compact_kv_into_native(keys, values, index, outs[:2], outs[2:])
    want_k, want_v = compact_kv_reference(keys, values, index)
    for got, want in zip(outs, want_k + want_v):
        assert_equal(f"into dim={dim} offset={offset}", got, want)


@pytest.mark.skipif(not HAS_NATIVE, reason="no native extension")
def test_compact_kv_into_native_refuses_bad_outputs():
    """Called directly (past the Python checks), the native op still names what is wrong
    and writes nothing out of bounds."""
    keys, values = kv_layers(2, 2, 2, 33, 16, torch.float32, "cpu")
    index = ragged_index(2, 33, "cpu")[:, :20]
    good = [torch.empty(2, 2, 20, 16) for _ in range(2)]
    native = torch.ops.glimpse._compact_kv_into_native
    bad = {
        r"out_keys\[1\] must be a contiguous CPU tensor \[2, 2, 20, 16\], got \[2, 2, 19, 16\] on cpu": (
            [good[0], torch.empty(2, 2, 19, 16)],
            good,
        ),
        r"out_values\[1\] must be a contiguous CPU tensor .* on cpu, not contiguous": (
            good,
            [good[0], torch.empty(2, 2, 16, 20).transpose(2, 3)],
        ),
        r"out_keys and out_values must hold one tensor per layer \(2\), got 1 and 2": (good[:1], good),
    }
    for message, (out_keys, out_values) in bad.items():
        with pytest.raises(ValueError, match=r"glimpse.compact_kv_into: " + message):
            native(keys, values, index, out_keys, out_values)
    with pytest.raises(
        TypeError, match=r"glimpse.compact_kv_into: out_values\[0\] must have the inputs' dtype Float, got Half"
    ):
        native(keys, values, index, good, [torch.empty(2, 2, 20, 16, dtype=torch.half), good[1]])
    with pytest.raises(ValueError, match=r"glimpse.compact_kv_into: index values must be in \[-1, S\)"):
        native(keys, values, index + 40, good, good)


@pytest.mark.parametrize("bd", COMPACT)
def test_compact_kv_into_refuses_outputs_sharing_memory(bd, seed):
    """The kernels write rows in place while others are still to be read: an output that
    overlaps an input (left padding moves row 0 to a later slot after zeroing slot 0) or
    another output is an error on every backend, not a wrong result or a race."""
    backend, device = bd
    dtype = dtypes_for(backend, device)[-1]
    cache = torch.randn(1, 1, 20, 16, device=device).to(dtype)
    keys, values = [cache[:, :, :8]], [torch.randn(1, 1, 8, 16, device=device).to(dtype)]
    keep = torch.zeros(1, 8, dtype=torch.bool, device=device)
    keep[0, [0, 2]] = True
    index = keep_index_reference(keep, 8, "left")[0]
    fresh = torch.empty(1, 1, 8, 16, device=device, dtype=dtype)
    into = {
        "out_keys[0] overlaps the input keys[0]": ([cache[:, :, 2:10]], [fresh]),
        "out_values[0] overlaps the input values[0]": ([fresh], [values[0]]),
        "out_keys[0] and out_values[0] share memory": ([fresh], [fresh]),
    }
    for message, (out_keys, out_values) in into.items():
        with pytest.raises(ValueError, match=rf"glimpse.compact_kv_into: {re.escape(message)}"):
            compact_kv_into(keys, values, index, out_keys, out_values, backend=backend)
    apart = cache[:, :, 8:16]  # the same storage, other bytes: fine
    compact_kv_into(keys, values, index, [apart], [fresh], backend=backend)
    want_k, want_v = compact_kv_reference(keys, values, index)
    assert_equal("apart", apart, want_k[0])
    assert_equal("fresh", fresh, want_v[0])


@pytest.mark.skipif(not HAS_NATIVE, reason="no native extension")
def test_compact_kv_into_native_refuses_outputs_sharing_memory():
    keys, values = kv_layers(2, 1, 1, 8, 16, torch.float32, "cpu")
    index = ragged_index(1, 8, "cpu", max_len=8)
    out = torch.empty(1, 1, 8, 16)
    native = torch.ops.glimpse._compact_kv_into_native
    with pytest.raises(ValueError, match=r"glimpse.compact_kv_into: out_keys\[1\] overlaps the input keys\[1\]"):
        native(keys, values, index, [out, keys[1]], [torch.empty_like(out), torch.empty_like(out)])
    with pytest.raises(ValueError, match=r"glimpse.compact_kv_into: out_keys\[0\] and out_values\[1\] share memory"):
        native(keys, values, index, [out, torch.empty_like(out)], [torch.empty_like(out), out])
