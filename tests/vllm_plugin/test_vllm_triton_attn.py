"""The plugin on vLLM's TRITON_ATTN backend (the GPU backend it supports), run on a CPU: vLLM's
own Triton attention and cache-writer kernels under the Triton interpreter, fp32, one batch of
the test prompts (two images, none, one). The pruned engine gives the CPU_ATTN engine's and the
HF path's greedy tokens, kept lengths and first-token log-probabilities (greedy tokens alone
are blind to stale attention metadata: a context length left unpruned keeps the tokens and
moves log-probabilities by about 0.03), and every KV block goes back to the pool.
Each engine runs in its own process (``triton_attn_generate.py``). Skipped without vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CASES, STEPS, case_images

pytest.importorskip("vllm")

import glimpse_ops  # noqa: E402

SCRIPT = Path(__file__).with_name("triton_attn_generate.py")
RATIO = 0.25
# fp32 end to end: measured differences 3e-6 (TRITON_ATTN vs CPU_ATTN and vs the HF path)
LOGPROB_ATOL = 1e-4


def _engine_run(tmp_path: Path, checkpoint, backend: str) -> dict:
    cases, out = tmp_path / "cases.json", tmp_path / f"{backend}.json"
    cases.write_text(json.dumps(CASES))
    source = str(Path(glimpse_ops.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, str(SCRIPT), str(checkpoint), str(cases), str(out), "--backend", backend,
               "--max-keep-ratio", str(RATIO), "--steps", str(STEPS)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("triton-attn")
    return {backend: _engine_run(tmp, checkpoint, backend) for backend in ("TRITON_ATTN", "CPU_ATTN")}


def _hf_first_logprobs(checkpoint, hf_model, first_tokens: list[int]) -> list[float]:
    from glimpse_ops import hf
    from glimpse_ops.vllm import testing

    logprobs = []
    for (text, specs), token in zip(CASES, first_tokens):
        x = testing.hf_inputs(checkpoint, [(text, case_images(specs))])
        with hf.pruned(hf_model, max_keep_ratio=RATIO), torch.no_grad():
            logits = hf_model(**x).logits[0, -1]
        logprobs.append(float(torch.log_softmax(logits.double(), dim=-1)[token]))
    return logprobs


def test_triton_attn_runs_vllms_triton_kernels(runs):
    assert runs["TRITON_ATTN"]["impls"] == ["TritonAttentionImpl"]
    assert runs["CPU_ATTN"]["impls"] == ["CPUAttentionBackendImpl"]


def test_triton_attn_equals_cpu_attn_and_the_hf_path(runs, checkpoint, hf_model, hf_answers):
    triton, cpu = runs["TRITON_ATTN"], runs["CPU_ATTN"]
    want_tokens, want_kept = hf_answers(max_keep_ratio=RATIO)
    assert triton["tokens"] == cpu["tokens"] == want_tokens
    assert triton["shrunk_to"] == cpu["shrunk_to"] == want_kept
    want = _hf_first_logprobs(checkpoint, hf_model, [tokens[0] for tokens in want_tokens])
    torch.testing.assert_close(torch.tensor(triton["first_logprobs"]), torch.tensor(cpu["first_logprobs"]),
                               rtol=0, atol=LOGPROB_ATOL)  # fmt: skip
    torch.testing.assert_close(torch.tensor(triton["first_logprobs"], dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=0, atol=LOGPROB_ATOL)  # fmt: skip


def test_triton_attn_gives_every_block_back(runs):
    for run in runs.values():
        before, after = run["free_blocks"]
        assert after == before, f"{run['backend']}: {before - after} blocks still held after every request finished"


def test_triton_attn_holds_only_layer_k_at_the_prune(runs):
    """On TRITON_ATTN the kept rows are compacted in the paged cache, so the pruning step holds
    layer K's q and k only; CPU_ATTN rewrites layers 0..K from a capture and holds their k and
    v too. Neither keeps a whole qkv projection buffer alive through a view (fp32, every
    prompt in the one pruning step)."""
    triton, cpu = runs["TRITON_ATTN"], runs["CPU_ATTN"]
    H, Hkv, D = triton["heads"]
    T, layers = sum(triton["prompt_tokens"]), triton["prune_layer"] + 1
    assert layers > 1
    assert triton["capture_bytes"] == T * (H + Hkv) * D * 4
    assert cpu["capture_bytes"] == T * (H + layers * 2 * Hkv) * D * 4
