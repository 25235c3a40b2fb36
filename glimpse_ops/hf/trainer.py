"""One training loop for both trainers, on one process or under ``torchrun`` (DDP or FSDP2).

* ``mode="glimpse"``: the glimpse token and the VIP (``GlimpsePredictor``), loss of
  ``losses.glimpse_loss_terms`` (answer cross entropy under the VIP's soft key mask, budget
  |kept fraction - keep_ratio|). ``train_glimpse`` is this loop on one process over a list of
  batches.
* ``mode="atp"``: ATP stages (``apply_atp(mode="train")``), loss of ``atp_loss_terms``
  (answer cross entropy under the stages' soft masks, the same budget on the soft kept
  fraction).
* ``mode="grpo"``: GlimpsePrune+'s stage 1, a LoRA on the LLM (``lora.apply_lora``) trained
  with GRPO on pruned rollouts (``grpo_step.GRPOStep``: keep sets from the data's boxes or a
  VIP, G rollouts per prompt, rewards, the loss of ``grpo.grpo_terms``); DDP or one process.

Across ranks the loss is the one of the whole global batch: the cross entropy is summed over
every rank's answer tokens and divided by their global count, and the kept fraction is the
global mean over every visual token (not a mean of per-rank fractions). Each rank
backpropagates its share of that loss, scaled by the world size because DDP and FSDP2 average
gradients, so 2 ranks x batch b step exactly as 1 process x batch 2b. With ``grad_accum``
micro-batches per step the step's loss is the mean of the micro-batches' global losses.
``precision="bf16"``: autocast to bf16, fp32 master weights and optimizer state for the
trainable modules. Checkpoints hold the trainable modules and the optimizer state in full,
written by rank 0, so a run saved on N ranks resumes on M.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..glimpseprune import GlimpsePredictor, default_layer
from . import distributed
from ._compat import is_checkpointing, set_checkpointing
from .adapters import adapter_for
from .atp import ATPHandle, apply_atp
from .attention import require_additive_masks, require_attention_kind
from .grpo_step import GRPOConfig, GRPOStep
from .lora import apply_lora
from .losses import LossTerms, answer_ce_sum, glimpse_loss_terms, prompt_and_answer
from .vit_taps import FAMILIES as VIT_TAP_FAMILIES

MODES = ("glimpse", "atp", "grpo")
METRICS = {"glimpse": ("answer_ce", "kept_fraction"), "atp": ("answer_ce", "kept_fraction"), "grpo": ("reward", "kl")}


@dataclass
class TrainConfig:
    mode: str = "glimpse"  # "glimpse", "atp" or "grpo"
    strategy: str = "ddp"  # "ddp" or "fsdp" (ignored on one process)
    keep_ratio: float = 0.1
    budget_weight: float = 1.0
    lr: float = 1e-4
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # or "bf16": autocast, fp32 master weights
    activation_checkpointing: bool = False  # the frozen LM's decoder layers (non-reentrant)
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"glimpse_ops.hf.Trainer: mode must be one of {MODES}, got {self.mode!r}")
        if self.strategy not in distributed.STRATEGIES:
            raise ValueError(
                f"glimpse_ops.hf.Trainer: strategy must be one of {distributed.STRATEGIES}, got {self.strategy!r}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"glimpse_ops.hf.Trainer: precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.grad_accum < 1:
            raise ValueError(f"glimpse_ops.hf.Trainer: grad_accum must be >= 1, got {self.grad_accum}")


def atp_loss_terms(model: nn.Module, handle: ATPHandle, batch: dict) -> LossTerms:
    """One forward over prompt + answer with the ATP stages' soft masks (``handle`` from
    ``apply_atp(model, layers, mode="train")``) -> ``LossTerms`` (kept: the soft kept counts
    after the last stage)."""
    prompt, answer, inputs = prompt_and_answer(batch)
    logits = model(**inputs, use_cache=False).logits
    ce, n_answer, answer_logits = answer_ce_sum(logits, prompt["input_ids"].shape[1], answer)
    return LossTerms(ce, n_answer, handle.kept.sum(), handle.state.visual.sum(), answer_logits)


class TrainStep(nn.Module):
    """The frozen model and the trainable modules in one module, so DDP and FSDP2 see one
    forward: ``forward(batch) -> LossTerms``."""

    def __init__(self, model: nn.Module, trainable: nn.Module, mode: str, atp: ATPHandle | None = None) -> None:
        super().__init__()
        self.model, self.trainable, self.mode, self.atp = model, trainable, mode, atp
        self.held: list = []  # hooks kept until backward (activation checkpointing recomputes there)

    def forward(self, batch: dict) -> LossTerms:
        if self.mode == "glimpse":
            return glimpse_loss_terms(self.model, self.trainable, batch, hold=self.held)
        return atp_loss_terms(self.model, self.atp, batch)

    def release(self) -> None:
        for hook in self.held:
            hook.remove()
        self.held.clear()


class Trainer:
    """``Trainer(model, config, predictor=... | atp_layers=...)`` then ``fit(batches, steps)``.

    ``batches``: this rank's micro-batches in order (a dict of the model's prompt inputs plus
    ``answer_ids`` [B, A], -100 for padding; ``data.JsonlDataset`` and ``data.collator`` make
    them from a JSON-lines file). Launch under ``torchrun`` to train on several processes; the
    process group is started from the environment when it is not already up."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        predictor: GlimpsePredictor | None = None,
        atp_layers: tuple[int, ...] | None = None,
        atp_stages: nn.ModuleDict | None = None,
        log: Callable[[str], None] | None = print,
        grpo: GRPOConfig | None = None,
        reward: Callable | None = None,
        decode: Callable | None = None,
        eos_token_id: int | list[int] | None = None,
        keep_rule: dict | None = None,
    ) -> None:
        """``mode="grpo"`` also takes ``grpo`` (a ``GRPOConfig``), ``reward`` (a
        ``rewards.RewardFunction``), ``decode`` (token ids -> text, e.g. the tokenizer's decode),
        ``eos_token_id`` (default the model's generation config's) and, with
        ``keep_source="predictor"``, ``predictor`` and ``keep_rule`` (``apply_glimpse_prune``'s
        keep-rule arguments)."""
        config.check()
        adapter = adapter_for(model)
        if config.mode in ("glimpse", "grpo"):  # before any process group starts
            require_additive_masks(adapter.attn_implementation, "glimpse_ops.hf.Trainer")
        else:
            require_attention_kind(adapter.attn_implementation, "glimpse_ops.hf.Trainer")
        if config.mode == "grpo":
            grpo = grpo or GRPOConfig()
            grpo.check()
            if reward is None or decode is None:
                raise ValueError("glimpse_ops.hf.Trainer: mode='grpo' needs reward= and decode=")
            if grpo.keep_source == "predictor" and predictor is None:
                raise ValueError("glimpse_ops.hf.Trainer: mode='grpo' with keep_source='predictor' needs predictor=")
            if config.strategy == "fsdp":
                raise ValueError(
                    "glimpse_ops.hf.Trainer: mode='grpo' runs under DDP or on one process (generate inside the step "
                    "needs every weight on every rank); strategy='fsdp' is not supported"
                )
            if config.activation_checkpointing:
                # the log-prob forward sets its masks with layer hooks that are gone by backward, and
                # transformers 5.17 recomputes the layers there with the hooks: a wrong mask, silently
                raise ValueError("glimpse_ops.hf.Trainer: mode='grpo' does not support activation_checkpointing yet")
        self.grpo_args = (grpo, reward, decode, eos_token_id, keep_rule)
        self.config, self.model = config, model
        self.device = next(model.parameters()).device
        distributed.init_from_env(self.device)
        self.rank, self.world = distributed.world()
        self.log = log if self.rank == 0 else None
        if config.mode == "glimpse" and adapter.model_type not in VIT_TAP_FAMILIES:
            raise TypeError(
                "glimpse_ops.hf.Trainer: trained GlimpsePrune needs a Qwen2.5-VL, Qwen3-VL or InternVL model "
                f"({', '.join(VIT_TAP_FAMILIES)}), got {adapter.model_type}"
            )
        if config.mode == "glimpse" and predictor is None:  # (mode="grpo" was checked above)
            raise ValueError("glimpse_ops.hf.Trainer: mode='glimpse' needs predictor=")
        if config.mode == "atp" and not atp_layers and atp_stages is None:
            raise ValueError("glimpse_ops.hf.Trainer: mode='atp' needs atp_layers= (or atp_stages=)")
        self.frozen = [p.requires_grad for p in model.parameters()]
        self.was_training = model.training
        self.was_checkpointing = is_checkpointing(model)
        self.atp = None
        self.lora = None
        self.skipped, self._micro = 0, 0
        self.global_batch: int | None = None  # samples per optimizer step over all ranks (the CLI sets it)
        try:
            self._setup(model, config, adapter, predictor, atp_layers, atp_stages)
        except BaseException:
            self.close()  # the model as it was
            raise

    def _setup(self, model, config, adapter, predictor, atp_layers, atp_stages) -> None:
        model.requires_grad_(False)
        if config.mode == "grpo":
            self._setup_grpo(model, config, adapter, predictor)
            return
        if config.mode == "glimpse":
            trainable = predictor.to(self.device)
        else:
            layers = tuple(sorted(int(k) for k in atp_stages)) if atp_stages is not None else tuple(atp_layers)
            self.atp = apply_atp(model, layers, mode="train", stages=atp_stages)
            trainable = self.atp.stages
        trainable.train()
        if config.activation_checkpointing:
            set_checkpointing(model, True)
            model.train()  # HF checkpoints only in training mode (the frozen LM has no dropout to switch)
        self.trainable = trainable
        self.step_module = TrainStep(model, trainable, config.mode, self.atp)
        # FSDP2 shards each decoder layer on its own, except in glimpse mode layers 0..K: the
        # glimpse's gradient enters layer K through its query and cached keys rather than the
        # layer's output, which FSDP2's backward unshard hooks never see; those layers shard
        # with the root (gathered for the whole step)
        per_layer = adapter.layers[predictor.config.score_layer + 1 :] if config.mode == "glimpse" else adapter.layers
        self.wrapped = distributed.wrap(self.step_module, list(per_layer), config.strategy)
        # after wrapping: FSDP2 replaces the parameters with their shards
        self.optimizer = torch.optim.AdamW([p for p in trainable.parameters()], lr=config.lr, weight_decay=0.0)
        self.step = 0

    def _setup_grpo(self, model, config, adapter, predictor) -> None:
        grpo, reward, decode, eos, keep_rule = self.grpo_args
        layer = grpo.layer
        if layer is None:
            layer = predictor.config.score_layer if predictor is not None else default_layer(len(adapter.layers))
        if eos is None:
            eos = model.generation_config.eos_token_id
        self.lora = apply_lora(model, grpo.lora_r, grpo.lora_alpha, grpo.lora_dropout, seed=grpo.seed)
        if predictor is not None:  # only chooses keep sets: frozen (DDP must not wait for its gradients)
            self.predictor_grad = [p.requires_grad for p in predictor.parameters()]
            predictor.to(self.device).eval().requires_grad_(False)
            self.predictor = predictor
        self.step_module = GRPOStep(model, self.lora, grpo, layer, reward, decode, eos, predictor, keep_rule)
        self.trainable = self.step_module.trainable
        if config.activation_checkpointing:
            set_checkpointing(model, True)
        model.train()  # LoRA dropout in the log-prob forward (rollouts sample in eval mode)
        self.wrapped = distributed.wrap(self.step_module, list(adapter.layers), config.strategy)
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=config.lr, weight_decay=0.0)
        self.step = 0

    # --- checkpoints --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """A checkpoint of the trainable modules, the optimizer and the step (every rank calls)."""
        extra = {"step": self.step, "config": asdict(self.config), "global_batch": self.global_batch}
        if self.config.mode == "atp":
            extra["atp_layers"] = sorted(int(k) for k in self.trainable)
        distributed.save_checkpoint(path, self.trainable, self.optimizer, extra)

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint (any world size or strategy wrote it); ``fit`` then skips
        the micro-batches the saved steps consumed."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["config"]["mode"] != self.config.mode:
            raise ValueError(f"glimpse_ops.hf.Trainer.resume: {path} trained mode={saved['config']['mode']!r}")
        before, now = saved.get("global_batch"), self.global_batch
        if before is not None and now is not None and before != now:
            # the data order is the same only for the same samples per step (whatever the world size)
            raise ValueError(
                f"glimpse_ops.hf.Trainer.resume: {path} was trained with {before} samples per step "
                f"(batch size x processes x grad_accum), this run has {now}: the data would not continue"
            )
        del saved
        extra = distributed.load_checkpoint(path, self.trainable, self.optimizer)
        self.step = int(extra["step"])

    def export(self, path: str | Path) -> None:
        """The trained modules for inference: a predictor ``.safetensors`` (``pruned(model,
        predictor=path)``) or the ATP stages (``torch.load`` -> ``{"layers", "state"}``)."""
        state = distributed.full_state(self.trainable)
        if self.rank != 0:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if self.config.mode == "grpo":  # the adapter in PEFT's format (a folder)
            if self.lora is None:
                raise RuntimeError("glimpse_ops.hf.Trainer.export: the trainer was closed (export before close())")
            self.lora.save(path)
            return
        if self.config.mode == "glimpse":
            predictor = GlimpsePredictor(self.trainable.config)
            predictor.load_state_dict(state)
            predictor.save(path)
        else:
            torch.save({"layers": sorted(int(k) for k in self.trainable), "state": state}, path)

    # --- training -----------------------------------------------------------------------------
    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _no_sync(self, last: bool):
        """DDP: skip the gradient reduction on all but the last micro-batch of a step (FSDP2
        is told per micro-batch in ``_micro_step``)."""
        if last or self.world == 1 or self.config.strategy != "ddp":
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def _micro_step(self, batch: dict, last: bool) -> Tensor:
        """Forward and backward of one micro-batch; returns [global loss, CE, kept fraction]."""
        c = self.config
        if self.world > 1 and c.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        with self._no_sync(last):
            if c.mode == "grpo":
                # each step and micro-batch samples from its own seeds (grpo_step: per prompt, or per rank)
                self.step_module.seed = self.grpo_args[0].seed + 1_000_003 * self.step + 7919 * self._micro
                self._micro += 1
            with self._autocast():
                terms = self.wrapped(batch)
            if c.mode == "grpo":
                totals = distributed.global_sum(terms.sums())
                view = terms.global_view(totals)
                loss, ce, kept = view.loss(), view.mean_reward(), view.kl()  # (reward, KL) under the old names
                self.skipped += int(totals[5])
            else:
                local = torch.stack([terms.answer_ce_sum, terms.answer_tokens, terms.kept_sum, terms.visual_tokens])
                totals = distributed.global_sum(local.float().detach())
                loss, ce, kept = terms.global_view(totals).loss(c.keep_ratio, c.budget_weight)
            # the global loss with this rank's gradients; DDP / FSDP2 average over ranks, hence the world size
            (loss * self.world / c.grad_accum).backward()
            self.step_module.release()
        return torch.stack([loss, ce, kept]).detach()

    def fit(
        self,
        batches: Iterable[dict],
        steps: int | None = None,
        checkpoint_dir: str | Path | None = None,
        skip_done: bool = True,
        on_step: Callable[[dict], None] | None = None,
    ) -> list[dict]:
        """Run optimizer steps ``self.step + 1 .. steps`` over ``batches`` (``steps=None``: until
        the batches end, one step per ``grad_accum`` of them), first skipping the micro-batches
        of the steps already done (``skip_done=False``: ``batches`` already starts after them).
        Returns one record per step (global loss, answer CE, kept fraction, seconds), also
        passed to ``on_step``; rank 0 logs each step and the checkpoints. A non-finite loss
        stops the run at once (it is global: every rank stops)."""
        c = self.config
        micro = iter(batches)
        if skip_done:
            skipped = sum(1 for _ in itertools.islice(micro, self.step * c.grad_accum))
            if skipped < self.step * c.grad_accum:
                raise ValueError(f"glimpse_ops.hf.Trainer.fit: the data ended before the resumed step {self.step}")
        history = []
        try:
            while steps is None or self.step < steps:
                start = time.perf_counter()
                group = list(itertools.islice(micro, c.grad_accum))
                if steps is None and not group:
                    break
                if len(group) < c.grad_accum:
                    raise ValueError(
                        f"glimpse_ops.hf.Trainer.fit: the data ended at step {self.step + 1} of {steps or 'the run'} "
                        f"({c.grad_accum} micro-batches per step)"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self._micro = 0
                totals = sum(self._micro_step(b, i == len(group) - 1) for i, b in enumerate(group)) / len(group)
                self.optimizer.step()
                self.step += 1
                loss, ce, kept = (float(v) for v in totals)
                first, second = METRICS[c.mode]
                record = {"step": self.step, "loss": loss, first: ce, second: kept,
                          "seconds": time.perf_counter() - start}  # fmt: skip
                if c.mode == "grpo":
                    record["skipped"] = self.skipped  # rollouts without a reward so far (a judge that failed)
                history.append(record)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"glimpse_ops.hf.Trainer.fit: the loss is {loss} at step {self.step}")
                if on_step is not None:
                    on_step(record)
                if self.log is not None:
                    shown = (f"reward {ce:.4f} KL {kept:.4f} skipped {self.skipped}" if c.mode == "grpo"
                             else f"answer CE {ce:.4f} kept {kept:.1%}")  # fmt: skip
                    self.log(
                        f"[{self.step}{'' if steps is None else f'/{steps}'}] loss {loss:.4f} {shown} "
                        f"{record['seconds']:.2f} s/step ({self.world} rank{'s' if self.world > 1 else ''})"
                    )
                if checkpoint_dir is not None and (
                    self.step == steps or (c.save_every and self.step % c.save_every == 0)
                ):  # with steps=None only every save_every steps
                    path = Path(checkpoint_dir) / f"step-{self.step:06d}.pt"
                    self.save(path)
                    if self.log is not None:
                        self.log(f"checkpoint {path}")
        finally:
            self.step_module.release()
        return history

    def close(self) -> None:
        """Give the model back as it was: ATP removed, requires_grad, training mode and
        gradient checkpointing restored."""
        if self.atp is not None:
            self.atp.remove()
            self.atp = None
        if self.lora is not None:  # export() first to keep the adapter
            self.lora.remove()
            self.lora = None
        if getattr(self, "predictor", None) is not None:
            for p, flag in zip(self.predictor.parameters(), self.predictor_grad):
                p.requires_grad_(flag)
            self.predictor = None
        if self.config.activation_checkpointing and not self.was_checkpointing:
            set_checkpointing(self.model, False)
        self.model.train(self.was_training)
        for p, flag in zip(self.model.parameters(), self.frozen):
            p.requires_grad_(flag)


def train_glimpse(
    model: nn.Module,
    predictor: GlimpsePredictor,
    batches: Iterable[dict],
    keep_ratio: float = 0.1,
    lr: float = 1e-4,
    budget_weight: float = 1.0,
    save_to: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
) -> GlimpsePredictor:
    """Train ``predictor`` (the glimpse token and the VIP) on ``batches`` with the LM frozen, one
    optimizer step per batch (``Trainer.fit`` on one process); ``progress`` gets a line per
    step; saves safetensors to ``save_to`` when given. The model is given back as it was."""
    config = TrainConfig(mode="glimpse", keep_ratio=keep_ratio, budget_weight=budget_weight, lr=lr)
    trainer = Trainer(model, config, predictor=predictor, log=progress)
    try:
        trainer.fit(batches)
    finally:
        trainer.close()
        predictor.eval()
    if save_to is not None:
        predictor.save(save_to)
    return predictor
