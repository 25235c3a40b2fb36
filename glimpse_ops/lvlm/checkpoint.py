"""Saving and loading a trained reference LVLM with its GlimpsePruner (one ``.pt`` file)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import LVLMConfig
from .glimpse import GlimpsePruner
from .model import LVLM


def save_trained(path: str | Path, model: LVLM, pruner: GlimpsePruner) -> None:
    """Write the config, the LVLM weights and the pruner's weights and settings to ``path``."""
    torch.save(
        {
            "config": dataclasses.asdict(model.config),
            "lvlm": model.state_dict(),
            "pruner": pruner.state_dict(),
            "pruner_settings": {
                "threshold": pruner.threshold,
                "max_keep_ratio": pruner.max_keep_ratio,
                "min_keep": pruner.min_keep,
            },
        },
        Path(path),
    )


def load_trained(path: str | Path) -> tuple[LVLM, GlimpsePruner]:
    """The (LVLM, GlimpsePruner) saved by ``save_trained``, in eval mode."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("config", "lvlm", "pruner", "pruner_settings"):
        if key not in state:
            raise ValueError(f"load_trained: {path} is not a checkpoint written by save_trained (no '{key}')")
    model = LVLM(LVLMConfig(**state["config"]))
    model.load_state_dict(state["lvlm"])
    pruner = GlimpsePruner(model, **state["pruner_settings"])
    pruner.load_state_dict(state["pruner"])
    return model.eval(), pruner.eval()
