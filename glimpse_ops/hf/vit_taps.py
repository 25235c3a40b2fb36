"""Where a trained predictor reads the ViT, per family: which module to watch for each call's
image layout, which blocks to tap, and how a tapped block output becomes one feature per
LLM image token (each merge group averaged, in the order the LLM sees the tokens).

* Qwen2.5-VL / Qwen3-VL: ``model.model.visual`` called with ``grid_thw``; blocks
  ``visual.blocks``; outputs [T * m^2, C] with each m x m merge group contiguous, in window
  order (Qwen2.5-VL, undone with ``window_index``) or raster order (Qwen3-VL); one VIP image
  per image.
* InternVL: ``model.model.vision_tower`` called with the tiles' pixel values; blocks
  ``vision_tower.encoder.layer``; outputs [tiles, 1 + s^2, C] (a CLS token, then the s x s
  patch grid in raster order); pixel shuffle merges each r x r patch group (r = 1 /
  downsample_ratio) into one token, raster order per tile; one VIP image per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..glimpseprune.predictor import merged_raster, window_index
from .patch import vit_grid

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "internvl")


@dataclass
class Layout:
    """The images of one ViT call: each VIP image's merged grid (h, w), in LLM order."""

    grids: list[tuple[int, int]]
    grid_thw: Tensor | None = None  # Qwen: [I, 3]

    @property
    def tokens(self) -> int:
        return sum(h * w for h, w in self.grids)


class VitTaps:
    def __init__(self, model: nn.Module) -> None:
        self.model_type = model.config.model_type
        if self.model_type not in FAMILIES:
            raise TypeError(f"glimpse_ops.hf: no ViT tap layout for {self.model_type}")
        self.config = model.config
        self.vision = model.model.visual if self.model_type != "internvl" else model.model.vision_tower
        self.blocks = self.vision.blocks if self.model_type != "internvl" else self.vision.encoder.layer

    def layout(self, args: tuple, kwargs: dict) -> Layout:
        """From the ViT's call (a forward pre-hook's arguments)."""
        if self.model_type == "internvl":
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            side = self._internvl_side()
            return Layout([(side, side)] * int(pixels.shape[0]))
        grid = vit_grid(args, kwargs)
        merge = self.config.vision_config.spatial_merge_size
        grids = [(t * h // merge, w // merge) for t, h, w in grid.tolist()]  # frames stack as rows
        return Layout(grids, grid)

    def _internvl_side(self) -> int:
        vision = self.config.vision_config
        patches = vision.image_size[0] // vision.patch_size[0]
        return int(patches * self.config.downsample_ratio)

    def features(self, output, layout: Layout) -> Tensor:
        """[N, C]: a tapped block's output as one feature per LLM image token."""
        output = output[0] if isinstance(output, tuple) else output
        if self.model_type == "internvl":
            tiles, side = output.shape[0], self._internvl_side()
            r = round(1 / self.config.downsample_ratio)
            grid = output[:, 1:].reshape(tiles, side, r, side, r, output.shape[-1])
            return grid.mean(dim=(2, 4)).reshape(tiles * side * side, -1)
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        if getattr(vision, "window_size", None):  # Qwen2.5-VL
            order = window_index(layout.grid_thw, merge, vision.window_size, vision.patch_size)
        else:  # Qwen3-VL
            order = torch.arange(layout.tokens)
        return merged_raster(output, order.to(output.device), merge)
