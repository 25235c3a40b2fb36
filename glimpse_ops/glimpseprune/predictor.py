"""GlimpsePrune's trained parts: the glimpse token and the VIP (used by ``glimpse_ops.hf`` and
the vLLM plugin alike; no transformers import).

Written from the description of the GlimpsePrune method and release with the parameter
names of the public release, so that its ``new_modules_gp.pt`` loads directly
(``glimpse_ops.glimpseprune.release.load_release``):

* ``learnable_embeddings`` [n_rows, 1, d], ``le_proj`` (Linear d->d), ``le_norm`` (RMSNorm):
  row i belongs to layer ``glimpse_layers[i]`` (the release's ``le_layers``, default 0..K):
  layer 0's row is the glimpse's input embedding, the others are added to it before their
  layer.
* ``attn_fuser`` (the VIP): ``attn_in_proj`` (Linear n_score_layers*H -> F), and per ViT
  level i (deep to shallow) ``cond_in_projs.i`` (Linear C_vit -> Cc) and ``layers.i``:
  RMSNorm ``norm1``/``norm2``, ``attn`` (q/k: Linear(F+Cc -> F+Cc) over concat(norm1(x), c),
  v/o: Linear(F -> F), all without bias, h heads, 2D RoPE over the q/k head dim from each
  token's (row, col) on the merged grid, attention within each image), ``mlp`` (SwiGLU
  F -> 2F -> F with biases); ``attn_out_projs.{last}`` (Linear F -> 1) gives the logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import RMSNorm, apply_rope
from ..ops import glimpse_scores


def grid_rope(
    grid_hw: list[tuple[int, int]], head_dim: int, device, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos, sin [N, head_dim] of ``dtype`` for the merged-grid (row, col) of every token, raster
    order per image: half of the frequencies rotate with the row, half with the column.

    Computed like the release's table: inverse frequencies and positions in ``dtype``, their
    outer product and cos/sin in ``dtype`` (in bf16 that rounds the angles; exact in fp32)."""
    dim = head_dim // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))).to(dtype)
    longest = max(max(h, w) for h, w in grid_hw)
    table = torch.outer(torch.arange(longest, device=device, dtype=dtype), inv_freq)  # [longest, dim / 2]
    rows, cols = [], []
    for h, w in grid_hw:
        rows.append(torch.arange(h, device=device).repeat_interleave(w))
        cols.append(torch.arange(w, device=device).repeat(h))
    freqs = torch.cat([table[torch.cat(rows)], table[torch.cat(cols)]], dim=1)  # [N, dim]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class CondAttention(nn.Module):
    def __init__(self, width: int, cond: int, heads: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width + cond, width + cond, bias=False)
        self.k_proj = nn.Linear(width + cond, width + cond, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.heads = heads

    def forward(self, x: Tensor, cond: Tensor, rope: tuple[Tensor, Tensor], sizes: list[int]) -> Tensor:
        N = x.shape[0]
        qk = torch.cat([x, cond], dim=-1)
        q = self.q_proj(qk).view(N, self.heads, -1)
        k = self.k_proj(qk).view(N, self.heads, -1)
        v = self.v_proj(x).view(N, self.heads, -1)
        cos, sin = (t[:, None].float() for t in rope)  # shared by the heads
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        outs = [
            F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1)).transpose(0, 1)
            for qi, ki, vi in zip(q.split(sizes), k.split(sizes), v.split(sizes))
        ]
        return self.o_proj(torch.cat(outs).reshape(N, -1))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FuserLayer(nn.Module):
    def __init__(self, width: int, cond: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        self.attn = CondAttention(width, cond, heads)
        self.mlp = SwiGLU(width, 2 * width)

    def forward(self, x: Tensor, cond: Tensor, rope: tuple[Tensor, Tensor], sizes: list[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), cond, rope, sizes)
        return x + self.mlp(self.norm2(x))


class VisualImportancePredictor(nn.Module):
    """glimpse logits [N, n_score_layers * H] over all visual tokens of a batch (images in
    order, raster order within each), ViT features per level (deep to shallow) [N, C_vit]
    and each image's merged grid (h, w) -> keep logits [N] in the module's dtype."""

    def __init__(
        self, score_channels: int, vit_dim: int, levels: int, width: int = 256, cond: int = 512, heads: int = 4
    ) -> None:
        super().__init__()
        if (width + cond) % heads or ((width + cond) // heads) % 4:
            raise ValueError(
                "VisualImportancePredictor: (width + cond) / heads must be a multiple of 4, "
                f"got {width}, {cond}, {heads}"
            )
        self.attn_in_proj = nn.Linear(score_channels, width)
        self.cond_in_projs = nn.ModuleList(nn.Linear(vit_dim, cond) for _ in range(levels))
        self.layers = nn.ModuleList(FuserLayer(width, cond, heads) for _ in range(levels))
        self.attn_out_projs = nn.ModuleList([nn.Identity() for _ in range(levels - 1)] + [nn.Linear(width, 1)])
        self.qk_head_dim = (width + cond) // heads

    def forward(self, scores: Tensor, vit_features: list[Tensor], grid_hw: list[tuple[int, int]]) -> Tensor:
        if len(vit_features) != len(self.layers):
            raise ValueError(
                f"VisualImportancePredictor: expected {len(self.layers)} ViT levels, got {len(vit_features)}"
            )
        dtype = self.attn_in_proj.weight.dtype
        x = self.attn_in_proj(scores.to(dtype))
        rope = grid_rope(grid_hw, self.qk_head_dim, x.device, dtype)
        sizes = [h * w for h, w in grid_hw]
        for proj, layer, features in zip(self.cond_in_projs, self.layers, vit_features):
            x = layer(x, proj(features.to(dtype)), rope, sizes)
        return self.attn_out_projs[-1](x).squeeze(-1)


class GlimpseToken(nn.Module):
    """``learnable_embeddings`` [n_rows, 1, d] through ``le_proj`` and ``le_norm`` (RMSNorm
    with the text model's ``eps``, as the release builds it)."""

    def __init__(self, hidden: int, rows: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.learnable_embeddings = nn.Parameter(torch.randn(rows, 1, hidden) * 0.02)
        self.le_proj = nn.Linear(hidden, hidden)
        self.le_norm = RMSNorm(hidden, eps)

    def row(self, index: int) -> Tensor:
        """[1, d]: embedding row ``index`` (see ``GlimpsePredictor.row_for_layer``)."""
        return self.le_norm(self.le_proj(self.learnable_embeddings[index]))


@dataclass
class PredictorConfig:
    """Sizes and settings of a predictor. The last group are the release's defaults for the keep
    rule (``reduce_threshold``, ``min_remain_num``, ``max_remain_ratio``, ``fixed_remain_ratio``),
    which ``apply_glimpse_prune`` uses for the arguments it is not given."""

    score_layer: int  # K: the glimpse is read and the sequence compacted after this layer
    vit_layers: tuple[int, ...]  # ViT blocks whose outputs condition the VIP, deep to shallow
    heads: int
    hidden: int
    vit_dim: int
    width: int = 256
    cond: int = 512
    fuse_heads: int = 4
    glimpse_layers: tuple[int, ...] | None = None  # the layer of each embedding row (release: le_layers); None: 0..K
    le_norm_eps: float = 1e-6  # the glimpse's RMSNorm eps (release: the text model's rms_norm_eps)
    use_attention_logits: bool = True  # VIP input: raw logits, else log-softmax over the valid keys
    reduce_threshold: float = 0.5
    min_remain_num: int = 1
    max_remain_ratio: float | None = None
    fixed_remain_ratio: float | None = None


class GlimpsePredictor(nn.Module):
    """The glimpse token and the VIP, ready for ``apply_glimpse_prune(model, predictor=...)``."""

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        layers = self.glimpse_layers
        if 0 not in layers or any(not 0 <= layer <= config.score_layer for layer in layers):
            raise ValueError(
                f"GlimpsePredictor: glimpse_layers must hold layer 0 (the input embedding) and layers up to the "
                f"score layer {config.score_layer} only, got {layers}"
            )
        self.glimpse = GlimpseToken(config.hidden, len(layers), config.le_norm_eps)
        self.vip = VisualImportancePredictor(
            config.heads, config.vit_dim, len(config.vit_layers), config.width, config.cond, config.fuse_heads
        )

    @property
    def glimpse_layers(self) -> tuple[int, ...]:
        """The decoder layers that get an embedding row: 0 (the glimpse's input embedding) and
        those whose input the row is added to, all <= the score layer."""
        layers = self.config.glimpse_layers
        return tuple(range(self.config.score_layer + 1)) if layers is None else tuple(layers)

    def row_for_layer(self, layer: int) -> Tensor | None:
        """[1, d] in the predictor's dtype: the glimpse's input embedding (layer 0) or what is
        added to it before ``layer``; None for a layer without a row."""
        layers = self.glimpse_layers
        return self.glimpse.row(layers.index(layer)) if layer in layers else None

    def head_scores(self, glimpse_q: Tensor, keys: Tensor, valid: Tensor, visual: Tensor) -> Tensor:
        """The VIP's first input, [N, H] fp32: the glimpse's layer-K score of every visual token,
        per head (raw logits, or log-softmax over the valid keys: ``use_attention_logits``).
        ``glimpse_q`` [B, H, 1, D] (after RoPE), ``keys`` [B, Hkv, S + 1, D] the layer-K keys
        with the glimpse's own last, ``valid`` bool [B, S + 1], ``visual`` bool [B, S] the
        visual tokens (N of them), in prompt order."""
        normalize = "logits" if self.config.use_attention_logits else "log_probs"
        logits = glimpse_scores(glimpse_q, keys, valid, scale=None, normalize=normalize)  # [B, H, 1, S + 1]
        return logits[:, :, 0, : visual.shape[1]].transpose(1, 2)[visual]

    def keep_probs(self, logits: Tensor) -> Tensor:
        """fp32 keep probabilities: sigmoid in the predictor's dtype (as the release does, so a
        bf16 predictor rounds them like the release before the threshold), then fp32."""
        return torch.sigmoid(logits).float()

    @classmethod
    def for_model(cls, model: nn.Module, score_layer: int, vit_layers: tuple[int, ...], **sizes) -> GlimpsePredictor:
        """A freshly initialized predictor sized for ``model`` (a Qwen2.5-VL)."""
        text, vision = model.config.text_config, model.config.vision_config
        return cls(
            PredictorConfig(
                score_layer, tuple(vit_layers), text.num_attention_heads, text.hidden_size, vision.hidden_size, **sizes
            )
        )

    def save(self, path: str | Path) -> None:
        """safetensors weights plus the config in its metadata."""
        from safetensors.torch import save_file

        meta = {k: json.dumps(v) for k, v in self.config.__dict__.items()}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @staticmethod
    def read_config(path: str | Path) -> PredictorConfig:
        """The config stored in a file ``save`` wrote (its weights are not read)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        config = PredictorConfig(**{k: json.loads(v) for k, v in meta.items()})  # older files: defaults
        config.vit_layers = tuple(config.vit_layers)
        if config.glimpse_layers is not None:
            config.glimpse_layers = tuple(config.glimpse_layers)
        return config

    @classmethod
    def load(cls, path: str | Path) -> GlimpsePredictor:
        from safetensors.torch import load_file

        predictor = cls(cls.read_config(path))
        predictor.load_state_dict(load_file(str(path)))
        return predictor


def window_index(grid_thw: Tensor, merge: int, window: int, patch: int) -> Tensor:
    """Qwen2.5-VL's ViT order of the merged tokens (windows of window/merge/patch tokens per
    side, raster inside each window): raster index of each position in window order."""
    out, offset = [], 0
    side = window // merge // patch
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        ph, pw = -gh % side, -gw % side
        padded = F.pad(index, (0, pw, 0, ph), value=-1)
        blocks = padded.view(t, (gh + ph) // side, side, (gw + pw) // side, side).permute(0, 1, 3, 2, 4).reshape(-1)
        out.append(blocks[blocks >= 0] + offset)
        offset += t * gh * gw
    return torch.cat(out)


def merged_raster(block_output: Tensor, order: Tensor, merge: int) -> Tensor:
    """[N, C]: a ViT block's output ([N * merge^2, C] or [N * merge^2, 1, C], window order)
    averaged over each merge x merge group and put in raster order (``order``: ``window_index``)."""
    grouped = block_output.reshape(-1, merge * merge, block_output.shape[-1]).mean(dim=1)
    raster = torch.empty_like(grouped)
    raster[order] = grouped
    return raster
