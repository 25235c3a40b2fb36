"""select_tokens against its reference: thresholds, caps, minimums, ties, NaN, ragged rows."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from helpers import assert_equal, backend_device_params, non_contiguous, random_keep_scores
from hypothesis import event, given, settings
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


# Values with ties (equal numbers, -0.0 and 0.0), NaN and infinities, mixed with distinct ones.
score_values = st.one_of(
    st.sampled_from([0.0, -0.0, 0.25, 0.5, 1.0, -1.0, float("nan"), float("inf"), float("-inf")]),
    st.floats(-3.0, 3.0, width=32),
)
THRESHOLDS = [0.0, 0.3, 0.5, -2.0, float("-inf"), float("inf")]
# How max_keep and min_keep relate to the row: every rule combination is drawn as often as any
# other (the previous strategy drew caps regardless of the row length and met a threshold, a
# binding cap and a smaller min_keep together in about 1% of examples).
CAP_KINDS = ("none", "binding", "loose", "per_row")
MIN_KINDS = ("zero", "below_cap", "above_kept", "above_candidates")


class Selection(NamedTuple):
    scores: torch.Tensor  # fp32 [B, S]
    candidates: torch.Tensor  # bool [B, S]
    threshold: float | None
    max_keep: int | torch.Tensor
    min_keep: int
    regime: tuple[str, ...]  # what the rules did in each row, for hypothesis' statistics


def _passing(scores: torch.Tensor, candidates: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Candidates passing the threshold, per row (all candidates without one)."""
    if threshold is None:
        return candidates.sum(1)
    return (candidates & (scores > torch.tensor(threshold, dtype=torch.float32))).sum(1)


REGIMES = [(t, c, m) for t in ("none", "set") for c in CAP_KINDS for m in MIN_KINDS]


@st.composite
def selections(draw, aim: tuple[str, str, str]) -> Selection:
    """Rows of ties, NaN and infinities aimed at one (threshold, cap, min_keep) regime in row 0:
    a binding cap gets at least two passing candidates planted there, so every regime is
    reachable at any size. ``regime`` says what the rules did in each row (hypothesis'
    statistics list it), not only what was aimed at."""
    threshold_kind, cap_kind, min_kind = aim
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(3 if cap_kind == "binding" else 1, 40))
    values = draw(st.lists(score_values, min_size=batch * seq, max_size=batch * seq))
    flags = draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq))
    scores = torch.tensor(values, dtype=torch.float32).view(batch, seq)
    candidates = torch.tensor(flags).view(batch, seq)
    threshold = None if threshold_kind == "none" else draw(st.sampled_from(THRESHOLDS[:-1]))
    if cap_kind == "binding" and int(_passing(scores, candidates, threshold)[0]) < 2:
        scores[0, :2], candidates[0, :2] = 2.5, True  # above every finite threshold drawn
    rows = _passing(scores, candidates, threshold).tolist()

    def cap_of(kind: str, passing: int) -> int:
        if kind == "none":
            return draw(st.sampled_from([0, -1]))
        if kind == "binding" and passing >= 2:
            return draw(st.integers(1, passing - 1))
        return draw(st.integers(max(passing, 1), seq + 2))

    if cap_kind == "per_row":
        max_keep: int | torch.Tensor = torch.tensor([cap_of(draw(st.sampled_from(CAP_KINDS[:3])), n) for n in rows])
        caps = max_keep.tolist()
    else:
        max_keep = cap_of(cap_kind, rows[0])
        caps = [max_keep] * batch
    kept = [min(n, c) if c > 0 else n for n, c in zip(rows, caps)]
    if min_kind == "zero":
        min_keep = 0
    elif min_kind == "below_cap":
        min_keep = draw(st.integers(1, max(kept[0], 1)))
    elif min_kind == "above_kept":
        min_keep = draw(st.integers(kept[0] + 1, seq + 1))
    else:
        min_keep = draw(st.integers(seq + 1, seq + 5))
    regimes = []
    for n, c, k, m in zip(rows, caps, kept, candidates.sum(1).tolist()):
        floor = min(min_keep, m)
        rule = "raises" if floor > k else "below the count" if floor > 0 else "0"
        regimes.append(f"threshold {threshold_kind}, cap {'binding' if 0 < c < n else 'not binding'}, min_keep {rule}")
    return Selection(scores, candidates, threshold, max_keep, min_keep, tuple(sorted(set(regimes))))


def select_oracle(selection: Selection) -> torch.Tensor:
    """The spec in plain Python, row by row: rank candidates (higher first, equal scores lower
    index first, -0.0 equal to 0.0, NaN last), keep the top n where n is the threshold's count,
    capped at max_keep, raised to min(min_keep, candidates)."""
    keep = []
    caps = selection.max_keep.tolist() if isinstance(selection.max_keep, torch.Tensor) else None
    for b, (row, flags) in enumerate(zip(selection.scores.tolist(), selection.candidates.tolist())):
        cands = [j for j, flag in enumerate(flags) if flag]
        order = sorted(cands, key=lambda j: (1, 0.0, j) if math.isnan(row[j]) else (0, -row[j], j))
        if selection.threshold is None:
            n = len(cands)
        else:
            limit = float(torch.tensor(selection.threshold, dtype=torch.float32))
            n = sum(1 for j in cands if row[j] > limit)
        cap = caps[b] if caps is not None else selection.max_keep
        if cap > 0:
            n = min(n, cap)
        n = max(n, min(selection.min_keep, len(cands)))
        kept = set(order[:n])
        keep.append([not flag or j in kept for j, flag in enumerate(flags)])
    return torch.tensor(keep, dtype=torch.bool).view(selection.scores.shape)


def _row(values: list[float], flags: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.tensor([values], dtype=torch.float32)
    return scores, torch.tensor([flags]) if flags is not None else torch.ones_like(scores, dtype=torch.bool)


NAN, INF = float("nan"), float("inf")
CORNERS = [
    # a tie at the cap boundary (0.5 at 0, 2 and 5; -0.0 == 0.0), a threshold and a smaller min_keep
    Selection(*_row([0.5, 0.7, 0.5, NAN, 0.7, 0.5, -0.0, 0.0]), 0.3, 3, 1, ("corner: tie at the cap",)),
    # a row of NaN only: nothing passes, min_keep takes the lowest indices
    Selection(*_row([NAN, NAN, NAN, NAN]), -INF, 0, 2, ("corner: all NaN",)),
    # infinities: +inf passes any finite threshold, -inf never passes -inf
    Selection(*_row([-INF, INF, 0.0, -INF, INF]), -INF, 0, 0, ("corner: infinities",)),
    # min_keep above the candidates: every candidate, non-candidates kept
    Selection(*_row([0.1, 0.9, 0.4, 0.6], [True, False, True, False]), 2.0, 1, 9, ("corner: min above candidates",)),
    # a cap equal to what passes, one per-row cap binding and one not
    Selection(
        torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.2, 0.9, 0.9, 0.3]]),
        torch.ones(2, 4, dtype=torch.bool),
        0.5,
        torch.tensor([3, 1]),
        0,
        ("corner: per-row caps",),
    ),
    # one token, one candidate, no threshold, a cap of 1
    Selection(*_row([0.0]), None, 1, 1, ("corner: one token",)),
]


@pytest.mark.parametrize("bd", PARAMS)
@pytest.mark.parametrize("aim", REGIMES, ids=["-".join(r) for r in REGIMES])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_property_matches_oracle(bd, aim, data):
    """Every backend (and the reference) equals the plain-Python oracle exactly, on drawn rows
    aimed at each of the 32 (threshold, cap, min_keep) regimes in turn (a strategy that draws
    the regime too met a threshold, a binding cap and a smaller min_keep in 0-15% of a run's
    examples, by hypothesis' statistics), plus the corner examples."""
    backend, device = bd
    selection = data.draw(selections(aim), label="selection")
    for regime in selection.regime:
        event(regime)
    _check_selection(bd, selection)


@pytest.mark.parametrize("bd", PARAMS)
@pytest.mark.parametrize(
    "selection", CORNERS, ids=[c.regime[0].removeprefix("corner: ").replace(" ", "-") for c in CORNERS]
)
def test_corners_match_oracle(bd, selection):
    _check_selection(bd, selection)


def _check_selection(bd: tuple[str, str], selection: Selection) -> None:
    backend, device = bd
    want = select_oracle(selection)
    got = select_tokens(
        selection.scores.to(device),
        selection.candidates.to(device),
        threshold=selection.threshold,
        max_keep=selection.max_keep.to(device) if isinstance(selection.max_keep, torch.Tensor) else selection.max_keep,
        min_keep=selection.min_keep,
        backend=backend,
    )
    assert_equal(f"keep[{backend}-{device}] ({selection.regime})", got, want.to(device))
