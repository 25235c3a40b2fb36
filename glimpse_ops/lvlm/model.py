"""The reference LVLM: vision encoder + merger/projector + decoder, with generation on a
per-layer KV cache, and the one-shot compaction step the pruning methods share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import gather_tokens, prune_kv
from ..layers import rope
from .config import LVLMConfig
from .decoder import KV, Decoder
from .task import IMAGE
from .vit import VisionEncoder


@dataclass
class DecodeState:
    """What decoding needs: each layer's cache and key validity (lengths may differ per
    layer), and the next RoPE position of each sample."""

    caches: list[KV]
    key_valid: list[Tensor]
    next_position: Tensor  # [B] int64
    key_visual: list[Tensor] | None = None  # per layer, for late-fusion layers

    def cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.caches)


@dataclass
class Prefix:
    """The sequence after layers 0..K, before pruning: hidden [B, S, d], positions [B, S],
    valid [B, S], the caches of layers 0..K, and which positions are visual tokens."""

    hidden: Tensor
    positions: Tensor
    valid: Tensor
    caches: list[KV]
    visual: Tensor
    taps: list[Tensor]
    glimpse_q: Tensor | None = None

    def prune(
        self, scores: Tensor, threshold: float | None, max_keep: int | Tensor, min_keep: int, max_len: int | None
    ) -> Compacted:
        """Select among the visual tokens by ``scores`` [B, S] fp32 and compact the caches of
        layers 0..K (one prune_kv call), then gather hidden states, positions, validity and
        the visual mask the same way. No host sync when ``max_len`` is given."""
        S = scores.shape[1]
        keys = [k[:, :, :S] for k, _ in self.caches]  # drop anything appended (the glimpse)
        values = [v[:, :, :S] for _, v in self.caches]
        new_keys, new_values, index, lengths, keep = prune_kv(
            scores, self.visual, keys, values, threshold=threshold, max_keep=max_keep, min_keep=min_keep,
            max_len=max_len, padding_side="left",
        )  # fmt: skip
        return self.gather(index, lengths, new_keys, new_values, keep)

    def gather(
        self,
        index: Tensor,
        lengths: Tensor,
        new_keys: list[Tensor],
        new_values: list[Tensor],
        keep: Tensor | None = None,
    ) -> Compacted:
        """After the caches of layers 0..K were compacted by ``index`` [B, Lmax]: gather hidden
        states, positions, validity and the visual mask the same way (anything appended after
        the prompt, such as the glimpse, is dropped)."""
        S = self.visual.shape[1]
        return Compacted(
            hidden=gather_tokens(self.hidden[:, :S], index, pad_value=0.0),
            positions=gather_tokens(self.positions[:, :S], index, pad_value=0),
            valid=gather_tokens(self.valid[:, :S], index, pad_value=False),
            visual=gather_tokens(self.visual, index, pad_value=False),
            caches=list(zip(new_keys, new_values)),
            index=index,
            lengths=lengths,
            keep=keep,
        )


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class LVLM(nn.Module):
    def __init__(self, config: LVLMConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config)
        self.decoder = Decoder(config)

    # --- building blocks ------------------------------------------------------------
    def embed(self, images: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(embeddings [B, S, d] with visual tokens at IMAGE ids, visual mask [B, S], taps)."""
        visual_tokens, taps = self.vision(images)
        h = self.decoder.embed(input_ids)
        visual = input_ids == IMAGE
        h = h.masked_scatter(visual[..., None], visual_tokens.to(h.dtype))
        return h, visual, taps

    def run_prefix(
        self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, end: int | None = None, extra=None
    ) -> Prefix:
        """Layers 0..end-1 (default 0..K) on the full prompt. ``extra(h, positions, valid)``
        may append tokens (the glimpse) and return (h, positions, valid, inject)."""
        h, visual, taps = self.embed(images, input_ids)
        positions, valid = positions_from_mask(attention_mask), attention_mask
        inject = None
        key_visual = visual
        if extra is not None:
            h, positions, valid, inject = extra(h, positions, valid)
            key_visual = torch.cat([visual, torch.zeros_like(visual[:, : h.shape[1] - visual.shape[1]])], dim=1)
        end = self.config.prune_layer + 1 if end is None else end
        h, caches, q = self.decoder.run_layers(h, positions, valid, [None] * end, 0, end, inject, key_visual)
        return Prefix(h, positions, valid, caches, visual, taps, q)

    def finish(
        self, h: Tensor, positions: Tensor, valid: Tensor, caches: list[KV], start: int, visual: Tensor | None = None
    ) -> tuple[Tensor, DecodeState]:
        """Layers start..L-1 on the (possibly compacted) sequence whose visual tokens are
        ``visual`` [B, L]; returns (logits of the last slot [B, V], the decode state).
        Decoding continues at the last position + 1."""
        n = self.config.layers - start
        h, new_caches, _ = self.decoder.run_layers(
            h, positions, valid, [None] * n, start, self.config.layers, None, visual
        )
        all_caches = list(caches) + new_caches
        key_visual = None if visual is None else [visual] * len(all_caches)
        state = DecodeState(all_caches, [valid] * len(all_caches), positions[:, -1] + 1, key_visual)
        return self.decoder.logits(h[:, -1]), state

    # --- unpruned model ---------------------------------------------------------------
    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits of the last prompt position [B, V] (the task's answer)."""
        return self.prefill(images, input_ids, attention_mask)[0]

    def prefill(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, DecodeState]:
        prefix = self.run_prefix(images, input_ids, attention_mask)
        return self.finish(
            prefix.hidden, prefix.positions, prefix.valid, prefix.caches, self.config.prune_layer + 1, prefix.visual
        )

    def decode_step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """One token per sample [B] -> logits [B, V]; updates ``state`` in place."""
        h = self.decoder.embed(tokens)[:, None]
        cos, sin = rope(state.next_position[:, None], self.config.head_dim, self.config.rope_theta)
        ones = torch.ones_like(state.key_valid[0][:, :1])
        for index, layer in enumerate(self.decoder.layers):
            valid = torch.cat([state.key_valid[index], ones], dim=1)
            visual = None
            if state.key_visual is not None:
                visual = torch.cat([state.key_visual[index], torch.zeros_like(ones)], dim=1)
                state.key_visual[index] = visual
            late = visual if index < self.config.text_sees_image_from else None
            h, state.caches[index], _ = layer(h, cos, sin, state.caches[index], valid, late)
            state.key_valid[index] = valid
        state.next_position = state.next_position + 1
        return self.decoder.logits(h[:, -1])

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        pruner=None,
    ) -> Tensor:
        """Greedy or sampled generation [B, max_new_tokens]; ``pruner`` (an object with a
        ``prefill(model, images, input_ids, attention_mask)``) prunes the prefill."""
        if pruner is None:
            logits, state = self.prefill(images, input_ids, attention_mask)
        else:
            logits, state = pruner.prefill(self, images, input_ids, attention_mask)[:2]
        out = []
        for step in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = logits.argmax(dim=-1)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits = self.decode_step(token, state)
        return torch.stack(out, dim=1)


@dataclass
class Compacted:
    """The prompt after the one-shot pruning step, before layers K+1..: hidden [B, Lmax, d],
    positions [B, Lmax] (original ones), valid and visual [B, Lmax], the compacted caches of
    layers 0..K, the kept positions ``index`` [B, Lmax] (-1 pads), lengths [B] and the
    selection ``keep`` [B, S] when it was computed."""

    hidden: Tensor
    positions: Tensor
    valid: Tensor
    visual: Tensor
    caches: list[KV]
    index: Tensor
    lengths: Tensor
    keep: Tensor | None = None

    def finish(self, model: LVLM) -> tuple[Tensor, DecodeState, dict]:
        """Layers K+1.. on the kept tokens: (logits of the last slot [B, V], the decode state,
        info with the index, lengths, selection and kept visual count per sample)."""
        logits, state = model.finish(
            self.hidden, self.positions, self.valid, self.caches, model.config.prune_layer + 1, self.visual
        )
        info = {"index": self.index, "lengths": self.lengths, "keep": self.keep, "kept_visual": self.visual.sum(dim=1)}
        return logits, state, info
