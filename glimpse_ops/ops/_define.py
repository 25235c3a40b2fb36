"""How an op is defined once and called everywhere.

* The public signature of ``torch.ops.glimpse.<op>`` is its schema string, written once in its
  module. ``define_op`` parses it: the fake kernel, the router and the validation receive one
  ``Call`` bound to the schema's argument names (``call.q``, ``call.max_len``), never a
  restated parameter list. The typed Python wrapper is the same signature with keyword-only
  options, checked against the schema by tests.
* Kernel backends (the C++ extension and the Triton launchers) share one calling convention
  per op: a ``NamedTuple`` of normalized arguments (masks materialized, the scale resolved,
  ``padding_side`` as ``left_padding``). The router builds it once; ``run_kernel`` passes it
  to the backend; the native op's schema is generated from it (the C++ files only register
  implementations).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

DEVICE_KEYS = ("CPU", "CUDA")


class Call(types.SimpleNamespace):
    """The arguments of one op call, by schema name."""


class Signature:
    """An op's schema, parsed once: argument names in order and their defaults."""

    def __init__(self, name: str, schema: str):
        self.name, self.schema = name, schema
        parsed = torch._C.parse_schema(f"glimpse::{name}{schema}")
        self.names = [arg.name for arg in parsed.arguments]
        self.defaults = {arg.name: arg.default_value for arg in parsed.arguments if arg.has_default_value()}

    def bind(self, args: tuple, kwargs: dict) -> Call:
        values = dict(zip(self.names, args))
        values.update(kwargs)
        for name in self.names[len(args) :]:
            if name not in values:
                if name not in self.defaults:
                    raise TypeError(f"glimpse.{self.name}: missing argument {name!r}")
                values[name] = self.defaults[name]
        return Call(**values)


def define_op(name: str, schema: str, router: Callable[[Call], object], fake: Callable[[Call], object]) -> Signature:
    """Define ``glimpse::<name>`` with ``schema``; CPU and CUDA calls go to ``router`` and
    fake tensors to ``fake``, each with the call bound to the schema."""
    signature = Signature(name, schema)
    qualname = f"glimpse::{name}"
    torch.library.define(qualname, schema)
    torch.library.register_fake(qualname)(lambda *args, **kwargs: fake(signature.bind(args, kwargs)))
    for key in DEVICE_KEYS:
        torch.library.impl(qualname, key)(lambda *args, **kwargs: router(signature.bind(args, kwargs)))
    return signature


# ------------------------------------------------------------------------------------------
# the kernel calling convention
# ------------------------------------------------------------------------------------------

_SCHEMA_TYPES = {
    "Tensor": "Tensor",
    "Tensor | None": "Tensor?",
    "list[Tensor]": "Tensor[]",
    "int": "int",
    "int | None": "int?",
    "float": "float",
    "float | None": "float?",
    "bool": "bool",
    "Scalar": "Scalar",
}


def kernel_schema(convention: type, returns: str, mutated: tuple[str, ...] = ()) -> str:
    """The schema of a native op taking ``convention``'s fields in order; the ``mutated``
    fields (tensors or tensor lists) are written in place, each its own alias set. The
    convention's module uses ``from __future__ import annotations``, so its annotations are
    the strings mapped here."""
    unknown = sorted(set(mutated) - set(convention._fields))
    if unknown:
        raise TypeError(f"{convention.__name__}: mutated names {unknown}, which are not its fields")
    fields = []
    for field in convention._fields:
        annotation = convention.__annotations__[field]
        annotation = getattr(annotation, "__forward_arg__", annotation)  # NamedTuple may wrap it in a ForwardRef
        if annotation not in _SCHEMA_TYPES:
            raise TypeError(f"{convention.__name__}.{field}: no schema type for the annotation {annotation!r}")
        kind = _SCHEMA_TYPES[annotation]
        if field in mutated:
            if not kind.startswith("Tensor"):
                raise TypeError(f"{convention.__name__}.{field}: only tensors can be mutated, not {kind}")
            kind = kind.replace("Tensor", f"Tensor({chr(ord('a') + mutated.index(field))}!)", 1)
        fields.append(f"{kind} {field}")
    return f"({', '.join(fields)}) -> {returns}"


def define_native(op: str, convention: type, returns: str, mutated: tuple[str, ...] = ()) -> None:
    """Declare ``glimpse::_<op>_native`` (implemented in csrc/) with the op's convention; a
    private op's leading underscore is dropped (``_soft_mask_attention_forward_native``).
    ``mutated``: the fields the kernel writes in place (``compact_kv_into``'s outputs)."""
    torch.library.define(f"glimpse::_{op.lstrip('_')}_native", kernel_schema(convention, returns, mutated))


def run_kernel(spec, backend: str, call: tuple):
    """Run the op's ``native`` or ``triton`` kernel on the normalized call. Private ops'
    kernels drop the leading underscore: ``_soft_mask_attention_forward_native``,
    ``glimpse_scores_backward_triton``."""
    if backend == "native":
        return getattr(torch.ops.glimpse, f"_{spec.op.lstrip('_')}_native")(*call)
    if backend == "triton":
        return getattr(spec.triton_module(), f"{spec.op.lstrip('_')}_triton")(*call)
    raise ValueError(f"glimpse.{spec.op}: run_kernel takes native or triton, got {backend!r}")


# ------------------------------------------------------------------------------------------
# small shared pieces
# ------------------------------------------------------------------------------------------


def split_max_keep(op: str, max_keep: int | torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The wrappers take max_keep as int or int64 [B]; the schema has both slots."""
    if isinstance(max_keep, torch.Tensor):
        return 0, max_keep
    if isinstance(max_keep, bool) or not isinstance(max_keep, int):
        raise TypeError(f"glimpse.{op}: max_keep must be an int or int64 [B], got {type(max_keep).__name__}")
    return max_keep, None


def require_tensors(op: str, **tensors: object) -> None:
    """Wrappers check their tensor arguments first: the dispatcher would raise a
    RuntimeError for a non-tensor, the convention is a TypeError naming the op."""
    from .._validation import check_tensor

    for name, value in tensors.items():
        if isinstance(value, (list, tuple)) and name in ("keys", "values"):
            for i, item in enumerate(value):
                check_tensor(op, f"{name}[{i}]", item)
        else:
            check_tensor(op, name, value)


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores are fp32, or fp64 for fp64 inputs (the reference's gradient-check mode)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def select_max_keep(max_keep: int, max_keep_per_row: torch.Tensor | None) -> int | torch.Tensor:
    return max_keep if max_keep_per_row is None else max_keep_per_row


def all_true(reference: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``mask``, or an all-True bool [B, S] mask shaped like ``reference`` [B, S, ...]."""
    if mask is not None:
        return mask
    return torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)
