"""torch.distributed plumbing for the trainers (``glimpse_ops.hf.trainer``): the process group,
wrapping the trainable step in DDP or FSDP2, global sums, and world-size-independent
checkpoints of the trainable modules and their optimizer state.

Every function works on one process too (no process group: world size 1, sums are local).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRATEGIES = ("ddp", "fsdp")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` set): NCCL on CUDA,
    gloo on CPU. Returns whether a process group is up."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def shutdown() -> None:
    """Every rank done, then the process group destroyed: a gloo group left to the interpreter's
    exit can abort a rank there ("terminate called without an active exception", seen once in
    CI after an FSDP2 run had finished)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def global_sum(values: Tensor) -> Tensor:
    """The sum over ranks of a detached tensor (a copy; the input is not modified)."""
    out = values.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(out)
    return out


def wrap(step: nn.Module, layers: list[nn.Module], strategy: str) -> nn.Module:
    """``step`` (the frozen model and the trainable modules, a ``TrainStep``) made
    data-parallel. ``ddp``: DistributedDataParallel over the parameters that require grad
    (the frozen model is neither broadcast nor reduced: every rank loads the same weights).
    ``fsdp``: FSDP2 ``fully_shard`` on each module of ``layers`` (frozen decoder layers, each
    gathered only while it runs) and on ``step`` itself (the trainable modules and the rest of
    the model, gathered for the whole step). One process: as is."""
    if strategy not in STRATEGIES:
        raise ValueError(f"glimpse_ops.hf.distributed.wrap: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if world()[1] == 1:
        return step
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        frozen = [name for name, p in step.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in step.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
        device = next(p for p in step.parameters() if p.requires_grad).device
        return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    # DDP broadcasts rank 0's weights; fully_shard keeps each rank's own, so do it here
    with torch.no_grad():
        for p in step.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    for layer in layers:
        fully_shard(layer)
    fully_shard(step)
    return step


def _full(t: Tensor) -> Tensor:
    """A plain CPU tensor of the whole value (gathers an FSDP2 DTensor shard: a collective)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def _like(full: Tensor, target: Tensor) -> Tensor:
    """``full`` placed as ``target`` is: the same shard of the same mesh for a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(target.device, target.dtype)
    return distribute_tensor(full, target.device_mesh, target.placements) if isinstance(target, DTensor) else full


def full_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's whole state dict as plain CPU tensors (call on every rank)."""
    return {name: _full(value) for name, value in module.state_dict().items()}


def save_checkpoint(path: str | Path, trainable: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
    """Write the trainable modules' full state, the optimizer state by parameter name and
    ``extra`` (step count, configuration) to one file, from rank 0. Call on every rank (it
    gathers shards); the file does not depend on the world size or the strategy."""
    names = {p: name for name, p in trainable.named_parameters()}
    optim_state = {
        names[p]: {key: _full(value) if torch.is_tensor(value) else value for key, value in state.items()}
        for p, state in optimizer.state.items()
    }
    blob = {"trainable": full_state(trainable), "optimizer": optim_state, **extra}
    if world()[0] == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)  # a reader never sees half a file
    if world()[1] > 1:
        dist.barrier()


def load_checkpoint(path: str | Path, trainable: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what ``save_checkpoint`` wrote into ``trainable`` (sharded or not) and
    ``optimizer`` (created over ``trainable``'s parameters); returns the rest (``extra``)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(trainable.named_parameters())
    missing = sorted(set(params) - set(blob["trainable"]))
    if missing:
        raise ValueError(f"glimpse_ops.hf.load_checkpoint: {path} has no values for {missing[:5]}")
    with torch.no_grad():
        for name, value in trainable.state_dict().items():
            value.copy_(_like(blob["trainable"][name], value))
    for name, state in blob["optimizer"].items():
        p = params[name]
        optimizer.state[p] = {
            key: (v if key == "step" else _like(v, p)) if torch.is_tensor(v) else v for key, v in state.items()
        }
    return {k: v for k, v in blob.items() if k not in ("trainable", "optimizer")}
