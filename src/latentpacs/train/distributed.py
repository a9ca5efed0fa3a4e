"""Data-parallel training under ``torchrun``: the process group, the rank's device, collectives.

``torchrun --nproc_per_node N -m latentpacs.cli train ...`` starts N copies of the same
command with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
in their environment. :func:`start` joins them into one process group (NCCL when the rank
trains on CUDA, gloo on CPU) and gives each rank its device (``cuda:LOCAL_RANK`` or
``cpu``); without those variables, or with ``WORLD_SIZE`` 1, it returns a single-process
context and every function here does nothing, so the single-process run is unchanged.

BatchNorm stays per rank (each rank normalises its own batch); rank 0's running
statistics are broadcast before every forward pass by DistributedDataParallel and
before validation by :func:`broadcast_buffers`, so all ranks evaluate, checkpoint and
export the same weights and statistics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from latentpacs.errors import ConfigError

logger = logging.getLogger(__name__)

_ENVIRONMENT = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) training run.

    Attributes
    ----------
    rank, local_rank, world_size:
        As set by torchrun; 0, 0, 1 for a single process.
    device:
        The torch device this rank trains on.
    backend:
        ``"nccl"``, ``"gloo"``, or ``""`` for a single process.
    """

    rank: int
    local_rank: int
    world_size: int
    device: str
    backend: str

    @property
    def distributed(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, shows progress and writes files."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"torchrun variable {name} must be an integer, got {value!r}") from None


def start(device: str | None) -> DistContext:
    """Join the torchrun process group when launched by torchrun with ``WORLD_SIZE > 1``.

    Parameters
    ----------
    device:
        The device asked for (``--device``); None picks CUDA when available, else CPU.
        Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``.

    Raises
    ------
    ConfigError
        ``WORLD_SIZE > 1`` without the other torchrun variables, or non-integer values.
    """
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = _env_int("WORLD_SIZE") if os.environ.get("WORLD_SIZE") else 1
    if world_size <= 1:
        return DistContext(0, 0, 1, chosen, "")
    missing = [name for name in _ENVIRONMENT if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE is {world_size} but {', '.join(missing)} unset: launch with torchrun")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if chosen.startswith("cuda"):
        chosen = f"cuda:{local_rank}"
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    logger.info("rank %d of %d on %s (%s)", rank, world_size, chosen, backend)
    return DistContext(rank, local_rank, world_size, chosen, backend)


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op for a single process)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_sums(ctx: DistContext, values: Sequence[float]) -> tuple[float, ...]:
    """The element-wise sum of ``values`` over all ranks, in float64 (identity for one process)."""
    if not ctx.distributed:
        return tuple(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tuple(float(v) for v in tensor.cpu())


def broadcast_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def finish(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
