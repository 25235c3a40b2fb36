"""The static compile gate's verdicts and the GPU check's time boxes (their full runs happen in
.ci/run: bench/compile_gate.py on two Triton versions, bench/gpu_check.py --dry-run)."""

from __future__ import annotations

import sys
import time

import pytest
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

import compile_gate  # noqa: E402
import gpu_check  # noqa: E402

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_bwd_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_dkdv_kernel
    448 bytes stack frame, 436 bytes spill stores, 412 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 600 bytes cmem[0]
"""


def test_parse_ptxas_log_reads_spills_and_registers():
    assert compile_gate.parse_ptxas_log(PTXAS_LOG) == {
        "registers": 255,
        "stack": 448,
        "spill_stores": 436,
        "spill_loads": 412,
    }


def test_occupancy_follows_registers_warps_and_shared_memory():
    assert compile_gate.occupancy(32, 4, 0, 90) == 1.0  # 16 blocks of 4 warps fill 64 warp slots
    assert compile_gate.occupancy(255, 4, 0, 90) == 8 / 64  # 256 regs x 32 threads: 8 warps fit
    assert compile_gate.occupancy(128, 8, 0, 80) == 16 / 64
    assert compile_gate.occupancy(64, 4, 100 * 1024, 80) == 4 / 64  # one 100 KiB block per 164 KiB SM


def _variant(**changes) -> compile_gate.Variant:
    base = dict(
        kernel="k._kernel",
        case="case",
        num_warps=4,
        num_stages=3,
        constants="BLOCK=64",
        registers=128,
        spill_stores=0,
        spill_loads=0,
        stack=0,
        shared=1024,
        occupancy=0.25,
    )
    return compile_gate.Variant(**{**base, **changes})


def test_problems_flag_spills_shared_memory_failures_and_uncompiled_kernels():
    report = compile_gate.ArchReport(arch=80, name="sm_80", triton="x")
    assert compile_gate.problems(report) == []
    report.variants = [_variant(), _variant(spill_stores=8, spill_loads=4), _variant(shared=200 * 1024)]
    report.failures = ["case: CompilationError: boom"]
    report.never_compiled = ["m._other_kernel"]
    found = compile_gate.problems(report)
    assert len(found) == 4
    assert any("spills" in line and "8 B spill stores" in line for line in found)
    assert any("shared memory" in line for line in found)
    assert any("never compiled" in line for line in found)
    assert compile_gate.summarize(report)[0]["max_spill"] == 12


def test_every_kernel_is_launched_by_some_gate_case():
    """The quick case list already reaches every launcher's kernels; the gate itself fails on
    any kernel no case compiled, so a new kernel without a case cannot slip through."""
    names = {name.split(".")[1] for name in compile_gate.jit_kernels()}
    import compile_cases

    labels = " ".join(label for label, _ in compile_cases.gate_cases(quick=True))
    for op in (
        "glimpse_scores",
        "attention_column_scores",
        "select_tokens",
        "keep_index",
        "gather_tokens",
        "compact_kv",
        "prune_kv",
        "glimpse_prune",
        "soft_mask_attention",
    ):
        assert op in labels, op
    assert len(names) >= 14


def test_time_box_kills_the_whole_process_group(tmp_path):
    command = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)",
    ]
    start = time.monotonic()
    status, seconds, _ = gpu_check.run_boxed(command, tmp_path / "log", timeout_s=1.5)
    assert status == "timed out"
    assert time.monotonic() - start < 20


def test_stage_without_enough_budget_is_skipped_with_a_reason(tmp_path):
    args = gpu_check.argparse.Namespace(dry_run=False, only=None, scale=1.0)
    stage = gpu_check.Stage("kernels", 100, 30, "x")
    result = gpu_check.run_stage(stage, args, tmp_path, deadline=time.monotonic() + 10)
    assert result.status == "skipped" and "budget" in result.detail


@pytest.mark.parametrize("stage", [s.name for s in gpu_check.STAGES])
def test_every_stage_has_commands_for_both_modes(stage, tmp_path):
    for dry in (True, False):
        args = gpu_check.argparse.Namespace(dry_run=dry, only=None, scale=1.0)
        commands = gpu_check.stage_commands(stage, args, tmp_path)
        assert commands and all(isinstance(c, list) and c for _, c in commands)
