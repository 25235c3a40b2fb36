"""compact_kv_paged against its gather-then-scatter reference, byte for byte: per-layer views
of one flat buffer in each of vLLM's six KV-cache layouts (K and V side by side in the content
axis), ragged requests (1, 577 and 4099 prompt tokens, 0 to all kept), scattered block tables,
a request that is not compacted, rows that are not sources poisoned with NaN (an unwritten
destination shows), every dtype it claims (fp8 moved as bytes), and clear errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import backend_device_params

from glimpse_ops import compact_kv_paged
from glimpse_ops.reference import compact_kv_paged_reference

PARAMS = backend_device_params("compact_kv_paged")
# vLLM's KVCacheLayout: the physical order of the logical axes [L, B, H, N, C] (C innermost)
LAYOUTS = ("LBNHC", "LBHNC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float8_e4m3fn)


def paged_caches(layout: str, layers: int, blocks: int, heads: int, block_size: int, content: int, dtype, device):
    """One flat buffer viewed as ``layers`` caches [num_blocks, Hkv, block_size, C] in ``layout``."""
    sizes = dict(L=layers, B=blocks, H=heads, N=block_size, C=content)
    physical = torch.randn([sizes[axis] for axis in layout], device=device)
    if dtype == torch.uint8:
        physical = torch.randint(0, 256, physical.shape, device=device, dtype=torch.uint8)
    else:
        physical = physical.to(dtype)
    logical = physical.permute([layout.index(axis) for axis in "LBHNC"])
    return [logical[layer] for layer in range(layers)]


def requests(lengths: list[int], kept: list[int], blocks: int, block_size: int, device, seed: int):
    """(block_table int32 [P, max_blocks], index int64 [P, Lmax]): request p's prompt of
    ``lengths[p]`` tokens on distinct random blocks, ``kept[p]`` sorted kept positions."""
    generator = torch.Generator().manual_seed(seed)
    per_request = [math.ceil(n / block_size) for n in lengths]
    order = torch.randperm(blocks, generator=generator)
    table = torch.full((len(lengths), max(per_request)), -1, dtype=torch.int32)
    used = 0
    for p, n in enumerate(per_request):
        table[p, :n] = order[used : used + n].int()
        used += n
    index = torch.full((len(lengths), max(max(kept), 1)), -1, dtype=torch.int64)
    for p, (n, k) in enumerate(zip(lengths, kept)):
        index[p, :k] = torch.randperm(n, generator=generator)[:k].sort().values
    return table.to(device), index.to(device)


def _poison_non_sources(caches, table, index, block_size) -> None:
    """NaN into every row of the requests' blocks that no kept row reads from."""
    if not caches[0].dtype.is_floating_point or caches[0].element_size() == 1:
        return
    for p in range(index.shape[0]):
        sources = set(index[p][index[p] >= 0].tolist())
        for position in range(table.shape[1] * block_size):
            block = int(table[p, position // block_size])
            if block >= 0 and position not in sources:
                for cache in caches:
                    cache[block, :, position % block_size] = float("nan")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


def _check(bd, layout, dtype, lengths, kept, seed, heads=2, content=64, block_size=16):
    backend, device = bd
    blocks = sum(math.ceil(n / block_size) for n in lengths) + 3  # three blocks of no request
    caches = paged_caches(layout, 2, blocks, heads, block_size, content, dtype, device)
    table, index = requests(lengths, kept, blocks, block_size, device, seed)
    _poison_non_sources(caches, table, index, block_size)
    want = [c.clone() for c in caches]
    compact_kv_paged_reference(want, table, index)
    before_table, before_index = table.clone(), index.clone()
    compact_kv_paged(caches, table, index, backend=backend)
    for layer, (got, expected) in enumerate(zip(caches, want)):
        if not torch.equal(_bytes(got), _bytes(expected)):
            bad = (_bytes(got) != _bytes(expected)).nonzero()[:3].tolist()
            raise AssertionError(f"{backend} {layout} {dtype} layer {layer}: bytes differ, first at {bad}")
    assert torch.equal(table, before_table) and torch.equal(index, before_index), "inputs other than caches kept"


@pytest.mark.parametrize("bd", PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_the_reference(bd, layout, seed):
    _check(bd, layout, torch.float32, lengths=[577, 1, 60, 33], kept=[58, 1, 60, 0], seed=seed)


@pytest.mark.parametrize("bd", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_matches_the_reference(bd, dtype, seed):
    _check(bd, "LBNHC", dtype, lengths=[577, 200], kept=[100, 7], seed=seed, heads=3, content=48)


@pytest.mark.parametrize("bd", PARAMS)
def test_a_long_prompt_and_odd_block_size(bd, seed):
    """4099 tokens on blocks of 7 (tiles of the Triton kernel cross block boundaries)."""
    _check(bd, "LBHNC", torch.float16, lengths=[4099, 577], kept=[410, 577], seed=seed, block_size=7, content=256)


@pytest.mark.parametrize("bd", PARAMS)
def test_nothing_to_do(bd):
    backend, device = bd
    caches = paged_caches("LBNHC", 1, 4, 1, 8, 16, torch.float32, device)
    before = caches[0].clone()
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    compact_kv_paged(caches, table, torch.full((1, 3), -1, device=device), backend=backend)
    compact_kv_paged([], table, torch.zeros(1, 1, dtype=torch.int64, device=device), backend=backend)
    assert torch.equal(caches[0], before)


ERRORS = [
    ("index rows must be strictly ascending", dict(index=[[3, 1, -1]])),
    ("index rows must hold the kept positions first", dict(index=[[0, -1, 2]])),
    ("index values must be in \\[-1, max_blocks \\* block_size\\) = \\[-1, 16\\)", dict(index=[[0, 16, -1]])),
    ("block_table rows must not share blocks", dict(table=[[0, 1], [1, 2]], index=[[9, -1, -1], [9, -1, -1]])),
    (
        "block_table entries of the blocks a row uses must be in \\[0, num_blocks=4\\), got 7",
        dict(table=[[0, 7]], index=[[9, -1, -1]]),
    ),
    ("block_table must be int32 \\[P, max_blocks\\]", dict(table_dtype=torch.int64)),
    ("index must be int64 \\[P, Lmax\\]", dict(index_dtype=torch.int32)),
    ("caches\\[0\\] must be fp32/fp16/bf16/uint8/float8_e4m3fn/float8_e5m2", dict(cache_dtype=torch.float64)),
    ("caches\\[1\\] must have the shape, strides and device of caches\\[0\\]", dict(second_shape=(4, 2, 8, 8))),
    ("caches\\[0\\] must have a contiguous last \\(content\\) axis", dict(strided=True)),
    ("index must have one row per block_table row", dict(index=[[0, -1, -1], [0, -1, -1]])),
]


@pytest.mark.parametrize("bd", PARAMS)
@pytest.mark.parametrize("message,case", ERRORS, ids=[m.split(" ")[0] + str(i) for i, (m, _) in enumerate(ERRORS)])
def test_bad_input_is_refused(bd, message, case):
    backend, device = bd
    shape = (4, 2, 8, 16)
    dtype = case.get("cache_dtype", torch.float32)
    first = torch.randn(4, 2, 8, 32)[..., ::2] if case.get("strided") else torch.randn(shape)
    caches = [first.to(dtype).to(device), torch.randn(case.get("second_shape", shape)).to(dtype).to(device)]
    table = torch.tensor(case.get("table", [[0, 1]]), dtype=case.get("table_dtype", torch.int32), device=device)
    index = torch.tensor(case.get("index", [[0, 2, -1]]), dtype=case.get("index_dtype", torch.int64), device=device)
    before = [c.clone() for c in caches]
    with pytest.raises((ValueError, TypeError), match=re.compile("glimpse.compact_kv_paged: " + message)):
        compact_kv_paged(caches, table, index, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(caches, before) if a.dtype != torch.float64), "nothing written"
