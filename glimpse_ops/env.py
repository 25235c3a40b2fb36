"""``python -m glimpse_ops.env``: versions, and which backend runs each op on which device."""

from __future__ import annotations

import platform
import sys

import torch

from . import OPS, __version__
from ._backend import HAS_NATIVE, REGISTRY, native_cuda_built, native_error, triton_interpreting, triton_status


def env_report() -> str:
    lines = [
        f"glimpse-ops {__version__}",
        f"python {sys.version.split()[0]} on {platform.machine()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, cuda available: {torch.cuda.is_available()})",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}")
    ok, why = triton_status()
    if ok:
        import triton

        lines.append(f"triton {triton.__version__} (TRITON_INTERPRET: {'on' if triton_interpreting() else 'off'})")
    else:
        lines.append(f"triton: unavailable: {why}")
    if HAS_NATIVE:
        cuda = "CUDA C++ kernels built" if native_cuda_built() else "no CUDA C++ kernels (the GPU kernels are Triton)"
        lines.append(f"native extension: loaded (C++ CPU kernels; {cuda})")
    else:
        lines.append(f"native extension: unavailable: {native_error()}")
    lines.append(hf_report())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines.append(f"\n{device}:")
        for op in OPS:
            spec = REGISTRY[op]
            auto = spec.resolve("auto", torch.device(device))
            parts = []
            for backend in ("reference", "native", "triton"):
                why = spec.unavailable_reason(backend, device)
                parts.append(f"{backend}: {'yes' if why is None else 'no (' + why + ')'}")
            lines.append(f"  {op:<24} auto -> {auto:<9} | " + "; ".join(parts))
    return "\n".join(lines)


def hf_report() -> str:
    """transformers' version against glimpse_ops.hf's range, and which of its attention
    implementations the pruning patches run under (the others are refused at ``apply_*``)."""
    try:
        import transformers
        from transformers import AttentionInterface
    except ImportError:
        return "transformers: not installed (glimpse_ops.hf needs it: pip install 'glimpse-ops[hf]')"
    from .hf._compat import SUPPORTED, SUPPORTED_TEXT, _version_tuple
    from .hf.attention import attention_kind

    low, high = SUPPORTED
    inside = "supported" if low <= _version_tuple(transformers.__version__) < high else "NOT supported"
    registered = getattr(AttentionInterface, "_global_mapping", {})
    offered = ["eager", *sorted(name for name in registered if not name.startswith("glimpse_"))]  # not ATP's own
    supported = [name for name in offered if attention_kind(name) is not None]
    refused = [name for name in offered if attention_kind(name) is None]
    return (f"transformers {transformers.__version__} ({inside}: glimpse_ops.hf supports {SUPPORTED_TEXT}); "
            f"pruning runs under attn_implementation {', '.join(supported)} and kernels-hub flash kernels; "
            f"refused: {', '.join(refused) or 'none'}")  # fmt: skip


if __name__ == "__main__":
    print(env_report())
