"""The pruning settings a run passes through ``hf_overrides`` and the engine-start check that
refuses settings under which pruning would be wrong (imported by vLLM processes only)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from ..hf.keep_rule import TrainedKeepRule
from ..hf.predictor_hooks import predictor_config
from . import ARCHITECTURE, SCHEDULER_CLS, WORKER_CLS

PREFIX = "glimpse_ops.vllm"


@dataclass(frozen=True)
class PruneSettings:
    layer: int  # K: scores read and caches compacted after this decoder layer
    max_keep_ratio: float | None
    threshold: float | None
    min_keep: int
    predictor: str | None = None  # trained mode: a .safetensors file or a release folder
    rule: TrainedKeepRule | None = None  # trained mode's keep rule
    predictor_dtype: str = "float32"  # a torch dtype name, or "model"

    @classmethod
    def from_hf_config(cls, hf_config, n_layers: int) -> PruneSettings:
        """The ``glimpse_*`` keys of ``hf_overrides`` (see ``engine_kwargs``), checked; in
        trained mode the predictor's config (not its weights) is read for its layer and the
        defaults of its keep rule, as ``glimpse_ops.hf.apply_glimpse_prune`` does."""
        get = lambda key, default=None: getattr(hf_config, f"glimpse_{key}", default)  # noqa: E731
        layer, ratio, threshold, min_keep = get("layer"), get("max_keep_ratio"), get("threshold"), get("min_keep")
        predictor, fixed, caps_per = get("predictor"), get("fixed_keep_ratio"), get("caps_per")
        predictor_dtype = get("predictor_dtype") or "float32"
        for name, value in (("max_keep_ratio", ratio), ("fixed_keep_ratio", fixed)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"{PREFIX}: glimpse_{name} must be in (0, 1] or None, got {value!r}")
        if min_keep is not None and (not isinstance(min_keep, int) or min_keep < 0):
            raise ValueError(f"{PREFIX}: glimpse_min_keep must be an int >= 0, got {min_keep!r}")
        rule = None
        if predictor is not None:
            config = predictor_config(predictor, SimpleNamespace(config=hf_config), where=PREFIX)
            if layer is not None and layer != config.score_layer:
                raise ValueError(
                    f"{PREFIX}: the predictor was trained for layer {config.score_layer}, got glimpse_layer={layer}"
                )
            layer = config.score_layer
            rule = TrainedKeepRule.resolve(config, threshold=threshold, max_keep_ratio=ratio, min_keep=min_keep,
                                           fixed_keep_ratio=fixed, caps_per=caps_per, where=PREFIX)  # fmt: skip
            ratio, threshold, min_keep = rule.max_keep_ratio, rule.threshold, rule.min_keep
            if predictor_dtype != "model" and not isinstance(getattr(torch, str(predictor_dtype), None), torch.dtype):
                raise ValueError(f"{PREFIX}: glimpse_predictor_dtype must name a torch dtype or be 'model', "
                                 f"got {predictor_dtype!r}")  # fmt: skip
        else:
            for name, value in (("fixed_keep_ratio", fixed), ("caps_per", caps_per)):
                if value is not None:
                    raise ValueError(f"{PREFIX}: glimpse_{name} applies with a predictor (glimpse_predictor) only")
            if threshold is None and ratio is None:
                ratio = 0.1
            min_keep = 1 if min_keep is None else min_keep
        if layer is None:
            layer = max(0, math.ceil(2 * n_layers / 3) - 1)
        if not isinstance(layer, int) or not 0 <= layer < n_layers - 1:
            raise ValueError(f"{PREFIX}: glimpse_layer must be an int in [0, {n_layers - 1}), got {layer!r}")
        return cls(layer, ratio, threshold, min_keep, predictor, rule, str(predictor_dtype))


def check_engine(vllm_config) -> None:
    """Refuse, naming the setting, what pruning cannot run correctly with; install the
    scheduler and worker that give the pruned blocks back."""
    from vllm.platforms import current_platform

    model, cache = vllm_config.model_config, vllm_config.cache_config
    scheduler, parallel = vllm_config.scheduler_config, vllm_config.parallel_config
    text = model.hf_config.get_text_config()
    PruneSettings.from_hf_config(model.hf_config, text.num_hidden_layers)
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
