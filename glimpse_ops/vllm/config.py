"""The pruning settings a run passes through ``hf_overrides`` and the engine-start check that
refuses settings under which pruning would be wrong (imported by vLLM processes only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from ..glimpseprune import PruneSettings, predictor_config
from . import ARCHITECTURE, SCHEDULER_CLS, SETTING_KEYS, WORKER_CLS

PREFIX = "glimpse_ops.vllm"


@dataclass(frozen=True)
class PluginSettings:
    """What a run passes through ``hf_overrides`` (see ``engine_kwargs``): the pruning settings
    (``glimpseprune.PruneSettings``, resolved as ``glimpse_ops.hf.apply_glimpse_prune``
    resolves them) and, in trained mode, the predictor's path and the dtype it runs in."""

    prune: PruneSettings
    predictor: str | None = None  # trained mode: a .safetensors file or a release folder
    predictor_dtype: str = "float32"  # a torch dtype name, or "model"

    @classmethod
    def from_hf_config(cls, hf_config, n_layers: int) -> PluginSettings:
        """The ``glimpse_*`` keys of ``hf_overrides``, checked; in trained mode the predictor's
        config (not its weights) is read for its layer and the defaults of its keep rule."""
        given = {key: getattr(hf_config, f"glimpse_{key}", None) for key in SETTING_KEYS}
        predictor, predictor_dtype = given.pop("predictor"), given.pop("predictor_dtype") or "float32"
        config = None
        if predictor is not None:
            config = predictor_config(predictor, SimpleNamespace(config=hf_config), where=PREFIX)
            if predictor_dtype != "model" and not isinstance(getattr(torch, str(predictor_dtype), None), torch.dtype):
                raise ValueError(f"{PREFIX}: glimpse_predictor_dtype must name a torch dtype or be 'model', "
                                 f"got {predictor_dtype!r}")  # fmt: skip
        prune = PruneSettings.resolve(n_layers, config, where=PREFIX, name_prefix="glimpse_", **given)
        return cls(prune, predictor, str(predictor_dtype))


def check_engine(vllm_config) -> None:
    """Refuse, naming the setting, what pruning cannot run correctly with; install the
    scheduler and worker that give the pruned blocks back."""
    from vllm.platforms import current_platform

    model, cache = vllm_config.model_config, vllm_config.cache_config
    scheduler, parallel = vllm_config.scheduler_config, vllm_config.parallel_config
    text = model.hf_config.get_text_config()
    PluginSettings.from_hf_config(model.hf_config, text.num_hidden_layers)
    split_vit = getattr(getattr(model, "multimodal_config", None), "mm_encoder_tp_mode", "weights") == "data"
    trained = getattr(model.hf_config, "glimpse_predictor", None) is not None
    refusals = [
        (split_vit and trained and parallel.tensor_parallel_size > 1,
         "mm_encoder_tp_mode='data' and a trained predictor: each rank's ViT sees only some images, the "
         "predictor needs every image's features"),
        (not current_platform.is_cpu(), "the device: only vLLM's CPU engine is supported and tested so far"),
        (not model.enforce_eager, "enforce_eager=False: the number of kept tokens changes per request, "
                                  "a traced graph cannot follow it; pass enforce_eager=True"),
        (bool(cache.enable_prefix_caching), "enable_prefix_caching=True: compacted blocks would be hashed as if "
                                            "they held the original tokens; pass enable_prefix_caching=False"),
        (bool(scheduler.enable_chunked_prefill), "enable_chunked_prefill=True: a chunk cannot tell whether it ends "
                                                 "the prompt; pass enable_chunked_prefill=False"),
        (vllm_config.speculative_config is not None, "speculative decoding: not supported with pruning"),
        (parallel.pipeline_parallel_size > 1, "pipeline_parallel_size > 1: not supported with pruning"),
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
