"""Static compile gate: every Triton kernel compiled for Hopper (sm_90a) and Ampere (sm_80)
on a machine without a GPU, failing on compile errors, register spills and shared memory
above the SM's limit.

    python bench/compile_gate.py                       # sm_90a and sm_80, the full case list
    python bench/compile_gate.py --arch 90 --quick     # one arch, the 7B geometry only
    python bench/compile_gate.py --json out.json       # also write the table as JSON

How: a stub Triton driver reports ``GPUTarget("cuda", arch, 32)`` and launches nothing, so
each launch of our launchers (on CPU tensors: nothing is read or written) compiles through
ptxas exactly as it would on that GPU, with the block sizes and warps the launchers pick for
that geometry. ``cuobjdump -res-usage`` (shipped with Triton) reads registers, spill stack
and local memory from each cubin; the compiled metadata gives shared memory. Each arch runs
in its own subprocess (Triton caches compiled kernels per process and target).

The cases are the geometries of real models (bench/compile_cases.py): Qwen2.5-VL-3B/7B/72B,
LLaVA-1.5-7B, a head-dim-64 and a head-dim-80 model, 16k visual + 256 text tokens, G = 1 and
8 glimpse rows, fp16 and bf16 (fp32 on one geometry), soft-mask attention causal and not,
forward and backward, plus size sweeps that make the launchers pick every block size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHES = {90: "sm_90a", 80: "sm_80"}
# Shared memory: the most one block may use (opt-in), and what one SM holds in all.
SMEM_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32


@dataclass
class Variant:
    """One compiled specialization of a kernel."""

    kernel: str
    case: str
    num_warps: int
    num_stages: int
    constants: str
    registers: int
    spill_stores: int  # bytes per thread, from ptxas -v
    spill_loads: int
    stack: int  # stack frame per thread, bytes (spills and local arrays)
    shared: int  # bytes per block
    occupancy: float  # resident warps / 64 that registers and shared memory allow


@dataclass
class ArchReport:
    arch: int
    name: str
    triton: str
    seconds: float = 0.0
    variants: list[Variant] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    never_compiled: list[str] = field(default_factory=list)
    op_seconds: dict[str, float] = field(default_factory=dict)  # compile time by launcher


def occupancy(registers: int, num_warps: int, shared: int, arch: int) -> float:
    """Fraction of the SM's 64 warp slots that can be resident, given registers per thread
    (allocated per warp in units of 256), warps per block and shared memory per block."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(REGS_PER_SM // per_warp // num_warps, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)
    if shared > 0:
        blocks = min(blocks, SMEM_PER_SM[arch] // (shared + 1024))
    return blocks * num_warps / MAX_WARPS_PER_SM


# ------------------------------------------------------------------------------------------
# the worker: one arch, in its own process
# ------------------------------------------------------------------------------------------


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} of the one function in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    for line in text.splitlines():
        if "REG:" in line:
            fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
            return {key: int(fields[key]) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    raise RuntimeError(f"cuobjdump -res-usage printed no function:\n{text}")


_PTXAS_LOGS: dict[str, dict[str, int]] = {}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """{'registers', 'stack', 'spill_stores', 'spill_loads'} from a ``ptxas -v`` log of one kernel."""
    found = {}
    stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if stack:
        found.update(stack=int(stack[1]), spill_stores=int(stack[2]), spill_loads=int(stack[3]))
    if regs:
        found["registers"] = int(regs[1])
    return found


def capture_ptxas_logs() -> None:
    """Keep each kernel's ``ptxas -v`` log (Triton prints it when asked), keyed by cubin."""
    import contextlib
    import hashlib
    import io

    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend

    knobs.nvidia.dump_ptxas_log = True
    make_cubin = CUDABackend.make_cubin

    def logged_make_cubin(self, src, metadata, opt, capability):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cubin = make_cubin(self, src, metadata, opt, capability)
        _PTXAS_LOGS[hashlib.sha256(cubin).hexdigest()] = parse_ptxas_log(printed.getvalue())
        return cubin

    CUDABackend.make_cubin = logged_make_cubin


def ptxas_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and spills of one cubin: ptxas' own figures when it was compiled in
    this process, cuobjdump's otherwise (cuobjdump cannot tell spills from local arrays)."""
    import hashlib

    usage = resource_usage(cubin)
    found = {
        "registers": usage["REG"],
        "stack": usage["STACK"],
        "spill_stores": usage["STACK"] + usage["LOCAL"],
        "spill_loads": usage["STACK"] + usage["LOCAL"],
    }
    found.update(_PTXAS_LOGS.get(hashlib.sha256(cubin).hexdigest(), {}))
    return found


def install_stub_driver(arch: int, torch_device) -> None:
    """Make Triton compile for ``arch`` and launch nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class _Utils:
        def get_device_properties(self, device):
            return {
                "max_shared_mem": SMEM_PER_BLOCK[arch],
                "multiprocessor_count": 132,
                "max_num_regs": REGS_PER_SM,
                "warpSize": 32,
                "sm_clock_rate": 1,
                "mem_clock_rate": 1,
                "mem_bus_width": 1,
            }

        def load_binary(self, name, kernel, shared, device):
            return None, None, 0, 0, 1024

        def unload_module(self, module):
            pass

    class StubDriver:
        def __init__(self):
            self.utils = _Utils()
            self.launcher_cls = lambda src, metadata: lambda *args, **kwargs: None

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch_device

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("the stub driver builds no launcher")

        def get_benchmarker(self):
            raise RuntimeError("the static compile gate cannot time anything (no GPU)")

        def get_device_interface(self):
            raise RuntimeError("the static compile gate has no device")

    driver.set_active(StubDriver())


def jit_kernels() -> dict[str, object]:
    """name -> JITFunction of every ``*_kernel`` in glimpse_ops.triton_kernels (helpers that
    kernels inline are not launched and not listed)."""
    import importlib
    import pkgutil

    import glimpse_ops.triton_kernels as package
    from triton.runtime.jit import JITFunction

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found[f"{info.name}.{name}"] = obj
    return found


def compiled(fn) -> list:
    """The CompiledKernels in a JITFunction's in-process cache (device 0)."""
    caches = getattr(fn, "device_caches", {})
    return list(caches[0][0].values()) if 0 in caches else []


def _constants(kernel) -> str:
    src = getattr(kernel, "src", None)
    constants = getattr(src, "constants", None) or {}
    signature = getattr(src, "signature", None) or {}
    names = list(signature)
    parts = []
    for path, value in sorted(constants.items(), key=lambda item: item[0]):
        index = path[0] if isinstance(path, tuple) else path
        name = names[index] if isinstance(index, int) and index < len(names) else str(path)
        if name.isupper():
            parts.append(f"{name}={getattr(value, 'name', value)}")
    return " ".join(parts)


def run_worker(arch: int, quick: bool, only: str | None = None) -> ArchReport:
    from glimpse_ops._backend import triton_interpreting

    if triton_interpreting():
        raise SystemExit("compile_gate: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    import torch
    import triton

    install_stub_driver(arch, torch.device("cpu"))
    capture_ptxas_logs()
    sys.path.insert(0, str(HERE))
    from compile_cases import gate_cases

    report = ArchReport(arch=arch, name=ARCHES[arch], triton=triton.__version__)
    kernels = jit_kernels()
    seen: set[int] = set()
    start = time.perf_counter()
    cases = [case for case in gate_cases(quick) if only is None or re.search(only, case[0])]
    for number, (label, launch) in enumerate(cases, 1):
        began = time.perf_counter()
        try:
            launch()
        except Exception as exc:  # a compile error, an out-of-resources error: record, go on
            report.failures.append(f"{label}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
        for name, fn in kernels.items():
            for kernel in compiled(fn):
                if id(kernel) in seen:
                    continue
                seen.add(id(kernel))
                usage = ptxas_usage(kernel.asm["cubin"])
                meta = kernel.metadata
                report.variants.append(
                    Variant(
                        kernel=name,
                        case=label,
                        num_warps=meta.num_warps,
                        num_stages=meta.num_stages,
                        constants=_constants(kernel),
                        shared=meta.shared,
                        occupancy=occupancy(usage["registers"], meta.num_warps, meta.shared, arch),
                        **usage,
                    )
                )
        op = label.split(" ")[0]
        report.op_seconds[op] = round(report.op_seconds.get(op, 0.0) + time.perf_counter() - began, 1)
        if number % 20 == 0 or number == len(cases):
            print(
                f"  {ARCHES[arch]}: {number}/{len(cases)} cases, {len(report.variants)} variants, "
                f"{time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    if only is None:  # a filtered run need not reach every kernel
        report.never_compiled = sorted(name for name, fn in kernels.items() if not compiled(fn))
    report.seconds = time.perf_counter() - start
    return report


# ------------------------------------------------------------------------------------------
# the driver: one subprocess per arch, the table, the verdict
# ------------------------------------------------------------------------------------------


def problems(report: ArchReport) -> list[str]:
    found = [f"{report.name}: {failure}" for failure in report.failures]
    found += [f"{report.name}: {name} was never compiled by any case" for name in report.never_compiled]
    for v in report.variants:
        if v.spill_stores or v.spill_loads:
            found.append(
                f"{report.name}: {v.kernel} spills ({v.registers} registers, {v.spill_stores} B spill stores, "
                f"{v.spill_loads} B spill loads) in {v.case} [{v.constants} warps={v.num_warps} "
                f"stages={v.num_stages}]"
            )
        if v.shared > SMEM_PER_BLOCK[report.arch]:
            found.append(
                f"{report.name}: {v.kernel} uses {v.shared} B shared memory (limit "
                f"{SMEM_PER_BLOCK[report.arch]}) in {v.case}"
            )
    return found


def summarize(report: ArchReport) -> list[dict]:
    """One row per kernel: variants, max registers / spill stack / shared, min occupancy."""
    rows = []
    for kernel in sorted({v.kernel for v in report.variants}):
        mine = [v for v in report.variants if v.kernel == kernel]
        worst = max(mine, key=lambda v: (v.registers, -v.occupancy))
        rows.append(
            {
                "kernel": kernel,
                "variants": len(mine),
                "max_registers": max(v.registers for v in mine),
                "max_spill": max(v.spill_stores + v.spill_loads for v in mine),
                "max_stack": max(v.stack for v in mine),
                "max_shared": max(v.shared for v in mine),
                "min_occupancy": min(v.occupancy for v in mine),
                "worst": f"{worst.constants} warps={worst.num_warps}",
            }
        )
    return rows


def print_table(report: ArchReport) -> None:
    print(f"\n{report.name} (Triton {report.triton}, {len(report.variants)} variants, {report.seconds:.0f} s)")
    print(
        f"  {'kernel':<44} {'variants':>8} {'max regs':>8} {'max spill':>9} {'max stack':>9} {'max smem':>9} "
        f"{'min occ':>7}"
    )
    for row in summarize(report):
        print(
            f"  {row['kernel']:<44} {row['variants']:>8} {row['max_registers']:>8} {row['max_spill']:>8}B "
            f"{row['max_stack']:>8}B {row['max_shared'] / 1024:>7.1f}K {row['min_occupancy']:>7.0%}"
        )


def run_arch_subprocess(arch: int, quick: bool, only: str | None) -> ArchReport:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--arch", str(arch), "--json", str(out)]
        if quick:
            cmd.append("--quick")
        if only:
            cmd += ["--only", only]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")  # compile everything: ptxas logs come with it
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not out.exists():
            return ArchReport(
                arch=arch,
                name=ARCHES[arch],
                triton="?",
                failures=[f"the compile worker exited with status {proc.returncode}"],
            )
        data = json.loads(out.read_text())
        data["variants"] = [Variant(**v) for v in data["variants"]]
        return ArchReport(**data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        type=int,
        action="append",
        choices=sorted(ARCHES),
        help="compute capability x10 (repeatable; default 90 and 80)",
    )
    parser.add_argument("--quick", action="store_true", help="only the Qwen2.5-VL-7B geometry")
    parser.add_argument("--only", help="only the cases whose label matches this regex (for development)")
    parser.add_argument("--json", help="write the table and every variant here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    arches = args.arch or [90, 80]
    if args.worker:
        report = run_worker(arches[0], args.quick, args.only)
        Path(args.json).write_text(json.dumps(asdict(report)))
        return 0

    # The arches compile in parallel: each worker is one process, ptxas runs single-threaded.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(arches)) as pool:
        reports = list(pool.map(lambda arch: run_arch_subprocess(arch, args.quick, args.only), arches))
    found = []
    for report in reports:
        print_table(report)
        found += problems(report)
    if args.json:
        import triton

        payload = {
            "triton": triton.__version__,
            "python": platform.python_version(),
            "quick": args.quick,
            "limits": {
                ARCHES[a]: {"shared_per_block": SMEM_PER_BLOCK[a], "registers_per_sm": REGS_PER_SM} for a in arches
            },
            "variant_fields": list(Variant.__dataclass_fields__),
            "arches": {
                r.name: {
                    "seconds": round(r.seconds, 1),
                    "op_seconds": r.op_seconds,
                    "kernels": summarize(r),
                    "failures": r.failures,
                    "never_compiled": r.never_compiled,
                    "variants": [list(asdict(v).values()) for v in r.variants],
                }
                for r in reports
            },
            "problems": found,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        # One line per variant: arrays of plain values are folded onto a single line.
        text = re.sub(
            r"\[\n\s+([^\[\]{}]*?)\n\s*\]",
            lambda m: "[" + " ".join(line.strip() for line in m[1].splitlines()) + "]",
            json.dumps(payload, indent=1),
        )
        Path(args.json).write_text(text + "\n")
        print(f"\nwrote {args.json}")
    if found:
        print(f"\ncompile gate FAILED ({len(found)} problems):")
        for line in found[:60]:
            print("  " + line)
        if len(found) > 60:
            print(f"  ... and {len(found) - 60} more")
        return 1
    print("\ncompile gate passed: every kernel compiled, no spills, shared memory within the limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
