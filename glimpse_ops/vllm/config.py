"""The pruning settings a run passes through ``hf_overrides`` and the engine-start check that
refuses settings under which pruning would be wrong (imported by vLLM processes only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from ..glimpseprune import PruneSettings, predictor_config
from . import ARCHITECTURE, CPU_WORKER_CLS, GPU_WORKER_CLS, SCHEDULER_CLS, SETTING_KEYS, SUPPORTED_BACKENDS

PREFIX = "glimpse_ops.vllm"


def backend_refusal(backend: str) -> str:
    """The message for an attention backend the plugin does not run on."""
    return (f"{PREFIX}: {ARCHITECTURE} cannot run on the {backend} attention backend: after a prune its "
            f"metadata of layers K+1.. is rebuilt by the backend's builder, which is tested for "
            f"{', '.join(SUPPORTED_BACKENDS)} only; on a GPU select TRITON_ATTN (attention_backend='TRITON_ATTN', "
            "`vllm serve --attention-backend TRITON_ATTN`; engine_kwargs() sets it)")  # fmt: skip


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
        unknown = sorted(k for k in vars(hf_config) if k.startswith("glimpse_") and k[8:] not in SETTING_KEYS)
        if unknown:
            raise ValueError(f"{PREFIX}: unknown setting {unknown[0]} in hf_overrides; the plugin reads "
                             f"{', '.join('glimpse_' + k for k in SETTING_KEYS)}")  # fmt: skip
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
    multimodal = getattr(model, "multimodal_config", None)
    compilation = vllm_config.compilation_config
    refusals = [
        (split_vit and trained and parallel.tensor_parallel_size > 1,
         "mm_encoder_tp_mode='data' and a trained predictor: each rank's ViT sees only some images, the "
         "predictor needs every image's features"),
        (not (current_platform.is_cpu() or current_platform.is_cuda()),
         f"the {current_platform.device_name} platform: the plugin runs on vLLM's CPU and CUDA platforms"),
        (not model.enforce_eager, "enforce_eager=False: the number of kept tokens changes per request, "
                                  "a traced graph cannot follow it; pass enforce_eager=True"),
        (bool(cache.enable_prefix_caching), "enable_prefix_caching=True: compacted blocks would be hashed as if "
                                            "they held the original tokens; pass enable_prefix_caching=False"),
        (bool(scheduler.enable_chunked_prefill), "enable_chunked_prefill=True: a chunk cannot tell whether it ends "
                                                 "the prompt; pass enable_chunked_prefill=False"),
        ((scheduler.long_prefill_token_threshold or 0) > 0,
         f"long_prefill_token_threshold={scheduler.long_prefill_token_threshold}: it splits prompts even with "
         "chunked prefill off, and a split prompt cannot be pruned; pass long_prefill_token_threshold=0"),
        (vllm_config.speculative_config is not None, "speculative decoding: not supported with pruning"),
        (parallel.pipeline_parallel_size > 1, "pipeline_parallel_size > 1: not supported with pruning"),
        (vllm_config.lora_config is not None, "LoRA: not supported with pruning"),
        (_uses_v2_runner(vllm_config),
         "Model Runner V2 (vLLM's default on CUDA when Triton is available): the pruning worker extends the "
         "V1 model runner; set VLLM_USE_V2_MODEL_RUNNER=0 (engine_kwargs() sets it in this process)"),
        (scheduler.async_scheduling is True, "async_scheduling=True: the scheduler must see a prune before it "
                                             "schedules the next step; pass async_scheduling=False"),
        (bool(getattr(multimodal, "video_pruning_rate", None)),
         "video_pruning_rate > 0 (vLLM's EVS): it would rewrite the positions the plugin prunes by"),
        (trained and bool(getattr(multimodal, "enable_mm_embeds", False)),
         "enable_mm_embeds=True and a trained predictor: an image given as embeddings has no ViT features "
         "for the predictor"),
        (trained and bool(getattr(compilation, "cudagraph_mm_encoder", False)),
         "compilation_config.cudagraph_mm_encoder=True and a trained predictor: a replayed ViT graph skips "
         "the taps that read the predictor's ViT features"),
    ]  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise ValueError(f"{PREFIX}: {ARCHITECTURE} cannot run with {why}")
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if backend is not None and current_platform.is_cuda() and backend.name not in SUPPORTED_BACKENDS:
        raise ValueError(backend_refusal(backend.name))
    if current_platform.is_cuda() and backend is None:
        raise ValueError(backend_refusal("default (on CUDA: FLASH_ATTN or FLASHINFER)"))
    if scheduler.scheduler_cls not in (None, SCHEDULER_CLS):
        raise ValueError(f"{PREFIX}: scheduler_cls={scheduler.scheduler_cls!r} is set; pruning needs {SCHEDULER_CLS}")
    worker_cls = CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
    if parallel.worker_cls not in ("auto", worker_cls):
        raise ValueError(f"{PREFIX}: worker_cls={parallel.worker_cls!r} is set; pruning needs {worker_cls}")
    scheduler.scheduler_cls = SCHEDULER_CLS
    parallel.worker_cls = worker_cls
    if scheduler.async_scheduling is None:  # vLLM resolves its default after this check: to on, on CUDA
        scheduler.async_scheduling = False


def _uses_v2_runner(vllm_config) -> bool:
    """vLLM's own choice of model runner (``VllmConfig.use_v2_model_runner`` on 0.32: V2 by
    default where Triton has a driver, the environment variable overriding), not only an
    explicit ``VLLM_USE_V2_MODEL_RUNNER=1``."""
    # the variable is read too: vLLM caches its environment once an engine has started
    explicit = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").strip().lower() not in ("", "0", "false")
    return explicit or bool(getattr(vllm_config, "use_v2_model_runner", False))


class GlimpsePruneConfigCheck(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        check_engine(vllm_config)
