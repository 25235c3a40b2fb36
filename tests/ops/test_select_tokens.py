"""select_tokens against its reference: thresholds, caps, minimums, ties, NaN, ragged rows."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_equal, backend_device_params, non_contiguous, random_keep_scores
from hypothesis import given, settings
from hypothesis import strategies as st

from glimpse_ops import select_tokens
from glimpse_ops.reference import select_tokens_reference

PARAMS = backend_device_params("select_tokens")


@pytest.mark.parametrize("bd", PARAMS)
@pytest.mark.parametrize("seq", [1, 577, 4099])
@pytest.mark.parametrize(
    "threshold,max_keep,min_keep",
    [(0.5, 0, 0), (0.9, 40, 1), (None, 30, 0), (0.999, 0, 5), (None, 0, 0), (0.2, 7, 3)],
)
def test_matches_reference(bd, seed, seq, threshold, max_keep, min_keep):
    backend, device = bd
    scores = random_keep_scores(3, seq, device)
    candidates = torch.rand(3, seq, device=device) < 0.8
    got = select_tokens(scores, candidates, threshold=threshold, max_keep=max_keep, min_keep=min_keep, backend=backend)
    want = select_tokens_reference(scores, candidates, threshold, max_keep, min_keep)
    assert_equal("keep", got, want)


@pytest.mark.parametrize("bd", PARAMS)
def test_ties_keep_lower_index_and_nan_ranks_last(bd):
    backend, device = bd
    scores = torch.tensor([[0.5, 0.7, 0.5, float("nan"), 0.7, 0.5, -0.0, 0.0]], device=device)
    keep = select_tokens(scores, None, threshold=None, max_keep=3, backend=backend)
    assert keep.cpu().tolist() == [[True, True, False, False, True, False, False, False]]
    # min_keep reaches the NaN only after every number.
    keep = select_tokens(scores, None, threshold=10.0, min_keep=7, backend=backend)
    assert keep.cpu().tolist() == [[True, True, True, False, True, True, True, True]]
    # -0.0 and 0.0 tie: the lower index wins.
    keep = select_tokens(scores[:, 6:], None, threshold=None, max_keep=1, backend=backend)
    assert keep.cpu().tolist() == [[True, False]]


@pytest.mark.parametrize("bd", PARAMS)
def test_nan_never_passes_threshold_and_noncandidates_kept(bd):
    backend, device = bd
    scores = torch.tensor([[float("nan"), 0.9, 0.1, 0.95], [0.2, float("nan"), 0.8, 0.3]], device=device)
    candidates = torch.tensor([[True, True, True, False], [True, True, False, True]], device=device)
    keep = select_tokens(scores, candidates, threshold=0.5, backend=backend)
    assert keep.cpu().tolist() == [[False, True, False, True], [False, False, True, False]]


@pytest.mark.parametrize("bd", PARAMS)
def test_per_row_caps_and_min_keep_above_candidates(bd, seed):
    backend, device = bd
    scores = random_keep_scores(4, 300, device)
    candidates = torch.rand(4, 300, device=device) < 0.5
    candidates[3] = False
    caps = torch.tensor([5, 0, 120, 3], device=device)
    got = select_tokens(scores, candidates, threshold=0.1, max_keep=caps, min_keep=400, backend=backend)
    want = select_tokens_reference(scores, candidates, 0.1, caps, 400)
    assert_equal("keep", got, want)
    assert bool(got[3].all()), "a row without candidates keeps everything"


@pytest.mark.parametrize("bd", PARAMS)
def test_non_contiguous_inputs_and_inputs_untouched(bd, seed):
    backend, device = bd
    scores = non_contiguous(random_keep_scores(2, 577, device))
    candidates = non_contiguous(torch.rand(2, 577, device=device) < 0.7)
    scores_before, cand_before = scores.clone(), candidates.clone()
    got = select_tokens(scores, candidates, threshold=0.3, max_keep=50, min_keep=2, backend=backend)
    want = select_tokens_reference(scores.contiguous(), candidates.contiguous(), 0.3, 50, 2)
    assert_equal("keep", got, want)
    assert torch.equal(scores, scores_before) and torch.equal(candidates, cand_before)


def test_reference_semantics_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.4, 0.6, 0.95]])
    keep = select_tokens_reference(scores, None, 0.5, 2, 0)
    assert keep.tolist() == [[False, True, False, False, True]]
    keep = select_tokens_reference(scores, None, 0.99, 0, 2)
    assert keep.tolist() == [[False, True, False, False, True]]
    keep = select_tokens_reference(scores, torch.tensor([[True, True, False, True, False]]), None, 1, 0)
    assert keep.tolist() == [[False, True, True, False, True]]


score_values = st.sampled_from([0.0, -0.0, 0.25, 0.5, 1.0, -1.0, float("nan"), float("inf"), float("-inf")])


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 40),
    threshold=st.one_of(st.none(), st.sampled_from([0.0, 0.3, 0.5, -2.0])),
    max_keep=st.integers(-1, 45),
    min_keep=st.integers(0, 45),
)
def test_property_matches_reference(data, batch, seq, threshold, max_keep, min_keep):
    values = data.draw(st.lists(score_values, min_size=batch * seq, max_size=batch * seq))
    flags = data.draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    scores = torch.tensor(values, dtype=torch.float32).view(batch, seq)
    candidates = torch.tensor(flags).view(batch, seq)
    want = select_tokens_reference(scores, candidates, threshold, max_keep, min_keep)
    for backend, device in (p.values[0] for p in PARAMS):
        got = select_tokens(
            scores.to(device),
            candidates.to(device),
            threshold=threshold,
            max_keep=max_keep,
            min_keep=min_keep,
            backend=backend,
        )
        assert_equal(f"keep[{backend}-{device}]", got, want.to(device))
    # The spec's invariants, independent of any implementation.
    n_cand = candidates.sum(1)
    kept_cand = (want & candidates).sum(1)
    assert bool((want | candidates).all()), "non-candidates are kept"
    assert bool((kept_cand >= torch.clamp(n_cand, max=min_keep)).all())
    if max_keep > 0:
        assert bool((kept_cand <= max(max_keep, min_keep)).all())
