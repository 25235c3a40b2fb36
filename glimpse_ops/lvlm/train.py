"""Training and evaluation loops for the reference LVLM on the synthetic task (CPU-sized)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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
    model: LVLM, steps: int, batch: int = 64, lr: float = 1e-3, seed: int = 0, progress: Progress | None = None, sparse: bool = True
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


def train_glimpse(
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


@torch.no_grad()
def evaluate(model: LVLM, pruner=None, samples: int = 512, batch: int = 128, seed: int = 1234) -> dict[str, float]:
    """Answer accuracy and the mean fraction of visual tokens kept."""
    g = torch.Generator().manual_seed(seed)
    correct, kept, total = 0, 0.0, 0
    for start in range(0, samples, batch):
        data = make_batch(model.config, min(batch, samples - start), g)
        if pruner is None:
            logits = model(data.images, data.input_ids, data.attention_mask)
            kept += float(model.config.visual_tokens * len(data.answers))
        else:
            logits, _, info = pruner.prefill(model, data.images, data.input_ids, data.attention_mask)
            kept += float(info["kept_visual"].sum())
        correct += int((logits.argmax(-1) == data.answers).sum())
        total += len(data.answers)
    return {"accuracy": correct / total, "kept_fraction": kept / (total * model.config.visual_tokens)}
