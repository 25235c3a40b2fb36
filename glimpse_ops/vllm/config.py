"""The pruning settings a run passes through ``hf_overrides`` and the engine-start check that
refuses settings under which pruning would be wrong (imported by vLLM processes only)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from . import ARCHITECTURE, SCHEDULER_CLS, WORKER_CLS

PREFIX = "glimpse_ops.vllm"


@dataclass(frozen=True)
class PruneSettings:
    layer: int  # K: scores read and caches compacted after this decoder layer
    max_keep_ratio: float | None
    threshold: float | None
    min_keep: int

    @classmethod
    def from_hf_config(cls, hf_config, n_layers: int) -> PruneSettings:
        """The ``glimpse_*`` keys of ``hf_overrides`` (see ``engine_kwargs``), checked."""
        layer = getattr(hf_config, "glimpse_layer", None)
        ratio = getattr(hf_config, "glimpse_max_keep_ratio", None)
        threshold = getattr(hf_config, "glimpse_threshold", None)
        min_keep = getattr(hf_config, "glimpse_min_keep", 1)
        if layer is None:
            layer = max(0, math.ceil(2 * n_layers / 3) - 1)
        if not isinstance(layer, int) or not 0 <= layer < n_layers - 1:
            raise ValueError(f"{PREFIX}: glimpse_layer must be an int in [0, {n_layers - 1}), got {layer!r}")
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"{PREFIX}: glimpse_max_keep_ratio must be in (0, 1] or None, got {ratio!r}")
        if threshold is None and ratio is None:
            raise ValueError(f"{PREFIX}: give glimpse_max_keep_ratio, glimpse_threshold or both")
        if not isinstance(min_keep, int) or min_keep < 0:
            raise ValueError(f"{PREFIX}: glimpse_min_keep must be an int >= 0, got {min_keep!r}")
        return cls(layer, ratio, threshold, min_keep)


def check_engine(vllm_config) -> None:
    """Refuse, naming the setting, what pruning cannot run correctly with; install the
    scheduler and worker that give the pruned blocks back."""
    from vllm.platforms import current_platform

    model, cache = vllm_config.model_config, vllm_config.cache_config
    scheduler, parallel = vllm_config.scheduler_config, vllm_config.parallel_config
    text = model.hf_config.get_text_config()
    PruneSettings.from_hf_config(model.hf_config, text.num_hidden_layers)
    refusals = [
        (not current_platform.is_cpu(), "the device: only vLLM's CPU engine is supported and tested so far"),
        (not model.enforce_eager, "enforce_eager=False: the number of kept tokens changes per request, "
                                  "a traced graph cannot follow it; pass enforce_eager=True"),
        (bool(cache.enable_prefix_caching), "enable_prefix_caching=True: compacted blocks would be hashed as if "
                                            "they held the original tokens; pass enable_prefix_caching=False"),
        (bool(scheduler.enable_chunked_prefill), "enable_chunked_prefill=True: a chunk cannot tell whether it ends "
                                                 "the prompt; pass enable_chunked_prefill=False"),
        (vllm_config.speculative_config is not None, "speculative decoding: not supported with pruning"),
        (parallel.pipeline_parallel_size > 1, "pipeline_parallel_size > 1: not supported with pruning"),
        (parallel.tensor_parallel_size > 1, "tensor_parallel_size > 1: not supported yet (the glimpse scores "
                                            "would need a cross-rank reduction)"),
        (vllm_config.lora_config is not None, "LoRA: not supported with pruning"),
        (os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("", "0"),
         "VLLM_USE_V2_MODEL_RUNNER=1: the pruning worker extends the V1 model runner"),
        (bool(getattr(scheduler, "async_scheduling", False)), "async_scheduling=True: the scheduler must see a "
                                                              "prune before it schedules the next step"),
    ]  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise ValueError(f"{PREFIX}: {ARCHITECTURE} cannot run with {why}")
    if scheduler.scheduler_cls not in (None, SCHEDULER_CLS):
        raise ValueError(f"{PREFIX}: scheduler_cls={scheduler.scheduler_cls!r} is set; pruning needs {SCHEDULER_CLS}")
    if parallel.worker_cls not in ("auto", WORKER_CLS):
        raise ValueError(f"{PREFIX}: worker_cls={parallel.worker_cls!r} is set; pruning needs {WORKER_CLS}")
    scheduler.scheduler_cls = SCHEDULER_CLS
    parallel.worker_cls = WORKER_CLS


class GlimpsePruneConfigCheck(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_engine(vllm_config)
