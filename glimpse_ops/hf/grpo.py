"""The GRPO objective of GlimpsePrune+'s stage 1, on rollouts already sampled and scored.

Per prompt, G rollouts (a group, contiguous in the batch); per rollout a reward (None: the
reward could not be computed, e.g. the judge failed: the rollout is skipped, it gets no
advantage and no loss, and the group's statistics leave it out). With ``logp`` the policy's
per-token log-probabilities of the sampled completion tokens [N, T], ``mask`` the completion
tokens that count (up to and including the first EOS; ``completion_mask``):

* advantages ``A = (r - mean_g r) / (std_g r + 1e-4)`` over each group (``torch.std``,
  unbiased: the official code's and TRL's ``scale_rewards="group"``); ``"batch"`` divides by
  the std of the whole batch, ``"none"`` only centers;
* the policy term per token ``-exp(logp - logp_old) * A`` (unclipped, the official one; with
  ``logp_old = logp.detach()`` its gradient is the REINFORCE one) or PPO's clipped
  ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)``, which differs only where the
  sampler's log-probs (``old_logp``) differ from the trainer's;
* plus ``beta`` times the k3 estimator of KL to the reference,
  ``exp(ref - logp) - (ref - logp) - 1`` (official beta 0.04);
* normalized as ``loss_type``: ``"grpo"`` the mean over rollouts of each rollout's token mean
  (the official code's); ``"dapo"`` the mean over all counted tokens; ``"dr_grpo"`` the token
  sum over (rollouts x ``max_completion_length``).

``grpo_terms`` returns sums and counts rather than means so that ranks can combine them into
the global loss (``GRPOTerms.global_view``), as the other trainers do. Shapes: N rollouts, T
completion positions; log-probs fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # the official code's and TRL's


def completion_mask(completion_ids: Tensor, eos_token_id: int | Sequence[int]) -> Tensor:
    """bool [N, T]: each completion's tokens up to and including its first EOS (every token
    when it has none). ``completion_ids`` int [N, T]; tokens after the EOS (generate's padding)
    do not count."""
    eos = torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=completion_ids.device
    )
    is_eos = torch.isin(completion_ids, eos)
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before each position
    return before == 0


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", scored: Tensor | None = None) -> Tensor:
    """Advantages fp32 [N] from rewards [N] (groups of ``group_size`` contiguous rollouts).
    ``scored`` bool [N] marks the rollouts that have a reward (default: all); the others get 0
    and are left out of their group's mean and std, and a group with fewer than 2 scored
    rollouts gets 0 throughout (no baseline to compare against)."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"glimpse_ops.hf.grpo: scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    if group_size < 2:
        raise ValueError(f"glimpse_ops.hf.grpo: a group needs at least 2 rollouts, got num_generations={group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"glimpse_ops.hf.grpo: rewards must be [N] with N a multiple of num_generations={group_size}, "
            f"got {tuple(rewards.shape)}"
        )
    r = rewards.float().view(-1, group_size)
    w = (torch.ones_like(r, dtype=torch.bool) if scored is None else scored.view(-1, group_size)).float()
    r = r.nan_to_num(0.0) * w  # unscored entries may hold anything
    n = w.sum(dim=1, keepdim=True)
    mean = r.sum(dim=1, keepdim=True) / n.clamp_min(1)
    centered = (r - mean) * w
    if scale == "group":
        std = (centered.square().sum(dim=1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
        centered = centered / (std + STD_EPS)
    elif scale == "batch":
        total = w.sum()
        batch_mean = r.sum() / total.clamp_min(1)
        batch_std = (((r - batch_mean) * w).square().sum() / (total - 1).clamp_min(1)).sqrt()
        centered = centered / (batch_std + STD_EPS)
    return (centered * (n >= 2).float()).view(-1)


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The k3 estimator of KL(policy || reference) per token: exp(d) - d - 1, d = ref - logp (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class GRPOTerms:
    """A micro-batch's share of the GRPO loss: ``objective_sum`` (with gradients) over
    ``count`` (rollouts for "grpo", counted tokens for "dapo", rollouts x max length for
    "dr_grpo"), and for the log the KL and policy-term sums over the same normalization,
    the reward sum, the scored-rollout count and the skipped (unscored) count."""

    objective_sum: Tensor
    count: Tensor
    kl_sum: Tensor
    reward_sum: Tensor
    scored: Tensor
    skipped: Tensor

    def sums(self) -> Tensor:
        """fp32 [6] without gradients: what ranks add up (``global_view``)."""
        parts = [self.objective_sum, self.count, self.kl_sum, self.reward_sum, self.scored, self.skipped]
        return torch.stack([torch.as_tensor(p, device=self.objective_sum.device).float() for p in parts]).detach()

    def global_view(self, totals: Tensor) -> GRPOTerms:
        """These terms as one rank's share of the global batch (``totals``: ``sums()`` added
        over every rank): the objective carries the global value and this rank's gradients."""
        objective = self.objective_sum + (totals[0] - self.objective_sum).detach()
        return GRPOTerms(objective, *totals[1:])

    def loss(self) -> Tensor:
        return self.objective_sum / self.count.clamp_min(1)

    def kl(self) -> Tensor:
        return self.kl_sum / self.count.clamp_min(1)

    def mean_reward(self) -> Tensor:
        return self.reward_sum / torch.as_tensor(self.scored).clamp_min(1)


def grpo_terms(
    logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    rewards: Tensor,
    scored: Tensor | None = None,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.04,
    clip: bool = False,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> GRPOTerms:
    """The GRPO terms of N rollouts (module docstring). ``logp`` [N, T] with gradients,
    ``mask`` bool [N, T], ``advantages``/``rewards`` [N], ``scored`` bool [N] (default all),
    ``old_logp``/``ref_logp`` [N, T] without gradients (None: the current policy / no KL term)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"glimpse_ops.hf.grpo: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(f"glimpse_ops.hf.grpo: logp {tuple(logp.shape)} and mask {tuple(mask.shape)} must be [N, T]")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("glimpse_ops.hf.grpo: loss_type='dr_grpo' needs max_completion_length")
    N = logp.shape[0]
    scored = torch.ones(N, dtype=torch.bool, device=logp.device) if scored is None else scored
    counted = mask & scored[:, None]
    weight = counted.float()
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    A = advantages.float()[:, None]
    if clip:
        high = epsilon if epsilon_high is None else epsilon_high
        per_token = -torch.minimum(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + high) * A)
    else:
        per_token = -ratio * A
    # k3 where counted only: a far-off log-prob at a masked position would overflow exp, and 0 * inf is NaN
    kl = torch.zeros_like(per_token) if ref_logp is None else k3(logp, torch.where(counted, ref_logp, logp.detach()))
    if ref_logp is not None and beta:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        tokens = weight.sum(dim=1).clamp_min(1)
        objective = ((per_token * weight).sum(dim=1) / tokens).sum()
        kl_sum = ((kl.detach() * weight).sum(dim=1) / tokens).sum()
        count = scored.float().sum()
    else:
        objective = (per_token * weight).sum()
        kl_sum = (kl.detach() * weight).sum()
        count = weight.sum() if loss_type == "dapo" else scored.float().sum() * max_completion_length
    reward_sum = (rewards.float().nan_to_num(0.0) * scored.float()).sum()
    return GRPOTerms(objective, count, kl_sum, reward_sum, scored.float().sum(), (~scored).float().sum())
