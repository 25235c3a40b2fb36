"""Run the pruning engine with tensor_parallel_size=2 (two CPU worker processes) on a tiny
checkpoint and write the greedy tokens of each request and the prompt lengths the pruned requests were
shrunk to (sorted: the scheduler's request ids are internal ones).

    python tp_generate.py CHECKPOINT CASES.json OUT.json [--predictor FILE] [--max-keep-ratio R]

``test_vllm_tensor_parallel.py`` runs it in a subprocess (vLLM's multiprocess executor needs a
``__main__`` guard) with ``VLLM_CPU_OMP_THREADS_BIND=0|1``: one core per rank.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("cases", help="JSON list of [text, [image seed and size ...]]")
    parser.add_argument("out")
    parser.add_argument("--predictor")
    parser.add_argument("--max-keep-ratio", type=float)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import vllm
    from transformers import AutoTokenizer

    import glimpse_ops.vllm as glimpse_vllm
    from glimpse_ops.vllm import testing

    shrunk = testing.record_shrinks()
    glimpse_vllm.register()
    llm = vllm.LLM(
        model=args.checkpoint, dtype="float32", max_model_len=1024, seed=0, block_size=32,
        num_gpu_blocks_override=64, limit_mm_per_prompt={"image": 2, "video": 0}, tensor_parallel_size=2,
        distributed_executor_backend="mp",
        **glimpse_vllm.engine_kwargs(max_keep_ratio=args.max_keep_ratio, predictor=args.predictor),
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompts = []
    for text, images in json.loads(open(args.cases).read()):
        pictures = [testing.random_image(*spec) for spec in images]
        prompt = {"prompt": testing.chat_prompt(tokenizer, text, len(pictures))}
        if pictures:
            prompt["multi_modal_data"] = {"image": pictures}
        prompts.append(prompt)
    params = vllm.SamplingParams(max_tokens=args.steps, min_tokens=args.steps, temperature=0.0)
    outputs = llm.generate(prompts, params)
    results = {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "kept": sorted(shrunk.values())}
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
