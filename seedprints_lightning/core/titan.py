"""The torchtitan model family: PyTorch's reference pretraining stack, its ``Decoder`` models (``Llama3Model``).

What the package needs of a family, for torchtitan's ``torchtitan.models.common.decoder.Decoder``
(read from torchtitan 0.3.0: ``Decoder.forward(tokens, positions, attention_masks)`` runs
``tok_embeddings``, each block of the ``layers`` dict as ``layer(h, attention_masks, positions)``,
``norm``, then ``lm_head`` unless ``_skip_lm_head``):

- **features**: the last hidden state at the last position, i.e. ``norm``'s output there. A probe
  sample is one document: ``positions`` is ``arange(L)`` on every row, and the attention masks are
  the model's own (``model.get_attention_masks(positions)``: FlexAttention's causal, per-document
  block mask, or varlen metadata; none for a maskless attention, as torchtitan's trainer passes
  none), so the probe runs what training runs. The whole forward is the model's own with
  ``_skip_lm_head`` set (torchtitan's switch for a forward that ends at ``norm``), so the LM head
  never runs. Embedding probes enter where ``tok_embeddings`` would hand over: the embedding module
  is replaced, for that forward only, by one that passes its input through.
- **layer-major probe** (:func:`extract_features_titan_layerwise`): the embeddings, then each block,
  then ``norm``, every probe sample through one block before the next, with a
  :data:`~seedprints_lightning.core.layerwise.BlockLoader` called before each block. The model's own
  forward is run once per batch with its blocks and ``norm`` swapped for recorders (as for the
  transformers families), so each block gets exactly the arguments a whole forward gives it; the
  features equal the whole forward's bit for bit (``tests/test_titan.py``).
- **sharded models** (FSDP2 / tensor parallel: DTensor weights, as torchtitan's trainer builds them
  even on one GPU): :func:`extract_features_titan_gathered` runs the layer-major probe on a meta twin
  built from the model's own config, each block filled with the live model's gathered tensors just
  before it runs (:class:`~seedprints_lightning.core.sharded.GatheredBlockLoader`, a collective every
  rank makes), so a rank never holds more than one full block. :func:`extract_features_titan` does
  this by itself for a sharded model.
- **controls**: fresh inits with torchtitan's own ``init_states`` (each module's ``param_init``: the
  depth-scaled truncated normals of ``Llama3Model``) under ``torch.manual_seed(seed)``, on a model
  built from the live model's own config (``model.config``) on the meta device and materialised on
  the CPU (:func:`build_titan_control`); a sharded model's too (its config, never its weights).
  ``init_states`` draws the whole model from the global generator in module order, so a control is
  built whole, as the trainer builds the model.
- **the config as a record** (:func:`titan_config_record` / :func:`titan_config_from_record`): the
  model's config as plain JSON types (each config class and init function by its import path), kept
  in the face's checkpoint state so the offline CLI rebuilds the model from torchtitan's distributed
  checkpoint (:mod:`seedprints_lightning.offline.titan`). Reading a record imports only modules of
  ``torchtitan`` and ``torch.nn.init`` (and those the caller trusts), never a pickle. An init that
  is a closure (the fused QKV init) cannot be named: it is taken from torchtitan's own registry
  config of the recorded model and flavor when that config has the same node.

Nothing here imports ``torchtitan`` at module import: a model is recognised only when ``torchtitan``
is already imported (a model of it exists), so other users pay nothing (its import needs ``triton``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .controls import INIT_SCHEME_ATTR, preserve_rng_state
from .errors import InputError
from .layerwise import BlockLoader
from .layerwise import Blocks as _Blocks
from .layerwise import Recorder as _Recorder
from .layerwise import Recording as _Recording
from .probes import ProbeBatch, ProbeSpec, preserve_module_modes
from .sharded import GatheredBlockLoader, gather_full_tensor

__all__ = [
    "INIT_TITAN",
    "TITAN_CONFIG_KEY",
    "TITAN_STATE_ENTRY",
    "TITAN_STATE_KEY",
    "TRUSTED_MODULES",
    "build_titan_control",
    "decode_titan_state",
    "encode_titan_state",
    "extract_features_titan",
    "extract_features_titan_gathered",
    "extract_features_titan_layerwise",
    "fill_inits_from_registry",
    "find_titan_decoder",
    "resolve_titan_spec",
    "titan_config_from_record",
    "titan_config_record",
    "titan_control_factory",
    "titan_feature_fn",
    "titan_gathers",
    "titan_rebuild_info",
]

#: The init scheme a control of this family records: torchtitan's ``init_states`` under ``torch.manual_seed(seed)``.
INIT_TITAN = "torchtitan-init_states"
#: Key, in a face's ``model_rebuild`` state, of the model's config record (:func:`titan_config_record`).
TITAN_CONFIG_KEY = "titan_config"
#: The modules a config record may name (classes and init functions); nothing else is imported when one is read.
TRUSTED_MODULES: tuple[str, ...] = ("torchtitan", "torch.nn.init")
#: Set on a model rebuilt from a record whose init functions were not all recovered: its controls are refused.
MISSING_INITS_ATTR = "seedprints_titan_missing_inits"


def _decoder_class() -> type | None:
    if "torchtitan" not in sys.modules:  # no torchtitan model can exist: nothing to import
        return None
    try:
        from torchtitan.models.common.decoder import Decoder
    except ImportError:  # pragma: no cover - a broken install (triton missing)
        return None
    return Decoder


def find_titan_decoder(module: Any) -> nn.Module | None:
    """The first torchtitan ``Decoder`` in ``module`` (itself included), or ``None``."""
    cls = _decoder_class()
    if cls is None or not isinstance(module, nn.Module):
        return None
    return next((m for m in module.modules() if isinstance(m, cls)), None)


def _is_dtensor(tensor: Any) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


def titan_gathers(model: nn.Module) -> bool:
    """Whether the torchtitan model in ``model`` holds sharded (DTensor) weights: it is probed block by block."""
    found = find_titan_decoder(model)
    return found is not None and any(_is_dtensor(p) for p in found.parameters())


def _find(model: nn.Module) -> nn.Module:
    found = find_titan_decoder(model)
    if found is None:
        raise InputError(f"no torchtitan Decoder (torchtitan.models.common.decoder.Decoder, e.g. Llama3Model) found "
                         f"inside {type(model).__name__}")
    for part in ("tok_embeddings", "layers", "norm"):
        if getattr(found, part, None) is None:
            raise InputError(f"this torchtitan {type(found).__name__} has no {part} (a pipeline-parallel stage): it "
                             "cannot be probed alone; probe the whole model (pipeline parallelism is not supported)")
    return found


def _require(model: nn.Module) -> nn.Module:
    """The unsharded ``Decoder`` in ``model``; a sharded one is refused, naming the gathered probe."""
    found = _find(model)
    if any(_is_dtensor(p) for p in found.parameters()):
        raise InputError("this torchtitan model holds DTensor (sharded) weights: probe it one gathered block at a "
                         "time with extract_features_titan_gathered (extract_features_titan does so by itself)")
    return found


def _local_weight(weight: torch.Tensor) -> torch.Tensor:
    """A tensor whose device and dtype are the weight's on this rank (a DTensor's local shard)."""
    return weight.to_local() if _is_dtensor(weight) else weight


def resolve_titan_spec(spec: ProbeSpec | None, model: nn.Module) -> ProbeSpec:
    """``spec`` with every ``None`` field filled from the torchtitan model (vocabulary, width, init embedding).

    For a sharded model an embedding probe's mean and std read the gathered embedding (a collective:
    call it on every rank).
    """
    model = _find(model)
    spec = spec or ProbeSpec()

    def init_embedding() -> torch.Tensor:
        weight = model.tok_embeddings.weight
        if _is_dtensor(weight):
            return gather_full_tensor(weight.detach())
        return weight

    return spec.resolved_with(vocab_size=int(model.config.vocab_size), hidden_size=int(model.config.dim),
                              init_embedding=init_embedding, width_name="dim")


class _PassThrough(nn.Module):
    """Stands in for ``tok_embeddings`` in an embedding probe's forward: the probe's embeddings go on as they are."""

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds


def _attention_masks(lm: nn.Module, positions: torch.Tensor) -> Any:
    """The masks torchtitan's trainer passes for these positions: the model's own for FlexAttention and varlen
    attention (``Trainer.post_dataloading_process``), none for a maskless attention (which is causal by itself)."""
    from torchtitan.models.common.attention import FlexAttention, VarlenAttention

    inner = getattr(lm.config.first_attention, "inner_attention", None)
    if isinstance(inner, (FlexAttention.Config, VarlenAttention.Config)):
        return lm.get_attention_masks(positions=positions)
    return None


@contextlib.contextmanager
def _probe_forward(lm: nn.Module, batch: ProbeBatch, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """The model set up for one probe forward that ends at ``norm``: ``(first argument, keyword arguments)``.

    ``_skip_lm_head`` (an instance attribute for the call, removed after) stops the forward at
    ``norm``; embedding probes swap ``tok_embeddings`` for a pass-through, put back after. ``device``
    and ``dtype`` default to the token embedding's (a meta twin's are given by the caller).
    """
    weight = _local_weight(lm.tok_embeddings.weight)
    device = device if device is not None else weight.device
    if dtype is None:
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    if batch.input_ids is not None:
        first = batch.input_ids.to(device)
    else:
        first = batch.inputs_embeds.to(device=device, dtype=dtype)
    rows, length = first.shape[:2]
    positions = torch.arange(length, device=device).unsqueeze(0).expand(rows, length)  # one document per sample
    kwargs = {"positions": positions, "attention_masks": _attention_masks(lm, positions)}
    embeddings = lm.tok_embeddings
    had_flag = "_skip_lm_head" in lm.__dict__
    previous_flag = lm.__dict__.get("_skip_lm_head")
    lm._skip_lm_head = True
    if batch.input_ids is None:
        lm.tok_embeddings = _PassThrough()
    try:
        yield first, kwargs
    finally:
        lm.tok_embeddings = embeddings
        if had_flag:
            lm._skip_lm_head = previous_flag
        else:
            del lm._skip_lm_head


def titan_feature_fn(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
    """``[b, dim]``: ``norm``'s output at the last position, from one forward of the whole model (no LM head).

    A ``feature_fn`` for :class:`~seedprints_lightning.SeedPrintsMonitor` (with a resolved
    ``probe``: :func:`resolve_titan_spec`, and ``control_factory=titan_control_factory(model)``).
    """
    lm = _require(model)
    with torch.no_grad(), _probe_forward(lm, batch) as (first, kwargs):
        hidden = lm(first, **kwargs)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise InputError(f"the forward of {type(lm).__name__} with _skip_lm_head did not return the [b, L, dim] "
                         "hidden state of its norm: it cannot be probed")
    return hidden[:, -1, :]


def extract_features_titan(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                           sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    """``[n, dim]`` float32 CPU features of a torchtitan ``Decoder`` (whole forwards, ``batch_size`` samples each).

    A sharded (DTensor) model is probed one gathered block at a time instead
    (:func:`extract_features_titan_gathered`, a collective: call it on every rank).
    """
    if titan_gathers(model):
        return extract_features_titan_gathered(model, spec, batch_size=batch_size, sample_range=sample_range)
    lm = _require(model)
    if not spec.is_resolved:
        spec = resolve_titan_spec(spec, lm)
    start, stop = sample_range if sample_range is not None else (0, spec.num_samples)
    out = []
    with preserve_rng_state(), preserve_module_modes(lm):
        for batch in spec.batches(batch_size, start, stop):
            out.append(titan_feature_fn(lm, batch).float().cpu())
    return torch.cat(out)


def _record(lm: nn.Module, first: torch.Tensor, kwargs: dict[str, Any]) -> _Recording:
    """Run the model's own forward (set up by :func:`_probe_forward`) with recorders for its blocks and norm."""
    recording = _Recording()
    keys, norm = list(lm.layers.keys()), lm.norm
    originals = {key: lm.layers[key] for key in keys}
    try:
        for index, key in enumerate(keys):
            lm.layers[key] = _Recorder(index, recording)
        lm.norm = _Recorder(-1, recording)
        lm(first, **kwargs)
    finally:
        for key in keys:
            lm.layers[key] = originals[key]
        lm.norm = norm
    if not recording.calls or recording.calls[-1].index != -1:
        raise InputError(f"the forward of {type(lm).__name__} did not end with its norm: it cannot be probed "
                         "layer by layer")
    return recording


def extract_features_titan_layerwise(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                                     sample_range: tuple[int, int] | None = None,
                                     block_loader: BlockLoader | None = None,
                                     device: torch.device | None = None,
                                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`extract_features_titan`, one block at a time: every sample through a block before the next.

    ``block_loader(name, module)`` runs before each block (``"tok_embeddings"`` for token probes,
    ``"layers.<i>"``, ``"norm"``); peak memory is one block plus the probe activations. ``device``
    and ``dtype`` (default: the token embedding's) are where the probe inputs go: a meta twin's
    blocks are filled by the loader, so the caller names them.
    """
    lm = _find(model) if block_loader is not None else _require(model)
    if not spec.is_resolved:
        spec = resolve_titan_spec(spec, lm)
    start, stop = sample_range if sample_range is not None else (0, spec.num_samples)
    batches = list(spec.batches(batch_size, start, stop))
    with preserve_rng_state(), preserve_module_modes(lm), torch.no_grad():
        # The embedding stage (its block loaded) and a recording of what each block is called with, per batch.
        stage = [("tok_embeddings", lm.tok_embeddings)] if spec.kind == "token" else []
        recordings = []
        with _Blocks(block_loader, stage):
            for batch in batches:
                with _probe_forward(lm, batch, device=device, dtype=dtype) as (first, kwargs):
                    recordings.append(_record(lm, first, kwargs))
        hidden = [recording.first_hidden for recording in recordings]
        blocks = [(f"layers.{key}", lm.layers[key]) for key in lm.layers.keys()] + [("norm", lm.norm)]
        for index, (name, block) in enumerate(blocks):
            with _Blocks(block_loader, [(name, block)]):
                for i, recording in enumerate(recordings):
                    call = recording.calls[index]
                    hidden[i] = call.run(block, hidden[i])
    return torch.cat([h[:, -1, :].float().cpu() for h in hidden])


def _meta_twin(config: Any) -> nn.Module:
    """The model of ``config`` on the meta device, eval mode, no grads: the frame a gathered probe fills."""
    with preserve_rng_state(), torch.device("meta"):
        twin = copy.deepcopy(config).build()
    twin.eval()
    twin.requires_grad_(False)
    return twin


#: The meta twin of each sharded model probed (by the model's id, with the config it was built from): built once.
_TWINS: dict[int, tuple[Any, nn.Module]] = {}


def extract_features_titan_gathered(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                                    sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    """The features of a sharded (FSDP2 / tensor-parallel) torchtitan model, one gathered block at a time.

    The layer-major probe runs on a meta twin built from the model's own ``config``; before each
    block runs, :class:`~seedprints_lightning.core.sharded.GatheredBlockLoader` fills it with the
    live model's full tensors (DTensors gathered, buffers such as the RoPE cache used as they are)
    and empties it after. A collective: every rank must call it, with the same spec. The features
    equal those of the unsharded model's whole forward (``tests/test_titan.py``).
    """

    lm = _find(model)
    if not spec.is_resolved:
        spec = resolve_titan_spec(spec, lm)
    built_from, twin = _TWINS.get(id(lm), (None, None))
    if twin is None or built_from is not lm.config:
        twin = _meta_twin(lm.config)
        _TWINS.clear()  # one live model is probed at a time: the last twin only
        _TWINS[id(lm)] = (lm.config, twin)
    weight = _local_weight(lm.tok_embeddings.weight)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return extract_features_titan_layerwise(twin, spec, batch_size=batch_size, sample_range=sample_range,
                                            block_loader=GatheredBlockLoader(lm), device=weight.device, dtype=dtype)


# --------------------------------------------------------------------------------------
# Controls: torchtitan's own init under another seed
# --------------------------------------------------------------------------------------


def build_titan_control(source: Any, seed: int, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh init of a torchtitan model: its config built on the meta device, materialised on the CPU and
    initialised by torchtitan's ``init_states`` under ``torch.manual_seed(seed)``; eval mode, no grads.

    ``source`` is the live model (unsharded or sharded: only its ``config`` is read, never its
    weights) or a ``Decoder.Config``. Every global RNG is restored after. Cast to ``dtype`` and
    moved to ``device`` (default: the live model's, or float32 on the CPU for a config).

    Raises:
        InputError: the model was rebuilt from a record that lacks some of its init functions
            (:func:`titan_config_from_record`), so a control would not be the family's init.
    """
    if isinstance(source, nn.Module):
        lm = _find(source)
        missing = getattr(lm, MISSING_INITS_ATTR, None)
        if missing:
            raise InputError(
                f"controls of this torchtitan model need its init functions, and the checkpoint's config record lacks "
                f"those of {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (closures, which a record "
                "cannot name, and no torchtitan registry config of the recorded model and flavor had them): pass a "
                "controls file made from the live run (seedprints controls) or --controls 0")
        config = lm.config
        weight = _local_weight(lm.tok_embeddings.weight)
        device = device if device is not None else weight.device
        if dtype is None:
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    else:
        config = source
        dtype = dtype if dtype is not None else torch.float32
    with preserve_rng_state():
        with torch.device("meta"):
            control = copy.deepcopy(config).build()
        control.to_empty(device="cpu")
        torch.manual_seed(int(seed))
        control.init_states(buffer_device=torch.device("cpu"))
    if device is not None:
        control = control.to(device=device)
    # The parameters only: the RoPE cache is a complex buffer, which a module-wide cast would make real.
    for param in control.parameters():
        if param.dtype.is_floating_point and param.dtype != dtype:
            param.data = param.data.to(dtype)
    control.eval()
    control.requires_grad_(False)
    setattr(control, INIT_SCHEME_ATTR, INIT_TITAN)
    return control


def titan_control_factory(model: nn.Module) -> Callable[[int], nn.Module]:
    """``control_factory(seed)`` for a face: :func:`build_titan_control` of ``model``."""
    _find(model)
    return lambda seed: build_titan_control(model, seed)


# --------------------------------------------------------------------------------------
# The model's config as a record (plain JSON types), and back
# --------------------------------------------------------------------------------------

_CLASS, _CALLABLE, _TUPLE, _DICT, _DTYPE = "__config__", "__callable__", "__tuple__", "__dict__", "__dtype__"
#: Config fields a record leaves out: how a model is sharded is the training run's, not the model's.
_SKIPPED_FIELDS = ("sharding_config",)


def _import_path(obj: Any) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:  # a lambda or a closure (<locals>) has no import path
        return None
    return f"{module}:{qualname}"


def titan_config_record(config: Any) -> dict[str, Any]:
    """A torchtitan model config as plain JSON types: each config class and init function by its import path.

    Dataclass configs become ``{"__config__": "module:Qualname", "fields": {...}}`` (their ``init``
    fields; ``sharding_config`` left out); init functions ``{"__callable__": "module:name"}``, a
    ``functools.partial`` with its arguments; a closure, which has no import path, is kept as
    ``{"__callable__": None, "repr": ...}`` (:func:`titan_config_from_record` then takes it from
    torchtitan's registry). Read back by :func:`titan_config_from_record`.

    Raises:
        InputError: a field holds a value a record cannot hold, named by its path.
    """

    def encode(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.dtype):
            return {_DTYPE: str(value).removeprefix("torch.")}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise InputError(f"the torchtitan config field {where} is a dict with non-string keys: it cannot be "
                                 "recorded")
            return {_DICT: {key: encode(item, f"{where}[{key}]") for key, item in value.items()}}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            path = _import_path(type(value))
            if path is None:
                raise InputError(f"the torchtitan config class at {where} ({type(value).__name__}) has no import path")
            fields = {f.name: encode(getattr(value, f.name), f"{where}.{f.name}")
                      for f in dataclasses.fields(value) if f.init and f.name not in _SKIPPED_FIELDS}
            return {_CLASS: path, "fields": fields}
        if isinstance(value, functools.partial):
            return {_CALLABLE: _import_path(value.func), "repr": repr(value),
                    "args": [encode(arg, f"{where}(arg {i})") for i, arg in enumerate(value.args)],
                    "keywords": {key: encode(arg, f"{where}({key}=)") for key, arg in value.keywords.items()}}
        if callable(value):
            return {_CALLABLE: _import_path(value), "repr": repr(value)}
        raise InputError(f"the torchtitan config field {where} holds a {type(value).__name__}, which a record cannot "
                         "hold (plain values, dataclass configs and named functions only)")

    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise InputError(f"titan_config_record needs a torchtitan model config (a dataclass), got "
                         f"{type(config).__name__}")
    return encode(config, "config")


def _trusted_object(path: str, trusted: tuple[str, ...]) -> Any:
    module_name, _, qualname = path.partition(":")
    if not any(module_name == prefix or module_name.startswith(prefix + ".") for prefix in trusted):
        raise InputError(f"the config record names {path}, outside the modules it may name ({', '.join(trusted)}): "
                         "pass trusted_modules=(...) with that package if you trust the checkpoint")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"the config record names {path}, which this torchtitan does not have ({exc})") from exc
    return obj


def titan_config_from_record(record: dict[str, Any], *, trusted_modules: tuple[str, ...] = ()) -> tuple[Any, list[str]]:
    """The config of a :func:`titan_config_record`, and the paths of the init functions it could not recover.

    Only classes and functions of :data:`TRUSTED_MODULES` (plus ``trusted_modules``) are imported;
    a class must be a dataclass. An init that was a closure is left out of its ``param_init``; its
    path (``"layers.0.attention.qkv_linear.wqkv.param_init[weight]"``) is returned. Such a config
    builds the model (its weights are loaded, not drawn) but draws no control.

    Raises:
        InputError: the record is malformed or names something outside the trusted modules.
    """
    trusted = TRUSTED_MODULES + tuple(trusted_modules)
    missing: list[str] = []

    def decode(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [decode(item, f"{where}.{i}") for i, item in enumerate(value)]
        if not isinstance(value, dict):
            raise InputError(f"the torchtitan config record holds a {type(value).__name__} at {where}")
        if _DTYPE in value:
            dtype = getattr(torch, str(value[_DTYPE]), None)
            if not isinstance(dtype, torch.dtype):
                raise InputError(f"the torchtitan config record names an unknown dtype {value[_DTYPE]!r} at {where}")
            return dtype
        if _TUPLE in value:
            return tuple(decode(item, f"{where}.{i}") for i, item in enumerate(value[_TUPLE]))
        if _DICT in value:
            out = {}
            for key, item in value[_DICT].items():
                decoded = decode(item, f"{where}[{key}]")
                if decoded is _MISSING:
                    missing.append(f"{where}[{key}]")
                    continue
                out[key] = decoded
            return out
        if _CALLABLE in value:
            if value[_CALLABLE] is None:
                return _MISSING
            func = _trusted_object(str(value[_CALLABLE]), trusted)
            if not callable(func):
                raise InputError(f"the torchtitan config record's {value[_CALLABLE]} at {where} is not callable")
            if "args" in value or "keywords" in value:
                return functools.partial(func, *decode(value.get("args", []), where),
                                         **{k: decode(v, where) for k, v in (value.get("keywords") or {}).items()})
            return func
        if _CLASS in value:
            cls = _trusted_object(str(value[_CLASS]), trusted)
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                raise InputError(f"the torchtitan config record's {value[_CLASS]} at {where} is not a config class")
            prefix = f"{where}." if where else ""
            fields = {key: decode(item, f"{prefix}{key}") for key, item in (value.get("fields") or {}).items()}
            try:
                return cls(**fields)
            except (TypeError, ValueError) as exc:
                raise InputError(f"the torchtitan config record's {value[_CLASS]} at {where or 'the root'} does not "
                                 f"build with this torchtitan ({exc})") from exc
        raise InputError(f"the torchtitan config record holds an unknown entry at {where}: {sorted(value)[:4]}")

    config = decode(record, "")
    return config, missing


class _Missing:
    """An init function a record could not name (a closure): left out of its ``param_init``."""


_MISSING = _Missing()


def _registry_config(model_name: str | None, flavor: str | None) -> Any:
    """torchtitan's own config of ``model_name``'s ``flavor`` (``torchtitan.models.<name>.model_registry``), or None."""
    if not model_name or not flavor or not str(model_name).isidentifier():
        return None
    try:
        registry = importlib.import_module(f"torchtitan.models.{model_name}").model_registry
        return registry(str(flavor)).model
    except Exception:  # no such model or flavor in this torchtitan: the record's inits are all there is
        return None


def _strip_inits(record: Any) -> Any:
    """A record with every ``param_init`` removed: what two configs must share for their inits to be exchanged."""
    if isinstance(record, list):
        return [_strip_inits(item) for item in record]
    if isinstance(record, dict):
        return {key: _strip_inits(value) for key, value in record.items() if key != "param_init"}
    return record


def fill_inits_from_registry(config: Any, missing: list[str], model_name: str | None,
                             flavor: str | None) -> list[str]:
    """Take the init functions a record lacked (``missing``) from torchtitan's registry config of the same model.

    An init is taken only from a registry node at the same path, of the same class, whose record
    (inits aside) equals this node's, so the closure's captured sizes are this model's. Returns the
    paths still missing.
    """
    if not missing:
        return []
    reference = _registry_config(model_name, flavor)
    if reference is None:
        return missing
    try:
        from torchtitan.protocols.module import Module
    except ImportError:  # pragma: no cover - torchtitan without its Module protocol
        return missing
    ours = {fqn: node for fqn, node, _parent, _attr in config.traverse(Module.Config, recurse=True)}
    theirs = {fqn: node for fqn, node, _parent, _attr in reference.traverse(Module.Config, recurse=True)}
    still = []
    for path in missing:
        fqn, _, key = path.partition(".param_init[")
        key = key.rstrip("]")
        node, other = ours.get(fqn), theirs.get(fqn)
        init = (other.param_init or {}).get(key) if other is not None else None
        if (node is None or init is None or type(node) is not type(other)
                or _strip_inits(titan_config_record(node)) != _strip_inits(titan_config_record(other))):
            still.append(path)
            continue
        node.param_init = {**(node.param_init or {}), key: init}
    return still


def titan_rebuild_info(model: nn.Module, *, model_name: str | None = None,
                       flavor: str | None = None) -> dict[str, Any]:
    """What a face's ``model_rebuild`` state holds for this family: the config record, or why not.

    ``model_name`` / ``flavor`` (torchtitan's ``ModelSpec.name`` / ``.flavor``) let the offline reader
    take closures' inits from torchtitan's own registry (:func:`fill_inits_from_registry`).
    """
    lm = _find(model)
    try:
        record = titan_config_record(lm.config)
    except InputError as exc:
        return {"why_not": f"the torchtitan model's config cannot be recorded ({exc}): fingerprint a checkpoint's "
                           "model yourself and pass that fingerprint file instead", "family": "torchtitan"}
    return {TITAN_CONFIG_KEY: record, "model_name": model_name, "flavor": flavor, "state_dict_prefix": "",
            "family": "torchtitan"}


# --------------------------------------------------------------------------------------
# The face's state inside torchtitan's distributed checkpoint
# --------------------------------------------------------------------------------------

#: The key of the face's state in torchtitan's checkpointer (``checkpointer.states``) and so in its checkpoints.
TITAN_STATE_KEY = "seedprints"
#: The one entry of that state: the face's state dict, ``torch.save``d to bytes.
TITAN_STATE_ENTRY = "face_state"


def encode_titan_state(state: dict[str, Any]) -> bytes:
    """The face's state as one bytes object: a distributed checkpoint keeps it whole (its tensors are not loaded
    into tensors of the same shapes, which a fresh face does not have), and it loads with ``weights_only=True``."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def decode_titan_state(blob: Any) -> dict[str, Any]:
    """:func:`encode_titan_state` read back (``weights_only=True``: tensors and plain types only, no code)."""
    import io

    if not isinstance(blob, (bytes, bytearray)):
        raise InputError(f"the SeedPrints state in this torchtitan checkpoint is a {type(blob).__name__}, not the "
                         "bytes the face writes")
    state = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise InputError("the SeedPrints state in this torchtitan checkpoint is not a dict")
    return state
