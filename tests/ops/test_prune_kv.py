"""prune_kv against its reference (selection, index, lengths, compacted caches), and the
composition of select_tokens and keep_index it stands for."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_equal, backend_device_params, dtypes_for, kv_layers, random_keep_scores

from glimpse_ops import compact_kv, keep_index, prune_kv, select_tokens
from glimpse_ops.reference import prune_kv_reference

PRUNE = backend_device_params("prune_kv")


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


@pytest.mark.parametrize("bd", PRUNE)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prune_kv_equals_select_index_compact_composed(bd, seed, padding_side):
    """prune_kv is select_tokens + keep_index + compact_kv: on scores with ties (every value
    drawn from 8), a threshold, per-row caps and min_keep, the fused op gives what the three
    separate ops of the same backend give, entry for entry."""
    backend, device = bd
    dtype = dtypes_for(backend, device)[-1]
    scores = torch.randint(0, 8, (3, 300), device=device).float() / 8
    candidates = torch.rand(3, 300, device=device) < 0.7
    keys, values = kv_layers(3, 3, 2, 300, 32, dtype, device)
    caps = torch.tensor([12, 0, 40], device=device)
    got = prune_kv(
        scores,
        candidates,
        keys,
        values,
        threshold=0.5,
        max_keep=caps,
        min_keep=20,
        max_len=300,
        padding_side=padding_side,
        backend=backend,
    )
    keep = select_tokens(scores, candidates, threshold=0.5, max_keep=caps, min_keep=20, backend=backend)
    index, lengths = keep_index(keep, max_len=300, padding_side=padding_side, backend=backend)
    new_keys, new_values = compact_kv(keys, values, index, backend=backend)
    for name, a, b in zip(("index", "lengths", "keep"), got[2:], (index, lengths, keep)):
        assert_equal(name, a, b)
    for a, b in zip(got[0] + got[1], new_keys + new_values):
        assert_equal("kv", a, b)
    assert set(lengths.tolist()) != {lengths[0].item()}, "the rows keep different counts"
