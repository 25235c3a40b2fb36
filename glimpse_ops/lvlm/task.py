"""A synthetic visual QA task where the answer depends on one image region.

An image is a grid of cells (one visual token each). Every cell has a color (6) and a
shape (4 pixel patterns), plus noise; exactly one cell has the color the question names.
The question is one token ("which shape is the red cell?"); the answer is that cell's
shape, one token. Only that region matters: keeping random tokens mostly loses it.
(Naming the cell by its grid index instead made the tiny LM plateau at chance.) Random
prompt prefixes of 0-3 filler tokens give batches different lengths, left-padded.

Prompt layout: [PAD...] BOS [IMAGE x Nv] FILLER* QUESTION -> ANSWER.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import LVLMConfig

PAD, IMAGE, BOS = 0, 1, 2
FILLERS = (3, 4, 5, 6)
QUESTION_BASE = 8
COLORS = torch.tensor(
    [[0.9, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.9], [0.9, 0.9, 0.1], [0.8, 0.1, 0.8], [0.1, 0.9, 0.9]]
)
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPE_NAMES = ("full", "ring", "dot", "bar")
N_SHAPES = len(SHAPE_NAMES)


ANSWER_BASE = QUESTION_BASE + len(COLOR_NAMES)


def answer_token(shape: Tensor) -> Tensor:
    return ANSWER_BASE + shape


def _shape_masks(cell: int) -> Tensor:
    """[4, cell, cell] pixel patterns."""
    full = torch.ones(cell, cell)
    ring = torch.ones(cell, cell)
    if cell > 2:
        ring[1:-1, 1:-1] = 0
    else:
        ring[1, 1] = 0
    dot = torch.zeros(cell, cell)
    dot[cell // 2 - (cell > 2) : cell // 2 + 1, cell // 2 - (cell > 2) : cell // 2 + 1] = 1
    bar = torch.zeros(cell, cell)
    bar[:, 0] = 1
    return torch.stack([full, ring, dot, bar])


@dataclass
class Batch:
    images: Tensor  # [B, 3, H, W]
    input_ids: Tensor  # [B, S] int64, left padded
    attention_mask: Tensor  # [B, S] bool
    answers: Tensor  # [B] answer token ids
    target_cell: Tensor  # [B] the visual token the question names
    target_color: Tensor  # [B] the color the question names
    colors: Tensor  # [B, Nv]
    shapes: Tensor  # [B, Nv]

    def to(self, device) -> Batch:
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


def make_batch(
    config: LVLMConfig, batch: int, generator: torch.Generator | None = None, max_filler: int = 3, sparse: bool = False
) -> Batch:
    """``sparse``: each image fills only a random number (1..Nv) of its cells, the rest
    blank; training mixes these in so that the lookup is learnable (with every cell filled
    from the start the tiny LM plateaus at chance). Evaluation uses full grids."""
    g, nv, cell = config.grid, config.visual_tokens, config.image_size // config.grid
    target = torch.randint(0, nv, (batch,), generator=generator)
    target_color = torch.randint(0, len(COLORS), (batch,), generator=generator)
    others = torch.randint(0, len(COLORS) - 1, (batch, nv), generator=generator)
    colors = others + (others >= target_color[:, None]).long()  # every other cell: another color
    colors.scatter_(1, target[:, None], target_color[:, None])
    shapes = torch.randint(0, N_SHAPES, (batch, nv), generator=generator)
    patterns = _shape_masks(cell)[shapes]  # [B, Nv, cell, cell]
    if sparse:
        n_filled = torch.randint(1, nv + 1, (batch, 1), generator=generator)
        rank = torch.rand(batch, nv, generator=generator).argsort(dim=1).argsort(dim=1)
        filled = rank < n_filled
        filled.scatter_(1, target[:, None], True)
        patterns = patterns * filled[..., None, None]
    rgb = COLORS[colors][..., None, None] * patterns[:, :, None]  # [B, Nv, 3, cell, cell]
    images = rgb.view(batch, g, g, 3, cell, cell).permute(0, 3, 1, 4, 2, 5).reshape(batch, 3, g * cell, g * cell)
    images = images + 0.05 * torch.randn(images.shape, generator=generator)
    fillers = torch.randint(0, max_filler + 1, (batch,), generator=generator)
    length = 1 + nv + int(fillers.max()) + 1
    input_ids = torch.full((batch, length), PAD, dtype=torch.int64)
    for b in range(batch):
        n = int(fillers[b])
        row = (
            [BOS]
            + [IMAGE] * nv
            + [FILLERS[i % len(FILLERS)] for i in range(n)]
            + [QUESTION_BASE + int(target_color[b])]
        )
        input_ids[b, length - len(row) :] = torch.tensor(row)
    answers = answer_token(shapes.gather(1, target[:, None])[:, 0])
    return Batch(images, input_ids, input_ids != PAD, answers, target, target_color, colors, shapes)
