"""glimpse_ops.hf.grpo: the GRPO objective against a float64 reference written loop by loop."""

from __future__ import annotations

import math

import pytest
import torch

from glimpse_ops.hf.grpo import completion_mask, group_advantages, grpo_terms, k3

G = 4


def _reference_advantages(rewards: list[float], scored: list[bool], group: int, scale: str) -> list[float]:
    out = [0.0] * len(rewards)
    members_all = [i for i in range(len(rewards)) if scored[i]]
    batch_mean = sum(rewards[i] for i in members_all) / max(1, len(members_all))
    batch_std = math.sqrt(sum((rewards[i] - batch_mean) ** 2 for i in members_all) / max(1, len(members_all) - 1))
    for start in range(0, len(rewards), group):
        members = [i for i in range(start, start + group) if scored[i]]
        if len(members) < 2:
            continue
        mean = sum(rewards[i] for i in members) / len(members)
        std = math.sqrt(sum((rewards[i] - mean) ** 2 for i in members) / (len(members) - 1))
        for i in members:
            if scale == "group":
                out[i] = (rewards[i] - mean) / (std + 1e-4)
            elif scale == "batch":
                out[i] = (rewards[i] - mean) / (batch_std + 1e-4)
            else:
                out[i] = rewards[i] - mean
    return out


def _reference_loss(logp, mask, adv, scored, old, ref, beta, clip, eps, eps_high, loss_type, max_len):
    """float64, one rollout and one token at a time."""
    per_rollout, token_sum, tokens, n_scored = [], 0.0, 0, 0
    for i in range(logp.shape[0]):
        if not scored[i]:
            continue
        n_scored += 1
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            if clip:
                term = -torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps, 1 + eps_high) * adv[i])
            else:
                term = -ratio * adv[i]
            if ref is not None:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1)
            terms.append(term)
        per_rollout.append(sum(terms) / len(terms))
        token_sum = token_sum + sum(terms)
        tokens += len(terms)
    if loss_type == "grpo":
        return sum(per_rollout) / n_scored
    if loss_type == "dapo":
        return token_sum / tokens
    return token_sum / (n_scored * max_len)


def _rollouts(seed: int, n: int = 8, T: int = 7, eos: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, T), generator=g)
    for i in range(n):  # EOS somewhere in most rollouts, then padding (more EOS) after it
        at = int(torch.randint(0, T + 2, (1,), generator=g))
        if at < T:
            ids[i, at:] = eos
    logp = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(n, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(n, T, generator=g, dtype=torch.float64)
    rewards = torch.rand(n, generator=g, dtype=torch.float64).round(decimals=1)
    return ids, logp, old, ref, rewards


def test_completion_mask_counts_up_to_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 9], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2], [5, 9, 6, 3, 4]])
    want = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]]
    got = completion_mask(ids, eos_token_id=[2, 3])
    assert got.tolist()[:4] == [[bool(v) for v in row] for row in want[:4]]
    assert got[4].tolist() == [True, True, True, True, False], "any of several EOS ids ends a completion"


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_the_reference_with_skipped_rollouts(scale, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(3 * G, generator=g, dtype=torch.float64)
    scored = torch.rand(3 * G, generator=g) > 0.25
    scored[G : 2 * G] = torch.tensor([True, False, False, False])  # a group with one scored rollout
    rewards[~scored] = float("nan")  # what a failed judge leaves
    got = group_advantages(rewards, G, scale, scored)
    want = _reference_advantages(rewards.tolist(), scored.tolist(), G, scale)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert bool((got[~scored] == 0).all()) and bool((got[G : 2 * G] == 0).all())
    equal = group_advantages(torch.full((G,), 0.7), G)
    assert bool((equal == 0).all()), "a group of equal rewards has no advantage (no division by a zero std)"


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("clip", [False, True], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["k3", "no-kl"])
def test_loss_and_gradients_match_the_float64_reference(loss_type, clip, with_ref, seed):
    ids, logp, old, ref, rewards = _rollouts(seed)
    mask = completion_mask(ids, 2)
    scored = torch.ones(len(rewards), dtype=torch.bool)
    scored[3] = False
    adv = group_advantages(rewards, G, "group", scored).double()
    settings = dict(beta=0.04, clip=clip, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type)
    ours_logp = logp.clone().float().requires_grad_()
    terms = grpo_terms(ours_logp, mask, adv, rewards, scored, old_logp=old.float(),
                       ref_logp=ref.float() if with_ref else None, max_completion_length=7, **settings)  # fmt: skip
    terms.loss().backward()
    ref_logp = logp.clone().requires_grad_()
    want = _reference_loss(ref_logp, mask, adv, scored, old, ref if with_ref else None, 0.04, clip, 0.2, 0.28,
                           loss_type, 7)  # fmt: skip
    want.backward()
    torch.testing.assert_close(terms.loss().double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_logp.grad.double(), ref_logp.grad, rtol=1e-4, atol=1e-6)
    assert bool((ours_logp.grad[~mask] == 0).all()), "tokens after the EOS get no gradient"
    assert bool((ours_logp.grad[3] == 0).all()), "a skipped rollout gets no gradient"


def test_the_official_loss_is_reinforce_plus_k3_per_rollout_mean(seed):
    """With logp_old = logp.detach() the unclipped term's value is -mean A and its gradient
    -A per token: the official code's exp(logp - logp.detach()) * A."""
    ids, logp, _, ref, rewards = _rollouts(seed)
    mask = completion_mask(ids, 2)
    adv = group_advantages(rewards, G)
    x = logp.float().requires_grad_()
    terms = grpo_terms(x, mask, adv, rewards, ref_logp=ref.float(), beta=0.0)
    torch.testing.assert_close(terms.loss(), -adv.mean())
    terms.loss().backward()
    tokens = mask.sum(dim=1, keepdim=True)
    torch.testing.assert_close(x.grad, (-adv[:, None] / tokens / len(adv)) * mask)
    assert bool((k3(x.detach(), ref.float()) >= 0).all())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_ranks_combine_into_the_whole_batch_loss(loss_type, seed):
    ids, logp, old, ref, rewards = _rollouts(seed, n=4 * G)
    mask = completion_mask(ids, 2)
    scored = torch.ones(4 * G, dtype=torch.bool)
    scored[[1, 2 * G + 3]] = False  # a skipped rollout on each rank
    adv = group_advantages(rewards, G, scored=scored)  # each rank holds whole groups
    common = dict(clip=True, loss_type=loss_type, max_completion_length=7)
    whole = logp.float().requires_grad_()
    grpo_terms(
        whole, mask, adv, rewards, scored, old_logp=old.float(), ref_logp=ref.float(), **common
    ).loss().backward()
    parts = [logp[: 2 * G].float().requires_grad_(), logp[2 * G :].float().requires_grad_()]
    halves = [slice(0, 2 * G), slice(2 * G, 4 * G)]
    terms = [
        grpo_terms(p, mask[h], adv[h], rewards[h], scored[h], old_logp=old[h].float(), ref_logp=ref[h].float(),
                   **common)
        for p, h in zip(parts, halves)
    ]  # fmt: skip
    totals = sum(t.sums() for t in terms)
    for t in terms:
        t.global_view(totals).loss().backward()
    torch.testing.assert_close(torch.cat([p.grad for p in parts]), whole.grad, rtol=1e-5, atol=1e-7)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of num_generations=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        group_advantages(torch.zeros(4), 2, "groups")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_terms(x, x.bool(), torch.zeros(2), torch.zeros(2), loss_type="ppo")
    with pytest.raises(ValueError, match="needs max_completion_length"):
        grpo_terms(x, x.bool(), torch.zeros(2), torch.zeros(2), loss_type="dr_grpo")
