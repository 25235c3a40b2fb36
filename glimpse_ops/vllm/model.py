"""vLLM's Qwen2.5-VL with GlimpsePrune after decoder layer K (see the package docstring).

The model runner (``worker.py``) tells the model, before each forward, which request each row
of the step is and whether the row holds its whole prompt (``StepRows``); the model leaves the
kept prompt positions of each pruned request in ``pruned`` for the runner to shrink the
request after sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

from .. import compact_kv_paged, glimpse_scores, keep_index, select_tokens
from ..glimpseprune import GlimpsePredictor, load_predictor
from .config import PREFIX, PluginSettings
from .trained import ImageFeatures, glimpse_pass, image_features, trained_keep

# backends whose paged cache holds one contiguous K|V row per (block, head, slot)
PAGED_ROW_BACKENDS = ("TRITON_ATTN",)


@dataclass(frozen=True)
class AttentionInputs:
    """What one layer's attention metadata of this step was built from: its attention group
    (``vllm.v1.worker.utils.AttentionGroup``, which holds the backend's metadata builder) and
    the ``CommonAttentionMetadata`` the runner passed to it."""

    group: object
    common: object
    ubatch: int = 0


@dataclass
class StepRows:
    """The rows of one step, in the order of ``query_start_loc`` (host arrays)."""

    req_ids: list[str]
    query_start_loc: np.ndarray  # int [R + 1]
    num_computed: np.ndarray  # int [R], tokens of the request already in the cache
    num_prompt: np.ndarray  # int [R]
    images: list[list | None] | None = None  # trained mode: each row's ImageFeatures in prompt order
    attention: dict[str, AttentionInputs] = field(default_factory=dict)  # by layer name
    # rows recomputed after a preemption: {row: the prompt positions their first prune kept}
    forced: dict[int, list[int]] = field(default_factory=dict)
    unpruned: np.ndarray | None = None  # bool [R]: streaming-input sessions, never pruned


def _own(t: Tensor) -> Tensor:
    """``t``, or a copy when it is a view into a larger buffer: q, k and v are often slices of
    the layer's qkv projection output, which a kept view would keep alive whole (36 heads' worth
    for Qwen2.5-VL-7B's 4 KV heads)."""
    return t if t.untyped_storage().nbytes() <= t.numel() * t.element_size() else t.clone()


@dataclass
class _Capture:
    """Post-RoPE q (layer K only) and k of the step being pruned, and in trained mode k and v
    of every layer 0..K."""

    active: bool = False
    q: Tensor | None = None
    keys: dict[int, Tensor] = field(default_factory=dict)
    values: dict[int, Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the storages the capture keeps alive (q, k and v are often views of one)."""
        held = [t.untyped_storage() for t in (self.q, *self.keys.values(), *self.values.values()) if t is not None]
        return sum({storage.data_ptr(): storage.nbytes() for storage in held}.values())


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
        self.capture_bytes = 0  # what the last pruning step's capture held at the prune
        self.tp_size = get_tensor_model_parallel_world_size()
        self._capture = _Capture()
        self._paged: bool | None = None
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
                # training-free scoring reads layer K's q and k; the trained glimpse pass and
                # the backend writer's rewrite (CPU_ATTN) every layer's K/V; on a backend with
                # row-per-slot pages the kept rows are compacted inside the paged cache instead
                if self.predictor is not None or not self._paged_compaction():
                    capture.keys[index], capture.values[index] = _own(k), _own(v)
                elif index == self.prune_layer:
                    capture.keys[index] = _own(k)
                if index == self.prune_layer:
                    capture.q = _own(q)

        return hook

    # --- which rows prune ----------------------------------------------------------------
    def _rows_to_prune(self, input_ids: Tensor | None) -> list[int]:
        """Rows whose whole prompt is in this step and holds image tokens (streaming-input
        sessions excepted)."""
        rows = self.rows
        if rows is None or input_ids is None:
            return []
        starts, ends = rows.query_start_loc[:-1], rows.query_start_loc[1:]
        full = (rows.num_computed == 0) & (ends - starts == rows.num_prompt)
        if rows.unpruned is not None:
            full &= ~rows.unpruned
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
        self.capture_bytes = self._capture.nbytes()
        order, new_rows, kept_index = self._select(input_ids, positions, prune_rows)
        self._install_metadata(order, new_rows, prune_rows, kept_index)
        hidden, residual, positions_kept = hidden[order], residual[order], positions[..., order]
        for layer in decoder.layers[K + 1 :]:
            hidden, residual = layer(positions_kept, hidden, residual)
        hidden, _ = decoder.norm(hidden, residual)
        out = hidden.new_zeros(input_ids.shape[0], hidden.shape[-1])
        out[order] = hidden  # the runner reads each row's last token, which is text and kept
        self._capture = _Capture()
        return out

    def _paged_compaction(self) -> bool:
        """Whether the kept K/V of layers 0..K are compacted in place in the paged cache
        (``compact_kv_paged``: backends whose page holds one K|V row per slot, TRITON_ATTN) or
        rewritten from a capture through the backend's writer (CPU_ATTN, whose kernels lay a
        page out per CPU ISA)."""
        if self._paged is None:
            names = {layer.self_attn.attn.attn_backend.get_name() for layer in self.language_model.model.layers}
            self._paged = names <= set(PAGED_ROW_BACKENDS)
        return self._paged

    def _block_table(self, slots: Tensor, qsl: Tensor, prune_rows: list[int], block_size: int) -> Tensor:
        """int32 [P, max_blocks]: each pruned request's cache blocks in position order, read off
        the step's slots (a whole prompt from position 0: position j is at slot ``slots[start + j]``,
        ``slot = block * block_size + offset``), so whatever maps the engine's blocks to the
        backend's cache blocks has already been applied."""
        rows = torch.as_tensor(prune_rows, device=slots.device)
        starts, lengths = qsl[rows], qsl[rows + 1] - qsl[rows]
        most = -(-int(lengths.max()) // block_size)
        first = torch.arange(most, device=slots.device) * block_size  # each block's first position
        where = (starts[:, None] + first[None, :]).clamp(max=len(slots) - 1)
        table = torch.div(slots[where], block_size, rounding_mode="floor")
        return torch.where(first[None, :] < lengths[:, None], table, -1).to(torch.int32)

    def _images_of(self, prune_rows: list[int]) -> list[ImageFeatures]:
        images = [] if self.rows.images is None else [self.rows.images[r] for r in prune_rows]
        if len(images) != len(prune_rows) or any(row is None or None in row for row in images):
            raise RuntimeError(f"{PREFIX}: a pruning request's image has no ViT features; a trained predictor needs "
                               "the ViT to run on the request's pixel values")  # fmt: skip
        return [feature for row in images for feature in row]

    def _select(self, input_ids: Tensor, positions: Tensor, prune_rows: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """(token order after the prune [T'], kept tokens per row [R], each pruned request's
        kept prompt positions int64 [P, Lmax] ascending, -1 pads on the right); records
        ``pruned``."""
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
        for i, r in enumerate(prune_rows):
            if (kept_before := rows.forced.get(r)) is not None:  # the decision made before the preemption
                keep[i] = False
                keep[i, torch.as_tensor(kept_before, device=device)] = True
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
        return order, new_rows, index

    def _install_metadata(self, order: Tensor, new_rows: Tensor, prune_rows: list[int], kept_index: Tensor) -> None:
        """Attention metadata and slots for layers K+1.. over the kept tokens, and the kept
        tokens' K/V of layers 0..K moved to each pruned request's first L slots: in place in
        the paged cache (``glimpse_ops.compact_kv_paged``) where ``_paged_compaction``, else
        rewritten from the capture through the backend's writer."""
        rows, K = self.rows, self.prune_layer
        context = get_forward_context()
        if not isinstance(context.attn_metadata, dict):
            raise RuntimeError(f"{PREFIX}: micro-batched attention metadata is not supported")
        layers = self.language_model.model.layers
        name_k = layers[K].self_attn.attn.layer_name
        old_slots = context.slot_mapping[name_k]
        device = order.device
        qsl = torch.as_tensor(rows.query_start_loc, device=device)
        new_qsl = torch.cat([qsl.new_zeros(1), torch.cumsum(new_rows, 0)])
        row_of = torch.repeat_interleave(torch.arange(len(new_rows), device=device), new_rows)
        # a pruned request starts at position 0: its first L old slots are logical positions 0..L-1
        slots = old_slots[qsl[row_of] + torch.arange(len(order), device=device) - new_qsl[row_of]]
        if self._paged_compaction():
            caches = [layer.self_attn.attn.kv_cache for layer in layers[: K + 1]]
            compact_kv_paged(caches, self._block_table(old_slots, qsl, prune_rows, caches[0].shape[2]), kept_index)
        else:  # CPU_ATTN: its pages are laid out by the CPU ISA; its own writer puts the kept K/V there
            pruned_row = torch.zeros(len(new_rows), dtype=torch.bool, device=device)
            pruned_row[prune_rows] = True
            rewrite = pruned_row[row_of]
            for index in range(K + 1):
                attn = layers[index].self_attn.attn
                k = self._capture.keys[index][order[rewrite]].view(-1, attn.num_kv_heads, attn.head_size)
                v = self._capture.values[index][order[rewrite]].view(-1, attn.num_kv_heads, attn.head_size)
                attn.impl.do_kv_cache_update(attn, k, v, attn.kv_cache, slots[rewrite])
        rebuilt: dict[tuple[int, int], object] = {}
        new_rows_host = new_rows.cpu().numpy()
        for layer in layers[K + 1 :]:
            name = layer.self_attn.attn.layer_name
            inputs = rows.attention.get(name)
            if inputs is None:
                raise RuntimeError(f"{PREFIX}: the runner recorded no attention metadata inputs for {name}")
            key = (id(inputs.group), id(inputs.common))
            if key not in rebuilt:
                pruned = pruned_common_metadata(inputs.common, rows.query_start_loc, new_rows_host, slots, order)
                rebuilt[key] = inputs.group.build_metadata(pruned, inputs.ubatch)
            context.attn_metadata[name] = rebuilt[key]
            context.slot_mapping[name] = slots


def pruned_common_metadata(common, query_start_loc: np.ndarray, new_rows: np.ndarray, slots: Tensor, order: Tensor):
    """``common`` (a ``CommonAttentionMetadata`` of the step) for the kept tokens only: each
    row's query is ``new_rows[r]`` tokens (a pruned request's whole kept prompt, other rows
    unchanged) and its context shrinks by what was pruned. Host and device copies both, so a
    backend that plans on the host (FlashInfer) and one that reads the device (Triton) see the
    same lengths; caches derived from the old token count are dropped.

    query_start_loc: int [R + 1] (host, the step's); new_rows: int [R] (host); slots: [T'] the
    kept tokens' slots; order: [T'] the kept tokens' indices in the step."""
    R = len(new_rows)
    if common.num_reqs != R or int(common.query_start_loc_cpu[R]) != int(query_start_loc[R]):
        raise RuntimeError(f"{PREFIX}: the step's attention metadata is padded ({common.num_reqs} rows for {R} "
                           "requests); pruning runs eager steps only")  # fmt: skip
    old_rows = query_start_loc[1:] - query_start_loc[:-1]
    shrink = torch.as_tensor(old_rows - new_rows)
    qsl_host = torch.zeros(R + 1, dtype=common.query_start_loc_cpu.dtype)
    qsl_host[1:] = torch.cumsum(torch.as_tensor(new_rows), 0)
    seq_lens = common.seq_lens - shrink.to(common.seq_lens.device, common.seq_lens.dtype)
    upper = common.seq_lens_cpu_upper_bound
    upper = None if upper is None else upper - shrink.to(upper.dtype)
    positions = common.positions
    return common.replace(
        query_start_loc=qsl_host.to(common.query_start_loc.device),
        query_start_loc_cpu=qsl_host,
        seq_lens=seq_lens,
        seq_lens_cpu_upper_bound=upper,
        num_actual_tokens=int(qsl_host[-1]),
        max_query_len=int(new_rows.max()),
        max_seq_len=int((seq_lens if upper is None else upper).max()),
        slot_mapping=slots,
        positions=None if positions is None else positions[..., order],
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
