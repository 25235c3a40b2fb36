"""GlimpsePrune inside vLLM's own Qwen2.5-VL: visual tokens pruned after decoder layer K at
prefill, and the pruned tokens' KV blocks given back to the pool.

Importing this package never imports vLLM. The ``vllm.general_plugins`` entry point
(``pip install 'glimpse-ops[vllm]'``) calls ``register()`` in every vLLM process; a run opts in
per model through the engine arguments ``engine_kwargs()`` returns:

    from vllm import LLM
    import glimpse_ops.vllm
    llm = LLM(model=path, **glimpse_ops.vllm.engine_kwargs(max_keep_ratio=0.1))

What happens (training-free GlimpsePrune, the same rule as ``glimpse_ops.hf``; with a trained
predictor see ``trained.py``: the glimpse token's pass and the VIP replace the scores):

* ``model.GlimpsePruneQwen2_5_VL`` runs layers 0..K on every prompt of the step; for each
  request whose whole prompt is in the step and holds image tokens, the last prompt token's
  layer-K query scores the prompt's keys (``glimpse_scores``, head-averaged probabilities),
  ``select_tokens`` keeps the top ``ceil(max_keep_ratio * Nv)`` image tokens (and every text
  token), the kept tokens' K/V of layers 0..K are rewritten through the attention backend's
  own writer into the request's first L cache slots, and layers K+1.. run on the kept tokens
  only, at their original M-RoPE positions, with attention metadata rebuilt for them by the
  backend's own metadata builder (CPU_ATTN or TRITON_ATTN).
* ``worker.GlimpsePruneCPUWorker`` / ``GlimpsePruneGPUWorker`` (their V1 model runner) and
  ``scheduler.GlimpsePruneScheduler`` then shrink the request to its L kept prompt tokens on
  both sides in the same step: the blocks past ``ceil(L / block_size)`` return to the free
  pool, and decoding continues at the original last position + 1 (the M-RoPE delta grows by
  the pruned count).

Settings that cannot work are refused at engine start (``config.check_engine``).
"""

from __future__ import annotations

import os

ARCHITECTURE = "GlimpsePruneQwen2_5_VLForConditionalGeneration"
SCHEDULER_CLS = "glimpse_ops.vllm.scheduler.GlimpsePruneScheduler"
CPU_WORKER_CLS = "glimpse_ops.vllm.worker.GlimpsePruneCPUWorker"
GPU_WORKER_CLS = "glimpse_ops.vllm.worker.GlimpsePruneGPUWorker"
# the attention backends whose metadata builder the plugin rebuilds the pruned step's metadata
# with, each tested: CPU_ATTN in vLLM's CPU engine, TRITON_ATTN with vLLM's Triton kernels under
# the Triton interpreter (tests/vllm_plugin/test_vllm_triton_attn.py); FLASH_ATTN and FLASHINFER are refused
SUPPORTED_BACKENDS = ("CPU_ATTN", "TRITON_ATTN")
# the engine_kwargs arguments, each passed as hf_overrides["glimpse_<key>"] (config.PluginSettings reads them)
SETTING_KEYS = ("layer", "threshold", "max_keep_ratio", "max_remain_ratio", "min_keep", "fixed_keep_ratio",
                "caps_per", "predictor", "predictor_dtype")  # fmt: skip


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the pruning architecture and its
    engine-config check (idempotent; vLLM calls it once in each of its processes)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import GlimpsePruneConfigCheck

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "glimpse_ops.vllm.model:GlimpsePruneQwen2_5_VL")
    MODELS_CONFIG_MAP[ARCHITECTURE] = GlimpsePruneConfigCheck


def engine_kwargs(
    max_keep_ratio: float | None = None,
    *,
    layer: int | None = None,
    threshold: float | None = None,
    min_keep: int | None = None,
    predictor: str | None = None,
    max_remain_ratio: float | None = None,
    fixed_keep_ratio: float | None = None,
    caps_per: str | None = None,
    predictor_dtype: str | None = None,
) -> dict:
    """Keyword arguments for ``vllm.LLM`` (or ``vllm serve`` flags of the same names) that turn
    pruning on for a Qwen2.5-VL checkpoint: the architecture override with the pruning
    settings, eager mode, prefix caching, chunked prefill and async scheduling off (all refused
    otherwise), the TRITON_ATTN backend (on CUDA; the CPU platform runs CPU_ATTN), and, as a
    side effect, ``VLLM_USE_V2_MODEL_RUNNER=0`` in this process's environment unless it is set.
    The arguments mean what they mean for ``glimpse_ops.hf.apply_glimpse_prune``.

    Training-free (``predictor=None``): ``layer`` K, default about 2/3 of the depth;
    ``max_keep_ratio``: at most ``ceil(r * Nv)`` image tokens per request (default 0.1 when
    no ``threshold`` is given); ``threshold`` on the glimpse probability keeps fewer;
    ``min_keep`` (default 1): at least this many. ``max_keep_ratio=1.0`` keeps all.

    Trained (``predictor``: a ``.safetensors`` file of ``GlimpsePredictor.save`` or a folder of
    the GlimpsePrune release, readable by every vLLM process): the layer is the predictor's;
    the release's keep rule (``fixed_keep_ratio``, or ``threshold`` on sigmoid(VIP) with the
    cap ``max(1, floor(max_remain_ratio * n))`` and ``min_keep``), per request or per image
    (``caps_per``), defaults from the predictor; ``max_keep_ratio`` with a predictor is read as
    ``max_remain_ratio`` for this release, with a DeprecationWarning; ``predictor_dtype``: a
    torch dtype name (default ``"float32"``) or ``"model"``."""
    settings = dict(
        layer=layer, threshold=threshold, max_keep_ratio=max_keep_ratio, max_remain_ratio=max_remain_ratio,
        min_keep=min_keep, fixed_keep_ratio=fixed_keep_ratio, caps_per=caps_per,
        predictor=None if predictor is None else str(predictor), predictor_dtype=predictor_dtype,
    )  # fmt: skip
    overrides = {"architectures": [ARCHITECTURE], **{f"glimpse_{k}": v for k, v in settings.items()}}
    # vLLM 0.32 defaults to Model Runner V2 on CUDA; the pruning worker extends V1. Read by every
    # vLLM process this one starts (an explicit VLLM_USE_V2_MODEL_RUNNER=1 is kept, and refused)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return {
        "hf_overrides": overrides,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "async_scheduling": False,  # the scheduler must see a prune before the request's next step
        "attention_backend": "TRITON_ATTN",  # on CUDA; vLLM's CPU platform always runs CPU_ATTN
    }


def serve_flags(**settings) -> list[str]:
    """``vllm serve`` flags for the engine arguments ``engine_kwargs(**settings)`` returns
    (same arguments), e.g. ``["--hf-overrides", '{"architectures": [...], ...}',
    "--enforce-eager", "--no-enable-prefix-caching", ...]``. The server's processes also need
    ``VLLM_USE_V2_MODEL_RUNNER=0`` in their environment on CUDA (refused otherwise)."""
    return engine_flags(engine_kwargs(**settings))


def engine_flags(engine_args: dict) -> list[str]:
    """``vllm serve`` flags for ``vllm.LLM`` keyword arguments: ``--key-name value``, booleans
    as ``--key`` / ``--no-key``, dicts as JSON without their None entries."""
    import json

    flags: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps({k: v for k, v in value.items() if v is not None})]
        else:
            flags += [flag, str(value)]
    return flags
