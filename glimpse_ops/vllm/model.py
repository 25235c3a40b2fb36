"""vLLM's Qwen2.5-VL with GlimpsePrune after decoder layer K (see the package docstring).

The model runner (``worker.py``) tells the model, before each forward, which request each row
of the step is and whether the row holds its whole prompt (``StepRows``); the model leaves the
kept prompt positions of each pruned request in ``pruned`` for the runner to shrink the
request after sampling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor
from vllm import _custom_ops as ops
from vllm import envs
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from .. import glimpse_scores, keep_index, select_tokens
from ..glimpseprune import GlimpsePredictor, load_predictor
from .config import PREFIX, PluginSettings
from .trained import ImageFeatures, glimpse_pass, image_features, trained_keep


@dataclass
class StepRows:
    """The rows of one step, in the order of ``query_start_loc`` (host arrays)."""

    req_ids: list[str]
    query_start_loc: np.ndarray  # int [R + 1]
    num_computed: np.ndarray  # int [R], tokens of the request already in the cache
    num_prompt: np.ndarray  # int [R]
    images: list[list | None] | None = None  # trained mode: each row's ImageFeatures in prompt order


@dataclass
class _Capture:
    """Post-RoPE q (layer K only), k and v of layers 0..K for the step being pruned."""

    active: bool = False
    q: Tensor | None = None
    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)


class GlimpsePruneQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    requires_raw_input_tokens = True  # the image-token mask comes from input_ids

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        decoder = self.language_model.model
        self.settings = PluginSettings.from_hf_config(hf_config, len(decoder.layers))
        self.prune_layer = self.settings.prune.layer  # K
        self.image_token_id = hf_config.image_token_id
        self.rows: StepRows | None = None
        self.pruned: dict[str, list[int]] = {}
        self.tp_size = get_tensor_model_parallel_world_size()
        self._capture = _Capture()
        for index, layer in enumerate(decoder.layers[: self.prune_layer + 1]):
            layer.self_attn.attn.register_forward_pre_hook(self._capture_hook(index))
        self._vision_config = hf_config.vision_config
        self._vit_taps: dict[int, Tensor] | None = None  # filled while the ViT runs (trained mode)
        self._new_features: dict[int, tuple[Tensor, ImageFeatures]] = {}
        # a plain attribute, not a submodule: vLLM's loader would look for its weights in the checkpoint
        self.__dict__["predictor"] = None
        if self.settings.predictor is not None:
            self.__dict__["predictor"] = self._load_predictor(hf_config)
            for level in self.predictor.config.vit_layers:
                self._tap_vit_block(level)

    def _load_predictor(self, hf_config) -> GlimpsePredictor:
        predictor = load_predictor(self.settings.predictor, SimpleNamespace(config=hf_config), where=PREFIX)
        name = self.settings.predictor_dtype
        dtype = self.language_model.model.embed_tokens.weight.dtype if name == "model" else getattr(torch, name)
        device = self.language_model.model.embed_tokens.weight.device
        return predictor.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def _tap_vit_block(self, level: int) -> None:
        # Not a forward hook: vLLM's @support_torch_compile __call__ runs ``self.forward``
        # directly when compilation is off, so hooks on a ViT block never fire.
        block = self.visual.blocks[level]
        forward = block.forward

        def tapped(*args, **kwargs):
            output = forward(*args, **kwargs)
            if self._vit_taps is not None:
                self._vit_taps[level] = output
            return output

        block.forward = tapped

    def _process_image_input(self, image_input):
        """The stock image path; in trained mode it also keeps each image's ViT features at the
        predictor's levels, for the runner to file under the image's cache key
        (``take_image_features``)."""
        if self.predictor is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        self._vit_taps = {}
        try:
            embeddings = super()._process_image_input(image_input)
            taps = self._vit_taps
        finally:
            self._vit_taps = None
        features = image_features(taps, image_input["image_grid_thw"], self._vision_config,
                                  self.predictor.config.vit_layers)  # fmt: skip
        for embedding, feature in zip(embeddings, features):
            self._new_features[id(embedding)] = (embedding, feature)
        return embeddings

    def take_image_features(self, embedding: Tensor) -> ImageFeatures | None:
        """The features of the image whose encoder output is ``embedding`` (once), or None."""
        entry = self._new_features.pop(id(embedding), None)
        return None if entry is None or entry[0] is not embedding else entry[1]

    def _capture_hook(self, index: int):
        def hook(module, args):
            capture = self._capture
            if capture.active:
                q, k, v = args[:3]
                capture.keys[index], capture.values[index] = k, v
                if index == self.prune_layer:
                    capture.q = q

        return hook

    # --- which rows prune ----------------------------------------------------------------
    def _rows_to_prune(self, input_ids: Tensor | None) -> list[int]:
        """Rows whose whole prompt is in this step and holds image tokens."""
        rows = self.rows
        if rows is None or input_ids is None:
            return []
        starts, ends = rows.query_start_loc[:-1], rows.query_start_loc[1:]
        full = (rows.num_computed == 0) & (ends - starts == rows.num_prompt)
        if not full.any():
            return []
        is_image = (input_ids == self.image_token_id).cpu().numpy()
        with_image = np.add.reduceat(is_image, starts.astype(np.int64)) if len(is_image) else np.zeros_like(full)
        return [int(r) for r in np.nonzero(full & (with_image[: len(full)] > 0))[0]]

    # --- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors=None,
        inputs_embeds: Tensor | None = None,
        **kwargs: object,
    ):
        prune_rows = self._rows_to_prune(input_ids)
        if not prune_rows:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        decoder = self.language_model.model
        K = self.prune_layer
        hidden = inputs_embeds if inputs_embeds is not None else decoder.embed_input_ids(input_ids)
        residual = None
        self._capture = _Capture(active=True)
        try:
            for layer in decoder.layers[: K + 1]:
                hidden, residual = layer(positions, hidden, residual)
        finally:
            self._capture.active = False
        order, new_rows = self._select(input_ids, positions, prune_rows)
        self._install_metadata(order, new_rows, prune_rows)
        hidden, residual, positions_kept = hidden[order], residual[order], positions[..., order]
        for layer in decoder.layers[K + 1 :]:
            hidden, residual = layer(positions_kept, hidden, residual)
        hidden, _ = decoder.norm(hidden, residual)
        out = hidden.new_zeros(input_ids.shape[0], hidden.shape[-1])
        out[order] = hidden  # the runner reads each row's last token, which is text and kept
        self._capture = _Capture()
        return out

    def _images_of(self, prune_rows: list[int]) -> list[ImageFeatures]:
        images = [] if self.rows.images is None else [self.rows.images[r] for r in prune_rows]
        if len(images) != len(prune_rows) or any(row is None or None in row for row in images):
            raise RuntimeError(f"{PREFIX}: a pruning request's image has no ViT features; a trained predictor needs "
                               "the ViT to run on the request's pixel values")  # fmt: skip
        return [feature for row in images for feature in row]

    def _select(self, input_ids: Tensor, positions: Tensor, prune_rows: list[int]) -> tuple[Tensor, Tensor]:
        """(token order after the prune [T'], kept tokens per row [R]); records ``pruned``."""
        rows, rule = self.rows, self.settings.prune.rule
        attn = self.language_model.model.layers[self.prune_layer].self_attn.attn
        H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_size
        device = input_ids.device
        starts = torch.as_tensor(rows.query_start_loc[prune_rows], device=device)
        lengths = torch.as_tensor(rows.query_start_loc[[r + 1 for r in prune_rows]], device=device) - starts
        longest = int(lengths.max())
        offsets = torch.arange(longest, device=device)
        valid = offsets[None, :] < lengths[:, None]  # [P, Smax]
        token = torch.where(valid, starts[:, None] + offsets[None, :], 0)  # row-major gather of each prompt
        capture = self._capture
        visual = valid & (input_ids[token] == self.image_token_id)
        if self.predictor is not None:
            last = starts + lengths - 1
            glimpse = glimpse_pass(self.language_model.model.layers, self.predictor, capture.keys, capture.values,
                                   positions[..., last] + 1, token, valid)  # fmt: skip
            keep = trained_keep(self.predictor, rule, glimpse, visual, self._images_of(prune_rows)) & valid
        else:
            keys = capture.keys[self.prune_layer][token].view(len(prune_rows), longest, Hkv, D).transpose(1, 2)
            glimpse = capture.q[starts + lengths - 1].view(len(prune_rows), H, 1, D)
            probs = glimpse_scores(glimpse, keys, valid, normalize="probs")  # [P, H on this rank, 1, Smax]
            if self.tp_size == 1:
                probs = probs.mean(dim=(1, 2))
            else:  # every rank must keep the same tokens: average over all ranks' heads
                probs = tensor_model_parallel_all_reduce(probs.sum(dim=(1, 2))) / (H * self.tp_size)
            caps = rule.caps(visual.sum(dim=1))  # glimpse_ops.hf's rule
            keep = select_tokens(probs, visual, threshold=rule.threshold, max_keep=0 if caps is None else caps,
                                 min_keep=rule.min_keep) & valid  # fmt: skip
        index, kept = keep_index(keep, max_len=None, padding_side="right")
        keep_flat = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
        keep_flat[token[valid]] = keep[valid]
        order = keep_flat.nonzero().squeeze(1)
        qsl = torch.as_tensor(rows.query_start_loc, device=device)
        counts = torch.cumsum(keep_flat.long(), 0)
        ends = counts[qsl[1:] - 1]
        new_rows = ends - torch.cat([ends.new_zeros(1), ends[:-1]])
        self.pruned = {
            rows.req_ids[r]: index[i, : int(kept[i])].tolist() for i, r in enumerate(prune_rows)
        }  # host lists: the runner needs them after sampling anyway
        return order, new_rows

    def _install_metadata(self, order: Tensor, new_rows: Tensor, prune_rows: list[int]) -> None:
        """Attention metadata and slots for layers K+1.. over the kept tokens, and the kept
        tokens' K/V of layers 0..K rewritten into each pruned request's first L slots."""
        rows, K = self.rows, self.prune_layer
        context = get_forward_context()
        if not isinstance(context.attn_metadata, dict):
            raise RuntimeError(f"{PREFIX}: micro-batched attention metadata is not supported")
        layers = self.language_model.model.layers
        name_k = layers[K].self_attn.attn.layer_name
        old_slots = context.slot_mapping[name_k]
        device = order.device
        qsl = torch.as_tensor(rows.query_start_loc, device=device)
        old_rows = qsl[1:] - qsl[:-1]
        new_qsl = torch.cat([qsl.new_zeros(1), torch.cumsum(new_rows, 0)])
        row_of = torch.repeat_interleave(torch.arange(len(new_rows), device=device), new_rows)
        # a pruned request starts at position 0: its first L old slots are logical positions 0..L-1
        slots = old_slots[qsl[row_of] + torch.arange(len(order), device=device) - new_qsl[row_of]]
        pruned_row = torch.zeros(len(new_rows), dtype=torch.bool, device=device)
        pruned_row[prune_rows] = True
        rewrite = pruned_row[row_of]
        for index in range(K + 1):
            attn = layers[index].self_attn.attn
            k = self._capture.keys[index][order[rewrite]].view(-1, attn.num_kv_heads, attn.head_size)
            v = self._capture.values[index][order[rewrite]].view(-1, attn.num_kv_heads, attn.head_size)
            attn.impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slots[rewrite])
        replaced: dict[int, object] = {}
        for layer in layers[K + 1 :]:
            attn = layer.self_attn.attn
            old = context.attn_metadata[attn.layer_name]
            if id(old) not in replaced:
                replaced[id(old)] = self._metadata(attn, old, new_qsl, old_rows, new_rows, slots)
            context.attn_metadata[attn.layer_name] = replaced[id(old)]
            context.slot_mapping[attn.layer_name] = slots

    def _metadata(self, attn, old, new_qsl: Tensor, old_rows: Tensor, new_rows: Tensor, slots: Tensor):
        seq_lens = (old.seq_lens - (old_rows - new_rows).to(old.seq_lens.dtype)).to(old.seq_lens.dtype)
        qsl = new_qsl.to(old.query_start_loc.dtype)
        impl = attn.impl
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(new_rows),
            num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size,
            seq_lens=seq_lens,
            dtype=self.language_model.model.layers[0].self_attn.qkv_proj.weight.dtype,
            query_start_loc=qsl,
            causal=old.causal,
            sliding_window_size=-1,
            isa=attn.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=old.dynamic_causal,
            kv_cache_dtype=impl.kv_cache_dtype,
        )
        return dataclasses.replace(
            old,
            num_actual_tokens=int(new_qsl[-1]),
            max_query_len=int(new_rows.max()),
            query_start_loc=qsl,
            max_seq_len=int(seq_lens.max()),
            seq_lens=seq_lens,
            slot_mapping=slots,
            scheduler_metadata=scheduler_metadata,
        )
