"""Training and evaluation loops for the reference LVLM on the synthetic task (CPU-sized)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .atp import ATPPruner, answer_and_budget_loss
from .glimpse import GlimpsePruner, dice_bce_loss, score_loss
from .model import LVLM
from .task import make_batch

Progress = Callable[[str], None]


def _cosine(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + torch.cos(torch.tensor((step - warm) / max(1, steps - warm) * 3.14159265)).item())


def train_lvlm(
    model: LVLM,
    steps: int,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
    sparse: bool = True,
) -> float:
    """Train everything on the answer token's cross entropy (on a mix of sparse and full
    grids, see ``make_batch``); returns the last loss. At lr 3e-3 the 4-layer model sits
    at chance on 16+ cells; 1e-3 learns the lookup."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, lr)
        data = make_batch(model.config, batch, g, sparse=sparse)
        loss = F.cross_entropy(model(data.images, data.input_ids, data.attention_mask), data.answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(f"LVLM step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()
    return loss.item()


def train_glimpse_pruner(
    model: LVLM,
    pruner: GlimpsePruner,
    steps: int,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 1,
    progress: Progress | None = None,
    score_loss_weight: float = 0.5,
) -> float:
    """Train the glimpse token and the VIP with the LM frozen: Dice + 0.1 BCE between the
    VIP logits and the mask of the cell the question names, plus ``score_loss_weight`` x a
    cross entropy on the glimpse's per-head logits (``score_loss``). Gradients reach the
    glimpse through glimpse_scores. Returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    model.requires_grad_(False)
    model.eval()
    opt = torch.optim.AdamW(pruner.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, steps, lr)
        data = make_batch(model.config, batch, g)
        head_scores, _, prefix = pruner.head_scores(model, data.images, data.input_ids, data.attention_mask)
        logits = pruner.vip(head_scores, prefix.taps)
        target = F.one_hot(data.target_cell, model.config.visual_tokens).float()
        loss = dice_bce_loss(logits, target)
        if score_loss_weight:
            loss = loss + score_loss_weight * score_loss(head_scores, data.target_cell)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(f"glimpse step {step + 1}/{steps} loss {loss.item():.3f}")
    return loss.item()


def train_atp(
    model: LVLM,
    atp: ATPPruner,
    steps: int,
    target: float,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 2,
    progress: Progress | None = None,
    budget_weight: float = 1.0,
    lm_lr: float | None = None,
) -> float:
    """Train the ATP threshold MLPs through the soft masks: answer cross entropy plus
    ``budget_weight`` x |mean kept - target| / Nv. The LM stays frozen unless ``lm_lr`` is
    given (then it is tuned at that rate). Returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    model.requires_grad_(lm_lr is not None)
    model.eval()
    groups = [{"params": list(atp.parameters()), "lr": lr}]
    if lm_lr is not None:
        groups.append({"params": list(model.parameters()), "lr": lm_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base = [group["lr"] for group in groups]
    loss = torch.tensor(0.0)
    for step in range(steps):
        for group, rate in zip(opt.param_groups, base):
            group["lr"] = _cosine(step, steps, rate)
        data = make_batch(model.config, batch, g)
        loss, info = answer_and_budget_loss(
            model, atp, data.images, data.input_ids, data.attention_mask, data.answers, target, budget_weight
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(f"ATP step {step + 1}/{steps} loss {loss.item():.3f} kept {info['kept'].mean().item():.1f}")
    model.requires_grad_(False)
    return loss.item()


@torch.no_grad()
def evaluate(model: LVLM, pruner=None, samples: int = 512, batch: int = 128, seed: int = 1234) -> dict[str, float]:
    """Answer accuracy and the mean fraction of visual tokens kept (after the last pruning
    step); ``kept_per_layer`` too when the pruner reports it (ATP)."""
    g = torch.Generator().manual_seed(seed)
    correct, kept, total = 0, 0.0, 0
    per_layer = torch.zeros(model.config.layers, dtype=torch.float64)
    for start in range(0, samples, batch):
        data = make_batch(model.config, min(batch, samples - start), g)
        if pruner is None:
            logits = model(data.images, data.input_ids, data.attention_mask)
            kept += float(model.config.visual_tokens * len(data.answers))
        else:
            logits, _, info = pruner.prefill(model, data.images, data.input_ids, data.attention_mask)
            kept += float(info["kept_visual"].sum())
            if "kept_per_layer" in info:
                per_layer += info["kept_per_layer"].double().sum(dim=1)
        correct += int((logits.argmax(-1) == data.answers).sum())
        total += len(data.answers)
    result = {"accuracy": correct / total, "kept_fraction": kept / (total * model.config.visual_tokens)}
    if pruner is not None and per_layer.any():
        result["kept_per_layer"] = [round(x, 4) for x in (per_layer / (total * model.config.visual_tokens)).tolist()]
    return result
