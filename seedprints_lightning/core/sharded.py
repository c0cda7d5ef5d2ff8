"""The layer-major probe of a sharded (DTensor) model: one block's full weights at a time, the LM head never.

A forward through an FSDP2 (``fully_shard``) model gathers each module's parameter group
around its forward. The root group is the causal LM's own parameters (token embedding, final
norm, LM head: 250 MB on a 200M LLaMA with a 32k vocabulary), and the root does not reshard
after its forward, so a probe, a forward without a backward, holds all of it at once (twice
while FSDP2 copies it out): ``benchmarks/step0_memory.py --strategy fsdp2`` measured +671 MB
per rank at step 0 in 0.6, for a 141 MB target (0.7: +135 MB, ``docs/benchmarks.md``). Here the
probe never calls the sharded model:

* a twin of the causal LM is built on the meta device (accelerate's ``init_empty_weights``,
  the live model's own class and a copy of its config), so it has the live model's modules
  and forward code and no weights;
* :func:`~seedprints_lightning.core.layerwise.extract_features_layerwise` runs every probe
  sample through one twin block at a time, and :class:`GatheredBlockLoader` fills that block
  just before it runs with the live block's full tensors (:func:`gather_full_tensor`, an
  all-gather over the tensor's mesh, into one allocation for the block), then drops them.

Peak memory per rank: one block's full tensors plus the probe activations of the rank's slice
of samples. The LM head is never gathered (the features are the last hidden state). Nothing of
the live model is written, and no FSDP hook runs (its lazy init, root and reshard state stay as
they were), so the probe cannot change the training it observes.

The weights run in the dtype the shards hold (an FSDP2 ``MixedPrecisionPolicy`` casts only inside
FSDP2's own forward), under whatever autocast the caller runs the probe in, as the reference
and every later probe of the run are taken the same way.

Every gather is a collective: every rank of the mesh must probe, and probe the same blocks in
the same order. :func:`~seedprints_lightning.core.processes.measure_over_ranks` gives every rank
the same number of samples, and the blocks are the model's, so they do.

DeepSpeed ZeRO-3 is probed the same way. Its parameters are plain tensors emptied to ``[0]``
(each rank keeps a flat slice, ``ds_tensor``), and a forward of the live model would gather
them through DeepSpeed's module hooks, LM head included. The loader instead gathers one block's
parameters with ``deepspeed.zero.GatheredParameters(params, modifier_rank=None)`` (every rank
receives the full tensors; nothing is written back) just before the twin block runs, and lets
DeepSpeed partition them again once it has run. :func:`weights_digest_gathered` hashes the
weights one gathered tensor at a time, for the save records of a ZeRO-3 run.
"""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .layerwise import block_storage, extract_features_layerwise, splits_into_blocks
from .probes import ProbeSpec, find_causal_lm, find_causal_lm_or_none
from .rng import preserve_rng_state
from .weights import tensor_digest

__all__ = ["GATHER_STEP_BYTES", "GatheredBlockLoader", "extract_features_gathered", "gather_full_tensor",
           "gathered_input_embedding", "holds_dtensors", "holds_zero3_params", "probes_gathered", "unsharded_class",
           "weights_digest_gathered"]


def _is_dtensor(tensor: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def holds_dtensors(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is a DTensor (FSDP2's ``fully_shard``, tensor parallelism)."""
    return any(_is_dtensor(param) for param in module.parameters())


def _is_zero3_param(tensor: Any) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitioned (``zero.Init`` or the engine): it has ``ds_id`` and ``ds_status``."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_status")


def holds_zero3_params(module: nn.Module) -> bool:
    """True when any parameter of ``module`` is partitioned by DeepSpeed ZeRO-3 (its local ``.data`` is empty)."""
    return any(_is_zero3_param(param) for param in module.parameters())


def _gathered_zero3(params: list[torch.Tensor]) -> Any:
    """``deepspeed.zero.GatheredParameters(params, modifier_rank=None)``: every rank sees the full tensors inside,
    and nothing is broadcast back on exit (the probe only reads). A collective over the parameters' group."""
    import deepspeed  # ``deepspeed.zero`` is an attribute of the package, not a module

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def probes_gathered(model: nn.Module) -> bool:
    """Whether :func:`extract_features_gathered` probes this model: DTensor or DeepSpeed ZeRO-3 weights, and an
    architecture the layer-major probe splits into blocks. Otherwise a probe calls the model (its own hooks gather)."""
    lm = find_causal_lm(model)
    return (holds_dtensors(lm) or holds_zero3_params(lm)) and splits_into_blocks(lm)


def unsharded_class(module: nn.Module) -> type:
    """The module's class before ``fully_shard`` swapped in its ``FSDP<Class>`` subclass (its own class otherwise)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return type(module)
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


#: Meta twins, one per live causal LM (a twin holds no weights, only the module tree).
_TWINS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _meta_twin(lm: nn.Module) -> nn.Module:
    """The live causal LM's class built on the meta device from a copy of its config (the live config is
    left as it was), in eval mode, every global RNG untouched."""
    twin = _TWINS.get(lm)
    if twin is None:
        from accelerate import init_empty_weights

        cls = unsharded_class(lm)
        with preserve_rng_state(), init_empty_weights():
            try:
                twin = cls(copy.deepcopy(lm.config))
            except Exception as exc:
                raise InputError(f"{cls.__name__}(config) could not be built on the meta device for a layer-major "
                                 f"probe of the sharded model ({type(exc).__name__}: {exc})") from exc
        twin.eval()
        twin.requires_grad_(False)
        _TWINS[lm] = twin
    return twin


class GatheredBlockLoader:
    """A :data:`~seedprints_lightning.core.layerwise.BlockLoader` that fills a meta twin's block with the live
    sharded model's full tensors, then puts the twin's meta tensors back.

    Each tensor of the twin block ``name`` is read from the live module of the same dotted name:
    a DTensor is gathered (:func:`gather_full_tensor`, a collective, into one allocation for the
    block); the block's ZeRO-3 parameters are gathered together by DeepSpeed
    (``GatheredParameters``, a collective) and used in place until the block has run, when
    DeepSpeed partitions them again; a plain tensor (a buffer, or a module FSDP2 holds
    unsharded) is used as it is, without a copy. Read-only: nothing of the live model is
    assigned. ``gathered`` lists the state-dict keys gathered, in order (what tests check).

    Raises:
        InputError: the live model has no tensor (or one of another shape) where the twin has one, named
            by its key; the twin is the live model's own class and config, so that means the live model
            was changed after it was built.
    """

    def __init__(self, live: nn.Module) -> None:
        self.live = live
        self.gathered: list[str] = []

    def __call__(self, name: str, module: nn.Module) -> Callable[[], None]:
        live_block = self.live.get_submodule(name)
        # ZeRO-3: the block's parameters are gathered (every rank, the same block) before their shapes are read,
        # since a partitioned parameter's local tensor is empty; DeepSpeed partitions them again in release().
        zero3 = [param for param in live_block.parameters() if _is_zero3_param(param)]
        zero3_ids = {id(param) for param in zero3}
        gathering = _gathered_zero3(zero3) if zero3 else None
        if gathering is not None:
            gathering.__enter__()
        originals: list[tuple[dict[str, Any], str, torch.Tensor]] = []

        def release() -> None:
            self._restore(originals)  # the twin lets go of the full tensors before DeepSpeed frees them
            if gathering is not None:
                gathering.__exit__(None, None, None)

        try:
            slots: list[tuple[dict[str, Any], str, torch.Tensor, torch.Tensor, str, str, bool]] = []
            for sub_name, twin_sub in module.named_modules():
                live_sub = live_block.get_submodule(sub_name) if sub_name else live_block
                for kind in ("_parameters", "_buffers"):
                    for key, meta in getattr(twin_sub, kind).items():
                        if meta is not None:
                            qualified = ".".join(part for part in (name, sub_name, key) if part)
                            raw = getattr(live_sub, kind).get(key)
                            live = self._live_tensor(raw, meta, qualified)
                            slots.append((getattr(twin_sub, kind), key, meta, live, kind, qualified,
                                          id(raw) in zero3_ids))
            # One allocation for the block's gathered tensors (block_storage says why), on the shards' device.
            sharded = [slot[3] for slot in slots if _is_dtensor(slot[3])]
            storage = iter(block_storage(sharded, local_device(sharded[0])) if sharded else [])
            for owner_slots, key, meta, live, kind, qualified, gathered in slots:
                if _is_dtensor(live):
                    self.gathered.append(qualified)
                    full = gather_full_tensor(live, out=next(storage))
                else:
                    if gathered:
                        self.gathered.append(qualified)
                    full = live
                originals.append((owner_slots, key, meta))
                owner_slots[key] = nn.Parameter(full, requires_grad=False) if kind == "_parameters" else full
        except BaseException:
            release()
            raise
        return release

    @staticmethod
    def _live_tensor(tensor: torch.Tensor | None, meta: torch.Tensor, qualified: str) -> torch.Tensor:
        if tensor is None or tuple(tensor.shape) != tuple(meta.shape):
            found = "no tensor" if tensor is None else f"shape {tuple(tensor.shape)}"
            raise InputError(f"the sharded model has {found} at {qualified!r} where its class and config build "
                             f"{tuple(meta.shape)}: a model changed after it was built cannot be probed layer by "
                             "layer; probe it by calling it (extract_features)")
        return tensor.detach()

    @staticmethod
    def _restore(originals: list[tuple[dict[str, Any], str, torch.Tensor]]) -> None:
        for slots, key, meta in reversed(originals):
            slots[key] = meta
        originals.clear()


#: Bytes of the staging buffer a row-wise gather goes through (every rank's rows of one step).
GATHER_STEP_BYTES = 4 * 2**20


def gather_full_tensor(tensor: torch.Tensor, *, out: torch.Tensor | None = None,
                       step_bytes: int = GATHER_STEP_BYTES) -> torch.Tensor:
    """The full tensor of a DTensor, holding little more than the result while it is gathered.

    ``DTensor.full_tensor()`` all-gathers into a flat buffer of the whole tensor, which gloo (the
    CPU backend) then copies out: twice the tensor at its peak (a 125 MB embedding peaked at
    250 MB). FSDP2's placement (``Shard(0)`` over a 1-D mesh, ``torch.chunk`` rows per rank) is
    gathered here row block by row block into the preallocated result instead, through a
    ``step_bytes`` staging buffer; other placements (tensor parallelism, HSDP) use
    ``full_tensor()`` (copied into ``out``). A collective: every rank of the mesh calls it with its
    own shard. ``out``: where to gather (the tensor's global shape and dtype, on the shards' device).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    if mesh.ndim != 1 or len(tensor.placements) != 1 or type(tensor.placements[0]) is not Shard \
            or tensor.placements[0].dim != 0 or tensor.ndim == 0:
        return tensor.full_tensor() if out is None else out.copy_(tensor.full_tensor())
    local, world, rank = tensor.to_local(), mesh.size(), mesh.get_local_rank()
    rows = tensor.shape[0]
    per_rank = -(-rows // world)  # torch.chunk: ceil(rows / world) a rank, the last ranks fewer or none
    full = torch.empty(tensor.shape, dtype=local.dtype, device=local.device) if out is None else out
    row_shape = tuple(tensor.shape[1:])
    row_bytes = max(1, full[:1].numel() * full.element_size())
    step = max(1, min(per_rank, step_bytes // (world * row_bytes)))
    staged = torch.empty((world * step, *row_shape), dtype=local.dtype, device=local.device)
    sent = torch.zeros((step, *row_shape), dtype=local.dtype, device=local.device)
    group = mesh.get_group()
    for start in range(0, per_rank, step):
        count = min(step, per_rank - start)
        mine = local[start:start + count]
        sent[:len(mine)].copy_(mine)
        sent[len(mine):count].zero_()  # padding of a short last shard; dropped below
        received = staged[:world * count]
        dist.all_gather_into_tensor(received, sent[:count], group=group)
        for source in range(world):
            first = source * per_rank + start
            kept = max(0, min(count, rows - first))
            if kept:
                full[first:first + kept].copy_(received[source * count:source * count + kept])
    if local.shape[0] != max(0, min(per_rank, rows - rank * per_rank)):  # every rank finds the same
        raise InputError(f"a Shard(0) DTensor of {rows} rows holds {local.shape[0]} on rank {rank} of {world}, not "
                         "torch.chunk's share: gather it with DTensor.full_tensor()")
    return full


def local_device(tensor: torch.Tensor) -> torch.device:
    return tensor.to_local().device if _is_dtensor(tensor) else tensor.device


def extract_features_gathered(
    model: nn.Module,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    sample_range: tuple[int, int] | None = None,
    loader: GatheredBlockLoader | None = None,
) -> torch.Tensor:
    """``extract_features(model, spec)`` of a sharded model, one gathered block at a time: ``[n, D]`` float32 on CPU.

    See the module docstring. Inputs and activations live where the rank's shards do; embedding
    probes are cast to the live token embedding's dtype, as ``extract_features`` does. Every rank of
    the model's mesh must call this with the same number of samples (a gather is a collective).

    Args:
        model: a sharded LLaMA / Qwen2 / Mistral / GPT-2 causal LM (or a module containing one).
        spec: the probe; an unresolved spec is resolved from the live model.
        sample_range: ``(start, stop)``: this rank's slice of the samples.
        loader: the :class:`GatheredBlockLoader` to use (tests read its ``gathered``); default: a new one.

    Raises:
        InputError: the architecture cannot be split into blocks, or the live model no longer matches
            its class and config.
    """
    lm = find_causal_lm(model)
    if not spec.is_resolved:
        spec = spec.resolve(lm)
    twin = _meta_twin(lm)
    embedding = lm.get_input_embeddings().weight
    loader = loader if loader is not None else GatheredBlockLoader(lm)
    if loader.live is not lm:
        raise InputError("the GatheredBlockLoader reads another model than the one probed: build it on the causal LM")
    return extract_features_layerwise(twin, spec, batch_size=batch_size, sample_range=sample_range,
                                      block_loader=loader, device=local_device(embedding), dtype=embedding.dtype)


def weights_digest_gathered(lm: nn.Module, *, writer: bool) -> str:
    """:func:`~seedprints_lightning.core.weights.weights_digest` of ``lm.state_dict()`` for a sharded model (DeepSpeed
    ZeRO-3, whose local tensors are empty, or FSDP2's DTensors): each sharded tensor is gathered alone (in name
    order), hashed by the ``writer`` and dropped, so a rank never holds more than one full tensor.

    A collective: every rank of the model's group must call it, at the same save. The other
    processes return ``""`` (only the writer's digest is recorded, as for an unsharded model). The
    names, dtypes and bytes are those of the unsharded model's ``state_dict()``, so the digest
    equals the one of the consolidated weights (``zero_to_fp32``, a ``save_pretrained`` of the
    gathered model, a DCP checkpoint read back) when they are saved in the parameters' dtype.
    """
    tensors = {str(key): value for key, value in lm.state_dict(keep_vars=True).items()
               if isinstance(value, torch.Tensor)}
    if not tensors:
        raise InputError("weights_digest_gathered: the model's state dict holds no tensor")
    combined = hashlib.sha256()
    for key in sorted(tensors):  # every rank walks the same names: the gathers pair up
        tensor = tensors[key]
        if _is_zero3_param(tensor):
            with _gathered_zero3([tensor]):
                part = tensor_digest(key, tensor.data) if writer else ""
        elif _is_dtensor(tensor):
            full = gather_full_tensor(tensor.detach())
            part = tensor_digest(key, full) if writer else ""
            del full
        else:
            part = tensor_digest(key, tensor.detach()) if writer else ""
        if writer:
            combined.update(key.encode("utf-8") + b"\0" + part.encode("ascii"))
    return combined.hexdigest() if writer else ""


def gathered_input_embedding(model: nn.Module) -> Any:
    """A context in which a ZeRO-3 causal LM's input embedding holds its full weight (``GatheredParameters``, a
    collective: every rank enters it), for code that reads it, as resolving an embedding probe's mean and std
    does. A no-op context for any other model."""
    import contextlib

    lm = find_causal_lm_or_none(model)
    weight = getattr(lm.get_input_embeddings(), "weight", None) if lm is not None else None
    return _gathered_zero3([weight]) if _is_zero3_param(weight) else contextlib.nullcontext()
