"""GlimpsePrune+ release folders: a LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``, stage 1) beside the glimpse token and VIP trained on the merged
LLM (``config.json`` + ``new_modules_gp.pt``, stage 2), the official layout.

``python -m glimpse_ops.hf.gp_plus --model BASE --release FOLDER --out OUT`` writes the base
model with the adapter merged as an HF checkpoint in ``OUT`` (weights, config, processor) and
the glimpse modules in ``OUT/glimpse``: ``apply_glimpse_prune(model, predictor=OUT/glimpse)``
on the merged checkpoint needs no adapter argument, and the vLLM plugin serves ``OUT`` with
``engine_kwargs(predictor=OUT/glimpse)``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from torch import nn

RELEASE_FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json", "new_modules_gp.pt")


def check_release(folder: str | Path) -> Path:
    """``folder`` as a Path when it holds every file of a GlimpsePrune+ release, else a
    FileNotFoundError naming the first one missing."""
    folder = Path(folder)
    for name in RELEASE_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"glimpse_ops.hf.gp_plus: {folder} is no GlimpsePrune+ release: it has no {name}")
    return folder


def merge_release(model: nn.Module, folder: str | Path) -> nn.Module:
    """``model`` with the release's adapter merged into its weights (in place)."""
    from .lora import read_adapter

    read_adapter(model, check_release(folder)).merge()
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glimpse_ops.hf.gp_plus", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base model (a local folder or hub id)")
    p.add_argument("--release", required=True, help="the GlimpsePrune+ release folder")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    release = check_release(args.release)  # before the model is loaded
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto")
    merge_release(model, release)
    out = Path(args.out)
    model.save_pretrained(out)
    try:
        processor = AutoProcessor.from_pretrained(args.model)
    except (OSError, ValueError, TypeError):  # a bare test checkpoint has none
        processor = None
        print(f"glimpse_ops.hf.gp_plus: {args.model} has no processor to copy")
    if processor is not None:
        processor.save_pretrained(out)
    (out / "glimpse").mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "new_modules_gp.pt"):
        shutil.copy2(release / name, out / "glimpse" / name)
    print(f"glimpse_ops.hf.gp_plus: wrote the merged model to {out} and the glimpse modules to {out / 'glimpse'}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
