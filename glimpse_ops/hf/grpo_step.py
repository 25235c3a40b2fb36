"""One GRPO micro-batch of GlimpsePrune+'s stage 1 (``Trainer(mode="grpo")``): keep sets,
pruned rollouts, rewards, advantages, policy and reference log-probs, ``grpo.GRPOTerms``.

A batch is the model's prompt inputs (tensors, left padded) plus ``questions`` and
``answers`` (lists of B strings) and, with ``keep_source="boxes"``, ``boxes`` (per image of the
batch, in prompt order, a list of normalized xyxy boxes).

Choices, each a ``GRPOConfig`` field:

* ``keep_source``: "boxes" (the official stage 1: the data's ground-truth boxes) or
  "predictor" (the later official variant: the trained VIP, run with the adapter off);
* ``reference``: "official" (adapter off; the first token unpruned, later tokens input-level
  pruned, as the official code) or "pruned_base" (adapter off, the same pruned computation
  as the policy: the KL then measures only what the adapter changed);
* the policy's log-probs always come from the exact pruned computation
  (``rollout.completion_logps``), for every token; the official code takes tokens 2.. from an
  input-level pruned sequence instead, which is not what its sampler ran;
* rollouts are sampled in eval mode (no LoRA dropout; the official code samples in train mode),
  the log-probs in train mode (LoRA dropout on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed, rollout
from .grpo import LOSS_TYPES, SCALE_REWARDS, GRPOTerms, completion_mask, group_advantages, grpo_terms
from .lora import LoRAHandle
from .rewards import RewardFunction

KEEP_SOURCES = ("boxes", "predictor")
REFERENCES = ("official", "pruned_base")
TEXT_KEYS = ("questions", "answers", "boxes")


@dataclass
class GRPOConfig:
    num_generations: int = 4  # G rollouts per prompt (official 4)
    max_new_tokens: int = 128
    temperature: float = 1.0
    beta: float = 0.04  # the k3 KL weight (official kd_weight)
    clip: bool = False  # PPO clipping of the ratio (the official term is unclipped)
    epsilon: float = 0.2
    epsilon_high: float | None = None
    old_logps: str = "policy"  # "policy": logp.detach() (on-policy, official); "sampler": generate's
    loss_type: str = "grpo"  # official: the mean over rollouts of each one's token mean
    scale_rewards: str = "group"
    reference: str = "official"
    keep_source: str = "boxes"
    layer: int | None = None  # K; default the predictor's, else glimpseprune.default_layer
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    seed: int = 0  # the rollouts' seeds derive from it, the step and micro-batch, and each prompt's ids
    # "per_prompt": one generate per prompt, seeded by its ids (2 ranks x b = 1 process x 2b);
    # "batched": one generate per rollout index over the batch (faster; seeded per rank)
    sampling: str = "per_prompt"

    def check(self) -> None:
        where = "glimpse_ops.hf.GRPOConfig"
        if self.num_generations < 2:
            raise ValueError(
                f"{where}: num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}"
            )
        for name, value, allowed in (
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("scale_rewards", self.scale_rewards, SCALE_REWARDS),
            ("reference", self.reference, REFERENCES),
            ("keep_source", self.keep_source, KEEP_SOURCES),
            ("old_logps", self.old_logps, ("policy", "sampler")),
            ("sampling", self.sampling, ("per_prompt", "batched")),
        ):
            if value not in allowed:
                raise ValueError(f"{where}: {name} must be one of {allowed}, got {value!r}")
        if self.max_new_tokens < 1 or self.temperature <= 0:
            raise ValueError(f"{where}: max_new_tokens >= 1 and temperature > 0 needed")


class GRPOStep(nn.Module):
    """The model, its LoRA (the trainable modules) and what a GRPO step needs, in one module
    (DDP sees one forward): ``forward(batch) -> GRPOTerms``."""

    def __init__(
        self,
        model: nn.Module,
        lora: LoRAHandle,
        config: GRPOConfig,
        layer: int,
        reward: RewardFunction,
        decode: Callable[[Sequence[int]], str],
        eos_token_id: int | Sequence[int],
        predictor: nn.Module | None = None,
        keep_rule: dict | None = None,
    ) -> None:
        super().__init__()
        self.model, self.trainable = model, lora.modules()
        self.lora, self.config, self.layer = lora, config, layer
        self.reward, self.decode, self.eos_token_id = reward, decode, eos_token_id
        self.predictor, self.keep_rule = predictor, keep_rule or {}
        self.seed = config.seed  # set per micro-batch by the trainer
        self.last: dict = {}  # the latest batch's rollouts, rewards and keep sets (for logs and tests)

    def keep_set(self, prompt: dict, batch: dict) -> Tensor:
        if self.config.keep_source == "boxes":
            if batch.get("boxes") is None:
                raise ValueError("glimpse_ops.hf.Trainer(mode='grpo'): keep_source='boxes' needs batch['boxes']")
            return rollout.box_keep(self.model, prompt, batch["boxes"])
        with self.lora.disabled():  # the VIP was trained on the base LLM
            return rollout.predictor_keep(self.model, self.predictor, prompt, **self.keep_rule)

    def completions_text(self, ids: Tensor) -> list[str]:
        mask = completion_mask(ids, self.eos_token_id)
        eos = {self.eos_token_id} if isinstance(self.eos_token_id, int) else set(self.eos_token_id)
        return [self.decode([t for t, m in zip(row, keep) if m and t not in eos]) for row, keep in
                zip(ids.tolist(), mask.tolist())]  # fmt: skip

    def forward(self, batch: dict) -> GRPOTerms:
        c, G = self.config, self.config.num_generations
        prompt = {k: v for k, v in batch.items() if k not in TEXT_KEYS}
        questions, answers = batch["questions"], batch["answers"]
        B = prompt["input_ids"].shape[0]
        if len(questions) != B or len(answers) != B:
            raise ValueError(f"glimpse_ops.hf.Trainer(mode='grpo'): {B} prompts but {len(questions)} questions "
                             f"and {len(answers)} answers")  # fmt: skip
        keep = self.keep_set(prompt, batch)
        if c.sampling == "per_prompt":
            rolled = rollout.sample_per_prompt(self.model, prompt, keep, G, c.max_new_tokens, self.layer,
                                               c.temperature, self.seed)  # fmt: skip
        else:
            seed = self.seed + 104_729 * distributed.world()[0]  # each rank its own draws
            rolled = rollout.sample(self.model, prompt, keep, G, c.max_new_tokens, self.layer, c.temperature, seed)
        ids = rolled.completion_ids  # [B * G, T], prompt-major
        texts = self.completions_text(ids)
        scores = self.reward([q for q in questions for _ in range(G)], texts, [a for a in answers for _ in range(G)])
        scored = torch.tensor([s is not None for s in scores], device=ids.device)
        rewards = torch.tensor([0.0 if s is None else float(s) for s in scores], device=ids.device)
        advantages = group_advantages(rewards, G, c.scale_rewards, scored)
        mask = completion_mask(ids, self.eos_token_id)
        logps, refs = [], []
        for g in range(G):  # one forward of the B prompts per rollout index
            rows = slice(g, None, G)
            logps.append(rollout.completion_logps(self.model, prompt, ids[rows], keep, self.layer, c.temperature))
            if c.beta:
                with torch.no_grad(), self.lora.disabled():
                    if c.reference == "official":
                        ref = rollout.official_reference_logps(self.model, prompt, ids[rows], keep, self.layer,
                                                               c.temperature)  # fmt: skip
                    else:
                        ref = rollout.completion_logps(self.model, prompt, ids[rows], keep, self.layer, c.temperature)
                refs.append(ref)
        logp = torch.stack(logps, dim=1).flatten(0, 1)  # [B, G, T] -> prompt-major [B * G, T]
        ref_logp = torch.stack(refs, dim=1).flatten(0, 1) if refs else None
        old = rolled.sampler_logps if c.old_logps == "sampler" else None
        self.last = {"completion_ids": ids, "texts": texts, "rewards": rewards, "scored": scored, "keep": keep,
                     "advantages": advantages, "kept_visual": rolled.kept_visual}  # fmt: skip
        return grpo_terms(
            logp, mask, advantages, rewards, scored, old_logp=old, ref_logp=ref_logp, beta=c.beta, clip=c.clip,
            epsilon=c.epsilon, epsilon_high=c.epsilon_high, loss_type=c.loss_type,
            max_completion_length=c.max_new_tokens,
        )  # fmt: skip

    def release(self) -> None:
        pass
