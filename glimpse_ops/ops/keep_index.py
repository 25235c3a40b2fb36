"""``glimpse.keep_index``: order-preserving positions of the kept tokens, padded with -1."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, register
from ..reference import keep_index_reference
from ._register import define_op, require_tensors

OP = "keep_index"
SPEC = register(OpBackends(OP, native=("cpu",), triton="keep_index"))
SCHEMA = "(Tensor keep, int? max_len=None, str padding_side='left', str backend='auto') -> (Tensor, Tensor)"


def validate(keep: Tensor, max_len: int | None, padding_side: str, backend: str) -> None:
    v.check_tensor(OP, "keep", keep)
    if keep.dtype != torch.bool:
        v.fail_type(OP, f"keep must be bool [B, S], got {v.describe(keep)}")
    v.check_rank(OP, "keep", keep, 2, "bool [B, S]")
    v.check_nonempty(OP, "keep", keep, (0, 1), "bool [B, S]")
    v.check_max_len(OP, max_len)
    v.check_choice(OP, "padding_side", padding_side, v.PADDING_SIDES)
    v.check_backend(OP, backend)


def fake_index(batch: int, max_len: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Fake (index, lengths); Lmax is a data-dependent size when max_len is None."""
    length = max_len if max_len is not None else torch.library.get_ctx().new_dynamic_size()
    index = torch.empty((batch, length), dtype=torch.int64, device=device)
    return index, torch.empty((batch,), dtype=torch.int64, device=device)


def _fake(keep, max_len=None, padding_side="left", backend="auto"):
    validate(keep, max_len, padding_side, backend)
    return fake_index(keep.shape[0], max_len, keep.device)


def _router(keep, max_len=None, padding_side="left", backend="auto"):
    validate(keep, max_len, padding_side, backend)
    chosen = SPEC.resolve(backend, keep.device)
    if chosen == "reference":
        return keep_index_reference(keep, max_len, padding_side)
    if chosen == "native":
        return torch.ops.glimpse._keep_index_native(keep, max_len, padding_side == "left")
    return SPEC.triton_module().keep_index_triton(keep, max_len, padding_side == "left")


define_op(OP, SCHEMA, _router, _fake)


def keep_index(
    keep: Tensor, max_len: int | None = None, padding_side: str = "left", backend: str = "auto"
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
