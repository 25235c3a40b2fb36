"""The losses of both trainers (``trainer.Trainer``): the glimpse token and the VIP on a user's
(image, question, answer) batches, and the sums ATP's loss is made of.

The LM stays frozen. Without boxes to supervise the VIP, the keep decision is learned from
the answer itself: the VIP's keep probabilities w enter the frozen model as a soft key mask
(log w added to the attention logits of the visual keys: renormalized, DynamicViT/ATP
style), and the loss is the answer's cross entropy plus a budget term |mean w - ratio|.
Each step runs two forwards:

1. prompt + glimpse through layers 0..K (stopped there), giving w with gradients back to
   the VIP and, through the glimpse's layer-K logits, to the glimpse token;
2. prompt + answer through the whole model with the soft mask where inference prunes:
   every layer for the answer rows (they decode against compacted caches) and layers
   K+1.. for the prompt rows. The glimpse is absent, as after pruning.

A batch is a dict of the model's prompt inputs (``input_ids`` left padded,
``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``) plus
``answer_ids`` [B, A] (pad with -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..glimpseprune import GlimpsePredictor, PruneSettings
from ..layers import attention_mask
from ._compat import cache_kwarg
from .adapters import adapter_for
from .attention import layer_mask, require_additive_masks
from .predictor_hooks import PredictorPruneHandle


class _Stop(Exception):
    pass


def _visual_keep_probs(model: nn.Module, predictor: GlimpsePredictor, prompt: dict) -> tuple[Tensor, Tensor]:
    """Forward 1: (keep probabilities fp32 [N] over all visual tokens with gradients, visual mask [B, S])."""
    adapter = adapter_for(model)
    settings = PruneSettings.resolve(len(adapter.layers), predictor.config, where="glimpse_ops.hf.Trainer")
    handle = PredictorPruneHandle(model, adapter, settings, predictor=predictor)
    K = settings.layer
    result: dict = {}

    def after_k(module, args, kwargs, output):
        p = handle.prefill
        keys = cache_kwarg(kwargs).layers[K].keys
        result["probs"] = torch.sigmoid(handle.visual_logits(p, keys))
        result["visual"] = p.visual
        raise _Stop

    # No activation checkpointing here (HF checkpoints in training mode only, and drops the
    # cache there): a recomputed layer K would run these hooks again during backward. Forward
    # 2, over prompt + answer, is the large one and keeps it. The frozen model has no dropout.
    training = model.training
    model.eval()
    try:
        handle.attach(after_layer_k=after_k)
        model(**prompt, use_cache=True)
    except _Stop:
        pass
    finally:
        handle.remove()
        model.train(training)
    if "probs" not in result:
        raise ValueError("glimpse_ops.hf.Trainer: the batch has no image tokens")
    return result["probs"], result["visual"]


def soft_masks(
    valid: Tensor, visual: Tensor, prompt_len: int, weight: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Additive masks [B, 1, T, T] for layers 0..K and K+1.. over prompt + answer (T tokens):
    causal, no padding keys (each row sees itself), plus log w on the visual keys for the
    answer rows (both) and for every row (layers K+1..). ``weight`` fp32 [B, T] is 1 off
    the visual tokens."""
    T = valid.shape[1]
    rows = torch.arange(T, device=valid.device)
    allowed = attention_mask(valid, T)
    base = layer_mask(valid, dtype, "eager")
    log_w = torch.log(weight.clamp_min(1e-6)).to(dtype)[:, None, None, :]  # [B, 1, 1, T]
    answer_rows = (rows >= prompt_len)[None, None, :, None]
    early = base + torch.where(answer_rows & allowed, log_w, torch.zeros_like(log_w))
    late = base + torch.where(allowed, log_w, torch.zeros_like(log_w))
    return early, late


@dataclass
class LossTerms:
    """The sums a training loss is made of, so ranks can combine them into global means:
    cross entropy summed over the answer tokens (``answer_tokens`` of them), and the kept
    weights summed over the visual tokens (``visual_tokens`` of them). Sums carry gradients,
    counts do not."""

    answer_ce_sum: Tensor
    answer_tokens: Tensor
    kept_sum: Tensor
    visual_tokens: Tensor
    logits: Tensor  # the answer rows' logits [B, A, V], detached

    def loss(self, keep_ratio: float, budget_weight: float) -> tuple[Tensor, Tensor, Tensor]:
        """(answer CE mean + budget_weight * |kept fraction - keep_ratio|, CE mean, kept fraction):
        the one place the budget term is written."""
        ce = self.answer_ce_sum / self.answer_tokens.clamp_min(1)
        kept = self.kept_sum / self.visual_tokens.clamp_min(1)
        return ce + budget_weight * (kept - keep_ratio).abs(), ce, kept

    def global_view(self, totals: Tensor) -> LossTerms:
        """These terms as one rank's share of the whole batch: ``totals`` [4] are the four
        sums over every rank (answer CE, answer tokens, kept, visual tokens; no gradient). The
        sums of the result carry the global values and this rank's gradients, so ``loss()`` of
        it is the global loss and its backward this rank's contribution to that loss's gradient."""

        def share(local: Tensor, total: Tensor) -> Tensor:
            return local + (total - local).detach()

        return LossTerms(share(self.answer_ce_sum, totals[0]), totals[1], share(self.kept_sum, totals[2]), totals[3],
                         self.logits)  # fmt: skip


def answer_ce_sum(logits: Tensor, prompt_len: int, answer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cross entropy summed over the answer tokens, their count, the answer rows' logits
    [B, A, V]): position prompt_len - 1 + i predicts answer token i (-100: padding)."""
    answer_logits = logits[:, prompt_len - 1 : prompt_len - 1 + answer.shape[1]]
    ce = F.cross_entropy(
        answer_logits.float().reshape(-1, logits.shape[-1]), answer.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return ce, (answer != -100).sum(), answer_logits.detach()


def prompt_and_answer(batch: dict) -> tuple[dict, Tensor, dict]:
    """(the prompt inputs, answer_ids [B, A], the model inputs over prompt + answer)."""
    prompt = {k: v for k, v in batch.items() if k != "answer_ids"}
    answer = batch["answer_ids"]
    ids = torch.cat([prompt["input_ids"], answer.clamp(min=0)], dim=1)
    valid = torch.cat([prompt["attention_mask"].bool(), torch.ones_like(answer, dtype=torch.bool)], dim=1)
    inputs = dict(prompt, input_ids=ids, attention_mask=valid.long())
    if "mm_token_type_ids" in prompt:
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
    return prompt, answer, inputs


def glimpse_loss_terms(
    model: nn.Module,
    predictor: GlimpsePredictor,
    batch: dict,
    force_weight: float | None = None,
    hold: list | None = None,
) -> LossTerms:
    """The two forwards of a training step (module docstring) -> ``LossTerms``. ``force_weight``
    replaces w by a constant (a test hook: 1.0 must reproduce the stock model). ``hold``: a
    list that receives the soft-mask hooks instead of removing them, for the caller to remove
    after backward (activation checkpointing recomputes the layers there, hooks included)."""
    require_additive_masks(adapter_for(model).attn_implementation, "glimpse_ops.hf.glimpse_loss_terms")
    prompt, answer, inputs = prompt_and_answer(batch)
    probs, visual = _visual_keep_probs(model, predictor, prompt)
    probs = probs.float()  # bf16 under autocast; the mask and the budget are fp32
    B, S = visual.shape
    if force_weight is not None:
        probs = torch.full_like(probs, force_weight)
    weight = torch.ones(B, S + answer.shape[1], device=probs.device)
    weight[:, :S][visual] = probs
    valid = inputs["attention_mask"].bool()
    dtype = next(model.parameters()).dtype
    early, late = soft_masks(
        valid, torch.cat([visual, torch.zeros_like(answer, dtype=torch.bool)], dim=1), S, weight, dtype
    )
    K = predictor.config.score_layer
    layers = adapter_for(model).layers

    def set_mask(index: int):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = early if index <= K else late
            return args, kwargs

        return hook

    hooks = [layer.register_forward_pre_hook(set_mask(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        logits = model(**inputs, use_cache=False).logits
    finally:
        if hold is None:
            for hook in hooks:
                hook.remove()
        else:
            hold.extend(hooks)
    ce, n_answer, answer_logits = answer_ce_sum(logits, S, answer)
    return LossTerms(ce, n_answer, probs.sum(), torch.tensor(probs.numel(), device=probs.device), answer_logits)


def glimpse_training_loss(
    model: nn.Module,
    predictor: GlimpsePredictor,
    batch: dict,
    keep_ratio: float,
    budget_weight: float = 1.0,
    force_weight: float | None = None,
) -> tuple[Tensor, dict]:
    """(answer cross entropy + budget_weight * |mean w - keep_ratio|, info) on one process.
    ``force_weight`` replaces w by a constant (a test hook: 1.0 must reproduce the stock model)."""
    terms = glimpse_loss_terms(model, predictor, batch, force_weight)
    loss, ce, kept = terms.loss(keep_ratio, budget_weight)
    return loss, {"answer_ce": ce.detach(), "kept_fraction": kept.detach(), "logits": terms.logits}
