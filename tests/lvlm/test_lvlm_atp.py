"""ATP on the reference LVLM (random weights): soft and hard paths agree, the thresholds
learn, the budget loss moves the kept count, and decoding runs on per-layer caches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_close

from glimpse_ops.atp_stage import spatial_scores
from glimpse_ops.lvlm import LVLM, ATPPruner, make_batch, tiny, train_atp
from glimpse_ops.lvlm.atp import answer_and_budget_loss
from glimpse_ops.lvlm.model import positions_from_mask

# (atol, rtol) of logits by dtype
TOLERANCES = {torch.float32: (1e-4, 1e-4)}


def _biting(atp: ATPPruner, theta_r: float = 0.0, theta_s: float = 1.5) -> ATPPruner:
    """Thresholds that prune some but not all tokens on a random model (logit-space biases)."""
    with torch.no_grad():
        for stage in atp.stages.values():
            stage.mlp[2].bias.copy_(torch.tensor([theta_r, theta_s]))
    return atp


@pytest.fixture
def two_stages(seed):
    model = LVLM(dataclasses.replace(tiny(), layers=5)).eval()
    atp = _biting(ATPPruner(model, (3, 4)))
    data = make_batch(model.config, 4, torch.Generator().manual_seed(seed))
    return model, atp, data


def test_spatial_scores_are_nested_uniform_grids():
    s = spatial_scores(4).view(4, 4)
    assert s[0, 0] == 1.0
    assert torch.equal(s[::2, ::2].flatten().sort().values, torch.tensor([0.5, 0.5, 0.5, 1.0]))
    assert int((s == 0.25).sum()) == 12
    assert spatial_scores(1).tolist() == [1.0]
    assert spatial_scores(3).view(3, 3)[::2, ::2].eq(1.0).all()  # stride 2 fits a 3-grid


@torch.no_grad()
def test_hard_weights_in_the_soft_forward_equal_hard_pruning(two_stages):
    model, atp, data = two_stages
    soft, info = atp.soft_forward(model, data.images, data.input_ids, data.attention_mask, hard=True)
    hard, state, hard_info = atp.prefill(model, data.images, data.input_ids, data.attention_mask)
    assert_close("logits", hard, soft, TOLERANCES[torch.float32])
    assert torch.equal(info["kept"].long(), hard_info["kept_visual"])
    assert torch.equal(info["kept_per_layer"].long(), hard_info["kept_per_layer"])
    per_layer = hard_info["kept_per_layer"]
    assert bool((per_layer[4] <= per_layer[3]).all()) and bool((per_layer[3] < 16).any()), "masks compound"
    assert bool((per_layer[4] < per_layer[3]).any()), "the second stage prunes some more"
    lengths = [k.shape[2] for k, _ in state.caches]
    assert lengths[0] == lengths[2] > lengths[3] >= lengths[4], "each layer's cache has its own length"


@torch.no_grad()
def test_batch_with_unequal_keeps_equals_single_runs(two_stages):
    model, atp, data = two_stages
    logits, _, info = atp.prefill(model, data.images, data.input_ids, data.attention_mask)
    for b in range(4):
        rows = data.attention_mask[b]
        one, _, one_info = atp.prefill(
            model, data.images[b : b + 1], data.input_ids[b : b + 1, rows], data.attention_mask[b : b + 1, rows]
        )
        assert_close(f"logits[{b}]", logits[b], one[0], TOLERANCES[torch.float32])
        assert int(one_info["kept_visual"][0]) == int(info["kept_visual"][b])


@torch.no_grad()
def test_decoding_on_the_pruned_caches(two_stages):
    model, atp, data = two_stages
    _, state, _ = atp.prefill(model, data.images, data.input_ids, data.attention_mask)
    assert torch.equal(state.next_position, positions_from_mask(data.attention_mask)[:, -1] + 1)
    before = [k.shape[2] for k, _ in state.caches]
    ids = model.generate(data.images, data.input_ids, data.attention_mask, 3, pruner=atp)
    assert ids.shape == (4, 3)
    sampled = model.generate(
        data.images,
        data.input_ids,
        data.attention_mask,
        3,
        do_sample=True,
        generator=torch.Generator().manual_seed(0),
        pruner=atp,
    )
    assert sampled.shape == (4, 3)
    model.decode_step(ids[:, 0], state)
    assert [k.shape[2] for k, _ in state.caches] == [n + 1 for n in before]


def test_thresholds_receive_gradients_from_the_answer_loss(two_stages):
    model, atp, data = two_stages
    model.requires_grad_(False)
    loss, _ = answer_and_budget_loss(
        model, atp, data.images, data.input_ids, data.attention_mask, data.answers, 4.0, 0.0
    )
    loss.backward()
    for name, stage in atp.stages.items():
        grad = stage.mlp[2].weight.grad
        assert grad is not None and bool(grad.abs().sum() > 0), (
            f"stage {name} got no gradient through soft_mask_attention"
        )


def test_budget_loss_moves_the_kept_count_toward_its_target(seed):
    model = LVLM(tiny()).eval()
    atp = ATPPruner(model, (3,))  # permissive start: keeps most tokens
    data = make_batch(model.config, 64, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = atp.soft_forward(model, data.images, data.input_ids, data.attention_mask)[1]["kept"].mean().item()
    train_atp(model, atp, 60, target=4.0, batch=16, lr=3e-2, seed=seed, budget_weight=5.0)
    with torch.no_grad():
        after = atp.soft_forward(model, data.images, data.input_ids, data.attention_mask)[1]["kept"].mean().item()
    assert abs(after - 4.0) < 0.5 * abs(before - 4.0), (before, after)


def test_stage_layers_are_checked():
    model = LVLM(tiny())
    with pytest.raises(ValueError, match="ATPPruner: stage layers must lie in"):
        ATPPruner(model, (1,))  # text sees the image only from layer 3 in tiny
    with pytest.raises(ValueError, match="increasing"):
        ATPPruner(model, ())
