"""How a loop's processes agree, Lightning-free: one writer, shared decisions, features probed in slices.

:class:`Processes` is what a face tells the core about its ranks; :func:`torch_processes` builds
it from ``torch.distributed``; :func:`measure_over_ranks` probes each rank's slice of the samples
and gathers them in sample order, identical on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .probes import ProbeSpec

__all__ = ["Processes", "measure_over_ranks", "torch_processes"]


def _same(obj: Any) -> Any:
    return obj


def _alone(obj: Any) -> list[Any]:
    return [obj]


@dataclass(frozen=True)
class Processes:
    """How a loop's processes agree: one process writes the files, and every decision is shared.

    ``broadcast(obj)`` returns the writer's ``obj`` on every process; ``any_rank(flag)`` is True on
    every process when it is True on one. ``all_gather(obj)`` returns every rank's ``obj`` on every
    rank, in rank order (``world`` of them; this process's is item ``rank``): what splits work over
    the ranks (each builds its share of the controls). Each is a collective: every rank calls it,
    the same number of times. The defaults are one process.
    """

    is_writer: bool = True
    broadcast: Callable[[Any], Any] = _same
    any_rank: Callable[[bool], bool] = bool
    rank: int = 0
    world: int = 1
    all_gather: Callable[[Any], list[Any]] = _alone

    def __post_init__(self) -> None:
        if not (isinstance(self.world, int) and isinstance(self.rank, int) and 0 <= self.rank < self.world):
            raise InputError(f"Processes needs 0 <= rank < world, got rank {self.rank!r} of world {self.world!r}")


def _collective_device() -> torch.device:
    """Where ``torch.distributed`` tensors must live: the current GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _distributed_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def torch_processes() -> Processes:
    """The ``torch.distributed`` ranks as :class:`Processes` (rank 0 writes); one process when not initialised."""
    rank, world = _distributed_world()
    if world == 1:
        return Processes()
    import torch.distributed as dist

    def broadcast(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any_rank(flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def all_gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out

    return Processes(is_writer=rank == 0, broadcast=broadcast, any_rank=any_rank, rank=rank, world=world,
                     all_gather=all_gather)


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    tensor = tensor.to(_collective_device()).contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.stack(parts)


def _broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    tensor = tensor.to(_collective_device()).contiguous()
    dist.broadcast(tensor, src=0)
    return tensor.to("cpu")


def measure_over_ranks(spec: ProbeSpec, probe_slice: Callable[[ProbeSpec, tuple[int, int] | None], torch.Tensor], *,
                       rank: int | None = None, world: int | None = None,
                       all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       broadcast: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The ``[n, D]`` features on ``spec``, each rank probing its own slice, identical on every rank.

    ``probe_slice(padded_spec, (start, stop))`` probes one slice (``None``: all of ``spec``, one
    process). Every rank runs the same number of forwards (under FSDP a forward is a collective):
    the samples are padded to a multiple of the world size with further samples of the same probe
    seed, dropped after the gather. Rank 0's result is then broadcast, so every rank tests the
    same numbers whatever the collective's arithmetic. ``rank``, ``world``, ``all_gather``
    (``[per_rank, D]`` -> ``[world, per_rank, D]``) and ``broadcast`` default to ``torch.distributed``.
    """
    if rank is None or world is None:
        rank, world = _distributed_world()
    if world == 1:
        return probe_slice(spec, None)
    per_rank = math.ceil(spec.num_samples / world)
    padded = dataclasses.replace(spec, num_samples=per_rank * world)
    start = rank * per_rank
    mine = probe_slice(padded, (start, start + per_rank))
    gathered = (all_gather or _all_gather)(mine)
    features = gathered.reshape(world * per_rank, -1)[:spec.num_samples].to("cpu")
    return (broadcast or _broadcast_tensor)(features)
