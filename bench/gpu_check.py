"""One command for a lent GPU: build, CUDA tests, compute-sanitizer, headline benchmarks, a
summary, all inside a wall-clock budget.

    python bench/gpu_check.py --out $OUT                    # on the GPU machine (default 8 min)
    python bench/gpu_check.py --out $OUT --budget-min 5     # a shorter slot
    python bench/gpu_check.py --dry-run --out /tmp/check    # CPU, tiny sizes, interpreter (CI)

Stages, in order, each in its own process with a time box (its cap, or what is left of the
budget, whichever is less; a stage that would not get its minimum is skipped and says so):

  build       pip install --no-build-isolation --no-deps -e .  (nothing is downloaded)
  env         python -m glimpse_ops.env
  tests       pytest -m cuda: every op x Triton/native on CUDA against the reference at odd
              sizes and every dtype, CUDA-graph capture and replay, torch.compile (Inductor)
  survey      tests/error_survey.py --device cuda: the measured error of every backend and dtype,
              which calibrates the provisional CUDA rows of the tests' tolerance tables
  sanitizer   compute-sanitizer memcheck and racecheck over bench/sanitizer_driver.py (one
              small call of every op); reported as unavailable where the tool cannot start
  kernels     bench/run.py: the kernel cases at 4k and 16k visual tokens, B = 1 and 8, 7.4% kept
  attention   bench/run.py: soft-mask attention fwd and fwd+bwd vs SDPA and FlexAttention, 4k/16k
  e2e         bench/run.py --e2e at 16k visual tokens
  hf_flash    bench/hf_flash_check.py (tiny models, a left-padded batch of 2 pruned under
              FlashAttention against sdpa, bf16), then bench/run.py --e2e --hf at 4k: the HF
              Qwen2.5-VL bench under sdpa and under flash_attention_2 (flash_attention_3 where only
              FA3 is installed); unavailable, with the reason, where no flash-attn package is
              importable; the dry run checks against tests/hf/plain_flash.py, the CPU stand-in
  summary     summary.md: per stage its status and time; per benchmark row the time, the ratio to
              each peer, % of the measured copy bandwidth and of the measured bf16 matrix rate

Everything goes to --out: one log per stage, the benchmark JSONs, summary.md and check.json.
The exit status is 0 only when every stage that ran passed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Stage:
    name: str
    cap_s: float  # the most this stage may take
    min_s: float  # skip it when less than this is left
    what: str


@dataclass
class StageResult:
    name: str
    status: str  # passed | failed | timed out | skipped | unavailable
    seconds: float = 0.0
    detail: str = ""
    command: list[str] = field(default_factory=list)


STAGES = (
    Stage("build", 240, 20, "pip install --no-build-isolation --no-deps -e ."),
    Stage("env", 30, 5, "python -m glimpse_ops.env"),
    Stage("tests", 180, 30, "pytest -m cuda (ops x backends x dtypes on CUDA, graph replay, Inductor)"),
    Stage("survey", 60, 20, "tests/error_survey.py: each backend's error on CUDA (calibrates the GPU tolerances)"),
    Stage("sanitizer", 120, 30, "compute-sanitizer memcheck + racecheck over bench/sanitizer_driver.py"),
    Stage("kernels", 180, 30, "bench/run.py kernel cases, 4k/16k, B=1/8, 7.4% kept"),
    Stage("attention", 90, 30, "bench/run.py soft-mask attention vs SDPA/Flex, 4k/16k, hd 128"),
    Stage("e2e", 90, 30, "bench/run.py --e2e at 16k"),
    Stage("hf_flash", 150, 40, "bench/run.py --e2e --hf at 4k under sdpa and under FlashAttention"),
)


def run_boxed(command: list[str], log: Path, timeout_s: float, env: dict | None = None) -> tuple[str, float, str]:
    """Run ``command`` in its own process group, output to ``log``; kill the whole group at
    the time box. -> (status, seconds, last lines of the log)."""
    start = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout_s)
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timed out"
    seconds = time.monotonic() - start
    tail = log.read_text(errors="replace").splitlines()[-12:]
    return status, seconds, "\n".join(tail)


def flash_implementation() -> str | None:
    """The FlashAttention implementation transformers can load here without a download:
    flash_attention_2 (the ``flash_attn`` package), flash_attention_3 (``flash_attn_interface``)
    or None."""
    # flash_attn.bert_padding: what transformers imports for FA2, absent from a flash-attn-4-only install
    for module, name in (("flash_attn", "flash_attention_2"), ("flash_attn_interface", "flash_attention_3")):
        try:
            found = importlib.util.find_spec(module) is not None and (
                module != "flash_attn" or importlib.util.find_spec("flash_attn.bert_padding") is not None
            )
        except (ImportError, ValueError):  # a package that fails to import
            found = False
        if found:
            return name
    return None


def sanitizer_commands(dry_run: bool, out: Path) -> list[tuple[str, list[str]]]:
    driver = [PY, "bench/sanitizer_driver.py"] + (["--device", "cpu", "--seq", "67"] if dry_run else [])
    if dry_run:
        return [("driver (no sanitizer: dry run)", driver)]
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    common = [tool, "--error-exitcode", "3", "--target-processes", "all"]
    return [
        ("warm-up (compiles the kernels once, outside the sanitizer)", driver),
        ("memcheck", common + ["--tool", "memcheck", "--leak-check", "no"] + driver),
        ("racecheck", common + ["--tool", "racecheck"] + driver),
    ]


def sanitizer_usable(timeout_s: float) -> str | None:
    """None when compute-sanitizer can instrument a CUDA program here, else why not (it
    refuses the device under one of the lent machines' runtimes)."""
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        return "compute-sanitizer is not installed"
    probe = [tool, "--error-exitcode", "3", PY, "-c", "import torch; torch.ones(4, device='cuda').sum().item()"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=timeout_s, start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"a trivial program under compute-sanitizer did not finish in {timeout_s:.0f} s"
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        return "compute-sanitizer cannot run here: " + " | ".join(lines[:3])[:300]
    return None


def stage_commands(stage: str, args: argparse.Namespace, out: Path) -> list[tuple[str, list[str]]]:
    dry = args.dry_run
    bench = [PY, "bench/run.py", "--budget", "0.05" if dry else "0.3"] + (["--device", "cpu"] if dry else [])
    if stage == "build":
        return [("pip", [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."])]
    if stage == "env":
        return [("env", [PY, "-m", "glimpse_ops.env"])]
    if stage == "tests":
        if dry:  # the CUDA tests skip on CPU; one interpreter file shows the plumbing works
            return [
                (
                    "pytest",
                    [
                        PY,
                        "-m",
                        "pytest",
                        "-q",
                        "-p",
                        "no:cacheprovider",
                        "tests/ops/test_cuda.py",
                        "tests/ops/test_keep_index.py",
                        "-m",
                        "cuda or triton_interpreter",
                    ],
                )
            ]
        parallel = ["-n", "4"] if importlib.util.find_spec("xdist") else []  # Triton's disk cache is shared
        return [
            (
                "pytest",
                [
                    PY,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-m",
                    "cuda",
                    "--maxfail",
                    "20",
                    *parallel,
                    "--junitxml",
                    str(out / "tests.xml"),
                    "tests",
                ],
            )
        ]
    if stage == "survey":
        scope = ["--device", "cpu", "--ops", "glimpse_prune", "--seeds", "1"] if dry else ["--device", "cuda"]
        return [("error_survey.py", [PY, "tests/error_survey.py", *scope, "--json", str(out / "error-survey.json")])]
    if stage == "sanitizer":
        return sanitizer_commands(dry, out)
    if stage == "kernels":
        # dry: the 1k cases of the full grid (the CPU default grid has none; an empty selection fails)
        sizes = ["--full", "--visual", "1024"] if dry else ["--visual", "4096", "16384"]
        providers = ["--providers", "eager", "reference", "native", "copy"] if dry else []  # no compile in CI
        return [
            (
                "run.py",
                bench
                + ["--ops", "glimpse_scores", "select_index", "compact_kv", "prune_kv", "glimpse_prune"]
                + sizes
                + ["--batch", "1"]
                + ([] if dry else ["8"])
                + ["--keep", "0.074"]
                + providers
                + ["--json", str(out / "kernels.json")],
            )
        ]
    if stage == "attention":
        sizes = ["--smoke"] if dry else ["--visual", "4096", "16384", "--batch", "1"]  # CPU --smoke: N = 512
        return [("run.py", bench + ["--ops", "soft_mask_attention"] + sizes + ["--json", str(out / "attention.json")])]
    if stage == "e2e":
        sizes = ["--smoke"] if dry else ["--visual", "16384"]
        return [("run.py --e2e", bench + ["--e2e"] + sizes + ["--json", str(out / "e2e.json")])]
    if stage == "hf_flash":
        check = [PY, "bench/hf_flash_check.py", "--json", str(out / "hf-flash-check.json")]
        if dry:
            return [("hf_flash_check.py (stand-in)", check + ["--stand-in", "--device", "cpu", "--dtype", "fp32"])]
        hf = bench + ["--e2e", "--hf", "--smoke"]
        flash = flash_implementation() or "flash_attention_2"
        return [
            (f"hf_flash_check.py ({flash})", check + ["--implementation", flash]),
            ("run.py --e2e --hf (sdpa)", hf + ["--json", str(out / "hf-sdpa.json")]),
            (
                f"run.py --e2e --hf ({flash})",
                hf + ["--attn-implementation", flash, "--json", str(out / "hf-flash.json")],
            ),
        ]
    raise ValueError(stage)


def run_stage(stage: Stage, args: argparse.Namespace, out: Path, deadline: float) -> StageResult:
    left = deadline - time.monotonic()
    if args.only and stage.name not in args.only:
        return StageResult(stage.name, "skipped", detail="not selected (--only)")
    if args.dry_run and stage.name == "build":
        return StageResult(stage.name, "skipped", detail="dry run: the package is already installed")
    if left < stage.min_s:
        return StageResult(
            stage.name, "skipped", detail=f"budget: {left:.0f} s left, the stage needs at least {stage.min_s:.0f} s"
        )
    box = min(stage.cap_s * args.scale, left)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    if stage.name == "sanitizer" and not args.dry_run:
        why = sanitizer_usable(min(60.0, box / 3))
        if why is not None:
            return StageResult(stage.name, "unavailable", detail=why)
    if stage.name == "hf_flash" and not args.dry_run and flash_implementation() is None:
        return StageResult(
            stage.name,
            "unavailable",
            detail="no flash-attn package is importable here (flash_attn for FA2, flash_attn_interface for FA3): "
            "the HF bench under FlashAttention did not run",
        )
    result = StageResult(stage.name, "passed")
    start = time.monotonic()
    for step, (label, command) in enumerate(stage_commands(stage.name, args, out)):
        remaining = box - (time.monotonic() - start)
        if remaining < 5:
            result.status, result.detail = "timed out", f"no time left for {label}"
            break
        log = out / f"{stage.name}{'-' + str(step) if step else ''}.log"
        status, _, tail = run_boxed(command, log, remaining, env)
        result.command += command
        if status != "passed":
            result.status, result.detail = status, f"{label}: {status}; last lines of {log.name}:\n{tail}"
            break
        result.detail += f"{label}: ok. "
    result.seconds = time.monotonic() - start
    return result


# ------------------------------------------------------------------------------------------
# the summary
# ------------------------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def spread_text(row: dict) -> str:
    """The p20-p80 spread as a share of p50, '!' above 20% (as bench/timing.spread_text; this
    script stays importable without torch)."""
    if "p20" not in row or "p80" not in row or not row.get("p50"):
        return "-"
    share = (row["p80"] - row["p20"]) / row["p50"]
    return f"{100 * share:.0f}%{'!' if share > 0.2 else ''}"


def kernel_lines(data: dict) -> list[str]:
    copy = data["machine"].get("copy_gbs")
    lines = [
        f"Measured copy bandwidth: {copy:.0f} GB/s (read + write)." if copy else "",
        "",
        "| case | provider | p50 ms | p20-p80 / p50 | vs eager | vs reference+compile | GB/s | % copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for r in data["results"] if "tflops" not in r]
    compiled = {r["name"]: r["p50"] for r in rows if r["provider"] == "reference+compile" and "p50" in r}
    for r in rows:
        if "p50" not in r:
            lines.append(f"| {r['name']} | {r['provider']} | {r.get('error', 'skipped')[:80]} | | | | | |")
            continue
        vs_eager = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
        vs_compile = f"{compiled[r['name']] / r['p50']:.2f}x" if r["name"] in compiled else "-"
        lines.append(
            f"| {r['name']} | {r['provider']} | {r['p50']:.3f} | {spread_text(r)} | {vs_eager} | {vs_compile} | "
            f"{r.get('gbps', 0):.0f} | {r.get('pct_copy_bw', 0):.0f}% |"
        )
    return lines


def attention_lines(data: dict, matrix_tflops: float | None) -> list[str]:
    lines = [
        "",
        "| case | provider | p50 ms | p20-p80 / p50 | time / SDPA unmasked | TFLOP/s | % of bf16 matrix rate | "
        "peak extra MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if "tflops" not in r and "p50" in r:
            continue
        if "p50" not in r:
            lines.append(f"| {r['name']} | {r['provider']} | {r.get('error', 'skipped')[:80]} | | | | | |")
            continue
        rate = f"{100 * r['tflops'] / matrix_tflops:.0f}%" if matrix_tflops else "-"
        lines.append(
            f"| {r['name']} | {r['provider']} | {r['p50']:.3f} | {spread_text(r)} | "
            f"{r.get('time_vs_sdpa_unmasked', 0):.2f} | "
            f"{r['tflops']:.0f} | {rate} | {r.get('peak_extra_mib', 0):.0f} |"
        )
    return lines


def e2e_lines(data: dict) -> list[str]:
    lines = ["", "```"]
    for r in data["results"]:
        keep = {k: v for k, v in r.items() if k not in ("case",) and not isinstance(v, (list, dict))}
        lines.append(json.dumps(keep)[:400])
    return lines + ["```"]


def measure_ceilings(dry_run: bool) -> dict:
    """The copy bandwidth and bf16 matrix rate of this GPU, measured (METHOD.md: use these,
    not datasheet figures). Empty on CPU."""
    if dry_run:
        return {}
    code = (
        "import json, torch\n"
        "from triton.testing import do_bench\n"
        "x = torch.empty(2**30, dtype=torch.uint8, device='cuda'); y = torch.empty_like(x)\n"
        "copy_ms = do_bench(lambda: y.copy_(x), return_mode='median')\n"
        "a = torch.randn(8192, 8192, dtype=torch.bfloat16, device='cuda'); b = torch.randn_like(a)\n"
        "mm_ms = do_bench(lambda: a @ b, return_mode='median')\n"
        "print(json.dumps({'copy_gbs': 2 * 2**30 / copy_ms / 1e6, 'bf16_tflops': 2 * 8192**3 / mm_ms / 1e9,"
        " 'gpu': torch.cuda.get_device_name(0)}))\n"
    )
    try:
        done = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=90, cwd=ROOT)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as exc:  # the summary goes on without ceilings
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def write_summary(out: Path, results: list[StageResult], ceilings: dict, args: argparse.Namespace, wall: float) -> str:
    lines = [
        f"# glimpse-ops GPU check{' (dry run: CPU, interpreter, tiny sizes)' if args.dry_run else ''}",
        "",
        f"Budget {args.budget_min:.1f} min, used {wall / 60:.1f} min. Ceilings: "
        + (
            ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in ceilings.items())
            or "none measured"
        ),
        "",
        "| stage | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for r in results:
        detail = r.detail.strip().splitlines()[0][:160] if r.detail.strip() else ""
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {detail} |")
    for r in results:
        if r.status not in ("passed", "skipped") and "\n" in r.detail:
            lines += ["", f"## {r.name}: {r.status}", "```", r.detail, "```"]
    kernels, attention, e2e = _load(out / "kernels.json"), _load(out / "attention.json"), _load(out / "e2e.json")
    if kernels:
        lines += ["", "## Kernels", *kernel_lines(kernels)]
    if attention:
        lines += ["", "## Soft-mask attention", *attention_lines(attention, ceilings.get("bf16_tflops"))]
    if e2e:
        lines += ["", "## End to end", *e2e_lines(e2e)]
    check = _load(out / "hf-flash-check.json")
    if check:
        lines += ["", "## Pruning under FlashAttention against sdpa (bench/hf_flash_check.py)", *e2e_lines(check)]
    for name, title in (("hf-sdpa", "HF Qwen2.5-VL, sdpa"), ("hf-flash", "HF Qwen2.5-VL, FlashAttention")):
        data = _load(out / f"{name}.json")
        if data:
            lines += ["", f"## {title}", *e2e_lines(data)]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")), help="output folder (default $OUT)"
    )
    parser.add_argument("--budget-min", type=float, default=8.0, help="wall-clock budget for everything (default 8)")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes: checks the script itself"
    )
    parser.add_argument("--only", nargs="*", choices=[s.name for s in STAGES], help="run only these stages")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's cap (e.g. 0.5 for a rerun)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + 60 * args.budget_min - 20  # the ceilings and the summary need a few seconds
    results = []
    for stage in STAGES:
        result = run_stage(stage, args, args.out, deadline)
        results.append(result)
        print(
            f"[gpu_check] {stage.name:<10} {result.status:<18} {result.seconds:6.0f} s  "
            f"{result.detail.strip().splitlines()[0][:100] if result.detail.strip() else ''}",
            flush=True,
        )
        if stage.name == "build" and result.status.startswith(("failed", "timed")):
            print("[gpu_check] the build failed: nothing else can run", flush=True)
            break
    ceilings = measure_ceilings(args.dry_run) if time.monotonic() < deadline + 10 else {}
    summary = write_summary(args.out, results, ceilings, args, time.monotonic() - start)
    (args.out / "check.json").write_text(
        json.dumps({"stages": [asdict(r) for r in results], "ceilings": ceilings}, indent=1)
    )
    print(summary)
    bad = [r for r in results if r.status.startswith(("failed", "timed"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
