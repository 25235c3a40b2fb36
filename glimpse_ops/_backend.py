"""Which backends exist on which device, and how ``backend=`` resolves.

Backends: ``reference`` (plain PyTorch, always there), ``native`` (the C++/CUDA extension
``glimpse_ops._C``), ``triton`` (Triton kernels: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``auto`` picks the fastest available one per device; an explicitly
requested backend that is not available raises RuntimeError, it never falls back.
``GLIMPSE_BACKEND=<name>`` overrides ``auto`` (for debugging).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from functools import cache

import torch

from ._env import triton_interpreting
from ._triton_kernels_path import kernels_missing_reason
from ._validation import check_backend

_NATIVE_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (importing runs the C++ op registrations)

    HAS_NATIVE = True
except ImportError as exc:  # the extension was not built; every op still works
    HAS_NATIVE = False
    _NATIVE_ERROR = f"glimpse_ops._C could not be imported ({exc})"


def native_error() -> str | None:
    """Why the native extension is missing, or None."""
    return _NATIVE_ERROR


@cache
def triton_status() -> tuple[bool, str]:
    """(importable, reason if not)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    return True, ""


@cache
def native_cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return HAS_NATIVE and bool(torch.ops.glimpse._native_has_cuda())


@dataclass(frozen=True)
class OpBackends:
    """What one op implements. ``native`` lists device types with a C++/CUDA kernel;
    ``triton`` names the module in ``glimpse_ops.triton_kernels`` holding its launcher;
    ``auto_cuda`` is the preference order on CUDA (from the committed GPU benchmarks);
    ``fp64`` lists the backends that take fp64 inputs (the compute kernels do not)."""

    op: str
    native: tuple[str, ...] = ()
    triton: str | None = None
    auto_cuda: tuple[str, ...] = ("triton", "native", "reference")
    auto_cpu: tuple[str, ...] = ("native", "reference")
    fp64: tuple[str, ...] = ("reference", "native", "triton")

    def unavailable_reason(self, backend: str, device_type: str) -> str | None:
        """None when ``backend`` can run this op on ``device_type``, else why not."""
        if backend == "reference":
            return None
        if backend == "native":
            if not HAS_NATIVE:
                return _NATIVE_ERROR
            if device_type not in self.native:
                return f"no native {device_type} kernel is implemented for this op"
            if device_type == "cuda" and not native_cuda_built():
                return "glimpse_ops._C was built without CUDA kernels"
            return None
        if backend == "triton":
            if self.triton is None:
                return "no Triton kernel is implemented for this op"
            missing = kernels_missing_reason()
            if missing is not None:
                return missing
            if importlib.util.find_spec(f"glimpse_ops.triton_kernels.{self.triton}") is None:
                return f"glimpse_ops.triton_kernels has no module {self.triton!r}"
            ok, why = triton_status()
            if not ok:
                return why
            if device_type == "cpu" and not triton_interpreting():
                return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
            if device_type not in ("cpu", "cuda"):
                return f"Triton does not run on {device_type} tensors"
            return None
        return f"unknown backend {backend!r}"

    def resolve(
        self, backend: str, device: torch.device, dtype: torch.dtype | None = None, head_dim: int | None = None
    ) -> str:
        """The backend to run: ``backend`` itself if available (else RuntimeError), or for
        ``auto`` the first available one of this device's preference order. ``head_dim``
        above ``MAX_TRITON_HEAD_DIM`` makes ``auto`` skip Triton (its kernels keep a head in
        registers)."""
        check_backend(self.op, backend)
        if backend == "auto":
            backend = os.environ.get("GLIMPSE_BACKEND", "auto") or "auto"
            check_backend(self.op, backend)
        fp64 = dtype == torch.float64
        if backend != "auto":
            if fp64 and backend not in self.fp64:
                raise TypeError(
                    f"glimpse.{self.op}: backend {backend!r} takes fp32/fp16/bf16 inputs, got fp64 "
                    "(fp64 runs on backend='reference')"
                )
            why = self.unavailable_reason(backend, device.type)
            if why is not None:
                raise RuntimeError(f"glimpse.{self.op}: backend {backend!r} is not available on {device.type}: {why}")
            return backend
        order = self.auto_cuda if device.type == "cuda" else self.auto_cpu
        for candidate in order:
            if fp64 and candidate not in self.fp64:
                continue
            if candidate == "triton" and head_dim is not None and head_dim > MAX_TRITON_HEAD_DIM:
                continue
            if self.unavailable_reason(candidate, device.type) is None:
                return candidate
        return "reference"

    def available(self, device_type: str) -> list[str]:
        return [b for b in ("reference", "native", "triton") if self.unavailable_reason(b, device_type) is None]

    def triton_module(self):
        return importlib.import_module(f"glimpse_ops.triton_kernels.{self.triton}")


MAX_TRITON_HEAD_DIM = 256
REGISTRY: dict[str, OpBackends] = {}


def declare_backends(spec: OpBackends) -> OpBackends:
    """Enter what one op implements into ``REGISTRY`` (each op module does at import)."""
    REGISTRY[spec.op] = spec
    return spec
