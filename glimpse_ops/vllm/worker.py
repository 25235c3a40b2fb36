"""The workers (CPU and GPU, vLLM's V1 model runner) whose model runner tells the pruning
model which request each row is and what each attention group's metadata was built from, and
shrinks each pruned request to its kept prompt tokens right after sampling (the scheduler,
``scheduler.py``, does the same on its side in the same step). A pruned request that vLLM
preempts gets its original prompt, images and positions back when it resumes, and its prompt
is pruned again with the kept positions of the first time (``StepRows.forced``).

The runner's pruning logic is one mixin, ``GlimpsePruneRunnerMixin``: vLLM's CPU runner *is*
its V1 GPU runner with the device buffers aliased to the host ones, so the same methods serve
both."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from .config import PREFIX, SUPPORTED_BACKENDS, backend_refusal
from .model import AttentionInputs, GlimpsePruneQwen2_5_VL, StepRows

PRUNED_ATTRIBUTE = "glimpse_pruned"  # on ModelRunnerOutput: {req_id: kept prompt token ids}
UNPRUNED_ATTRIBUTE = "glimpse_unpruned"  # on SchedulerOutput: ids of requests never to prune (sessions)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class _PrunedState:
    """A pruned request's worker state before its prune, and the prompt positions it kept."""

    prompt_token_ids: list[int]
    mm_features: list
    mrope_positions: object  # Tensor [3, S] or None
    mrope_position_delta: int | None
    kept: list[int]


class GlimpsePruneRunnerMixin:
    """The pruning methods of a V1 model runner (``GPUModelRunner`` or its CPU subclass)."""

    # trained mode: each cached image's ViT features, under the encoder cache's key
    glimpse_image_features: dict | None = None
    # this step's {layer name: (attention group, the CommonAttentionMetadata it was built from)}
    glimpse_attention_inputs: dict[str, AttentionInputs] | None = None
    # by request id, from its prune until it finishes
    glimpse_pruned_states: dict[str, _PrunedState] | None = None
    # resumed after a preemption: {request id: the prompt positions to keep again}
    glimpse_forced: dict[str, list[int]] | None = None

    # streaming-input sessions of this step, which are not pruned (see the scheduler)
    glimpse_unpruned: frozenset[str] = frozenset()

    def _update_states(self, scheduler_output, *args, **kwargs):
        """vLLM's state update; before it, a pruned request that resumes from a preemption
        gets its state before the prune back (vLLM re-adds it to the batch from that state)."""
        self.glimpse_unpruned = getattr(scheduler_output, UNPRUNED_ATTRIBUTE, frozenset())
        states = self.glimpse_pruned_states
        for req_id in scheduler_output.finished_req_ids:
            # a request can finish between its resume and its re-prune: then only forced holds it
            if states:
                states.pop(req_id, None)
            if self.glimpse_forced:
                self.glimpse_forced.pop(req_id, None)
        if states:
            for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
                if (saved := states.pop(req_id, None)) is None:
                    continue
                state = self.requests[req_id]
                state.prompt_token_ids = list(saved.prompt_token_ids)
                state.num_prompt_tokens = len(saved.prompt_token_ids)
                state.mm_features = list(saved.mm_features)
                state.mrope_positions = saved.mrope_positions
                state.mrope_position_delta = saved.mrope_position_delta
                if self.glimpse_forced is None:
                    self.glimpse_forced = {}
                self.glimpse_forced[req_id] = saved.kept
        return super()._update_states(scheduler_output, *args, **kwargs)

    def initialize_kv_cache(self, *args, **kwargs):
        """vLLM's KV-cache set-up, then the backend allow-list: the attention backends are
        chosen only here, after the engine-start check has run."""
        result = super().initialize_kv_cache(*args, **kwargs)
        names = sorted({group.backend.get_name() for groups in self.attn_groups for group in groups})
        unsupported = [name for name in names if name not in SUPPORTED_BACKENDS]
        if unsupported:
            raise ValueError(backend_refusal(unsupported[0]))
        return result

    def _build_attention_metadata(self, *args, **kwargs):
        """vLLM's metadata build, recording the ``CommonAttentionMetadata`` each attention
        group's builder got: after a prune the model rebuilds the metadata of layers K+1..
        through the same builder from a pruned copy of it, whatever the backend."""
        inputs: dict[str, AttentionInputs] = {}
        groups = [group for per_kv_group in self.attn_groups for group in per_kv_group]
        for group in groups:
            group.build_metadata = _recording_build(group, inputs)  # an instance attribute, removed below
        try:
            result = super()._build_attention_metadata(*args, **kwargs)
        finally:
            for group in groups:
                group.__dict__.pop("build_metadata", None)
        self.glimpse_attention_inputs = inputs
        return result

    def _cache_encoder_output(self, mm_hash, output, *args, **kwargs):
        super()._cache_encoder_output(mm_hash, output, *args, **kwargs)
        features = self._pruning_model().take_image_features(output)
        if features is not None:
            if self.glimpse_image_features is None:
                self.glimpse_image_features = {}
            self.glimpse_image_features[mm_hash] = features

    def _step_images(self, req_ids: list[str], num_computed) -> list[list | None] | None:
        """Trained mode: for each row starting its prompt, its images' ViT features in prompt
        order (None for an image without them); None for other rows."""
        features = self.glimpse_image_features
        if not features:
            return None
        for mm_hash in [h for h in features if h not in self.encoder_cache]:
            del features[mm_hash]  # the encoder cache let the image go: so do we
        images: list[list | None] = []
        for req_id, computed in zip(req_ids, num_computed):
            specs = [f for f in self.requests[req_id].mm_features if f.modality == "image"] if computed == 0 else None
            images.append(None if specs is None else [
                features.get(f.identifier) for f in sorted(specs, key=lambda f: f.mm_position.offset)
            ])  # fmt: skip
        return images

    def _pruning_model(self) -> GlimpsePruneQwen2_5_VL:
        model = self.get_model()
        if not isinstance(model, GlimpsePruneQwen2_5_VL):
            raise RuntimeError(f"{PREFIX}: the pruning worker runs {type(model).__name__}, not the pruning model")
        return model

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None,
                       **model_kwargs):  # fmt: skip
        batch, model = self.input_batch, self._pruning_model()
        n = batch.num_reqs
        req_ids, num_computed = list(batch.req_ids[:n]), batch.num_computed_tokens_cpu[:n].copy()
        model.rows = StepRows(
            req_ids=req_ids,
            query_start_loc=self.query_start_loc.np[: n + 1].copy(),
            num_computed=num_computed,
            num_prompt=batch.num_prompt_tokens[:n].copy(),
            images=self._step_images(req_ids, num_computed) if model.predictor is not None else None,
            attention=self.glimpse_attention_inputs or {},
            forced={row: self.glimpse_forced[r] for row, r in enumerate(req_ids) if r in (self.glimpse_forced or {})},
            unpruned=np.array([r in self.glimpse_unpruned for r in req_ids], dtype=bool),
        )
        model.pruned = {}
        try:
            return super()._model_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **model_kwargs)
        finally:
            model.rows = None

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        model = self._pruning_model()
        pruned, model.pruned = model.pruned, {}
        if not pruned or output is EMPTY_MODEL_RUNNER_OUTPUT:
            return output
        setattr(output, PRUNED_ATTRIBUTE, {req_id: self._shrink(req_id, kept) for req_id, kept in pruned.items()})
        return output

    def _shrink(self, req_id: str, kept: list[int]) -> list[int]:
        """Make the worker's copy of the request its L kept prompt tokens: prompt ids, token
        row (the sampled token moves from S to L), M-RoPE positions and delta (decoding stays at
        the original positions), no multimodal features left to inject, and a block-table row
        cut to ceil(L / block_size) blocks. Returns the kept prompt token ids."""
        state, batch = self.requests[req_id], self.input_batch
        row = batch.req_id_to_index[req_id]
        S, L = state.num_prompt_tokens, len(kept)
        if self.glimpse_forced:
            self.glimpse_forced.pop(req_id, None)
        if self.glimpse_pruned_states is None:
            self.glimpse_pruned_states = {}
        self.glimpse_pruned_states[req_id] = _PrunedState(list(state.prompt_token_ids), list(state.mm_features),
                                                          state.mrope_positions, state.mrope_position_delta,
                                                          list(kept))  # fmt: skip
        n_out = len(state.output_token_ids)
        kept_ids = [state.prompt_token_ids[p] for p in kept]
        generated = batch.token_ids_cpu[row, S : S + n_out].copy()
        batch.token_ids_cpu[row, :L] = kept_ids
        batch.token_ids_cpu[row, L : L + n_out] = generated
        batch.is_token_ids[row, : L + n_out] = True
        batch.num_prompt_tokens[row] = L
        batch.num_tokens_no_spec[row] = L + n_out
        batch.num_computed_tokens_cpu[row] = L
        state.prompt_token_ids = kept_ids
        state.num_prompt_tokens = L
        state.num_computed_tokens = L
        if state.mrope_positions is not None:
            state.mrope_positions = state.mrope_positions[:, kept]
            state.mrope_position_delta += S - L
        state.mm_features = []
        for group, table in enumerate(batch.block_table.block_tables):
            keep = _cdiv(L, table.block_size)
            table.block_table.np[row, keep : table.num_blocks_per_row[row]] = 0
            table.num_blocks_per_row[row] = keep
            del state.block_ids[group][keep:]
        return kept_ids


def _recording_build(group, inputs: dict[str, AttentionInputs]):
    def build_metadata(common_attn_metadata, ubatch_idx: int = 0, *args, **kwargs):
        for name in group.layer_names:
            inputs[name] = AttentionInputs(group, common_attn_metadata, ubatch_idx)
        return type(group).build_metadata(group, common_attn_metadata, ubatch_idx, *args, **kwargs)

    return build_metadata


class GlimpsePruneCPUModelRunner(GlimpsePruneRunnerMixin, CPUModelRunner):
    pass


class GlimpsePruneGPUModelRunner(GlimpsePruneRunnerMixin, GPUModelRunner):
    pass


class GlimpsePruneCPUWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        # CPUWorker builds its V1 CPUModelRunner itself (the engine check refused V2): give
        # that object the pruning methods
        if type(self.model_runner) is not CPUModelRunner:
            raise RuntimeError(f"{PREFIX}: the CPU worker built {type(self.model_runner).__name__}, "
                               "not vLLM's V1 CPUModelRunner the pruning runner extends")  # fmt: skip
        self.model_runner.__class__ = GlimpsePruneCPUModelRunner


class GlimpsePruneGPUWorker(Worker):
    """vLLM's GPU worker with the pruning V1 model runner (not run on a GPU yet: see README)."""

    def _make_model_runner(self):
        if self.use_v2_model_runner:
            raise ValueError(f"{PREFIX}: the GPU worker was asked for Model Runner V2; pruning extends the V1 "
                             "runner: set VLLM_USE_V2_MODEL_RUNNER=0")  # fmt: skip
        return GlimpsePruneGPUModelRunner(self.vllm_config, self.device)
