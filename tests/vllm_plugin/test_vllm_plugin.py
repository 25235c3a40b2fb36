"""GlimpsePrune inside vLLM (vllm-cpu 0.32.0, in-process engine, tiny Qwen2.5-VL, fp32 greedy):
the plugin's tokens equal glimpse_ops.hf's, steps mix a pruning prefill with decodes, the
pruned tails' blocks go back to the pool and are reused, and settings that cannot work are
refused. Runs in the venv tests/vllm_plugin/make_venv.sh builds (CI does); skipped without vLLM."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: inspectable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

import glimpse_ops.vllm as glimpse_vllm  # noqa: E402
from glimpse_ops import hf  # noqa: E402
from glimpse_ops.vllm import testing  # noqa: E402

BLOCK, BLOCKS, STEPS = 32, 64, 6


CASES = [
    ("What is shown?", testing.random_image(40, 24, 0)),
    ("Text only, a longer prompt.", None),
    ("Describe", testing.random_image(64, 48, 1)),
]


def _engine(checkpoint, **prune):
    glimpse_vllm.register()  # what the vllm.general_plugins entry point does in each process
    return vllm.LLM(
        model=str(checkpoint), dtype="float32", max_model_len=1024, seed=0, block_size=BLOCK,
        num_gpu_blocks_override=BLOCKS, limit_mm_per_prompt={"image": 1, "video": 0},
        **glimpse_vllm.engine_kwargs(**prune),
    )  # fmt: skip


# Engines live as long as the module: shutting one down tears down the process-wide
# parallel state the other one uses.
@pytest.fixture(scope="module")
def pruning(checkpoint):
    return _engine(checkpoint, max_keep_ratio=0.25)


@pytest.fixture(scope="module")
def keep_all(checkpoint):
    return _engine(checkpoint, max_keep_ratio=1.0)


def _prompt(checkpoint, text, image):
    from transformers import AutoTokenizer

    rendered = testing.chat_prompt(AutoTokenizer.from_pretrained(checkpoint), text, image is not None)
    return {"prompt": rendered, **({"multi_modal_data": {"image": image}} if image is not None else {})}


def _hf_tokens(model, checkpoint, text, image, steps=STEPS, **prune) -> list[int]:
    x = testing.hf_inputs(checkpoint, [(text, image)])
    with hf.pruned(model, **prune):
        with torch.no_grad():
            out = model.generate(**x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, x["input_ids"].shape[1] :].tolist()


def _greedy(steps=STEPS):
    return vllm.SamplingParams(max_tokens=steps, min_tokens=steps, temperature=0.0)


def test_mixed_batch_equals_the_hf_path(checkpoint, hf_model, pruning):
    """Tokens equal the HF path's; each pruned request's output reports what the prune kept
    (``kv_transfer_params["glimpse"]``), a text-only one reports nothing."""
    outputs = pruning.generate([_prompt(checkpoint, t, i) for t, i in CASES], _greedy())
    image_token = hf_model.config.image_token_id
    for (text, image), output in zip(CASES, outputs):
        want = _hf_tokens(hf_model, checkpoint, text, image, max_keep_ratio=0.25)
        assert list(output.outputs[0].token_ids) == want, text
        if image is None:
            assert output.kv_transfer_params is None
            continue
        S, visual = len(output.prompt_token_ids), output.prompt_token_ids.count(image_token)
        kept = math.ceil(0.25 * visual)
        report = {"prompt_tokens": S, "kept_prompt_tokens": S - visual + kept, "visual_tokens": visual,
                  "kept_visual_tokens": kept}  # fmt: skip
        assert output.kv_transfer_params["glimpse"] == report


def test_keep_all_equals_the_stock_model(checkpoint, hf_model, keep_all):
    outputs = keep_all.generate([_prompt(checkpoint, t, i) for t, i in CASES], _greedy())
    for (text, image), output in zip(CASES, outputs):
        x = testing.hf_inputs(checkpoint, [(text, image)])
        with torch.no_grad():
            stock = hf_model.generate(**x, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
        assert list(output.outputs[0].token_ids) == stock[0, x["input_ids"].shape[1] :].tolist(), text


def _scheduler(engine):
    return engine.llm_engine.engine_core.engine_core.scheduler


def test_pruning_prefill_beside_decodes_returns_the_tail_blocks(checkpoint, hf_model, pruning):
    """Request A (221 prompt tokens, 192 of them image tokens) prefills and is pruned to
    221 - 192 + 48 = 77 tokens: its blocks drop from ceil(221 / 32) = 7 to ceil(77 / 32) = 3.
    Then B's pruning prefill runs in the same step as A's decodes; at the end every block is
    free again, and a later request reuses them with the right answer."""
    engine, scheduler = pruning.llm_engine, _scheduler(pruning)
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    text_a, image_a = CASES[2]
    engine.add_request("a", _prompt(checkpoint, text_a, image_a), _greedy())
    engine.step()  # A's prefill: pruned, shrunk, first token sampled
    (request_a,) = scheduler.requests.values()  # the engine's internal id extends "a"
    assert request_a.num_prompt_tokens == 77 and request_a.num_computed_tokens == 77
    assert free_before - pool.get_num_free_blocks() == math.ceil(77 / BLOCK) == 3  # stock vLLM holds 7 here
    engine.step()  # a decode of A alone
    text_b, image_b = CASES[0]
    engine.add_request("b", _prompt(checkpoint, text_b, image_b), _greedy())
    seen = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                seen[output.request_id] = list(output.outputs[0].token_ids)
    assert seen["a"] == _hf_tokens(hf_model, checkpoint, text_a, image_a, max_keep_ratio=0.25)
    assert seen["b"] == _hf_tokens(hf_model, checkpoint, text_b, image_b, max_keep_ratio=0.25)
    assert pool.get_num_free_blocks() == free_before, "every block is back in the pool"
    again = pruning.generate([_prompt(checkpoint, text_a, image_a)], _greedy())
    assert list(again[0].outputs[0].token_ids) == seen["a"], "blocks reused by a later request"


SMALL_POOL, LONG = 12, 100  # 11 usable blocks of 32 tokens; 100 decode steps


@pytest.fixture(scope="module")
def small_pool(checkpoint):
    glimpse_vllm.register()
    return vllm.LLM(
        model=str(checkpoint), dtype="float32", max_model_len=(SMALL_POOL - 1) * BLOCK, seed=0, block_size=BLOCK,
        num_gpu_blocks_override=SMALL_POOL, limit_mm_per_prompt={"image": 1, "video": 0},
        **glimpse_vllm.engine_kwargs(max_keep_ratio=0.25),
    )  # fmt: skip


def test_a_preempted_pruned_request_is_recomputed(checkpoint, pruning, small_pool, monkeypatch):
    """Three image requests of 221 prompt tokens (77 after the prune) and 100 decode steps in
    a pool of 11 blocks: A and B prefill (7 blocks each, 3 after the prune), C waits; at 161
    tokens B's next block does not fit and vLLM preempts B. B is recomputed (its prompt
    prefilled and pruned again, then its generated tokens over the kept cache): all three
    answer what the large-pool engine answers, token by token and logprob by logprob, the
    worker pruned B's prompt again, and the engine goes on serving with every block back in
    the pool."""
    engine, scheduler = small_pool.llm_engine, _scheduler(small_pool)
    runner = small_pool.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    pool = scheduler.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    preempted, forced = [], []
    preempt, prune = scheduler._preempt_request, runner._shrink

    def record_preempt(request, *args, **kwargs):
        preempted.append((request.request_id, request.request_id in scheduler.pruned_requests))
        return preempt(request, *args, **kwargs)

    def record_prune(req_id, kept):
        if req_id in (runner.glimpse_forced or {}):
            forced.append((req_id, list(kept) == runner.glimpse_forced[req_id]))
        return prune(req_id, kept)

    monkeypatch.setattr(scheduler, "_preempt_request", record_preempt)
    monkeypatch.setattr(runner, "_shrink", record_prune)
    text, image = CASES[2]
    params = vllm.SamplingParams(max_tokens=LONG, min_tokens=LONG, temperature=0.0, logprobs=0)
    for name in "abc":
        engine.add_request(name, _prompt(checkpoint, text, image), params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0]
    assert preempted and all(was_pruned for _, was_pruned in preempted), preempted
    assert forced and all(same for _, same in forced), "the recomputed prompt was pruned with the first decision"
    assert {name: out.finish_reason for name, out in finished.items()} == {n: "length" for n in "abc"}
    want = pruning.generate([_prompt(checkpoint, text, image)], params)[0].outputs[0]
    for name, out in finished.items():
        assert list(out.token_ids) == list(want.token_ids), name
        got = [next(iter(step.values())).logprob for step in out.logprobs]
        ref = [next(iter(step.values())).logprob for step in want.logprobs]
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, name
    assert pool.get_num_free_blocks() == free_before, "every block is back in the pool"
    assert not scheduler.pruned_requests and not scheduler.recomputing
    ours = {req_id for req_id in runner.requests if req_id[0] in "abc"} | set(runner.glimpse_pruned_states)
    again = small_pool.generate([_prompt(checkpoint, text, image)], _greedy())
    assert list(again[0].outputs[0].token_ids) == list(want.token_ids)[:STEPS], "the engine still serves"
    assert not ours & set(runner.glimpse_pruned_states), "the worker let the finished requests' states go"


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(enable_prefix_caching=True), "enable_prefix_caching=True"),
        (dict(enable_chunked_prefill=True), "enable_chunked_prefill=True"),
        (dict(enforce_eager=False), "enforce_eager=False"),
        (dict(scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler"), "scheduler_cls="),
        (dict(long_prefill_token_threshold=64), "long_prefill_token_threshold=64"),
        (dict(async_scheduling=True), "async_scheduling=True"),
        (dict(video_pruning_rate=0.5), "video_pruning_rate > 0"),
    ],
)
def test_settings_that_cannot_work_are_refused(checkpoint, setting, message):
    """The plugin's own ValueError (vLLM may wrap it in pydantic's ValidationError, a
    ValueError too), naming the plugin and the setting: not any exception that happens to
    contain the setting's name."""
    glimpse_vllm.register()
    kwargs = {**glimpse_vllm.engine_kwargs(max_keep_ratio=0.25), **setting}
    with pytest.raises(ValueError, match=r"glimpse_ops\.vllm: .*" + re.escape(message)):
        vllm.LLM(model=str(checkpoint), dtype="float32", max_model_len=1024, **kwargs)


def test_model_runner_v2_is_refused(checkpoint, monkeypatch):
    """vLLM's own choice of runner is checked (on CUDA 0.32 picks V2 by default), here forced
    by the environment variable engine_kwargs() leaves alone when it is set."""
    glimpse_vllm.register()
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    kwargs = glimpse_vllm.engine_kwargs(max_keep_ratio=0.25)
    with pytest.raises(ValueError, match=r"glimpse_ops\.vllm: .*Model Runner V2.*VLLM_USE_V2_MODEL_RUNNER=0"):
        vllm.LLM(model=str(checkpoint), dtype="float32", max_model_len=1024, **kwargs)


def test_async_scheduling_left_to_vllm_is_resolved_off(checkpoint):
    """vLLM resolves async_scheduling=None (its default) after the plugin's check, to on where
    the executor supports it: the check resolves it to off first, so the engine never runs a
    pruning step asynchronously."""
    from vllm.engine.arg_utils import EngineArgs

    glimpse_vllm.register()
    kwargs = {k: v for k, v in glimpse_vllm.engine_kwargs(max_keep_ratio=0.25).items() if k != "async_scheduling"}
    config = EngineArgs(model=str(checkpoint), dtype="float32", max_model_len=1024, **kwargs).create_engine_config()
    assert config.scheduler_config.async_scheduling is False
    assert config.scheduler_config.scheduler_cls == glimpse_vllm.SCHEDULER_CLS


def test_bad_pruning_settings_are_refused(checkpoint):
    glimpse_vllm.register()
    kwargs = glimpse_vllm.engine_kwargs(max_keep_ratio=1.5)
    with pytest.raises(ValueError, match=r"glimpse_ops\.vllm: glimpse_max_keep_ratio must be in \(0, 1\]"):
        vllm.LLM(model=str(checkpoint), dtype="float32", max_model_len=1024, **kwargs)
