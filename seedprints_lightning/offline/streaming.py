"""Models probed one block at a time from disk, and the choice between that and loading them whole.

:class:`ModelHandle` is one model source (a ``save_pretrained`` directory or a training checkpoint)
opened without reading its weights: its config, a meta-device copy of its causal LM (accelerate's
``init_empty_weights``) and a :class:`WeightStore` that reads named tensors on demand. Its
:meth:`~ModelHandle.fingerprint` probes it either

* **whole**: :func:`~seedprints_lightning.offline.sources.load_model` then ``fingerprint_model``
  (the path every version before this one took), or
* **streamed**: :func:`~seedprints_lightning.core.layerwise.extract_features_layerwise` on the meta
  model with a block loader that reads only the running block's tensors (a ``safe_open`` per block,
  closed after it, so no mapping of a shard stays open), casts them to the runtime dtype, moves
  them to its device, and frees them once the block has run. Peak memory: one block plus the probe
  activations. Controls are then :func:`~seedprints_lightning.core.layerwise.probe_streamed_control`,
  the same weights as the whole path's :func:`~seedprints_lightning.core.controls.build_control_model`.

``load="auto"`` takes the whole path when the weights fit the available memory with a margin
(:data:`WHOLE_SAFETY_FACTOR` times their size in the runtime dtype against
``psutil.virtual_memory().available``, and against the CUDA device's free memory when probing on
one), the streamed path otherwise. Features of both paths are equal (tests/test_streaming.py).

Weight stores: safetensors (one ``model.safetensors`` or a sharded directory with
``model.safetensors.index.json``; headers are parsed without mapping the files, so a truncated shard
is named with its first cut tensor before anything runs), training checkpoints (``torch.load(mmap=True,
weights_only=True)``, mapped again for each block and closed after it, so the pages read never
add up to the whole file: :class:`StateDictStore`) and Lightning distributed checkpoint
directories (a partial ``torch.distributed.checkpoint`` load of one block's keys at a time).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core.controls import (
    INIT_SCHEME_ATTR,
    INIT_STREAMED,
    ControlSet,
    control_seeds,
    preserve_rng_state,
    probe_streamed_controls,
)
from ..core.errors import IncompatibleFingerprintsError, InputError, SourceError
from ..core.families import TRANSFORMERS, ModelFamily, family_of, plan_measurement
from ..core.fingerprint import Fingerprint, config_digest, fingerprint_model
from ..core.layerwise import extract_features_layerwise, split_blocks
from ..core.probes import ProbeSpec

__all__ = [
    "LOAD_CHOICES",
    "WHOLE_SAFETY_FACTOR",
    "FamilyCheckpointHandle",
    "LoadDecision",
    "ModelHandle",
    "WeightStore",
    "available_memory",
    "check_fits",
    "measurement_of",
    "why_not_streamed",
]

LoadMode = Literal["auto", "whole", "streamed"]
LOAD_CHOICES: tuple[str, ...] = ("auto", "whole", "streamed")
#: The whole path is taken when ``WHOLE_SAFETY_FACTOR * weight bytes`` fits the available memory:
#: loading holds the weights once, a checkpoint read or a dtype cast can hold them twice for a moment,
#: and the probe's activations and the controls (one more copy) come on top.
WHOLE_SAFETY_FACTOR = 3.0

_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def available_memory(device: torch.device | str | None = None) -> tuple[int, str]:
    """``(bytes, what)``: the host's available memory, or the lesser of it and the CUDA device's free memory."""
    try:
        import psutil

        host = int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with accelerate; /proc/meminfo on Linux otherwise
        host = _meminfo_available()
    what = "host memory available"
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        if free < host:
            return int(free), f"free memory of {device}"
    return host, what


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: assume it fits, as before this module existed


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB"


# --------------------------------------------------------------------------------------
# Weight stores: named tensors read on demand
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]
    numel: int
    nbytes: int  # as stored
    floating: bool


class WeightStore:
    """Named tensors of a saved model (names as in the causal LM's state dict), read only when asked for."""

    describe: str = "weights"

    def info(self, key: str) -> _TensorInfo | None:
        raise NotImplementedError

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (all present: check with :meth:`info` first), as saved, on CPU."""
        raise NotImplementedError

    def where(self, key: str) -> str:
        """The file a key is (or would be) read from, for messages."""
        return self.describe

    def close(self) -> None:
        """Drop what the store holds open."""


def _candidates(key: str, prefixes: tuple[str, ...]) -> list[str]:
    """A causal-LM state-dict key as a saved file may spell it: as is, or without the base model's prefix."""
    out = [key]
    for prefix in prefixes:
        if prefix and key.startswith(prefix):
            out.append(key[len(prefix):])
    return out


class SafetensorsStore(WeightStore):
    """One ``model.safetensors``, or the shards an ``model.safetensors.index.json`` names.

    Headers are parsed from the files directly (no mapping); a tensor is read by opening its shard
    with ``safe_open`` for the block being loaded and closing it after.
    """

    def __init__(self, folder: Path, prefixes: tuple[str, ...] = ()) -> None:
        self.folder, self.prefixes = folder, prefixes
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SourceError(f"{index} is not a readable safetensors index ({type(exc).__name__}: {exc})") from exc
            files = sorted({folder / name for name in weight_map.values()})
            self.describe = f"{index} ({len(files)} shards)"
            self._file_of_key = {key: folder / name for key, name in weight_map.items()}
        else:
            files = [folder / "model.safetensors"]
            self.describe = str(files[0])
            self._file_of_key = None
        self._infos: dict[str, tuple[Path, _TensorInfo]] = {}
        for file in files:
            for key, info in _read_header(file).items():
                self._infos[key] = (file, info)
        if self._file_of_key is not None:
            for key, file in self._file_of_key.items():
                if key not in self._infos or self._infos[key][0] != file:
                    raise SourceError(f"{file}: the index {index} names tensor {key!r} in this shard, but the shard "
                                      "does not hold it (an incomplete or mismatched shard)")

    def _stored(self, key: str) -> str | None:
        return next((c for c in _candidates(key, self.prefixes) if c in self._infos), None)

    def info(self, key: str) -> _TensorInfo | None:
        stored = self._stored(key)
        return None if stored is None else self._infos[stored][1]

    def where(self, key: str) -> str:
        stored = self._stored(key)
        return str(self._infos[stored][0]) if stored is not None else self.describe

    def total_bytes(self) -> tuple[int, int]:
        """``(floating numel, other bytes)`` of everything stored."""
        floating = sum(info.numel for _, info in self._infos.values() if info.floating)
        other = sum(info.nbytes for _, info in self._infos.values() if not info.floating)
        return floating, other

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key in keys:
            stored = self._stored(key)
            by_file.setdefault(self._infos[stored][0], []).append((key, stored))
        out: dict[str, torch.Tensor] = {}
        for file, items in by_file.items():
            current = items[0][1]
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key, stored in items:
                        current = stored
                        out[key] = handle.get_tensor(stored)
            except Exception as exc:  # safetensors raises its own error types for damaged files
                raise SourceError(f"{file}: tensor {current!r} could not be read "
                                  f"({type(exc).__name__}: {exc})") from exc
        return out


def _read_header(file: Path) -> dict[str, _TensorInfo]:
    """A safetensors file's tensor table, read from its header; a file cut short names its first missing tensor."""
    if not file.is_file():
        raise SourceError(f"{file} does not exist (a shard of the model is missing)")
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise SourceError(f"{file} is truncated: {size} bytes, not even a safetensors header")
            length = int.from_bytes(raw, "little")
            if 8 + length > size:
                raise SourceError(f"{file} is truncated: its header needs {8 + length} bytes, the file has {size}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    header.pop("__metadata__", None)
    out = {}
    cut = []
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        if 8 + length + end > size:
            cut.append((begin, key, end))
        shape = tuple(int(d) for d in entry["shape"])
        numel = 1
        for d in shape:
            numel *= d
        dtype = str(entry["dtype"])
        out[key] = _TensorInfo(shape, numel, end - begin, dtype.startswith(("F", "BF")))
    if cut:
        _, key, end = min(cut)
        raise SourceError(f"{file} is truncated: tensor {key!r} ends at byte {8 + length + end} but the file has "
                          f"{size} bytes ({len(cut)} tensors cut); re-save or re-download this shard")
    return out


class StateDictStore(WeightStore):
    """A training checkpoint's tensors, mapped again for each block's read (``torch.load(mmap=True)``).

    Pages of a mapped file that were read count as resident until the mapping is closed, so one
    mapping kept open for the whole probe would end holding the whole checkpoint. Each
    :meth:`read` therefore maps the file, copies its block's tensors out and drops the mapping
    (re-reading the pickle is cheap next to a block's weights); between reads only the shapes are kept.
    """

    def __init__(self, weights: dict[str, torch.Tensor], describe: str, prefixes: tuple[str, ...] = (),
                 remap: Callable[[], dict[str, torch.Tensor]] | None = None) -> None:
        self.describe, self.prefixes = describe, prefixes
        self.infos = {key: _TensorInfo(tuple(t.shape), t.numel(), t.numel() * t.element_size(), t.is_floating_point())
                      for key, t in weights.items()}
        # Without a way to map the file again (weights given in memory), the tensors are kept.
        self._remap = remap
        self._weights = None if remap is not None else weights

    def _stored(self, key: str) -> str | None:
        return next((c for c in _candidates(key, self.prefixes) if c in self.infos), None)

    def info(self, key: str) -> _TensorInfo | None:
        stored = self._stored(key)
        return None if stored is None else self.infos[stored]

    @property
    def holds_tensors(self) -> bool:
        """Whether the store keeps tensors (or a mapping of the file) between reads."""
        return self._weights is not None

    def total_bytes(self) -> tuple[int, int]:
        floating = sum(i.numel for i in self.infos.values() if i.floating)
        other = sum(i.nbytes for i in self.infos.values() if not i.floating)
        return floating, other

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        weights = self._weights if self._weights is not None else self._remap()
        out = {}
        try:
            for key in keys:
                stored = self._stored(key)
                try:
                    out[key] = weights[stored].clone()
                except Exception as exc:  # a mapped file cut short fails here
                    raise SourceError(f"{self.describe}: tensor {stored!r} could not be read "
                                      f"({type(exc).__name__}: {exc})") from exc
        finally:
            del weights  # the last reference to this read's mapping: its pages are released
        return out

    def close(self) -> None:
        self._weights, self._remap = None, None


class DistributedCheckpointStore(WeightStore):
    """A Lightning distributed checkpoint directory: each block's keys loaded alone (DCP partial loads)."""

    def __init__(self, folder: Path, prefix: str) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder, self.prefix = folder, prefix
        self.describe = f"{folder} (distributed checkpoint)"
        try:
            metadata = FileSystemReader(str(folder)).read_metadata()
        except Exception as exc:
            raise SourceError(f"{folder}: the distributed checkpoint's .metadata could not be read "
                              f"({type(exc).__name__}: {exc})") from exc
        self._meta = {}
        for key, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata) and key.startswith(f"state_dict.{prefix}"):
                self._meta[key[len(f"state_dict.{prefix}"):]] = entry

    def info(self, key: str) -> _TensorInfo | None:
        entry = self._meta.get(key)
        if entry is None:
            return None
        shape = tuple(int(d) for d in entry.size)
        numel = 1
        for d in shape:
            numel *= d
        dtype = entry.properties.dtype
        return _TensorInfo(shape, numel, numel * dtype.itemsize, dtype.is_floating_point)

    def total_bytes(self) -> tuple[int, int]:
        infos = [self.info(key) for key in self._meta]
        return (sum(i.numel for i in infos if i.floating), sum(i.nbytes for i in infos if not i.floating))

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        wanted = {}
        for key in keys:
            entry = self._meta[key]
            wanted[f"{self.prefix}{key}"] = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"state_dict": wanted}, checkpoint_id=str(self.folder), no_dist=True)
        except Exception as exc:
            raise SourceError(f"{self.folder}: the tensors {sorted(wanted)[:3]}... could not be read from the "
                              f"distributed checkpoint ({type(exc).__name__}: {exc})") from exc
        return {key: wanted[f"{self.prefix}{key}"] for key in keys}


# --------------------------------------------------------------------------------------
# Block loader
# --------------------------------------------------------------------------------------


class _StoreLoader:
    """A :data:`~seedprints_lightning.core.layerwise.BlockLoader` reading each block's tensors from a store.

    Tensors the meta model holds on the meta device are read (all of one block in one go), checked
    against the meta shapes, cast to ``dtype`` (floating ones) and moved to ``device``; tensors
    already real (rotary ``inv_freq`` buffers) are moved alike. The release puts the meta tensors back.
    """

    def __init__(self, store: WeightStore, device: torch.device, dtype: torch.dtype) -> None:
        self.store, self.device, self.dtype = store, device, dtype
        self.loaded: list[str] = []

    def __call__(self, name: str, module: nn.Module) -> Callable[[], None]:
        slots = []  # (owner, kind, key, original tensor, full name)
        for sub, owner in module.named_modules():
            for kind in ("_parameters", "_buffers"):
                for key, tensor in getattr(owner, kind).items():
                    if tensor is not None:
                        full = ".".join(part for part in (name, sub, key) if part)
                        slots.append((owner, kind, key, tensor, full))
        needed = [slot for slot in slots if slot[3].device.type == "meta"]
        for *_, tensor, full in needed:
            info = self.store.info(full)
            if info is None:
                raise SourceError(f"{self.store.where(full)}: the saved model has no tensor {full!r} (needed by "
                                  f"block {name!r}); the checkpoint is incomplete or of another model")
            if info.shape != tuple(tensor.shape):
                raise SourceError(f"{self.store.where(full)}: tensor {full!r} has shape {list(info.shape)}, but the "
                                  f"model's config makes it {list(tensor.shape)}")
        read = self.store.read([slot[4] for slot in needed]) if needed else {}
        self.loaded.append(name)
        for owner, kind, key, tensor, full in slots:
            value = read.get(full, tensor)
            value = value.detach().to(device=self.device, dtype=self.dtype if value.is_floating_point() else None)
            getattr(owner, kind)[key] = nn.Parameter(value, requires_grad=False) if kind == "_parameters" else value

        def release() -> None:
            for owner, kind, key, tensor, _ in slots:
                getattr(owner, kind)[key] = tensor

        return release


# --------------------------------------------------------------------------------------
# Model handles
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadDecision:
    """Which path a model was probed by, and why (``to_dict`` goes into fingerprints and the JSON output).

    ``path`` is the path actually taken, ``requested`` the ``--load`` asked for; :attr:`honoured` is
    False when an explicit request could not be followed (``--load streamed`` of a class the
    layer-major probe cannot split, loaded whole because it fits: ``reason`` says so, ``note`` why).
    """

    path: Literal["whole", "streamed"]
    reason: str
    requested: str = "auto"
    note: str | None = None

    @property
    def honoured(self) -> bool:
        return self.requested in ("auto", self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "requested": self.requested, "honoured": self.honoured,
                "note": self.note}

    def describe(self) -> str:
        return f"{self.path} ({self.reason})" + (f"; note: {self.note}" if self.note else "")


@dataclass
class ModelHandle:
    """A model source opened without its weights: config, meta causal LM and (where it can stream) a weight store."""

    source: Any  # sources.Source
    config: Any
    meta: nn.Module
    store: WeightStore | None
    why_not_streamed: str | None = None  # set when the store is None, or the class cannot be split
    runtime: Any = None
    #: Loads the model whole (:func:`~seedprints_lightning.offline.sources.load_model` of the source).
    load_whole: Callable[[], nn.Module] | None = field(default=None, repr=False)
    _whole: nn.Module | None = field(default=None, repr=False)

    @property
    def lm_class(self) -> str:
        return type(self.meta).__name__

    def weight_bytes(self) -> int:
        """The weights' size in the runtime dtype (floating tensors; others as stored)."""
        if self.store is not None and hasattr(self.store, "total_bytes"):
            floating, other = self.store.total_bytes()
        else:
            floating = sum(p.numel() for p in self.meta.parameters())
            other = 0
        return floating * torch.empty((), dtype=self.runtime.dtype).element_size() + other

    def decide(self) -> LoadDecision:
        """The path this model is probed by under ``runtime.load`` (see the module docstring)."""
        requested = getattr(self.runtime, "load", "auto")
        size = self.weight_bytes()
        need = WHOLE_SAFETY_FACTOR * size
        available, what = available_memory(self.runtime.device)
        fits = need <= available
        sizes = f"weights {_gb(size)} in {str(self.runtime.dtype).removeprefix('torch.')}, {what} {_gb(available)}"
        if requested == "whole":
            return LoadDecision("whole", "--load whole", requested)
        if self.why_not_streamed is None and requested == "streamed":
            return LoadDecision("streamed", "--load streamed", requested)
        if self.why_not_streamed is None:
            if fits:
                return LoadDecision("whole", f"auto: fits, {sizes}", requested)
            return LoadDecision("streamed", f"auto: {WHOLE_SAFETY_FACTOR:g}x the weights exceed the memory, {sizes}",
                                requested)
        if not fits and requested == "streamed":
            # An explicit request for the streamed path is a limit the user set: never overridden by a whole
            # load that would not fit. An input error (exit 2): the request cannot be met for this model.
            raise InputError(
                f"--load streamed was asked for {self.source.path}, but it cannot be probed one block at a time "
                f"({self.why_not_streamed}), and the whole model does not fit in memory ({sizes}; the whole path "
                f"needs about {WHOLE_SAFETY_FACTOR:g}x the weights). Probe it on a machine with more memory, or pass "
                "--load whole to load it whole anyway"
            )
        if not fits:
            raise SourceError(
                f"{self.source.path} does not fit in memory to be probed whole ({sizes}; the whole path needs about "
                f"{WHOLE_SAFETY_FACTOR:g}x the weights) and cannot be probed one block at a time: "
                f"{self.why_not_streamed}. Probe it on a machine with more memory, or pass --load whole to try anyway"
            )
        if requested == "streamed":
            return LoadDecision("whole", f"--load streamed NOT honoured: this model class cannot stream, so it was "
                                         f"loaded whole, which fits ({sizes})", requested, note=self.why_not_streamed)
        return LoadDecision("whole", f"auto: cannot stream, fits ({sizes})", requested, note=self.why_not_streamed)

    def embedding_stats(self) -> tuple[float, float]:
        """Mean and std of the input embedding, as ``ProbeSpec.resolve`` takes them (from the runtime dtype)."""
        embedding = self.meta.get_input_embeddings()
        name = next(n for n, m in self.meta.named_modules() if m is embedding)
        key = f"{name}.weight"
        if self.store is None or self.store.info(key) is None:
            weight = self.whole().get_input_embeddings().weight
        else:
            weight = self.store.read([key])[key].to(self.runtime.dtype)
        weight = weight.detach().float()
        return float(weight.mean()), float(weight.std())

    def resolve(self, spec: Any) -> Any:
        """``spec`` resolved for this model without loading it whole where possible."""
        spec = spec or ProbeSpec()
        if spec.kind == "embedding" and (spec.embed_mean is None or spec.embed_std is None):
            mean, std = self.embedding_stats()
            spec = dataclasses.replace(spec, embed_mean=spec.embed_mean if spec.embed_mean is not None else mean,
                                       embed_std=spec.embed_std if spec.embed_std is not None else std)
        return spec.resolve(self.meta)

    def whole(self) -> nn.Module:
        """The model loaded whole (kept until :meth:`release`)."""
        if self._whole is None:
            if self.load_whole is None:
                raise SourceError(f"{self.source.path}: this handle was opened without a way to load the model whole")
            self._whole = self.load_whole()
        return self._whole

    def release(self) -> None:
        """Free the whole model (if loaded) and what the store holds open."""
        self._whole = None
        if self.store is not None:
            self.store.close()

    def fingerprint(self, spec: Any, *, step: int | None, num_controls: int = 0,
                    extra: dict[str, Any] | None = None) -> Any:
        """Probe the model (by :meth:`decide`'s path) into a fingerprint; ``extra["load"]`` records the path.

        ``extra["measurement"]`` records how (the :class:`~seedprints_lightning.core.families.MeasurementPlan`).
        """
        decision = self.decide()
        plan = plan_measurement(self.meta, num_controls=num_controls, layer_major=decision.path == "streamed")
        extra = {**dict(extra or {}), "load": decision.to_dict(), "measurement": measurement_of(plan, decision)}
        runtime = self.runtime
        if decision.path == "whole":
            model = self.whole()
            if spec is not None and spec.is_resolved:
                check_fits(model, spec, str(self.source.path))
            if runtime.device is not None:
                model.to(runtime.device)
            try:
                return fingerprint_model(model, spec, step=step, batch_size=runtime.batch_size,
                                         progress=runtime.progress, extra=extra, num_controls=num_controls)
            finally:
                self.release()
        if spec is not None and spec.is_resolved:
            check_fits(self.meta, spec, str(self.source.path))
        spec = self.resolve(spec)
        device = torch.device(runtime.device) if runtime.device is not None else torch.device("cpu")
        loader = _StoreLoader(self.store, device, runtime.dtype)
        try:
            features = extract_features_layerwise(self.meta, spec, batch_size=runtime.batch_size, block_loader=loader,
                                                  device=device, dtype=runtime.dtype)
        finally:
            self.release()
        seeds = control_seeds(num_controls)
        controls = None
        if seeds:
            controls = probe_streamed_controls(self.config, seeds, spec, batch_size=runtime.batch_size, device=device,
                                               dtype=runtime.dtype)
        return Fingerprint(features=features, spec=spec, model_class=self.lm_class,
                           config_digest=config_digest(self.config), step=step, extra=extra, controls=controls,
                           control_seeds=seeds, controls_init_scheme=INIT_STREAMED if seeds else None)


def measurement_of(plan: Any, decision: LoadDecision) -> dict[str, str]:
    """The plan as a fingerprint's ``extra["measurement"]``, its reason saying why this load path was taken."""
    return {**plan.to_dict(), "reason": f"{plan.reason} ({decision.reason})"}


@dataclass
class FamilyCheckpointHandle:
    """A model family's checkpoint that its family rebuilds whole (:class:`~seedprints_lightning.core.families.
    CheckpointSide`'s ``load_model``), probed and re-initialised by the family: the handle for a family with no
    ``open`` of its own (torchtitan's checkpoints).
    """

    source: Any  # sources.Source
    family: ModelFamily
    runtime: Any
    why_not_streamed: str | None = "this family's checkpoints are rebuilt whole by the family"
    _whole: nn.Module | None = field(default=None, repr=False)

    @property
    def meta(self) -> nn.Module:
        """The model (rebuilt whole: the family has no weight-free reader); sizes and specs are read from it."""
        return self.whole()

    @property
    def config(self) -> Any:
        return getattr(self.whole(), "config", None)

    @property
    def lm_class(self) -> str:
        return type(self.whole()).__name__

    def decide(self) -> LoadDecision:
        return LoadDecision("whole", f"{self.family.name} checkpoint: rebuilt whole by its family",
                            getattr(self.runtime, "load", "auto"), note=self.why_not_streamed)

    def whole(self) -> nn.Module:
        if self._whole is None:
            load = self.family.checkpoint.get("load_model")
            model = None if load is None else load(self.source.path, dtype=self.runtime.dtype,
                                                   trust_pickle=self.runtime.trust_pickle)
            if model is None:
                raise SourceError(f"{self.source.path} is a {self.family.name} checkpoint, which this installation "
                                  "cannot rebuild into a model yet")
            self._whole = model.eval()
        return self._whole

    def release(self) -> None:
        self._whole = None

    def embedding_stats(self) -> tuple[float, float]:
        spec = self.family.resolve_spec(ProbeSpec(kind="embedding"), self.whole())
        return float(spec.embed_mean), float(spec.embed_std)

    def resolve(self, spec: Any) -> Any:
        return self.family.resolve_spec(spec, self.whole())

    def controls(self, spec: Any, num_controls: int) -> ControlSet:
        """``num_controls`` fresh inits by the family (its own init), probed on ``spec``."""
        seeds = control_seeds(num_controls)
        if not seeds:
            return ControlSet.none("no controls (--controls 0): analytic threshold and effect-size margin only")
        model, features, schemes = self.whole(), [], set()
        with preserve_rng_state():
            for seed in seeds:
                control = self.family.build_control(model, seed)
                schemes.add(getattr(control, INIT_SCHEME_ATTR, None))
                features.append(self.family.whole(control, spec, batch_size=self.runtime.batch_size))
                del control
        identity = self.family.identity(model)
        return ControlSet(torch.stack(features), seeds, spec, identity["config_digest"], identity["model_class"],
                          f"{len(seeds)} fresh inits of {self.source.path}'s {self.family.name} config (the family's "
                          f"own init, seeds {seeds[0]}..{seeds[-1]})",
                          init_scheme=schemes.pop() if len(schemes) == 1 else None)

    def fingerprint(self, spec: Any, *, step: int | None, num_controls: int = 0,
                    extra: dict[str, Any] | None = None) -> Any:
        decision = self.decide()
        model = self.whole()
        plan = plan_measurement(model, family=self.family, num_controls=num_controls)
        extra = {**dict(extra or {}), "load": decision.to_dict(), "measurement": measurement_of(plan, decision)}
        try:
            spec = self.family.resolve_spec(spec, model)
            if self.runtime.device is not None:
                model.to(self.runtime.device)
            features = self.family.whole(model, spec, batch_size=self.runtime.batch_size)
            evidence = self.controls(spec, num_controls) if num_controls else None
            identity = self.family.identity(model)
        finally:
            self.release()
        return Fingerprint(features=features, spec=spec, step=step, extra=extra,
                           controls=None if evidence is None else evidence.features,
                           control_seeds=() if evidence is None else evidence.seeds,
                           controls_init_scheme=None if evidence is None else evidence.init_scheme, **identity)


def check_fits(model: nn.Module, spec: ProbeSpec, name: str) -> None:
    """Raise :class:`IncompatibleFingerprintsError` unless ``model`` can take ``spec``'s inputs (its family's rule)."""
    try:
        (family_of(model) or TRANSFORMERS).resolve_spec(spec, model)  # a resolved spec resolves to itself
    except InputError as exc:
        raise IncompatibleFingerprintsError(f"{name} cannot be probed with this probe spec: {exc}") from exc


def why_not_streamed(meta: nn.Module) -> str | None:
    """Why the layer-major probe cannot split this model (``None``: it can)."""
    try:
        split_blocks(meta)
    except InputError as exc:
        return str(exc)
    return None


def __getattr__(name: str) -> Any:
    """``open_model``, 0.8's name here, now :func:`seedprints_lightning.offline.sources.open_model` (warns)."""
    if name == "open_model":
        warnings.warn("seedprints_lightning.offline.streaming.open_model moved to "
                      "seedprints_lightning.offline.sources.open_model in 0.9; the old name goes in 0.10",
                      DeprecationWarning, stacklevel=2)
        # why: a deprecation shim only; sources imports this module, so it cannot be imported at the top
        from .sources import open_model

        return open_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
