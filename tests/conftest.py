"""Shared test machinery.

* Every test runs with deterministic algorithms and ``fill_uninitialized_memory``: each
  fresh allocation (``torch.empty`` in Python, ``at::empty`` in C++, Triton launchers'
  outputs) is poisoned with NaN (floats) or the max value (ints), so an output slot a kernel
  forgets to write fails the comparison.
* ``backend_device_params(op)`` yields one pytest param per (backend, device) that can run
  the op here, with ids like ``native-cpu`` and marks ``cuda`` / ``triton_interpreter``.
* ``TOLERANCES`` holds (atol, rtol) per dtype; ``assert_close`` prints a verbose diff.
"""

from __future__ import annotations

import os

import pytest
import torch

from glimpse_ops._backend import REGISTRY

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_params(op: str) -> list:
    params = []
    for device in DEVICES:
        for backend in REGISTRY[op].available(device):
            marks = []
            if device == "cuda":
                marks.append(pytest.mark.cuda)
            if backend == "triton" and device == "cpu":
                marks.append(pytest.mark.triton_interpreter)
            params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """The Triton interpreter's bf16 dot is unreliable: fp32/fp16 only there."""
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison_fresh_allocations():
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


@pytest.fixture
def seed(request):
    """A fresh seed per test run (printed on failure), never a fixed one."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


def assert_close(
    name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0
) -> None:
    """allclose with the dtype's tolerance (times ``scale``) and a diff that says where."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    atol, rtol = atol * scale, rtol * scale
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (torch.sign(actual) == torch.sign(expected))
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    diff = torch.where(both_inf | (torch.isnan(actual) & torch.isnan(expected)), 0.0, (actual - expected).abs())
    bad = nan_mismatch | (diff > atol + rtol * expected.abs().nan_to_num(0, 0, 0)) | diff.isnan()
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol:g}, rtol={rtol:g}); "
            f"max abs diff {diff.nan_to_num(float('inf')).max().item():.3g}; NaN mismatches {int(nan_mismatch.sum())}; "
            f"first at {where}: got {[actual[tuple(i)].item() for i in where]}, "
            f"expected {[expected[tuple(i)].item() for i in where]}"
        )


def assert_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality for indices and masks."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int((actual != expected).sum())} entries differ, first at {bad}")


def random_keep_scores(batch: int, seq: int, device: str) -> torch.Tensor:
    """Tie-free fp32 scores: a random permutation per row, scaled into (0, 1)."""
    return torch.stack([torch.randperm(seq, device=device) for _ in range(batch)]).float() / seq


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose last-but-one dims are strided (a sliced buffer)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    view = wide[..., ::2] if t.dim() == 1 else wide[..., : t.shape[-1]]
    view.copy_(t)
    return view
