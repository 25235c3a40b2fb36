"""A streaming-input session (``AsyncLLM.generate`` with an input stream: vLLM's ``resumable``
requests) beside an ordinary request, on the pruning engine or the stock one. Run by
``test_vllm_sessions.py`` in a process of its own (AsyncLLM starts its engine core process):

    python tests/vllm_plugin/session_generate.py CHECKPOINT OUT.json [--stock]

The session's first input is an image chat, its second a few more text tokens; each input
decodes STEPS greedy tokens. Writes the session's tokens (all inputs, in order), the ordinary
request's tokens and its ``kv_transfer_params`` (where the plugin reports what it kept), and
the session's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"

STEPS = 6
MORE_TEXT = [115, 101, 101]  # token ids of the session's second input


async def run(checkpoint: str, stock: bool) -> dict:
    import vllm
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    import glimpse_ops.vllm as glimpse_vllm
    from glimpse_ops.vllm import testing

    stock_engine = dict(enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False)
    engine = stock_engine if stock else glimpse_vllm.engine_kwargs(max_keep_ratio=0.25)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=checkpoint, dtype="float32", max_model_len=1024, seed=0, block_size=32, num_gpu_blocks_override=64,
        limit_mm_per_prompt={"image": 1, "video": 0}, **engine,
    ))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    def image_chat(seed: int) -> dict:
        return {"prompt": testing.chat_prompt(tokenizer, "What is shown?", True),
                "multi_modal_data": {"image": testing.random_image(64, 48, seed)}}  # fmt: skip

    # two images: a session and a request sharing one can race in vLLM's multimodal cache
    # ("P0/P1 cache drift"), which is vLLM's, with or without the plugin
    prompt, other = image_chat(1), image_chat(2)
    params = vllm.SamplingParams(max_tokens=STEPS, min_tokens=STEPS, temperature=0.0,
                                 output_kind=RequestOutputKind.DELTA)  # fmt: skip

    async def inputs():
        yield StreamingInput(prompt=prompt)
        yield StreamingInput(prompt={"prompt_token_ids": MORE_TEXT})

    async def collect(source) -> tuple[list[int], dict | None]:
        tokens, report = [], None
        async for output in source:
            tokens += list(output.outputs[0].token_ids)
            report = output.kv_transfer_params or report
        return tokens, report

    try:
        plain = dict(prompt=other, sampling_params=params, request_id="plain")
        (session, session_report), (single, single_report) = await asyncio.gather(
            collect(llm.generate(inputs(), params, request_id="session")), collect(llm.generate(**plain))
        )
    finally:
        llm.shutdown()
    return {"session": session, "session_report": session_report, "plain": single, "plain_report": single_report}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--stock", action="store_true")
    args = parser.parse_args()
    if not args.stock:
        import glimpse_ops.vllm as glimpse_vllm

        glimpse_vllm.register()
    Path(args.out).write_text(json.dumps(asyncio.run(run(args.checkpoint, args.stock))))


if __name__ == "__main__":
    main()
