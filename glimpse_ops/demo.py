"""A picture of what GlimpsePrune keeps on the reference LVLM.

    python -m glimpse_ops.demo --out kept.png                      # trains the tiny LVLM first (~2 min on 2 cores)
    python -m glimpse_ops.demo --out kept.png --weights trained.pt # reuses bench/fidelity.py --save trained.pt

Writes a PNG with one panel per example: the image with the pruned visual tokens dimmed and
the kept ones outlined, the question, and the answers of the unpruned and the pruned model.
Needs Pillow (``pip install pillow``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .lvlm import LVLM, GlimpsePruner, make_batch, tiny, train_glimpse_pruner, train_lvlm
from .lvlm.checkpoint import load_trained
from .lvlm.task import ANSWER_BASE, COLOR_NAMES, IMAGE, SHAPE_NAMES
from .progress import Progress

CELL_PX = 64  # on-screen size of one visual token


@dataclass
class Example:
    image: Tensor  # [3, H, W] in [0, 1]
    kept: Tensor  # [Nv] bool, raster order
    question: str
    truth: str
    unpruned: str
    pruned: str


def _answer_name(token: int) -> str:
    shape = token - ANSWER_BASE
    return SHAPE_NAMES[shape] if 0 <= shape < len(SHAPE_NAMES) else f"token {token}"


@torch.no_grad()
def run_examples(model: LVLM, pruner: GlimpsePruner, samples: int, seed: int) -> list[Example]:
    """Answer ``samples`` fresh task examples with and without pruning."""
    data = make_batch(model.config, samples, torch.Generator().manual_seed(seed))
    unpruned = model(data.images, data.input_ids, data.attention_mask).argmax(-1)
    logits, _, info = pruner.prefill(model, data.images, data.input_ids, data.attention_mask)
    pruned = logits.argmax(-1)
    visual = data.input_ids == IMAGE
    kept = info["keep"][visual].view(samples, model.config.visual_tokens)  # IMAGE slots are in raster order
    return [
        Example(
            image=data.images[b].clamp(0, 1),
            kept=kept[b],
            question=f"Which shape is the {COLOR_NAMES[int(data.target_color[b])]} cell?",
            truth=_answer_name(int(data.answers[b])),
            unpruned=_answer_name(int(unpruned[b])),
            pruned=_answer_name(int(pruned[b])),
        )
        for b in range(samples)
    ]


def render(examples: list[Example], grid: int):
    """One PIL image: a panel per example, the pruned tokens dimmed, the kept ones outlined."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as error:
        raise ImportError("glimpse_ops.demo: writing the PNG needs Pillow (pip install pillow)") from error
    side = grid * CELL_PX
    text_h, margin, title_h = 86, 16, 30
    width = len(examples) * (side + margin) + margin
    canvas = Image.new("RGB", (width, title_h + side + text_h + margin), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text(
        (margin, 8),
        "GlimpsePrune on the reference LVLM: kept visual tokens outlined, pruned ones dimmed",
        fill="black",
        font=font,
    )
    for i, ex in enumerate(examples):
        x0, y0 = margin + i * (side + margin), title_h
        pixels = (ex.image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        panel = Image.fromarray(pixels, "RGB").resize((side, side), Image.NEAREST)
        dim = Image.new("RGB", (CELL_PX, CELL_PX), (40, 40, 40))
        for cell in range(grid * grid):
            if not ex.kept[cell]:
                r, c = divmod(cell, grid)
                box = (c * CELL_PX, r * CELL_PX, (c + 1) * CELL_PX, (r + 1) * CELL_PX)
                panel.paste(Image.blend(panel.crop(box), dim, 0.75), box)
        canvas.paste(panel, (x0, y0))
        for cell in range(grid * grid):
            if ex.kept[cell]:
                r, c = divmod(cell, grid)
                draw.rectangle(
                    (x0 + c * CELL_PX, y0 + r * CELL_PX, x0 + (c + 1) * CELL_PX - 1, y0 + (r + 1) * CELL_PX - 1),
                    outline=(255, 200, 0),
                    width=4,
                )
        lines = [
            ex.question,
            f"answer: {ex.truth}",
            f"unpruned model: {ex.unpruned}",
            f"pruned model: {ex.pruned}",
            f"kept {int(ex.kept.sum())} of {grid * grid} visual tokens",
        ]
        for j, line in enumerate(lines):
            draw.text((x0, y0 + side + 6 + 16 * j), line, fill="black", font=font)
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument(
        "--weights", type=Path, default=None, help="a checkpoint from bench/fidelity.py --save (skips training)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs=2,
        metavar=("LVLM", "GLIMPSE"),
        default=(1500, 3000),
        help="training steps when no --weights are given",
    )
    parser.add_argument("--samples", type=int, default=4, help="examples in the picture")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be at least 1")

    if args.weights is not None:
        model, pruner = load_trained(args.weights)
    else:
        torch.manual_seed(args.seed)
        model = LVLM(tiny())
        pruner = GlimpsePruner(model)
        progress = Progress(sum(args.steps))
        train_lvlm(model, args.steps[0], seed=args.seed, progress=progress.step)
        train_glimpse_pruner(model, pruner, args.steps[1], seed=args.seed + 1, progress=progress.step)
        pruner.eval()
    examples = run_examples(model, pruner, args.samples, seed=args.seed + 100)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render(examples, model.config.grid).save(args.out)
    right = sum(ex.pruned == ex.truth for ex in examples)
    print(f"wrote {args.out}: {len(examples)} examples, pruned model right on {right}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
