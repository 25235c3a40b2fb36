"""bench/run.py fails (exit code 1) on any provider error and on an empty selection, so that a
crash in a benchmark (a Triton kernel at 16k on a GPU) is never reported as a passed run; a
peer running out of memory and a planned skip are outcomes, not failures."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

import run  # noqa: E402
import timing  # noqa: E402
from registry import Case  # noqa: E402

from glimpse_ops.progress import Progress  # noqa: E402


def _row(provider: str, **fields) -> dict:
    return {"name": "compact_kv Nv=1k B=1", "provider": provider, **fields}


@pytest.mark.parametrize(
    "rows, failing",
    [
        ([_row("native", p50=1.0), _row("eager", p50=2.0)], []),
        ([_row("native", p50=1.0), _row("triton", error="RuntimeError: an illegal memory access")], ["raised"]),
        ([_row("native", error="failed the correctness gate: index agreement 0.5")], ["correctness gate"]),
        ([_row("native", p50=1.0), _row("eager", error="RecompiledWhileTiming: x")], ["timed loop"]),
        ([_row("native", p50=1.0), _row("sdpa_dense_mask", error="out of memory: CUDA")], []),  # a peer's outcome
        ([_row("glimpse_ops", error="out of memory: CUDA"), _row("eager", p50=1.0)], ["ran out of memory"]),
        ([_row("-", error="skipped: inputs exceed the memory limit"), _row("native", p50=1.0)], []),
        ([_row("-", error="skipped: inputs exceed the memory limit")], ["nothing was measured"]),
        ([], ["nothing was measured"]),
    ],
)
def test_run_failures_name_every_kind_of_failure(rows, failing):
    problems = timing.run_failures(rows)
    assert len(problems) == len(failing), problems
    for line, what in zip(problems, failing):
        assert what in line
    assert run.gate_exit_code(rows) == (1 if failing else 0)


def test_record_error_marks_out_of_memory():
    row: dict = {}
    timing.record_error(row, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert row["error"].startswith("out of memory")
    timing.record_error(row, ValueError("bad"))
    assert row["error"] == "ValueError: bad"


def test_a_provider_that_raises_is_recorded_and_fails_the_run(monkeypatch):
    case = Case("compact_kv", 1024, 0.10, 1)
    providers = run.providers_for(case, "cpu", {"reference", "native"})

    def broken(inputs):
        raise RuntimeError("the kernel crashed")

    monkeypatch.setattr(run, "providers_for", lambda *a: {"reference": providers["reference"], "native": broken})
    rows = run.run_case(case, "cpu", {"reference", "native"}, 0.01, 10.0, Progress(2))
    assert [r["provider"] for r in rows] == ["reference", "native"]
    assert "p50" in rows[0] and rows[1]["error"] == "RuntimeError: the kernel crashed"
    assert run.gate_exit_code(rows) == 1


def test_an_empty_selection_exits_1(tmp_path, capsys):
    code = run.main(["--device", "cpu", "--visual", "12345", "--json", str(tmp_path / "empty.json")])
    assert code == 1
    assert "matched no case" in capsys.readouterr().err
