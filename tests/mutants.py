"""Plant plausible bugs in a scratch copy and record which tests catch each: evidence that the
tests bite (tests/MUTANTS.md is this script's output, committed).

    python tests/mutants.py                       # every mutant, writes tests/MUTANTS.md
    python tests/mutants.py --only select_ties    # one mutant, prints its row

Each mutant replaces one snippet of one kernel file (C++, Triton) or bench script. The scratch
copy (the checkout's tracked and untracked files) is built once with its own extension; a C++
mutant rebuilds the files it touches (ninja, in place), a Triton mutant runs its tests under
TRITON_INTERPRET=1. A mutant is *caught* when at least one of its tests fails; the failing
test ids are listed. Not run in CI: the C++ rebuilds alone take minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    op: str
    what: str  # the bug, as a reviewer would describe it
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments (files or node ids)
    interpreter: bool = False  # run the tests under TRITON_INTERPRET=1 with -m triton_interpreter


MUTANTS = (
    Mutant(
        "soft_native_bf16_dq",
        "soft_mask_attention",
        "native backward: dq 3% too large in bf16 only",
        "csrc/cpu/soft_mask_attention_cpu.cpp",
        "return {dq_total.to(q.scalar_type()),",
        "return {(q.scalar_type() == at::kBFloat16 ? dq_total * 1.03 : dq_total).to(q.scalar_type()),",
        ("tests/ops/test_soft_mask_attention.py",),
    ),
    Mutant(
        "soft_native_dw",
        "soft_mask_attention",
        "native backward: dw 1% too large",
        "csrc/cpu/soft_mask_attention_cpu.cpp",
        "dw.sum(1).to(key_weight.scalar_type())",
        "(dw.sum(1) * 1.01).to(key_weight.scalar_type())",
        ("tests/ops/test_soft_mask_attention.py",),
    ),
    Mutant(
        "soft_triton_dk",
        "soft_mask_attention",
        "Triton backward: dk 2% too large",
        "triton_kernels/soft_mask_attention.py",
        "(dk * scale).to(dk_ptr.dtype.element_ty)",
        "(dk * scale * 1.02).to(dk_ptr.dtype.element_ty)",
        ("tests/ops/test_soft_mask_attention.py",),
        interpreter=True,
    ),
    Mutant(
        "scores_native_small",
        "glimpse_scores",
        "native: probabilities below 1e-4 flushed to 0",
        "csrc/cpu/glimpse_scores_cpu.cpp",
        "if (normalize == 1) return at::softmax(out, -1).masked_fill_(empty_row, 0.f);",
        "if (normalize == 1) { auto p = at::softmax(out, -1).masked_fill_(empty_row, 0.f); "
        "return p.masked_fill_(p < 1e-4, 0.f); }",
        ("tests/ops/test_glimpse_scores.py", "tests/ops/test_glimpse_prune.py"),
    ),
    Mutant(
        "scores_triton_small",
        "glimpse_scores",
        "Triton: probabilities below 1e-4 flushed to 0",
        "triton_kernels/glimpse_scores.py",
        "y = tl.exp(x - lse) if MODE == 1 else x - lse",
        "y = tl.where(tl.exp(x - lse) < 1e-4, 0.0, tl.exp(x - lse)) if MODE == 1 else x - lse",
        ("tests/ops/test_glimpse_scores.py", "tests/ops/test_glimpse_prune.py"),
        interpreter=True,
    ),
    Mutant(
        "prune_native_average",
        "glimpse_prune",
        "native: head average divides by one row too many (same ranking, scores 1/(HG+1) off)",
        "csrc/cpu/glimpse_prune_cpu.cpp",
        "s_ptr[i] = total / static_cast<float>(rows);",
        "s_ptr[i] = total / static_cast<float>(rows + 1);",
        ("tests/ops/test_glimpse_prune.py",),
    ),
    Mutant(
        "prune_triton_layer",
        "glimpse_prune",
        "Triton: scores from the first layer's keys instead of keys[score_layer]",
        "triton_kernels/glimpse_prune.py",
        "glimpse_scores_triton(q, keys[score_layer], key_mask",
        "glimpse_scores_triton(q, keys[0], key_mask",
        ("tests/ops/test_glimpse_prune.py",),
        interpreter=True,
    ),
    Mutant(
        "select_native_ties",
        "select_tokens",
        "native: equal scores keep the higher index first",
        "csrc/cpu/select_tokens_cpu.cpp",
        "    return a < b;\n",
        "    return a > b;\n",
        ("tests/ops/test_select_tokens.py", "tests/ops/test_prune_kv.py"),
    ),
    Mutant(
        "select_native_order",
        "select_tokens",
        "native: min_keep applied before the cap (a cap below min_keep wins)",
        "csrc/cpu/select_tokens_cpu.cpp",
        "  int64_t n_keep = cap > 0 ? std::min(n_above, cap) : n_above;\n"
        "  n_keep = std::max(n_keep, std::min(min_keep, n_candidates));",
        "  int64_t n_keep = std::max(n_above, std::min(min_keep, n_candidates));\n"
        "  if (cap > 0) n_keep = std::min(n_keep, cap);",
        ("tests/ops/test_select_tokens.py", "tests/ops/test_prune_kv.py"),
    ),
    Mutant(
        "select_triton_negzero",
        "select_tokens",
        "Triton: -0.0 ranks below 0.0 instead of tying with it",
        "triton_kernels/select_tokens.py",
        "    x = tl.where(x == 0.0, 0.0, x)\n",
        "",
        ("tests/ops/test_select_tokens.py",),
        interpreter=True,
    ),
    Mutant(
        "select_triton_nan",
        "select_tokens",
        "Triton: NaN ranks first instead of last",
        "triton_kernels/select_tokens.py",
        "return tl.where(x != x, 0, key)",
        "return tl.where(x != x, 0xFFFFFFFF, key)",
        ("tests/ops/test_select_tokens.py",),
        interpreter=True,
    ),
    Mutant(
        "keep_index_triton_pad",
        "keep_index",
        "Triton: right padding leaves the first pad slot unwritten",
        "triton_kernels/keep_index.py",
        "is_pad = (slots < offset) if LEFT else (slots >= length)",
        "is_pad = (slots < offset) if LEFT else (slots > length)",
        ("tests/ops/test_keep_index.py",),
        interpreter=True,
    ),
    Mutant(
        "compact_native_pad",
        "compact_kv",
        "native: pad slots (index -1) copy the first row instead of zeros",
        "csrc/cpu/compact_kv_cpu.cpp",
        "const char* row = row_idx[i] < 0 ? nullptr : base + row_idx[i] * seq_stride;",
        "const char* row = row_idx[i] < 0 ? base : base + row_idx[i] * seq_stride;",
        ("tests/ops/test_compact_kv.py", "tests/ops/test_prune_kv.py"),
    ),
    Mutant(
        "columns_native_small",
        "attention_column_scores",
        "native: probabilities below 1e-4 left out of the column sums",
        "csrc/cpu/attention_column_scores_cpu.cpp",
        "for (int64_t j = 0; j < nk; ++j) col[j] += row[j];",
        "for (int64_t j = 0; j < nk; ++j) col[j] += row[j] < 1e-4f ? 0.f : row[j];",
        ("tests/ops/test_attention_column_scores.py",),
    ),
    Mutant(
        "e2e_gate_values",
        "bench e2e gate",
        "bench/e2e.py: the eager pipeline's compacted values reversed (same kept positions)",
        "bench/e2e.py",
        "new_keys, new_values, index = peers.eager_compact(keys, values, keep)",
        "new_keys, new_values, index = peers.eager_compact(keys, values, keep)\n"
        "        new_values = [v.flip(2) for v in new_values]",
        ("tests/bench/test_bench_e2e.py::test_e2e_smoke_run_reports_every_provider",),
    ),
)


def _copy_tree(scratch: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = scratch / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _build(scratch: Path, env: dict) -> None:
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=scratch, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"mutants: the build failed in {scratch}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _env(scratch: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}


def _run_tests(scratch: Path, mutant: Mutant, env: dict) -> tuple[list[str], str]:
    command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "--hypothesis-profile", "mutants"]
    if mutant.interpreter:
        env = {**env, "TRITON_INTERPRET": "1"}
        command += ["-m", "triton_interpreter"]
    command += list(mutant.tests)
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=3600)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", done.stdout, flags=re.M)))
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    return failed, summary


def _check_imports(scratch: Path, env: dict) -> None:
    code = "import glimpse_ops, glimpse_ops._C; print(glimpse_ops.__file__, glimpse_ops._C.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=env, capture_output=True, text=True)
    paths = done.stdout.split()
    if done.returncode != 0 or not paths or not all(p.startswith(str(scratch)) for p in paths):
        raise SystemExit(f"mutants: the scratch copy does not import its own glimpse_ops: {done.stdout} {done.stderr}")


def _tests_at(scratch: Path, revision: str) -> None:
    """Replace the scratch copy's tests/ with those of ``revision`` (to show what an older suite
    let through)."""
    shutil.rmtree(scratch / "tests")
    archive = subprocess.run(["git", "archive", revision, "tests"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x"], cwd=scratch, input=archive, check=True)
    shutil.copy2(REPO / "tests" / "conftest.py", scratch / "tests" / "conftest.py")  # the no-shrink profile


def run(mutants: list[Mutant], scratch: Path, tests_at: str | None = None) -> list[dict]:
    if scratch.exists():
        shutil.rmtree(scratch)
    _copy_tree(scratch)
    if tests_at:
        _tests_at(scratch, tests_at)
    env = _env(scratch)
    print(f"mutants: building the scratch copy in {scratch}", flush=True)
    _build(scratch, env)
    _check_imports(scratch, env)
    rows = []
    for mutant in mutants:
        path = scratch / mutant.file
        original = path.read_text()
        if original.count(mutant.old) != 1:
            raise SystemExit(f"mutants: {mutant.name}: the snippet to replace is not in {mutant.file} exactly once")
        start = time.monotonic()
        path.write_text(original.replace(mutant.old, mutant.new))
        try:
            if mutant.file.endswith(".cpp"):
                _build(scratch, env)
            failed, summary = _run_tests(scratch, mutant, env)
        finally:
            path.write_text(original)
            if mutant.file.endswith(".cpp"):
                _build(scratch, env)
        row = {"mutant": mutant, "failed": failed, "summary": summary, "seconds": time.monotonic() - start}
        rows.append(row)
        print(f"  {mutant.name}: {'caught by ' + str(len(failed)) if failed else 'NOT CAUGHT'} ({summary})", flush=True)
    return rows


def markdown(rows: list[dict], before: list[dict] | None = None, revision: str | None = None) -> str:
    """The table of ``rows``; with ``before`` (the same mutants against the tests at
    ``revision``) a column says what that older suite caught."""
    lines = [
        "# Planted bugs and the tests that catch them",
        "",
        f"Written by `python tests/mutants.py{f' --compare-at {revision}' if revision else ''}` (a scratch copy per",
        "run; each row is one bug planted alone, its tests run, the bug removed). Triton rows ran under",
        "`TRITON_INTERPRET=1` (fp32/fp16: the interpreter's bf16 dot is unreliable, so bf16 Triton kernels",
        "are checked on a GPU only)."
        + (
            f" The column `at {revision}` runs the tests of that commit against the same bugs (the code under"
            " test, benches included, is the current one)."
            if revision
            else ""
        ),
        "",
        "| op | bug | file | caught | " + (f"at {revision} | " if before else "") + "failing tests |",
        "|---|---|---|---|" + ("---|" if before else "") + "---|",
    ]
    for index, row in enumerate(rows):
        m = row["mutant"]
        tests = "<br>".join(f"`{t.split('::', 1)[-1]}`" for t in row["failed"][:6])
        more = f"<br>... {len(row['failed']) - 6} more" if len(row["failed"]) > 6 else ""
        caught = f"yes ({len(row['failed'])})" if row["failed"] else "**no**"
        old = ""
        if before:
            failed = before[index]["failed"]
            old = (f"yes ({len(failed)})" if failed else "**no**") + " | "
        lines.append(f"| {m.op} | {m.what} | `{m.file}` | {caught} | {old}{tests}{more} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutant names (default all)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/glimpse-mutants"))
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "MUTANTS.md")
    parser.add_argument("--tests-at", help="run the tests of this git revision instead (prints, writes nothing)")
    parser.add_argument("--compare-at", help="also run the tests of this git revision; the table gets a column")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if not chosen:
        parser.error(f"no mutant named {args.only}; choose from {', '.join(m.name for m in MUTANTS)}")
    rows = run(chosen, args.scratch, args.tests_at)
    before = None
    if args.compare_at:
        print(f"mutants: the same bugs against the tests at {args.compare_at}", flush=True)
        before = run(chosen, args.scratch.with_name(args.scratch.name + "-before"), args.compare_at)
    text = markdown(rows, before, args.compare_at)
    if args.only or args.tests_at:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    if any(not row["failed"] for row in rows):
        sys.exit("mutants: some planted bugs were not caught (rows marked no)")


if __name__ == "__main__":
    main()
