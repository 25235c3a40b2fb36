"""``glimpse.keep_index``: order-preserving positions of the kept tokens, padded with -1."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import keep_index_reference
from ._define import Call, define_native, define_op, require_tensors, run_kernel

OP = "keep_index"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="keep_index"))
SCHEMA = "(Tensor keep, int? max_len=None, str padding_side='left', str backend='auto') -> (Tensor, Tensor)"


class Kernel(NamedTuple):
    """What the native and Triton kernels take."""

    keep: Tensor
    max_len: int | None
    left_padding: bool


def validate(c: Call) -> None:
    v.check_tensor(OP, "keep", c.keep)
    if c.keep.dtype != torch.bool:
        v.fail_type(OP, f"keep must be bool [B, S], got {v.describe(c.keep)}")
    v.check_rank(OP, "keep", c.keep, 2, "bool [B, S]")
    v.check_nonempty(OP, "keep", c.keep, (0, 1), "bool [B, S]")
    v.check_max_len(OP, c.max_len)
    v.check_choice(OP, "padding_side", c.padding_side, v.PADDING_SIDES)
    v.check_backend(OP, c.backend)


def fake_index(batch: int, max_len: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Fake (index, lengths); Lmax is a data-dependent size when max_len is None."""
    length = max_len if max_len is not None else torch.library.get_ctx().new_dynamic_size()
    index = torch.empty((batch, length), dtype=torch.int64, device=device)
    return index, torch.empty((batch,), dtype=torch.int64, device=device)


def _fake(c: Call) -> tuple[Tensor, Tensor]:
    validate(c)
    return fake_index(c.keep.shape[0], c.max_len, c.keep.device)


def _router(c: Call) -> tuple[Tensor, Tensor]:
    validate(c)
    chosen = SPEC.resolve(c.backend, c.keep.device)
    if chosen == "reference":
        return keep_index_reference(c.keep, c.max_len, c.padding_side)
    index, lengths = run_kernel(SPEC, chosen, Kernel(c.keep, c.max_len, c.padding_side == "left"))
    v.check_kernel_lengths(chosen, lengths, c.max_len)
    return index, lengths


define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "(Tensor, Tensor)")


def keep_index(
    keep: Tensor, *, max_len: int | None = None, padding_side: str = "left", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Positions of the kept tokens of each row, in order, padded to a common length.

    Args:
        keep: bool [B, S].
        max_len: the padded length Lmax. None: ``max(lengths)``, which needs a host sync on
            GPU (and gives a data-dependent shape under torch.compile). A row keeping more
            than max_len tokens raises ValueError on CPU; on GPU only the first max_len are
            written (never out of bounds) and ``lengths`` reports the true count.
        padding_side: ``left`` puts the -1 pads first, ``right`` last.
        backend: ``auto | reference | native | triton``.

    Returns:
        (index int64 [B, Lmax], lengths int64 [B]); pad slots of index hold -1.
    """
    require_tensors(OP, keep=keep)
    return torch.ops.glimpse.keep_index(keep, max_len, padding_side, backend)
