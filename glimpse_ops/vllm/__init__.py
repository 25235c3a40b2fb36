"""GlimpsePrune inside vLLM's own Qwen2.5-VL: visual tokens pruned after decoder layer K at
prefill, and the pruned tokens' KV blocks given back to the pool.

Importing this package never imports vLLM. The ``vllm.general_plugins`` entry point
(``pip install 'glimpse-ops[vllm]'``) calls ``register()`` in every vLLM process; a run opts in
per model through the engine arguments ``engine_kwargs()`` returns:

    from vllm import LLM
    import glimpse_ops.vllm
    llm = LLM(model=path, **glimpse_ops.vllm.engine_kwargs(max_keep_ratio=0.1))

What happens (training-free GlimpsePrune, the same rule as ``glimpse_ops.hf``):

* ``model.GlimpsePruneQwen2_5_VL`` runs layers 0..K on every prompt of the step; for each
  request whose whole prompt is in the step and holds image tokens, the last prompt token's
  layer-K query scores the prompt's keys (``glimpse_scores``, head-averaged probabilities),
  ``select_tokens`` keeps the top ``ceil(max_keep_ratio * Nv)`` image tokens (and every text
  token), the kept tokens' K/V of layers 0..K are rewritten through the attention backend's
  own writer into the request's first L cache slots, and layers K+1.. run on the kept tokens
  only, at their original M-RoPE positions, with attention metadata rebuilt for them.
* ``worker.GlimpsePruneCPUWorker`` (its model runner) and ``scheduler.GlimpsePruneScheduler``
  then shrink the request to its L kept prompt tokens on both sides in the same step: the
  blocks past ``ceil(L / block_size)`` return to the free pool, and decoding continues at the
  original last position + 1 (the M-RoPE delta grows by the pruned count).

Settings that cannot work are refused at engine start (``config.check_engine``).
"""

from __future__ import annotations

ARCHITECTURE = "GlimpsePruneQwen2_5_VLForConditionalGeneration"
SCHEDULER_CLS = "glimpse_ops.vllm.scheduler.GlimpsePruneScheduler"
WORKER_CLS = "glimpse_ops.vllm.worker.GlimpsePruneCPUWorker"


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
    max_keep_ratio: float | None = 0.1,
    *,
    layer: int | None = None,
    threshold: float | None = None,
    min_keep: int = 1,
) -> dict:
    """Keyword arguments for ``vllm.LLM`` (or ``vllm serve`` flags of the same names) that turn
    pruning on for a Qwen2.5-VL checkpoint: the architecture override with the pruning
    settings, eager mode, and prefix caching and chunked prefill off (both refused otherwise).

    ``layer``: K, default about 2/3 of the depth; ``max_keep_ratio``: at most
    ``ceil(r * Nv)`` image tokens per request; ``threshold`` on the glimpse probability keeps
    fewer; ``min_keep``: at least this many. ``max_keep_ratio=1.0, threshold=None`` keeps all."""
    overrides = {
        "architectures": [ARCHITECTURE],
        "glimpse_layer": layer,
        "glimpse_max_keep_ratio": max_keep_ratio,
        "glimpse_threshold": threshold,
        "glimpse_min_keep": min_keep,
    }
    return {
        "hf_overrides": overrides,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
    }
