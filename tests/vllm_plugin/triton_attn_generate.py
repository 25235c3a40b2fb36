"""The plugin's engine on vLLM's TRITON_ATTN backend, on a CPU: vLLM's own Triton attention
kernels (``unified_attention``, ``triton_reshape_and_cache_flash``) run on CPU tensors under
``TRITON_INTERPRET=1``. Run by ``test_vllm_triton_attn.py`` in a process of its own (the recipe
patches vLLM's Triton placeholders and platform before the engine starts):

    python tests/vllm_plugin/triton_attn_generate.py CHECKPOINT CASES.json OUT.json [--backend TRITON_ATTN|CPU_ATTN]

Writes, for the prompts of CASES.json (``conftest.CASES``: text and image specs) in one batch,
each request's greedy tokens, the first token's log-probability, the prompt lengths the
scheduler shrank pruned requests to (sorted), the attention implementations the layers ran,
the free KV blocks before and after, and the bytes the pruning step's capture held.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: inspectable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def use_real_triton_kernels() -> None:
    """vLLM hands out no-op Triton placeholders where stock Triton has no driver (vllm-cpu):
    give its kernel modules the real Triton, whose interpreter runs them on CPU tensors. vLLM's
    own ``HAS_TRITON`` stays False, so everything else keeps its CPU path (and the V1 runner)."""
    import torch
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as triton_utils
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.language.core import _aggregate as aggregate

    for name, module in dict(triton=triton, tl=tl, tldevice=tldevice, gluon=gluon, gl=gl, aggregate=aggregate).items():
        setattr(triton_utils, name, module)
    # the cache writer's launcher picks its tile by the device's compute capability
    torch.cuda.get_device_capability = lambda device=None: (9, 0)


def select_backend(backend: str) -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    stock = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            return stock(cls, selected_backend, attn_selector_config, num_heads)
        return AttentionBackendEnum[backend].get_path()

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("cases", help="JSON list of [text, [[width, height, seed] of each image]]")
    parser.add_argument("out")
    parser.add_argument("--backend", default="TRITON_ATTN", choices=("TRITON_ATTN", "CPU_ATTN"))
    parser.add_argument("--max-keep-ratio", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.backend == "TRITON_ATTN":
        use_real_triton_kernels()
        select_backend(args.backend)

    import vllm
    from transformers import AutoTokenizer

    import glimpse_ops.vllm as glimpse_vllm
    from glimpse_ops.vllm import testing

    shrunk = testing.record_shrinks()
    glimpse_vllm.register()
    llm = vllm.LLM(
        model=args.checkpoint, dtype="float32", max_model_len=1024, seed=0, block_size=32,
        num_gpu_blocks_override=64, limit_mm_per_prompt={"image": 2, "video": 0},
        **glimpse_vllm.engine_kwargs(max_keep_ratio=args.max_keep_ratio),
    )  # fmt: skip
    core = llm.llm_engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    model = runner.get_model()
    attn = model.language_model.model.layers[0].self_attn.attn
    impls = sorted({type(layer.self_attn.attn.impl).__name__ for layer in model.language_model.model.layers})
    pool = core.scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    params = vllm.SamplingParams(max_tokens=args.steps, min_tokens=args.steps, temperature=0.0, logprobs=1)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts = []
    for text, specs in json.loads(Path(args.cases).read_text()):
        images = [testing.random_image(*spec) for spec in specs]
        prompts.append({"prompt": testing.chat_prompt(tokenizer, text, len(images)),
                        **({"multi_modal_data": {"image": images}} if images else {})})  # fmt: skip
    outputs = llm.generate(prompts, params)
    result = {
        "backend": args.backend,
        "impls": impls,
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "first_logprobs": [o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob for o in outputs],
        "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
        "shrunk_to": sorted(shrunk.values()),
        "free_blocks": [free_before, pool.get_num_free_blocks()],
        "capture_bytes": model.capture_bytes,  # of the step that pruned (all prompts are in one step)
        "prune_layer": model.prune_layer,
        "heads": [attn.num_heads, attn.num_kv_heads, attn.head_size],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
