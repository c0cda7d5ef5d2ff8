"""The OLMo-core model family: AllenAI's ``olmo_core.nn.transformer.Transformer`` (OLMo 2 and 3 pretraining).

What the package needs of a family, for OLMo-core's own ``Transformer`` (``ai2-olmo-core``, the ``[olmo]`` extra):

- **features**: the last hidden state at the last position. The final norm sits inside the LM head
  (``lm_head.norm``), so the features are that module's output: a forward hook keeps it, and
  ``logits_to_keep=1`` keeps the LM head's product to one position (:func:`olmo_forward_features`).
  Token probes feed token ids; embedding probes go in through the model's own ``input_embeddings``
  argument, which skips the embedding lookup, scale and embedding norm (as ``inputs_embeds`` does for a
  transformers model), with dummy ids for the shape.
- **layer-major probe** (:func:`extract_features_olmo_layerwise`): the embeddings, then each block, then
  ``lm_head.norm``, every probe sample through one block before the next, with a
  :data:`~seedprints_lightning.core.layerwise.BlockLoader` that may materialise each block just before it
  runs. As for the transformers families, the model's OWN forward is run once per batch with its blocks
  and LM head swapped for recorders, so every argument a block gets is the one the real forward gives
  it; features equal the whole forward's bit for bit (``tests/test_olmo.py``). Under FSDP2 (DTensor
  weights) the probe runs on a meta twin built from the run's ``TransformerConfig``, each block filled
  with the live block's gathered weights (:class:`~seedprints_lightning.core.sharded.GatheredBlockLoader`):
  one block's full weights per rank at a time, the LM head's output matrix never.
- **controls**: fresh inits with OLMo-core's own ``init_weights`` (the one the train module calls at
  step 0) under ``init_seed = seed`` (:func:`build_olmo_control`): from the run's ``TransformerConfig``
  (built on the meta device, then materialised on the CPU) or, without it, from a copy of the live
  unsharded model. ``init_weights`` draws the embeddings, each block in order, then the LM head's output
  matrix from ONE generator stream, the probe's order: so a run's default controls (with its config, for
  a dense ``Transformer``) are drawn block by block just before each block runs and freed after
  (:class:`OLMoStreamedInit`, :func:`probe_olmo_streamed_control`), bit for bit the whole control's
  features (:data:`INIT_OLMO` either way); a rank never holds a whole control.
- **rebuild** from the stack's checkpoint directory ``save_folder/stepN/`` (``model_and_optim/``, a
  ``torch.distributed.checkpoint``, plus ``train/rank0.pt``, the trainer state holding the callback's):
  the config comes from the callback state (:data:`OLMO_CONFIG_KEY`) or the ``config.json`` that
  OLMo-core's ``ConfigSaverCallback`` writes (its ``"model"`` entry); only the ``model.*`` keys are read.

Nothing here imports ``olmo_core`` at module import: a model is recognised only when ``olmo_core`` is
already imported (a model of it exists), so other users pay nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import sys
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checks import check_int
from .controls import INIT_SCHEME_ATTR, preserve_rng_state
from .errors import InputError, SourceError
from .files import is_seedprints_state
from .layerwise import Block, BlockLoader, Blocks, Recorder, Recording, StreamedInit
from .probes import ProbeBatch, ProbeSpec, extract_features, preserve_module_modes
from .sharded import GatheredBlockLoader, holds_dtensors, local_device

__all__ = [
    "INIT_OLMO",
    "OLMO_CONFIG_KEY",
    "OLMO_STATE_PREFIX",
    "OLMoStreamedInit",
    "build_olmo_control",
    "extract_features_olmo",
    "extract_features_olmo_layerwise",
    "find_olmo_transformer",
    "is_olmo_checkpoint",
    "olmo_config_digest",
    "olmo_config_from_dict",
    "olmo_forward_features",
    "olmo_meta_model",
    "olmo_rebuild_info",
    "olmo_streams_controls",
    "probe_olmo_streamed_control",
    "read_olmo_checkpoint",
    "register_olmo_config",
    "registered_olmo_config",
    "resolve_olmo_spec",
]

#: The init scheme a control of this family records: OLMo-core's ``Transformer.init_weights`` under
#: ``init_seed = seed`` (one generator over the whole model, as at the run's step 0).
INIT_OLMO = "olmo-core-init_weights"
#: Key, in a face's ``model_rebuild`` state, of the run's ``TransformerConfig`` (``as_config_dict()``).
OLMO_CONFIG_KEY = "olmo_config"
#: The model's keys in OLMo-core's ``model_and_optim`` distributed checkpoint: ``model.<state-dict key>``.
OLMO_STATE_PREFIX = "model."
#: The final norm, inside the LM head: its output is the last hidden state.
FINAL_NORM = "lm_head.norm"


# --------------------------------------------------------------------------------------
# Recognising the family
# --------------------------------------------------------------------------------------


def _transformer_class() -> type | None:
    if "olmo_core" not in sys.modules:  # no OLMo-core model can exist: nothing to import
        return None
    try:
        from olmo_core.nn.transformer import Transformer
    except ImportError:  # pragma: no cover - a broken install
        return None
    return Transformer


def find_olmo_transformer(module: Any) -> nn.Module | None:
    """The first OLMo-core ``Transformer`` in ``module`` (itself included; its FSDP subclass too), or ``None``."""
    cls = _transformer_class()
    if cls is None or not isinstance(module, nn.Module):
        return None
    return next((m for m in module.modules() if isinstance(m, cls)), None)


def _require(model: nn.Module) -> nn.Module:
    found = find_olmo_transformer(model)
    if found is None:
        raise InputError(f"no OLMo-core Transformer (olmo_core.nn.transformer.Transformer) found inside "
                         f"{type(model).__name__}")
    if getattr(found, "lm_head", None) is None or getattr(found, "embeddings", None) is None:
        raise InputError("this OLMo-core Transformer has no embeddings or no LM head (a pipeline-parallel stage): "
                         "it cannot be probed alone; probe the whole model")
    return found


def _embedding_weight(model: nn.Module) -> torch.Tensor:
    weight = model.embeddings.weight.detach()
    full = getattr(weight, "full_tensor", None)  # a DTensor: the statistics are of the whole matrix
    return full() if callable(full) and weight.device.type != "meta" else weight


def resolve_olmo_spec(spec: ProbeSpec | None, model: nn.Module) -> ProbeSpec:
    """``spec`` with every ``None`` field filled from the OLMo-core model (vocabulary, width, init embedding)."""
    model = _require(model)
    spec = spec or ProbeSpec()
    return spec.resolved_with(vocab_size=int(model.vocab_size), hidden_size=int(model.d_model),
                              init_embedding=lambda: _embedding_weight(model), width_name="d_model")


def _inputs(batch: ProbeBatch, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(input_ids, extra kwargs)`` of a forward: token ids, or dummy ids plus ``input_embeddings``."""
    if batch.input_ids is not None:
        return batch.input_ids.to(device), {}
    embeds = batch.inputs_embeds
    ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=device)  # the shape only: never looked up
    return ids, {"input_embeddings": embeds.to(device=device, dtype=dtype)}


def _first_real_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.device.type != "meta":
            return local.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------
# Whole-model probe
# --------------------------------------------------------------------------------------


def olmo_forward_features(model: nn.Module, batch: ProbeBatch, device: torch.device | None = None) -> torch.Tensor:
    """``[b, d]``: ``lm_head.norm``'s output at the last position, from one forward of the whole model.

    The root is called (under FSDP2 its hooks gather what it holds); ``logits_to_keep=1`` keeps the LM head's
    product to the last position. Without a final norm (``lm_head.norm`` is ``None``) the LM head's input is kept.
    """
    lm = _require(model)
    device = device if device is not None else _first_real_device(lm)
    dtype = _embedding_weight_dtype(lm)
    ids, kwargs = _inputs(batch, device, dtype)
    captured: list[torch.Tensor] = []
    norm = lm.lm_head.norm
    if norm is not None:
        handle = norm.register_forward_hook(lambda _m, _a, out: captured.append(out))
    else:
        handle = lm.lm_head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        lm(ids, logits_to_keep=1, **kwargs)
    finally:
        handle.remove()
    if not captured or captured[-1].dim() != 3:
        raise InputError(f"the forward of {type(lm).__name__} never ran {FINAL_NORM}: it cannot be probed")
    hidden = captured[-1]
    local = getattr(hidden, "to_local", None)  # tensor parallelism would hand back a DTensor
    return (hidden.full_tensor() if callable(local) else hidden)[:, -1, :]


def _embedding_weight_dtype(lm: nn.Module) -> torch.dtype:
    dtype = lm.embeddings.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def extract_features_olmo(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                          sample_range: tuple[int, int] | None = None,
                          device: torch.device | str | None = None, config: Any = None) -> torch.Tensor:
    """``[n, D]`` float32 features (CPU) of an OLMo-core model: whole forwards, or one gathered block at a time.

    An unsharded model is called whole (:func:`olmo_forward_features`); a sharded one (DTensor weights, FSDP2)
    is probed layer-major through a meta twin of its config (:func:`_gathered_features`), never through the
    FSDP root, which needs the model's ``TransformerConfig``: ``config``, or the one
    :func:`register_olmo_config` recorded. Every rank of a sharded model must call this with the same number of
    samples.
    """
    lm = _require(model)
    if config is not None:
        register_olmo_config(lm, config)
    spec = spec if spec.is_resolved else resolve_olmo_spec(spec, lm)
    if holds_dtensors(lm):
        return _gathered_features(lm, spec, batch_size=batch_size, sample_range=sample_range)
    device = torch.device(device) if device is not None else _first_real_device(lm)
    return extract_features(lm, spec, batch_size=batch_size, sample_range=sample_range,
                            forward_fn=lambda batch: olmo_forward_features(lm, batch, device))


# --------------------------------------------------------------------------------------
# Layer-major probe
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pinned_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The model's cached ``device`` (where its forward moves the inputs) set to ``device`` for the probe.

    ``Transformer.device`` is the first parameter's device, cached in ``_device``: a meta twin would
    move the probe's inputs to the meta device.
    """
    had = "_device" in vars(model)
    before = vars(model).get("_device")
    model._device = device
    try:
        yield
    finally:
        if had:
            model._device = before
        else:  # pragma: no cover - every Transformer sets it in __init__
            del model._device


def _record(lm: nn.Module, batch: ProbeBatch, device: torch.device, dtype: torch.dtype) -> Recording:
    """The model's own forward with recorders in place of its blocks and LM head: the call of each block."""
    recording = Recording()
    keys = list(lm.blocks.keys())
    originals = [lm.blocks[key] for key in keys]
    head = lm.lm_head
    ids, kwargs = _inputs(batch, device, dtype)
    try:
        for i, key in enumerate(keys):
            lm.blocks[key] = Recorder(i, recording)
        lm.lm_head = Recorder(-1, recording)
        lm(ids, **kwargs)
    finally:
        for key, block in zip(keys, originals):
            lm.blocks[key] = block
        lm.lm_head = head
    if not recording.calls or recording.calls[-1].index != -1:
        raise InputError(f"the forward of {type(lm).__name__} did not end with its LM head: it cannot be probed "
                         "layer by layer")
    return recording


def extract_features_olmo_layerwise(
    model: nn.Module,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    sample_range: tuple[int, int] | None = None,
    block_loader: BlockLoader | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The features of :func:`extract_features_olmo` computed layer-major: ``[n, D]`` float32 on CPU.

    Blocks, named as in the model's state dict: ``"embeddings"`` (and ``"embedding_norm"``, token probes
    only: embedding probes never read them), ``"blocks.<i>"``, then ``"lm_head.norm"``. With
    ``block_loader`` the model may be on the meta device (see
    :data:`~seedprints_lightning.core.layerwise.BlockLoader`); the LM head's output matrix never runs.

    Args:
        model: an OLMo-core ``Transformer`` (or a module holding one), unsharded or a meta twin.
        spec: the probe; an unresolved spec is resolved from the model (embedding probes on a meta model
            need a resolved one).
        device: where inputs and activations live (default: the first materialised parameter's device).
        dtype: the dtype embedding-probe inputs are cast to (default: the embedding's).
    """
    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    lm = _require(model)
    spec = spec if spec.is_resolved else resolve_olmo_spec(spec, lm)
    device = torch.device(device) if device is not None else _first_real_device(lm)
    dtype = dtype if dtype is not None else _embedding_weight_dtype(lm)
    start, stop = sample_range if sample_range is not None else (0, spec.num_samples)
    if stop <= start:
        return torch.empty(0, 0)
    stage0: list[tuple[str, nn.Module]] = []
    if spec.kind == "token":
        stage0.append(("embeddings", lm.embeddings))
        if lm.embedding_norm is not None:
            stage0.append(("embedding_norm", lm.embedding_norm))
    keys = list(lm.blocks.keys())
    with preserve_module_modes(lm), torch.no_grad(), _pinned_device(lm, device):
        hidden: list[torch.Tensor] = []
        recordings: list[Recording] = []
        with Blocks(block_loader, stage0):
            for batch in spec.batches(batch_size, start, stop):
                recording = _record(lm, batch, device, dtype)
                hidden.append(recording.first_hidden)
                recording.first_hidden = None
                recordings.append(recording)
        order = [call.index for call in recordings[0].calls]
        if any([call.index for call in r.calls] != order for r in recordings):
            raise InputError(f"{type(lm).__name__} called its blocks in a batch-dependent order")
        for position, index in enumerate(order):
            if index == -1:
                norm = lm.lm_head.norm
                if norm is None:
                    hidden = [h[:, -1, :].to(device="cpu", dtype=torch.float32) for h in hidden]
                    continue
                with Block(block_loader, FINAL_NORM, norm):
                    hidden = [norm(h)[:, -1, :].to(device="cpu", dtype=torch.float32) for h in hidden]
                continue
            name = f"blocks.{keys[index]}"
            with Block(block_loader, name, lm.blocks[keys[index]]):
                for c, recording in enumerate(recordings):
                    hidden[c] = recording.calls[position].run(lm.blocks[keys[index]], hidden[c])
                    recording.calls[position] = None  # free what the call held once used
    return torch.cat(hidden)


# --------------------------------------------------------------------------------------
# Sharded (FSDP2) models: one gathered block at a time through a meta twin
# --------------------------------------------------------------------------------------


#: The config of each live model (set by the face: a Transformer does not keep its config), and the meta twin
#: built from it, held only as long as the live model is.
_CONFIGS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_TWINS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, nn.Module]] = weakref.WeakKeyDictionary()


def register_olmo_config(model: nn.Module, config: Any) -> None:
    """Tell the family the ``TransformerConfig`` ``model`` was built from (a sharded model is probed through it)."""
    _CONFIGS[_require(model)] = config


def registered_olmo_config(model: nn.Module) -> Any:
    """The ``TransformerConfig`` :func:`register_olmo_config` recorded for ``model``, or ``None``."""
    return _CONFIGS.get(_require(model))


def _gathered_features(lm: nn.Module, spec: ProbeSpec, *, batch_size: int,
                       sample_range: tuple[int, int] | None) -> torch.Tensor:
    config = _CONFIGS.get(lm)
    if config is None:
        raise InputError(
            "this OLMo-core Transformer is sharded (DTensor weights, FSDP2) and its TransformerConfig is unknown, so "
            "it cannot be probed one gathered block at a time: pass model_config=<the TransformerConfig the model was "
            "built from> to SeedPrintsOLMoCallback")
    built_from, twin = _TWINS.get(lm, (None, None))
    if twin is None or built_from is not config:
        with preserve_rng_state():
            twin = config.build(init_device="meta")
        twin.eval()
        twin.requires_grad_(False)
        _TWINS[lm] = (config, twin)
    embedding = lm.embeddings.weight
    return extract_features_olmo_layerwise(twin, spec, batch_size=batch_size, sample_range=sample_range,
                                           block_loader=GatheredBlockLoader(lm), device=local_device(embedding),
                                           dtype=embedding.dtype)


# --------------------------------------------------------------------------------------
# Controls: OLMo-core's own init under another seed
# --------------------------------------------------------------------------------------


def olmo_config_from_dict(data: dict[str, Any]) -> Any:
    """A ``TransformerConfig`` from its ``as_config_dict()`` (what the face records and ``config.json`` holds)."""
    from olmo_core.nn.transformer import TransformerConfig

    try:
        return TransformerConfig.from_dict(dict(data))
    except Exception as exc:
        raise SourceError(f"not a readable OLMo-core TransformerConfig ({type(exc).__name__}: {exc})") from exc


def olmo_config_digest(config: Any) -> str:
    """sha256 of a ``TransformerConfig``'s JSON, its ``init_seed`` left out (controls: the config, other seeds)."""
    data = json.loads(json.dumps(config.as_config_dict()))
    data.pop("init_seed", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def build_olmo_control(source: Any, seed: int, *, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh init of the OLMo-core model: ``init_weights`` (OLMo-core's own init) under ``init_seed = seed``.

    ``source`` is the run's ``TransformerConfig`` (built on the meta device, materialised on the CPU) or a
    live unsharded ``Transformer`` (copied, then re-initialised: its weights are overwritten, never read).
    Drawn on the CPU, so a control is the same on every device; then cast to ``dtype`` (default: float32
    for a config, the live dtype for a model), moved to ``device``, in eval mode, without gradients.
    Every global RNG is restored after.
    """
    with preserve_rng_state():
        torch.manual_seed(int(seed))  # modules whose reset_parameters draws from the global RNG
        if isinstance(source, nn.Module):
            live = _require(source)
            if holds_dtensors(live):
                raise InputError("controls of a sharded OLMo-core model are built from its TransformerConfig: pass "
                                 "model_config=... to SeedPrintsOLMoCallback")
            dtype = dtype if dtype is not None else _embedding_weight_dtype(live)
            control = copy.deepcopy(live).to("meta")
        else:
            control = dataclasses.replace(source, init_seed=int(seed)).build(init_device="meta")
        control.init_seed = int(seed)
        control._device = None  # re-read from the materialised parameters
        control.init_weights(device=torch.device("cpu"))
    control = control.to(dtype=dtype if dtype is not None else torch.float32)
    if device is not None:
        control = control.to(device)
    control._device = None
    control.eval()
    control.requires_grad_(False)
    setattr(control, INIT_SCHEME_ATTR, INIT_OLMO)
    return control


# --------------------------------------------------------------------------------------
# Streamed controls: OLMo-core's init_weights drawn one block at a time, bit for bit the whole control
# --------------------------------------------------------------------------------------


def _streamable(lm: nn.Module) -> str | None:
    """Why ``lm``'s ``init_weights`` cannot be replayed block by block here, or ``None`` when it can.

    The replay below is ``Transformer.init_weights``'s own steps for a dense model; any other class (the
    nGPT variant renormalises after the draw, the MoE ones draw routers and experts) or block kind keeps
    whole controls rather than risk a different draw.
    """
    from olmo_core.nn.transformer import Transformer

    try:  # init_weights draws these fused-MoE blocks' own weights too (init_moe_v2): not replayed here
        from olmo_core.nn.ddp.block import OLMoDDPTransformerBlock
    except ImportError:  # an OLMo-core without them
        OLMoDDPTransformerBlock = ()  # noqa: N806 - isinstance(x, ()) is False

    if type(lm) is not Transformer:
        return f"a {type(lm).__name__} (only the dense Transformer's init is replayed block by block)"
    for key, block in lm.blocks.items():
        if (hasattr(block, "feed_forward_moe") or not hasattr(block, "feed_forward")
                or isinstance(block, OLMoDDPTransformerBlock)):
            return f"block {key} is a {type(block).__name__} (an MoE block, or one without a feed-forward)"
        if not callable(getattr(block.attention, "init_weights", None)):
            return f"block {key}'s attention ({type(block.attention).__name__}) has no init_weights"
    if lm.embeddings is None or lm.lm_head is None:
        return "a pipeline stage without embeddings or LM head"
    return None


class OLMoStreamedInit(StreamedInit):
    """A block loader drawing a meta OLMo-core ``Transformer``'s blocks as ``init_weights`` does, in its streams.

    ``Transformer.init_weights`` (what :func:`build_olmo_control` calls) draws from two streams: first
    every module's ``reset_parameters`` from the GLOBAL generator (under ``torch.manual_seed(seed)``), in
    ``modules()`` order; then ONE ``torch.Generator`` seeded with ``init_seed``, in a fixed order: the
    embeddings, each block in order (attention, then feed-forward), the LM head's output matrix last. That
    order is the probe's (``embeddings``, ``embedding_norm``, ``blocks.<i>``, ``lm_head.norm``), so each
    unit is drawn just before it runs, from the states of both streams the previous unit left (carried
    here; the global RNG is restored around every draw), and freed after: the weights are bit for bit the
    whole control's. The LM head's output matrix, last in both streams, is never drawn; the embeddings,
    which embedding probes never run, are still drawn to advance the stream and freed at once. The peak is
    the embeddings or one block, whichever is larger, plus the activations.

    Each unit is drawn on the CPU in the dtype the meta model was built in (as the whole control), then cast
    to ``dtype`` and moved to ``device``. ``drawn`` lists the units drawn, in order. A unit asked for after
    the stream has passed it is refused (its draw is gone). Raises :class:`InputError` for a model whose
    init this does not replay (:func:`_streamable`) or whose modules are not in the stream's order.
    """

    stream = "OLMo-core's init stream"
    order = "init_weights order"

    def __init__(self, model: nn.Module, seed: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        check_int("seed", seed, low=0)
        lm = _require(model)
        why = _streamable(lm)
        if why is not None:
            raise InputError(f"OLMo-core's init of this model cannot be streamed block by block: {why}; build the "
                             "whole control with build_olmo_control")
        units: list[tuple[str, nn.Module]] = [("embeddings", lm.embeddings)]
        if lm.embedding_norm is not None:
            units.append(("embedding_norm", lm.embedding_norm))
        units += [(f"blocks.{key}", block) for key, block in lm.blocks.items()]
        if lm.lm_head.norm is not None:
            units.append((FINAL_NORM, lm.lm_head.norm))
        # The global stream is modules() order: the units must be exactly its prefix, only LM-head modules after.
        covered = [id(m) for _, unit in units for m in unit.modules()]
        whole = [id(m) for m in lm.modules() if m is not lm and m is not lm.blocks and m is not lm.lm_head]
        head = {id(m) for m in lm.lm_head.modules()}
        if covered != whole[:len(covered)] or not set(whole[len(covered):]) <= head:
            raise InputError(f"this {type(lm).__name__} has modules outside its embeddings, blocks and LM head, or in "
                             "another order: its init cannot be streamed block by block; build the whole control "
                             "with build_olmo_control")
        super().__init__(units, device=device, dtype=dtype)
        self.lm = lm
        with preserve_rng_state():
            torch.manual_seed(int(seed))  # as build_olmo_control: reset_parameters draws from the global RNG
            self.state = torch.random.get_rng_state()
        # init_weights' own generator, on the CPU as build_olmo_control's draw.
        self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def _init(self, name: str, unit: nn.Module) -> None:
        """The generator's draws of one unit: ``Transformer.init_weights``' calls for it, with its arguments."""
        lm, generator = self.lm, self.generator
        if name == "embeddings":
            std = lm.embedding_init_std if lm.embedding_init_std is not None else lm.init_std
            lm.init_method.init_embeddings(unit, d_model=lm.d_model, embed_scale=lm.embed_scale, std=std,
                                           generator=generator)
        elif name.startswith("blocks."):
            common = dict(d_model=lm.d_model, block_idx=unit.block_idx, num_blocks=lm.n_layers, std=lm.init_std,
                          generator=generator)
            lm.init_method.init_attention(unit.attention, **common)
            lm.init_method.init_feed_forward(unit.feed_forward, **common)
        # embedding_norm and lm_head.norm: reset_parameters only (init_weights draws nothing more for them).

    def _init_unit(self, name: str, unit: nn.Module) -> None:
        with preserve_rng_state():
            torch.random.set_rng_state(self.state)
            for owner in unit.modules():
                if hasattr(owner, "reset_parameters"):
                    owner.reset_parameters()
            self.state = torch.random.get_rng_state()
            self._init(name, unit)


def olmo_meta_model(config: Any) -> nn.Module:
    """The ``TransformerConfig``'s model on the meta device (no memory, no draw), in eval mode, without gradients."""
    if not callable(getattr(config, "build", None)):
        raise InputError(f"an OLMo-core TransformerConfig is needed here, got {type(config).__name__}")
    with preserve_rng_state():
        model = config.build(init_device="meta")
    model.eval()
    model.requires_grad_(False)
    return model


def olmo_streams_controls(config: Any) -> bool:
    """Whether the controls of ``config``'s model can be drawn block by block (:class:`OLMoStreamedInit`)."""
    if config is None:
        return False
    try:
        OLMoStreamedInit(olmo_meta_model(config), 0)
    except InputError:
        return False
    return True


def probe_olmo_streamed_control(
    config: Any,
    seed: int,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    sample_range: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Features ``[n, d_model]`` of ``build_olmo_control(config, seed)`` without the control ever existing whole.

    The config's model is built on the meta device and probed layer-major
    (:func:`extract_features_olmo_layerwise`), each block drawn just before it runs by
    :class:`OLMoStreamedInit` and freed after: the weights, and so the features, are bit for bit those of
    the whole control (``tests/test_olmo_streamed.py``). Global RNGs are left untouched.

    Args:
        config: the run's OLMo-core ``TransformerConfig``.
        seed: the control's seed (``init_seed`` of OLMo-core's ``init_weights``).
        spec: the run's resolved spec; an unresolved token spec takes the config's vocabulary (embedding
            probes need the run's resolved spec: their statistics are the run's INIT embedding's).
        device: where blocks and activations live (default CPU); the init is drawn on the CPU.
        dtype: the dtype the blocks run in (drawn in the config's dtype, then cast, as ``build_olmo_control``).
    """
    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    skeleton = olmo_meta_model(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    loader = OLMoStreamedInit(skeleton, seed, device=device, dtype=dtype)
    return extract_features_olmo_layerwise(skeleton, spec, batch_size=batch_size, sample_range=sample_range,
                                           block_loader=loader, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------
# Rebuild from OLMo-core's checkpoint directory
# --------------------------------------------------------------------------------------


def olmo_rebuild_info(config: Any) -> dict[str, Any]:
    """What a face's ``model_rebuild`` state holds for this family: the config as a dict, or why not."""
    if config is None:
        return {"why_not": "the run's OLMo-core TransformerConfig was not given (model_config=...) nor found in a "
                           "ConfigSaverCallback: the audit reads the config.json OLMo-core's ConfigSaverCallback "
                           "writes into the checkpoint directory, if any"}
    # Through JSON: as_config_dict() keeps str-enum members (AttentionType...), which a weights_only load refuses.
    plain = json.loads(json.dumps(config.as_config_dict()))
    return {OLMO_CONFIG_KEY: plain, "state_dict_prefix": OLMO_STATE_PREFIX, "family": "olmo-core"}


def is_olmo_checkpoint(path: str | Path) -> bool:
    """True for an OLMo-core checkpoint directory: ``model_and_optim/.metadata`` and ``train/rank0.pt``."""
    folder = Path(path)
    return (folder.is_dir() and (folder / "model_and_optim" / ".metadata").is_file()
            and (folder / "train" / "rank0.pt").is_file())


def _safe_numpy_globals() -> list[Any]:
    """What ``train/rank0.pt`` holds beyond tensors: the RNG states' NumPy arrays (data, not code)."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype,
            *{type(np.dtype(name)) for name in ("uint32", "uint64", "int64", "float64", "float32")}]


def read_olmo_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """The trainer state of an OLMo-core checkpoint directory (``train/rank0.pt``), with no weights.

    Returned as ``{"global_step": N, "seedprints": <the SeedPrints callback state, if any>}`` (what the
    offline readers look for). Read with ``weights_only=True`` plus NumPy arrays (the RNG states), unless
    ``trust_pickle``.
    """
    file = Path(path) / "train" / "rank0.pt"
    try:
        if trust_pickle:
            state = torch.load(file, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_safe_numpy_globals()):
                state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(f"{file} could not be read as OLMo-core trainer state ({type(exc).__name__}: {exc}); pass "
                          "trust_pickle=True (--trust-pickle) if you created it yourself") from exc
    if not isinstance(state, dict):
        raise SourceError(f"{file} is not an OLMo-core trainer state (a dict)")
    callbacks = state.get("callbacks") or {}
    found = next((value for value in callbacks.values() if is_seedprints_state(value)), None)
    out: dict[str, Any] = {"global_step": state.get("global_step")}
    if found is not None:
        out["seedprints"] = found
    return out


def olmo_checkpoint_config(path: str | Path, state: dict[str, Any] | None) -> Any:
    """An OLMo-core checkpoint's ``TransformerConfig``: the SeedPrints state's, else ``config.json``'s ``model``."""
    rebuild = ((state or {}).get("model_rebuild") or {}) if isinstance(state, dict) else {}
    if isinstance(rebuild, dict) and isinstance(rebuild.get(OLMO_CONFIG_KEY), dict):
        return olmo_config_from_dict(rebuild[OLMO_CONFIG_KEY])
    folder = Path(path)
    for candidate in (folder / "config.json", folder.parent / "config.json"):
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            return olmo_config_from_dict(data["model"])
    why = rebuild.get("why_not") if isinstance(rebuild, dict) else None
    raise SourceError(
        f"{path} is an OLMo-core checkpoint whose model config is unknown"
        + (f" ({why})" if why else "")
        + ": train with SeedPrintsOLMoCallback(model_config=<your TransformerConfig>) or OLMo-core's "
          "ConfigSaverCallback (its config.json's 'model' entry), or fingerprint the model yourself")


def read_olmo_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's tensors of an OLMo-core checkpoint (``model_and_optim``'s ``model.*`` keys, no optimizer), as saved.

    Read with OLMo-core's own reader (``olmo_core.distributed.checkpoint.load_keys``: its storage layout is
    its own), in this one process, so call it outside a distributed run.
    """
    from olmo_core.distributed.checkpoint import get_checkpoint_metadata, load_keys

    folder = Path(path) / "model_and_optim"
    try:
        metadata = get_checkpoint_metadata(str(folder))
        keys = [key for key in metadata.state_dict_metadata if key.startswith(OLMO_STATE_PREFIX)]
        if not keys:
            raise SourceError(f"{folder} holds no '{OLMO_STATE_PREFIX}*' tensors: not an OLMo-core model checkpoint")
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            values = list(load_keys(str(folder), keys))
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{folder}: the model's tensors could not be read ({type(exc).__name__}: {exc})") from exc
    return {key[len(OLMO_STATE_PREFIX):]: value for key, value in zip(keys, values)}


def load_olmo_model(path: str | Path, *, dtype: torch.dtype = torch.float32, trust_pickle: bool = False) -> nn.Module:
    """The OLMo-core model of a checkpoint directory, rebuilt from its config, on the CPU, in eval mode."""
    state = read_olmo_checkpoint(path, trust_pickle=trust_pickle).get("seedprints")
    config = olmo_checkpoint_config(path, state)
    with preserve_rng_state():
        model = config.build(init_device="meta")
    weights = read_olmo_weights(path)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except Exception as exc:
        raise SourceError(f"{path}: the weights do not match the model its config describes "
                          f"({type(exc).__name__}: {exc})") from exc
    model = model.to(dtype=dtype)
    model._device = None
    model.eval()
    model.requires_grad_(False)
    return model
