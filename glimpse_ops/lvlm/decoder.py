"""The decoder-only language model: RMSNorm, RoPE on arbitrary position ids, GQA attention
with a per-layer KV cache [B, Hkv, S, D], SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import soft_mask_attention
from ..layers import RMSNorm, apply_rope, attention_mask, rope
from .config import LVLMConfig

KV = tuple[Tensor, Tensor]


class Attention(nn.Module):
    def __init__(self, config: LVLMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.q = nn.Linear(c.hidden, c.heads * c.head_dim)
        self.k = nn.Linear(c.hidden, c.kv_heads * c.head_dim)
        self.v = nn.Linear(c.hidden, c.kv_heads * c.head_dim)
        self.o = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def project(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, S, d] (normed) -> q [B, H, S, D], k and v [B, Hkv, S, D], RoPE applied."""
        c = self.config
        B, S, _ = h.shape
        q = apply_rope(self.q(h).view(B, S, c.heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(self.k(h).view(B, S, c.kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        return q, k, self.v(h).view(B, S, c.kv_heads, c.head_dim).transpose(1, 2)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        past: KV | None,
        key_valid: Tensor,
        key_visual: Tensor | None = None,
        key_weight: Tensor | None = None,
        soft_attention=None,
    ) -> tuple[Tensor, KV]:
        """The new rows q [B, H, Sq, D] against the cache plus k, v -> (out [B, Sq, d], cache).
        ``key_weight`` [B, Sk] (soft keep weights, no cache, no late-fusion mask) switches to
        ``soft_mask_attention`` (ATP training), or to ``soft_attention(q, k, v, key_weight,
        key_valid, causal)`` when given (the benchmark's dense-mask peer)."""
        B, _, S, _ = q.shape
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if key_weight is not None:
            if past is not None or key_visual is not None:
                raise ValueError(
                    "Attention.attend: key_weight needs the whole sequence at once and no late-fusion mask"
                )
            out = (soft_attention or soft_mask_attention)(q, k, v, key_weight, key_valid, causal=True)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask(key_valid, S, key_visual), enable_gqa=True
            )
        return self.o(out.transpose(1, 2).reshape(B, S, -1)), (k, v)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, past: KV | None, key_valid: Tensor, key_visual: Tensor | None = None
    ) -> tuple[Tensor, KV, Tensor]:
        """h [B, Sq, d] -> (out [B, Sq, d], the layer's cache after appending, q [B, H, Sq, D])."""
        q, k, v = self.project(h, cos, sin)
        out, kv = self.attend(q, k, v, past, key_valid, key_visual)
        return out, kv, q


class DecoderLayer(nn.Module):
    def __init__(self, config: LVLMConfig) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(config.hidden), RMSNorm(config.hidden)
        self.attn = Attention(config)
        self.gate_up = nn.Linear(config.hidden, 2 * config.ffn, bias=False)
        self.down = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(
        self, h: Tensor, cos: Tensor, sin: Tensor, past: KV | None, key_valid: Tensor, key_visual: Tensor | None = None
    ) -> tuple[Tensor, KV, Tensor]:
        attn, kv, q = self.attn(self.attn_norm(h), cos, sin, past, key_valid, key_visual)
        return self.mlp(h + attn), kv, q

    def mlp(self, h: Tensor) -> Tensor:
        """The SwiGLU half of the layer, with its residual."""
        gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    """Token embedding, the layers, final norm and LM head."""

    def __init__(self, config: LVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)

    def run_layers(
        self,
        h: Tensor,
        positions: Tensor,
        key_valid: Tensor,
        caches: list[KV | None],
        start: int,
        end: int,
        inject=None,
        key_visual: Tensor | None = None,
    ) -> tuple[Tensor, list[KV], Tensor]:
        """Layers start..end-1 on h [B, Sq, d] with positions [B, Sq]; key_valid [B, Sk]
        covers the cached keys and the new ones; key_visual [B, Sk] marks visual keys (for
        the layers before ``text_sees_image_from``). ``inject(layer, h)`` may edit h before
        a layer (the glimpse injections). Returns (h, the layers' caches, q of the last layer)."""
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta)
        new_caches, q = [], None
        for index in range(start, end):
            if inject is not None:
                h = inject(index, h)
            late = key_visual if index < self.config.text_sees_image_from else None
            h, kv, q = self.layers[index](h, cos, sin, caches[index - start], key_valid, late)
            new_caches.append(kv)
        return h, new_caches, q

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm(h)).float()
