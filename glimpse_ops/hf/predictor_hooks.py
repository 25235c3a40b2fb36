"""The hooks of GlimpsePrune with a trained glimpse token and VIP (Qwen2.5-VL, Qwen3-VL,
InternVL; where each reads its ViT: ``vit_taps.py``).

On top of the training-free hooks (``prune_hooks.py``): ViT block outputs are kept at the
predictor's levels; a pre-hook on the text model appends the glimpse (its input embedding,
a 1 on the 2-D mask, position last + 1 on every M-RoPE axis); pre-hooks on layers 1..K add
the per-layer injections to it (the layers of its embedding rows). After layer K its
scores over the visual keys (``glimpse_scores``: raw logits, or log-softmax over the valid
keys, per head) and the ViT features (2x2 groups averaged, raster order) go through the VIP.
The keep rule is the release's (``glimpseprune.TrainedKeepRule``). ``prune_kv`` (per sample) or ``select_tokens`` +
``keep_index`` + ``compact_kv`` (per image) then compact the caches of layers 0..K, which
drops the glimpse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..glimpseprune import GlimpsePredictor
from ..ops import compact_kv, keep_index, prune_kv
from .prune_hooks import GlimpsePruneHandle, _Prefill
from .vit_taps import Layout, VitTaps


@dataclass
class PredictorPruneHandle(GlimpsePruneHandle):
    """``settings.rule`` is the release's ``TrainedKeepRule``: per sample (the release commit)
    or per image (later versions of the release)."""

    predictor: GlimpsePredictor | None = None
    vit_outputs: dict = field(default_factory=dict)
    taps: VitTaps | None = None
    layout: Layout | None = None  # the images of the latest ViT call
    prompt_length: int = 0

    def _attach_inputs(self) -> None:
        self.taps = VitTaps(self.model)
        # generate (5.2x) runs the ViT before the multimodal model and drops image_grid_thw
        # from its kwargs, so the layout and the features are taken at the ViT itself.
        self.hooks.append(self.taps.vision.register_forward_pre_hook(self._on_vit, with_kwargs=True))
        for level in self.predictor.config.vit_layers:
            self.hooks.append(self.taps.blocks[level].register_forward_hook(self._vit_tap(level)))
        self.hooks.append(self.adapter.text_model.register_forward_pre_hook(self._append_glimpse, with_kwargs=True))
        for layer in self.predictor.glimpse_layers:
            if layer == 0:  # the input embedding: appended by _append_glimpse
                continue
            self.hooks.append(
                self.adapter.layers[layer].register_forward_pre_hook(self._inject(layer), with_kwargs=True)
            )

    def _on_vit(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.vit_outputs.clear()
        self.layout = self.taps.layout(args, kwargs)

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super()._on_multimodal(module, args, kwargs)
        p = self.prefill
        if p is None:
            return
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError(
                "glimpse_ops.hf: a trained predictor scores image tokens only (its VIP reads per-image ViT "
                "features); prune video inputs with the training-free mode (predictor=None)"
            )
        if not bool(p.visual.any()):
            self.prefill = None  # no image in this prompt: nothing to prune

    def _vit_tap(self, level: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            self.vit_outputs[level] = output[0] if isinstance(output, tuple) else output

        return hook

    def _append_glimpse(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.prefill is None:
            return None
        embeds = kwargs["inputs_embeds"]
        B, S, _ = embeds.shape
        self.prompt_length = S
        row = self.predictor.row_for_layer(0).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([embeds, row.expand(B, 1, -1)], dim=1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            kwargs["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
        deepstack = kwargs.get("visual_pos_masks")  # Qwen3-VL: the glimpse gets no DeepStack feature
        if deepstack is not None:
            kwargs["visual_pos_masks"] = torch.cat([deepstack, torch.zeros_like(deepstack[:, :1])], dim=1)
        return args, kwargs

    def _inject(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self.prefill is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            row = self.predictor.row_for_layer(layer).to(hidden.dtype)
            hidden = torch.cat([hidden[:, :-1], hidden[:, -1:] + row], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def visual_logits(self, p: _Prefill, keys_k: Tensor) -> Tensor:
        """VIP logits [N] in the predictor's dtype for every visual token of the batch, in
        prompt order (images in order, raster order within each)."""
        valid = torch.cat([p.valid, torch.ones_like(p.valid[:, :1])], dim=1)
        head_scores = self.predictor.head_scores(p.glimpse_q, keys_k, valid, p.visual)  # [N, H]
        encoded = 0 if self.layout is None else self.layout.tokens
        if encoded != head_scores.shape[0] or len(self.vit_outputs) != len(self.predictor.config.vit_layers):
            raise RuntimeError(
                f"glimpse_ops.hf: the ViT features seen ({encoded} tokens) do not match the prompt's "
                f"{head_scores.shape[0]} image tokens; with a predictor the ViT must run for this prompt "
                "(no reused or expanded encoder outputs, no beam search)"
            )
        levels = self.predictor.config.vit_layers
        features = [self.taps.features(self.vit_outputs[level], self.layout) for level in levels]
        grid_hw = self.layout.grids
        self.vit_outputs.clear()  # used once: a later prompt must bring its own
        return self.predictor.vip(head_scores, features, grid_hw)

    def image_sizes(self) -> list[int]:
        """Visual tokens per image (per tile on InternVL) of the latest prefill, in order."""
        return [h * w for h, w in self.layout.grids]

    def _select_and_compact(self, p: _Prefill, keys: list[Tensor], values: list[Tensor]):
        S = self.prompt_length
        probs = self.predictor.keep_probs(self.visual_logits(p, keys[self.layer]))  # fp32 [N]
        scores = torch.zeros(p.visual.shape, device=probs.device)
        scores[p.visual] = probs
        keys, values = [k[:, :, :S] for k in keys], [v[:, :, :S] for v in values]
        dtype = next(self.predictor.parameters()).dtype
        rule = self.settings.rule
        if rule.caps_per == "sample":  # one fused op
            threshold, caps, min_keep = rule.limits(p.visual.sum(dim=1), dtype)
            new_keys, new_values, index, _, _ = prune_kv(
                scores, p.visual, keys, values, threshold=threshold, max_keep=caps, min_keep=min_keep,
                max_len=None, padding_side="left",
            )  # fmt: skip
            return new_keys, new_values, index, scores
        keep = rule.keep(probs, p.visual, self.image_sizes(), dtype)
        index, _ = keep_index(keep, max_len=None, padding_side="left")
        new_keys, new_values = compact_kv(keys, values, index)
        return new_keys, new_values, index, scores
