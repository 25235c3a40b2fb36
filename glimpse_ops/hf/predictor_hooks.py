"""The hooks of GlimpsePrune with a trained glimpse token and VIP (Qwen2.5-VL).

On top of the training-free hooks (``prune_hooks.py``): ViT block outputs are kept at the
predictor's levels; a pre-hook on the text model appends the glimpse (its input embedding,
a 1 on the 2-D mask, position last + 1 on every M-RoPE axis); pre-hooks on layers 1..K add
the per-layer injections to it (the layers of its embedding rows). After layer K its
scores over the visual keys (``glimpse_scores``: raw logits, or log-softmax over the valid
keys, per head) and the ViT features (2x2 groups averaged, raster order) go through the VIP.
The keep rule (the release's, per sample or per image): with ``fixed_keep_ratio`` r the top
max(1, floor(r * n)) tokens; else sigmoid > threshold, at most max(1, floor(max_keep_ratio *
n)) of them, at least min(min_keep, n). ``prune_kv`` (per sample) or ``select_tokens`` +
``keep_index`` + ``compact_kv`` (per image) then compact the caches of layers 0..K, which
drops the glimpse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import compact_kv, glimpse_scores, keep_index, prune_kv, select_tokens
from .hooks import vit_grid
from .predictor import GlimpsePredictor, window_index
from .prune_hooks import GlimpsePruneHandle, _Prefill
from .release import load_release


@dataclass
class PredictorPruneHandle(GlimpsePruneHandle):
    predictor: GlimpsePredictor | None = None
    fixed_keep_ratio: float | None = None
    caps_per: str = "sample"  # "sample" (the release commit) or "image" (later versions of the release)
    vit_outputs: dict = field(default_factory=dict)
    grid_thw: Tensor | None = None
    prompt_length: int = 0

    def attach_predictor_hooks(self, model: nn.Module) -> None:
        visual = model.model.visual
        # generate (5.2x) runs the ViT before the multimodal model and drops image_grid_thw
        # from its kwargs, so the grid and the features are taken at the ViT itself.
        self.hooks.append(visual.register_forward_pre_hook(self._on_vit, with_kwargs=True))
        for level in self.predictor.config.vit_layers:
            self.hooks.append(visual.blocks[level].register_forward_hook(self._vit_tap(level)))
        self.hooks.append(self.adapter.text_model.register_forward_pre_hook(self._append_glimpse, with_kwargs=True))
        for layer in self.predictor.glimpse_layers:
            if layer == 0:  # the input embedding: appended by _append_glimpse
                continue
            self.hooks.append(
                self.adapter.layers[layer].register_forward_pre_hook(self._inject(layer), with_kwargs=True)
            )

    def _on_vit(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.vit_outputs.clear()
        self.grid_thw = vit_grid(args, kwargs)

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super()._on_multimodal(module, args, kwargs)
        p = self.prefill
        if p is None:
            return
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
        S = self.prompt_length
        valid = torch.cat([p.valid, torch.ones_like(p.valid[:, :1])], dim=1)
        normalize = "logits" if self.predictor.config.use_attention_logits else "log_probs"
        logits = glimpse_scores(p.glimpse_q, keys_k, valid, scale=None, normalize=normalize)  # [B, H, 1, S + 1]
        head_scores = logits[:, :, 0, :S].transpose(1, 2)[p.visual]  # [N, H]
        vision = self.model.config.vision_config
        merge = vision.spatial_merge_size
        encoded = 0 if self.grid_thw is None else int(self.grid_thw.prod(dim=1).sum()) // (merge * merge)
        if encoded != head_scores.shape[0] or len(self.vit_outputs) != len(self.predictor.config.vit_layers):
            raise RuntimeError(
                f"glimpse_ops.hf: the ViT features seen ({encoded} tokens) do not match the prompt's "
                f"{head_scores.shape[0]} image tokens; with a predictor the ViT must run for this prompt "
                "(no reused or expanded encoder outputs, no beam search)"
            )
        order = window_index(self.grid_thw, merge, vision.window_size, vision.patch_size).to(head_scores.device)
        features = []
        for level in self.predictor.config.vit_layers:
            grouped = self.vit_outputs[level]
            grouped = grouped.view(-1, merge * merge, grouped.shape[-1]).mean(dim=1)  # window order
            raster = torch.empty_like(grouped)
            raster[order] = grouped
            features.append(raster)
        grid_hw = [(h // merge, w // merge) for _, h, w in self.grid_thw.tolist()]
        self.vit_outputs.clear()  # used once: a later prompt must bring its own
        return self.predictor.vip(head_scores, features, grid_hw)

    def image_sizes(self) -> list[int]:
        """Visual tokens per image of the latest prefill, in order (host ints from the grid)."""
        merge = self.model.config.vision_config.spatial_merge_size
        return [t * h * w // (merge * merge) for t, h, w in self.grid_thw.tolist()]

    def keep_rule(self, n_tokens: Tensor) -> tuple[float | None, Tensor, int]:
        """(threshold, max_keep int64 per row, min_keep) of ``select_tokens`` for rows of
        ``n_tokens`` visual tokens (the release's rule; see the module docstring)."""
        n = n_tokens.double()
        if self.fixed_keep_ratio is not None:
            return None, torch.floor(n * self.fixed_keep_ratio).long().clamp(min=1), 0
        caps = torch.zeros_like(n_tokens)  # 0: no cap
        if self.max_keep_ratio is not None:
            caps = torch.floor(n * self.max_keep_ratio).long().clamp(min=1)
        threshold = self.threshold
        dtype = next(self.predictor.parameters()).dtype
        if threshold is not None and dtype != torch.float32:
            # the release compares probabilities in its dtype: the threshold rounds to it too
            threshold = float(torch.tensor(threshold, dtype=dtype))
        return threshold, caps, self.min_keep

    def _select_and_compact(self, p: _Prefill, keys: list[Tensor], values: list[Tensor]):
        S = self.prompt_length
        probs = self.predictor.keep_probs(self.visual_logits(p, keys[self.layer]))  # fp32 [N]
        scores = torch.zeros(p.visual.shape, device=probs.device)
        scores[p.visual] = probs
        keys, values = [k[:, :, :S] for k in keys], [v[:, :, :S] for v in values]
        if self.caps_per == "sample":
            threshold, caps, min_keep = self.keep_rule(p.visual.sum(dim=1))
            new_keys, new_values, index, _, _ = prune_kv(
                scores, p.visual, keys, values, threshold=threshold, max_keep=caps, min_keep=min_keep,
                max_len=None, padding_side="left",
            )  # fmt: skip
            return new_keys, new_values, index, scores
        # per image: one select_tokens row per image, then back to the prompt's layout
        sizes = self.image_sizes()
        rows = nn.utils.rnn.pad_sequence(list(probs.split(sizes)), batch_first=True)  # [I, n_max]
        in_image = nn.utils.rnn.pad_sequence(
            [torch.ones(n, dtype=torch.bool, device=probs.device) for n in sizes], batch_first=True
        )
        threshold, caps, min_keep = self.keep_rule(torch.tensor(sizes, device=probs.device))
        kept = select_tokens(rows, in_image, threshold=threshold, max_keep=caps, min_keep=min_keep)
        keep = ~p.visual
        keep[p.visual] = kept[in_image]
        index, _ = keep_index(keep, max_len=None, padding_side="left")
        new_keys, new_values = compact_kv(keys, values, index)
        return new_keys, new_values, index, scores


def load_predictor(predictor, model: nn.Module) -> GlimpsePredictor:
    """A GlimpsePredictor from itself, a .safetensors file (``GlimpsePredictor.save``) or a
    folder of the GlimpsePrune release."""
    from pathlib import Path

    if isinstance(predictor, GlimpsePredictor):
        return predictor
    path = Path(predictor)
    if path.is_dir():
        return load_release(path, model)
    if path.suffix == ".safetensors" and path.exists():
        return GlimpsePredictor.load(path)
    raise ValueError(
        "glimpse_ops.hf.apply_glimpse_prune: predictor must be a GlimpsePredictor, a .safetensors file or a "
        f"release folder, got {predictor!r}"
    )
