"""What every trainer integration does at train start, Lightning-free: reference, files, controls, ledger.

A training loop's face (the Lightning callback today; a Hugging Face ``TrainerCallback`` or a
Fabric loop tomorrow) owns three loop-specific things: how the live model's features are
measured, how its processes agree (:class:`Processes`), and how it acts on a lost identity.
Everything else about opening a run is here, in :func:`open_chain`, so each face writes the same
run directory, the same ledger and the same chain state::

    open_chain(chain, step=..., run=RunDirectory(save_dir), processes=..., take_reference=...,
               controls=ControlsSource(...))      # then, every probe:  chain.observe(step, features)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .chain import CustodyChain
from .controls import ControlSet, control_seeds
from .custody import REFERENCE_FILE, RunDirectory, save_parent_anchor
from .errors import InputError
from .files import file_sha256
from .fingerprint import Fingerprint
from .probes import ProbeSpec

__all__ = ["ControlsSource", "Processes", "measure_over_ranks", "open_chain", "torch_processes"]


def _same(obj: Any) -> Any:
    return obj


@dataclass(frozen=True)
class Processes:
    """How a loop's processes agree: one process writes the files, and every decision is shared.

    ``broadcast(obj)`` returns the writer's ``obj`` on every process; ``any_rank(flag)`` is True on
    every process when it is True on one. The defaults are one process.
    """

    is_writer: bool = True
    broadcast: Callable[[Any], Any] = _same
    any_rank: Callable[[bool], bool] = bool


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

    return Processes(is_writer=rank == 0, broadcast=broadcast, any_rank=any_rank)


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


@dataclass(frozen=True)
class ControlsSource:
    """Where a run's fresh-init controls come from: its checkpoint state, a precomputed file, or a build.

    ``build(seeds, spec)`` probes fresh inits of the run's model (one alive at a time);
    ``identity`` (``model_class``, ``config_digest``) is what the run's model is, checked against a
    file and recorded in ``controls.safetensors``.
    """

    num_controls: int
    build: Callable[[tuple[int, ...], ProbeSpec], ControlSet]
    identity: dict[str, str | None] = field(default_factory=dict)
    file: ControlSet | None = None
    file_path: str | None = None


def open_chain(chain: CustodyChain, *, step: int, run: RunDirectory | None, processes: Processes,
               take_reference: Callable[[], Fingerprint], controls: ControlsSource, origin: str,
               warn: Callable[[str], None], missing_state: str = "seedprints state") -> bool:
    """Make ``chain`` ready to observe at ``step``; True when a new chain starts here (nothing to link yet).

    The reference is the chain's own (explicit or restored) or, at step 0 only, ``take_reference()``;
    a trained run without one is an error that names ``missing_state`` and the fix. With ``run``
    (``None`` writes no file), the writer process writes or checks ``reference.safetensors``
    (``origin`` names where a restored or explicit reference came from), saves the controls and
    positions the ledger; every process raises the writer's errors alike.
    """
    fresh = chain.reference is None
    if fresh:
        if step != 0:
            where = run.reference_path if run is not None else f"<run>/seedprints/{REFERENCE_FILE}"
            raise InputError(
                f"SeedPrints has no reference at global_step={step}: the checkpoint has no {missing_state}, so "
                "the run's step-0 reference is unknown and will not be taken from trained weights. Pass "
                f"reference=<run>/seedprints/{REFERENCE_FILE} (e.g. {where}) or resume from a checkpoint saved with "
                "the callback"
            )
        chain.begin(take_reference(), step)
    chain.keeps_records = run is not None
    reference_sha = _sync_reference(chain, run, fresh, processes, origin, warn) if run is not None else None
    _ensure_controls(chain, run, processes, controls)
    if run is not None and processes.is_writer:
        initial = chain.initial_anchor
        initial_sha = None if initial is None else file_sha256(
            save_parent_anchor(run.path, initial.features, initial.step))
        controls_sha = file_sha256(run.controls_path) if len(chain.controls) else None
        ledger, moved = run.open_ledger(chain.next_index, chain.last_sha256, reference_sha256=reference_sha,
                                        controls_sha256=controls_sha, initial_anchor_sha256=initial_sha)
        chain.next_index = ledger.next_index
        chain.attach_ledger(ledger)
        if moved:
            warn(moved)
    # The writer holds the ledger; every process numbers the records alike (the anchor's index).
    chain.next_index = int(processes.broadcast(chain.next_index))
    return fresh


def _sync_reference(chain: CustodyChain, run: RunDirectory, fresh: bool, processes: Processes, origin: str,
                    warn: Callable[[str], None]) -> str | None:
    error = sha = None
    if processes.is_writer:
        try:
            sha, warning = run.sync_reference(chain.reference, fresh=fresh, origin=origin)
        except InputError as exc:
            error, warning = str(exc), None
        if warning:
            warn(warning)
    error = processes.broadcast(error)
    if error is not None:
        raise InputError(error)
    return sha


def _ensure_controls(chain: CustodyChain, run: RunDirectory | None, processes: Processes,
                     source: ControlsSource) -> None:
    """The chain's controls: restored with its state, loaded from the file, or built (then shared by the writer's)."""
    seeds, spec = control_seeds(source.num_controls), chain.reference.spec
    if not seeds:
        chain.controls = ControlSet.none()
        return
    restored = chain.controls.matches(spec, chain.reference.features.shape) and chain.controls.seeds == seeds
    if not restored and source.file is not None:
        source.file.check_fits(spec, source.identity.get("config_digest"), source.file_path)
        chain.controls, restored = source.file, True
    if not restored:
        built = source.build(seeds, spec)
        chain.controls = dataclasses.replace(built, features=processes.broadcast(built.features))
    if run is not None and processes.is_writer and (not restored or not run.controls_path.exists()):
        chain.controls.save(run.controls_path, **source.identity)
