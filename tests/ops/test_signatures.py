"""Each op's signature is written once (its schema); everything else is checked against it:
the typed wrapper (options keyword-only), the reference, the kernel calling convention, the
native op generated from it, and each Triton launcher."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import glimpse_ops
from glimpse_ops import reference
from glimpse_ops._backend import REGISTRY

PUBLIC = list(glimpse_ops.OPS) + ["compact_kv_into"]
# The wrappers take max_keep as an int or a per-row tensor; the schema has a slot for each.
MERGED = {"max_keep_per_row"}


def _schema(op: str):
    return getattr(torch.ops.glimpse, op).default._schema


def _module(op: str):
    return importlib.import_module(f"glimpse_ops.ops.{'compact_kv' if op == 'compact_kv_into' else op}")


@pytest.mark.parametrize("op", PUBLIC)
def test_wrapper_is_the_schema_with_keyword_only_options(op):
    schema = _schema(op)
    wanted = [(a.name, a.default_value if a.has_default_value() else inspect.Parameter.empty)
              for a in schema.arguments if a.name not in MERGED]  # fmt: skip
    params = list(inspect.signature(getattr(glimpse_ops, op)).parameters.values())
    assert [(p.name, p.default) for p in params] == wanted
    for p in params:
        is_data = str(p.annotation).startswith(("Tensor", "list[Tensor]"))  # tensors stay positional
        is_option = p.default is not inspect.Parameter.empty and not is_data
        if is_option:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{op}: option {p.name} must be keyword-only"
        else:
            assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{op}: {p.name}"


@pytest.mark.parametrize("op", glimpse_ops.OPS)
def test_reference_takes_the_schema_arguments(op):
    wanted = [a.name for a in _schema(op).arguments if a.name not in MERGED | {"backend"}]
    got = list(inspect.signature(getattr(reference, f"{op}_reference")).parameters)
    assert got == wanted


def _kernels(op: str):
    module = _module(op)
    return [(name, obj) for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, tuple) and name.endswith("Kernel")]  # fmt: skip


NATIVE_NAMES = {
    "Kernel": "_{op}_native",
    "ForwardKernel": "_{op}_forward_native",
    "BackwardKernel": "_{op}_backward_native",
    "IntoKernel": "_{op}_into_native",
}


@pytest.mark.parametrize("op", glimpse_ops.OPS)
def test_native_op_is_generated_from_the_kernel_convention(op):
    """Each convention with a native kernel (Kernel, or ForwardKernel + BackwardKernel)
    is that kernel's schema, argument for argument."""
    spec = REGISTRY[op]
    natives = {name: NATIVE_NAMES[name].format(op=op) for name, _ in _kernels(op)}
    if not spec.native:
        assert not any(hasattr(torch.ops.glimpse, native) for native in natives.values())
        return
    checked = 0
    for name, kernel in _kernels(op):
        if hasattr(torch.ops.glimpse, natives[name]):
            native = [a.name for a in getattr(torch.ops.glimpse, natives[name]).default._schema.arguments]
            assert native == list(kernel._fields), natives[name]
            checked += 1
    assert checked, f"{op} declares a native kernel but no native op follows its conventions"


@pytest.mark.parametrize("op", glimpse_ops.OPS)
def test_triton_launchers_take_the_kernel_convention(op):
    spec = REGISTRY[op]
    pytest.importorskip("triton")
    launchers = importlib.import_module(f"glimpse_ops.triton_kernels.{spec.triton}")
    names = {"Kernel": op, "BackwardKernel": f"{op}_backward", "ForwardKernel": f"{op}_forward", "IntoKernel": op}
    found = _kernels(op)
    assert found, f"{op} has no kernel convention"
    for name, kernel in found:
        launcher = getattr(launchers, f"{names[name]}_triton")
        params = list(inspect.signature(launcher).parameters)[: len(kernel._fields)]
        assert params == list(kernel._fields), f"{names[name]}_triton"
