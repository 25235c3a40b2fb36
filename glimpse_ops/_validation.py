"""Input checks shared by every backend and by the fake (meta) kernels.

Messages follow one format: ``glimpse.<op>: <arg> must <rule>, got <actual>``. Shape and
value problems raise ValueError, dtype problems TypeError. Checks that read tensor data
(index ranges, weight ranges) run only on CPU tensors outside fake mode, where they cost no
host sync; see ``reads_data_cheaply``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # fp64 for gradcheck
BACKENDS = ("auto", "reference", "native", "triton")
PADDING_SIDES = ("left", "right")

_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.bool: "bool",
    torch.int64: "int64",
    torch.int32: "int32",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def describe(t: Tensor) -> str:
    """``fp16 [2, 28, 1, 128]``: how a tensor is shown in error messages."""
    return f"{dtype_name(t.dtype)} [{', '.join(str(s) for s in t.shape)}]"


def fail_value(op: str, message: str) -> None:
    raise ValueError(f"glimpse.{op}: {message}")


def fail_type(op: str, message: str) -> None:
    raise TypeError(f"glimpse.{op}: {message}")


def check_tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        fail_type(op, f"{name} must be a Tensor, got {type(t).__name__}")
    return t  # type: ignore[return-value]


def check_dtype(op: str, name: str, t: Tensor, allowed: Sequence[torch.dtype], shape: str) -> None:
    if t.dtype not in allowed:
        names = "/".join(dtype_name(d) for d in allowed)
        fail_type(op, f"{name} must be {names} {shape}, got {describe(t)}")


def check_rank(op: str, name: str, t: Tensor, rank: int, shape: str) -> None:
    if t.dim() != rank:
        fail_value(op, f"{name} must be {shape} ({rank}-D), got {describe(t)}")


def check_floating(op: str, name: str, t: Tensor, shape: str) -> None:
    check_tensor(op, name, t)
    check_dtype(op, name, t, FLOAT_DTYPES, shape)
    check_rank(op, name, t, shape.count(",") + 1, shape)


def check_same_device(op: str, tensors: dict[str, Tensor | None]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            fail_value(op, f"{name} must be on the same device as {first_name} ({first}), got {device}")


def check_mask(op: str, name: str, mask: Tensor | None, batch: int, seq: int) -> None:
    """An optional bool [B, S] mask."""
    if mask is None:
        return
    check_tensor(op, name, mask)
    if mask.dtype != torch.bool:
        fail_type(op, f"{name} must be bool [B, S], got {describe(mask)}")
    if tuple(mask.shape) != (batch, seq):
        fail_value(op, f"{name} must be bool [B, S] = [{batch}, {seq}], got {describe(mask)}")


def check_backend(op: str, backend: str) -> None:
    if backend not in BACKENDS:
        fail_value(op, f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def check_choice(op: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        fail_value(op, f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_scale(op: str, scale: float | None) -> None:
    if scale is not None and not (scale == scale and abs(scale) != float("inf")):
        fail_value(op, f"scale must be a finite float or None, got {scale}")


def check_nonempty(op: str, name: str, t: Tensor, dims: Sequence[int], shape: str) -> None:
    for d in dims:
        if t.shape[d] == 0:
            fail_value(op, f"{name} must be non-empty {shape}, got {describe(t)}")


def check_gqa(op: str, q: Tensor, k: Tensor) -> None:
    """q [B, H, ., D] and k [B, Hkv, S, D] with H % Hkv == 0 and equal B and D."""
    if k.shape[0] != q.shape[0]:
        fail_value(op, f"k must have the batch size of q ({q.shape[0]}), got {describe(k)}")
    if k.shape[3] != q.shape[3]:
        fail_value(op, f"k must have the head dim of q ({q.shape[3]}), got {describe(k)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        fail_value(
            op,
            f"k's head count must divide q's ({q.shape[1]}) (H % Hkv == 0), got {describe(k)}",
        )


def reads_data_cheaply(t: Tensor) -> bool:
    """True when checking t's values costs no host sync and is not a fake/meta tensor."""
    if t.device.type != "cpu":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake

        return not is_fake(t)
    except ImportError:  # pragma: no cover - older torch
        return True


def check_select_args(
    op: str,
    batch: int,
    threshold: float | None,
    max_keep: int,
    min_keep: int,
    max_keep_per_row: Tensor | None,
) -> None:
    """Arguments shared by select_tokens, prune_kv and glimpse_prune."""
    if threshold is not None and threshold != threshold:
        fail_value(op, f"threshold must be a float or None, got {threshold}")
    if min_keep < 0:
        fail_value(op, f"min_keep must be >= 0, got {min_keep}")
    if max_keep_per_row is not None:
        check_tensor(op, "max_keep", max_keep_per_row)
        if max_keep_per_row.dtype != torch.int64:
            fail_type(op, f"max_keep must be an int or int64 [B], got {describe(max_keep_per_row)}")
        if tuple(max_keep_per_row.shape) != (batch,):
            fail_value(op, f"max_keep must be an int or int64 [B] = [{batch}], got {describe(max_keep_per_row)}")


def check_max_len(op: str, max_len: int | None) -> None:
    if max_len is not None and max_len < 1:
        fail_value(op, f"max_len must be >= 1 or None, got {max_len}")


def check_kv_lists(op: str, keys: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """keys/values: equally long lists of [B, Hkv, S, D] tensors of one shape, dtype and device."""
    if len(keys) != len(values):
        fail_value(op, f"keys and values must have the same length, got {len(keys)} and {len(values)}")
    if len(keys) == 0:
        return
    first = keys[0]
    for kind, tensors in (("keys", keys), ("values", values)):
        for i, t in enumerate(tensors):
            name = f"{kind}[{i}]"
            check_floating(op, name, t, "[B, Hkv, S, D]")
            if t.dtype != first.dtype:
                fail_type(op, f"{name} must have the dtype of keys[0] ({dtype_name(first.dtype)}), got {describe(t)}")
            if t.shape != first.shape:
                fail_value(op, f"{name} must have the shape of keys[0] {describe(first)}, got {describe(t)}")
            if t.device != first.device:
                fail_value(op, f"{name} must be on the device of keys[0] ({first.device}), got {t.device}")


def check_kept_lengths(lengths: Tensor, max_len: int) -> None:
    """keep_index's overflow rule for lengths int64 [B] on CPU: no row beyond max_len."""
    longest = int(lengths.max())
    if longest > max_len:
        row = int(torch.argmax(lengths))
        fail_value("keep_index", f"every row must keep at most max_len={max_len} tokens, got {longest} in row {row}")


def check_kernel_lengths(backend: str, lengths: Tensor, max_len: int | None) -> None:
    """After a Triton kernel ran keep_index's rule (keep_index, prune_kv, glimpse_prune):
    ``check_kept_lengths`` on CPU tensors, where it costs no device sync (the native kernels
    check in C++; on a GPU a longer row keeps its first max_len tokens, never out of bounds)."""
    if backend == "triton" and max_len is not None and lengths.device.type == "cpu":
        check_kept_lengths(lengths, max_len)


def check_index(op: str, index: Tensor, batch: int, seq: int) -> None:
    """index int64 [B, Lmax] with values in [-1, S) (values checked on CPU only)."""
    check_tensor(op, "index", index)
    if index.dtype != torch.int64:
        fail_type(op, f"index must be int64 [B, Lmax], got {describe(index)}")
    if index.dim() != 2:
        fail_value(op, f"index must be int64 [B, Lmax], got {describe(index)}")
    if index.shape[0] != batch:
        fail_value(op, f"index must be int64 [B, Lmax] with B = {batch}, got {describe(index)}")
    if reads_data_cheaply(index) and index.numel() > 0:
        low, high = int(index.min()), int(index.max())
        if low < -1 or high >= seq:
            bad = low if low < -1 else high
            fail_value(op, f"index values must be in [-1, S) = [-1, {seq}), got {bad}")
