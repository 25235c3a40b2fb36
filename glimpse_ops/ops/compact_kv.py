"""``glimpse.compact_kv``: gather every layer's K and V cache along S in one call."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import compact_kv_reference
from ._define import Call, define_native, define_op, require_tensors, run_kernel

OP = "compact_kv"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="compact_kv"))
SCHEMA = "(Tensor[] keys, Tensor[] values, Tensor index, str backend='auto') -> (Tensor[], Tensor[])"


class Kernel(NamedTuple):
    """What the native and Triton kernels take."""

    keys: list[Tensor]
    values: list[Tensor]
    index: Tensor


def validate(c: Call, op: str = OP) -> None:
    v.check_kv_lists(op, c.keys, c.values)
    if c.keys:
        v.check_index(op, c.index, c.keys[0].shape[0], c.keys[0].shape[2])
        v.check_same_device(op, {"keys[0]": c.keys[0], "index": c.index})
    else:
        v.check_tensor(op, "index", c.index)
        if c.index.dtype != torch.int64 or c.index.dim() != 2:
            v.fail_type(op, f"index must be int64 [B, Lmax], got {v.describe(c.index)}")
    v.check_backend(op, c.backend)


def fake_compacted(tensors: list[Tensor], length) -> list[Tensor]:
    return [t.new_empty((t.shape[0], t.shape[1], length, t.shape[3])) for t in tensors]


def _fake(c: Call) -> tuple[list[Tensor], list[Tensor]]:
    validate(c)
    return fake_compacted(c.keys, c.index.shape[1]), fake_compacted(c.values, c.index.shape[1])


def _compact(c: Call, chosen: str) -> tuple[list[Tensor], list[Tensor]]:
    if chosen == "reference":
        return compact_kv_reference(c.keys, c.values, c.index)
    return run_kernel(SPEC, chosen, Kernel(c.keys, c.values, c.index))


def _router(c: Call) -> tuple[list[Tensor], list[Tensor]]:
    validate(c)
    return _compact(c, SPEC.resolve(c.backend, c.index.device))


define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "(Tensor[], Tensor[])")


def compact_kv(
    keys: list[Tensor], values: list[Tensor], index: Tensor, *, backend: str = "auto"
) -> tuple[list[Tensor], list[Tensor]]:
    """Compact the KV cache of every layer to the kept tokens, in one call.

    Args:
        keys, values: equally long lists (one entry per layer) of [B, Hkv, S, D] tensors,
            fp32/fp16/bf16, one dtype and device. Only the head dim must be contiguous.
        index: int64 [B, Lmax] with values in [-1, S), from ``keep_index``.
        backend: ``auto | reference | native | triton``.

    Returns:
        (keys, values): new lists of [B, Hkv, Lmax, D] tensors; pad slots (index -1) are
        zero. The inputs are not modified.
    """
    require_tensors(OP, keys=keys, values=values, index=index)
    return torch.ops.glimpse.compact_kv(keys, values, index, backend)


# ----------------------------------------------------------------------------------------
# compact_kv_into: the same, written into caller-provided tensors
# ----------------------------------------------------------------------------------------

INTO_OP = "compact_kv_into"
INTO_SCHEMA = (
    "(Tensor[] keys, Tensor[] values, Tensor index, Tensor(a!)[] out_keys, Tensor(b!)[] out_values, "
    "str backend='auto') -> ()"
)


class IntoKernel(NamedTuple):
    """What ``compact_kv_into``'s native and Triton kernels take: ``Kernel`` and the
    caller's output tensors, written directly."""

    keys: list[Tensor]
    values: list[Tensor]
    index: Tensor
    out_keys: list[Tensor]
    out_values: list[Tensor]


def validate_into(c: Call) -> None:
    validate(c, INTO_OP)
    for kind, outs, ins in (("out_keys", c.out_keys, c.keys), ("out_values", c.out_values, c.values)):
        if len(outs) != len(ins):
            v.fail_value(INTO_OP, f"{kind} must hold one tensor per layer ({len(ins)}), got {len(outs)}")
        for i, (out, src) in enumerate(zip(outs, ins)):
            want = (src.shape[0], src.shape[1], c.index.shape[1], src.shape[3])
            v.check_tensor(INTO_OP, f"{kind}[{i}]", out)
            if out.dtype != src.dtype:
                v.fail_type(
                    INTO_OP, f"{kind}[{i}] must have the inputs' dtype {v.dtype_name(src.dtype)}, got {v.describe(out)}"
                )
            if tuple(out.shape) != want or out.device != src.device or not out.is_contiguous():
                v.fail_value(
                    INTO_OP,
                    f"{kind}[{i}] must be a contiguous {v.dtype_name(src.dtype)} [{', '.join(map(str, want))}] "
                    f"on {src.device}, got {v.describe(out)}",
                )


def check_outputs_apart(c: Call) -> None:
    """The kernels write rows in place while others are still to be read (by several
    threads or programs): no output may share memory with an input or another output.
    Same storage and intersecting byte extents count (conservative for interleaved views);
    one sweep over the extents of each storage, sorted by start."""
    by_storage: dict[tuple[torch.device, int], list[tuple[int, int, str, bool]]] = {}
    named = [(f"out_keys[{i}]", True, t) for i, t in enumerate(c.out_keys)]
    named += [(f"out_values[{i}]", True, t) for i, t in enumerate(c.out_values)]
    named += [(f"keys[{i}]", False, t) for i, t in enumerate(c.keys)]
    named += [(f"values[{i}]", False, t) for i, t in enumerate(c.values)]
    for name, is_output, t in named:
        if t.numel() == 0:
            continue
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        begin = t.data_ptr()
        key = (t.device, t.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append((begin, begin + (last + 1) * t.element_size(), name, is_output))
    for extents in by_storage.values():
        reach = None  # the extent reaching furthest so far: anything overlapping a later one overlaps it
        for begin, end, name, is_output in sorted(extents):
            if reach is not None and begin < reach[1] and (is_output or reach[3]):
                if is_output and reach[3]:
                    v.fail_value(INTO_OP, f"{reach[2]} and {name} share memory: every output needs its own")
                output, other = (name, reach[2]) if is_output else (reach[2], name)
                v.fail_value(
                    INTO_OP, f"{output} overlaps the input {other}: outputs must not share memory with the inputs"
                )
            if reach is None or end > reach[1]:
                reach = (begin, end, name, is_output)


def _into_fake(c: Call) -> None:
    validate_into(c)


def _into_router(c: Call) -> None:
    validate_into(c)
    chosen = SPEC.resolve(c.backend, c.index.device)
    if chosen != "native":  # the native op checks the same itself, in C++ (~0.3 ms less per call)
        check_outputs_apart(c)
    call = IntoKernel(c.keys, c.values, c.index, c.out_keys, c.out_values)
    if chosen == "triton":
        SPEC.triton_module().compact_kv_triton(*call)
    elif chosen == "native":
        torch.ops.glimpse._compact_kv_into_native(*call)
    else:  # the reference computes, then copies
        new_keys, new_values = compact_kv_reference(c.keys, c.values, c.index)
        for out, new in zip(list(c.out_keys) + list(c.out_values), new_keys + new_values):
            out.copy_(new)


define_op(INTO_OP, INTO_SCHEMA, _into_router, _into_fake)
define_native(INTO_OP, IntoKernel, "()", mutated=("out_keys", "out_values"))


def compact_kv_into(
    keys: list[Tensor],
    values: list[Tensor],
    index: Tensor,
    out_keys: list[Tensor],
    out_values: list[Tensor],
    *,
    backend: str = "auto",
) -> None:
    """``compact_kv`` written into caller-provided tensors (e.g. a preallocated cache).

    Args:
        keys, values, index, backend: as in ``compact_kv``.
        out_keys, out_values: one contiguous [B, Hkv, Lmax, D] tensor per layer, of the
            inputs' dtype and device, sharing no memory with the inputs or each other
            (a ValueError otherwise); overwritten (pad slots with zeros). The native and
            Triton backends write them directly; the reference computes, then copies.
    """
    require_tensors(INTO_OP, keys=keys, values=values, index=index)
    torch.ops.glimpse.compact_kv_into(keys, values, index, out_keys, out_values, backend)
