"""Configuration of the reference LVLM, with the two presets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LVLMConfig:
    """Shapes of the reference LVLM.

    Images are ``image_size`` square RGB; the ViT cuts ``patch`` x ``patch`` patches, and
    the 2x2 merger turns each 2x2 group of patches into one visual token, so an image
    gives ``(image_size // patch // 2) ** 2`` visual tokens. ``prune_layer`` is K: the
    glimpse is read at decoder layer K and layers 0..K run on the full sequence.
    """

    image_size: int = 8
    patch: int = 1
    vit_dim: int = 32
    vit_layers: int = 2
    vit_heads: int = 2
    vit_window: bool = True  # attention within each 2x2 merge group (Qwen's window blocks)
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    ffn: int = 128
    vocab: int = 160
    rope_theta: float = 10000.0
    prune_layer: int = 2
    vip_width: int = 64
    # Text tokens attend to visual tokens only from this layer on (0: everywhere). The tiny
    # preset sets K + 1 so that the answer is read after the pruning layer: otherwise the
    # question token has read its cell by layer K and pruning cannot matter on the toy.
    text_sees_image_from: int = 0

    @property
    def grid(self) -> int:
        """Visual tokens per image side."""
        return self.image_size // self.patch // 2

    @property
    def visual_tokens(self) -> int:
        return self.grid * self.grid

    def __post_init__(self) -> None:
        if self.image_size % (2 * self.patch):
            raise ValueError(
                f"LVLMConfig: image_size must be a multiple of 2 * patch, got {self.image_size} and {self.patch}"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"LVLMConfig: heads must be a multiple of kv_heads, got {self.heads} and {self.kv_heads}")
        if not 0 <= self.prune_layer < self.layers:
            raise ValueError(f"LVLMConfig: prune_layer must be in [0, {self.layers}), got {self.prune_layer}")


def tiny() -> LVLMConfig:
    """CPU tests and the fidelity benchmark: 16 visual tokens (a 4x4 grid), trains in about
    a minute on 2 cores. (An 8x8 grid stayed at chance for 1200 steps at lr 1e-3.)"""
    return LVLMConfig(text_sees_image_from=LVLMConfig.prune_layer + 1)


def qwen2_5_vl_7b_shapes() -> LVLMConfig:
    """Qwen2.5-VL-7B decoder shapes with random weights (GPU benchmarks): 28 layers, hidden
    3584, 28/4 heads of dim 128, pruning at layer 18; 1024 visual tokens per 896 px image."""
    return LVLMConfig(
        image_size=896,
        patch=14,
        vit_dim=1280,
        vit_layers=4,
        vit_heads=16,
        vit_window=False,
        hidden=3584,
        layers=28,
        heads=28,
        kv_heads=4,
        head_dim=128,
        ffn=18944,
        vocab=152064,
        rope_theta=1e6,
        prune_layer=18,
        vip_width=256,
    )
