"""Timers and the machine description for bench/run.py (the progress bar is glimpse_ops.progress)."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from glimpse_ops.progress import Progress


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p20": at(0.2), "p50": at(0.5), "p80": at(0.8), "reps": len(ordered)}


SPREAD_FLAG = 0.2  # a row whose p20-p80 spread exceeds this share of its median is flagged


class RecompiledWhileTiming(RuntimeError):
    """A torch.compile graph or a Triton kernel was compiled inside a timed loop."""


class CompileWatch:
    """Counts compilations in this process: graphs torch.compile (dynamo) built and Triton
    kernel specializations compiled (Triton's ``jit_cache_hook`` runs before each; no
    launcher of ours uses ``triton.autotune``, so that is every Triton compile)."""

    triton_compiles = 0
    _installed = False

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        cls._installed = True
        try:
            from triton import knobs
        except ImportError:  # no Triton (or one without knobs): dynamo's count alone
            return
        previous = knobs.runtime.jit_cache_hook

        def hook(*args, **kwargs):
            cls.triton_compiles += 1
            return previous(*args, **kwargs) if previous is not None else False  # a true value skips the compile

        knobs.runtime.jit_cache_hook = hook

    @classmethod
    def count(cls) -> int:
        cls.install()
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]) + cls.triton_compiles


@contextmanager
def no_compiles(where: str) -> Iterator[None]:
    """Raise ``RecompiledWhileTiming`` if anything compiles inside the ``with`` block (``where``
    says what was being timed)."""
    before = CompileWatch.count()
    yield
    if CompileWatch.count() != before:
        raise RecompiledWhileTiming(f"{CompileWatch.count() - before} compilation(s) {where}")


def settle(fn: Callable[[], object], what: str = "the timed call", max_calls: int = 5) -> None:
    """Warm-up calls of ``fn`` until one compiles nothing (torch.compile, Triton), at most
    ``max_calls``; a call that still compiles after that is an error (a recompile per call)."""
    for _ in range(max_calls):
        before = CompileWatch.count()
        fn()
        if CompileWatch.count() == before:
            return
    raise RecompiledWhileTiming(f"{what} still compiles after {max_calls} warm-up calls (a recompile on every call?)")


def spread_share(stats: dict[str, float]) -> float:
    """(p80 - p20) / p50 of a ``quantiles`` result."""
    return (stats["p80"] - stats["p20"]) / stats["p50"] if stats["p50"] > 0 else 0.0


def spread_text(stats: dict[str, float]) -> str:
    """'±x%' of the p20-p80 spread around the median, with '!' when it exceeds SPREAD_FLAG."""
    share = spread_share(stats)
    return f"{100 * share:.0f}%{'!' if share > SPREAD_FLAG else ' '}"


def time_ms(fn: Callable[[], object], device: str, budget_s: float, cold: bool = False) -> dict[str, float]:
    """Median-of-reps timing in ms (p20, p50, p80 and reps): CUDA events on GPU, perf_counter
    on CPU. Untimed warm-up calls first until a call compiles nothing (compilation, Triton
    specializations, allocator warm-up); a compile inside the timed loop raises
    ``RecompiledWhileTiming``. ``cold``: the caches are evicted (untimed) before each call."""
    settle(fn)
    before = (lambda: evict_caches(device)) if cold else None
    with no_compiles("inside the timed loop"):
        return quantiles(_samples_ms(fn, device, budget_s, before))


# bytes written between timed calls of a cold measurement: well above the last-level cache
# (a 2-core EPYC here: 32 MiB of L3; H200: 50 MiB of L2)
EVICT_BYTES = {"cpu": 96 * 2**20, "cuda": 256 * 2**20}
_evict_buffers: dict[str, torch.Tensor] = {}


def evict_caches(device: str) -> None:
    """Read a buffer larger than the last-level cache, so the next call reads its inputs from
    memory as a real prefill does (its K/V were written layers earlier). Reading leaves clean
    lines: the timed call pays no write-back of the eviction's data."""
    buffer = _evict_buffers.get(device)
    if buffer is None:
        buffer = _evict_buffers[device] = torch.ones(EVICT_BYTES[device] // 8, dtype=torch.int64, device=device)
    buffer.sum()
    sync(device)


def _samples_ms(
    fn: Callable[[], object], device: str, budget_s: float, before: Callable[[], None] | None = None
) -> list[float]:
    """The timed calls of ``time_ms`` in ms: at least 5 (GPU) or 3 (CPU), then until ``budget_s``
    (``before`` runs untimed before each)."""
    samples: list[float] = []
    start_all = time.perf_counter()
    if device == "cuda":
        torch.cuda.synchronize()
        while len(samples) < 5 or (time.perf_counter() - start_all < budget_s and len(samples) < 200):
            if before is not None:
                before()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
    else:
        while len(samples) < 3 or (time.perf_counter() - start_all < budget_s and len(samples) < 50):
            if before is not None:
                before()
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def measure(fn: Callable[[], object], device: str, budget_s: float, cold: bool = False) -> dict[str, float]:
    """time_ms plus, on GPU, the peak memory allocated above what was live before."""
    if device != "cuda":
        return time_ms(fn, device, budget_s, cold)
    evict_caches(device)  # its buffer is allocated before the baseline
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stats = time_ms(fn, device, budget_s, cold)
    stats["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return stats


def default_device(requested: str | None = None) -> str:
    """``requested``, else cuda when a GPU is there, else cpu."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the profiler prints a start and a stop line there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_mib(fn: Callable[[], object]) -> float:
    """The peak of one call's CPU tensor memory above what was live before: the profiler's
    memory timeline (every allocation and free, in order; what existed before is left out)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with (
        _quiet_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof,
    ):
        fn()
    live = peak = 0
    for _, action, _, size in sorted(prof._memory_profile().timeline, key=lambda item: item[0]):
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return round(peak / 2**20, 1)


def peak_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory one call of ``fn`` allocates above what was live before (GPU: the caching
    allocator's peak; CPU: from the profiler's allocation records)."""
    if device != "cuda":
        return _cpu_peak_mib(fn)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def gate_failed(row: dict, note: str, progress: Progress) -> None:
    """Record a provider that failed the correctness gate (it gets no time)."""
    row["error"] = f"failed the correctness gate: {note}"
    progress.step(f"{row['name']} {row['provider']}: FAILED GATE")


# glimpse-ops' own providers across the benches: one of them running out of memory is a failure,
# a peer doing so (the dense-mask SDPA at 16k, the eager pipeline) is a measured outcome
OUR_PROVIDERS = frozenset({"native", "triton", "native_into", "triton_into", "glimpse_ops", "atp_soft_mask"})


def record_error(row: dict, exc: BaseException) -> None:
    """A provider that raised: the row says so ("out of memory: ..." for an OOM)."""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        row["error"] = f"out of memory: {exc}"[:300]
    else:
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]


def run_failures(rows: list[dict]) -> list[str]:
    """What makes a benchmark run fail (exit code 1): no row was measured at all (an empty
    selection), or a row with an error that is not a planned skip (``skipped: ...``) nor a
    peer running out of memory: a failed correctness gate, a compilation inside a timed loop,
    a provider that raised. One line per kind, with the first rows' names."""
    problems: dict[str, list[str]] = {}
    for row in rows:
        error = row.get("error", "")
        if not error or error.startswith("skipped"):
            continue
        if error.startswith("out of memory") and row.get("provider") not in OUR_PROVIDERS:
            continue
        kind = (
            "failed the correctness gate"
            if "failed the correctness gate" in error
            else "compiled inside a timed loop (their times mean nothing)"
            if "RecompiledWhileTiming" in error
            else "ran out of memory"
            if error.startswith("out of memory")
            else "raised"
        )
        problems.setdefault(kind, []).append(f"{row.get('name', '?')} {row.get('provider', '?')}: {error[:120]}")
    lines = [f"{len(names)} provider(s) {kind}: " + "; ".join(names[:3]) for kind, names in problems.items()]
    if all(row.get("error", "").startswith("skipped") for row in rows):
        lines.append("nothing was measured: the selection (--visual/--batch/--keep/--ops) matched no case that ran")
    return lines


def copy_bandwidth_gbs(device: str) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), the floor
    every memory-bound kernel is compared with."""
    n_bytes = (512 if device == "cuda" else 64) * 2**20
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    stats = time_ms(lambda: dst.copy_(src), device, 1.0)
    return 2 * n_bytes / (stats["p50"] * 1e-3) / 1e9


def device_slug(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_state() -> dict[str, object]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "sha": run("rev-parse", "HEAD") or "unknown",
        "dirty": bool(run("status", "--porcelain", "--untracked-files=no")),
    }


def machine_info(device: str) -> dict[str, object]:
    info: dict[str, object] = {
        "device": torch.cuda.get_device_name(0)
        if device == "cuda"
        else f"{platform.processor() or platform.machine()} CPU",
        "device_slug": device_slug(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{f"git_{k}": v for k, v in git_state().items()},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info
