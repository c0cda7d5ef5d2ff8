"""LitGPT's ``GPT`` as a model family: where its last hidden state is, its probe, its controls, its rebuild info.

No trainer and no Fabric here (the face is :mod:`seedprints_lightning.faces.litgpt`, the checkpoint reader
:mod:`seedprints_lightning.offline.litgpt`). LitGPT itself is imported only when a GPT is probed or built:
:func:`find_litgpt_model` looks its class up in ``sys.modules`` (a GPT cannot exist unless it was imported).

- The last hidden state is the output of ``transformer.ln_f``. A probe calls the GPT and a forward hook
  on ``ln_f`` ends the call there: the LM head never runs (``[b, L, padded_vocab]`` logits are never
  computed), and everything before it is a whole forward's computation, so the features equal a whole
  forward's bit for bit. Embedding probes replace ``transformer.wte``'s output (the model scales it as
  its own embeddings when ``config.scale_embeddings``).
- A control is ``GPT(config)`` drawn by LitGPT's own pretraining init
  (``litgpt.pretrain.initialize_weights``) under the control's seed: bit for bit the model
  ``litgpt pretrain`` draws with that seed.
- A checkpoint's model is rebuilt from the ``Config`` (as plain JSON types under
  :data:`LITGPT_CONFIG_KEY` in a face's ``model_rebuild`` state, or LitGPT's ``model_config.yaml``).
- Layer by layer (:func:`extract_features_litgpt_layerwise`): ``transformer.wte``, then each
  ``transformer.h[i]`` for every probe batch, then ``transformer.ln_f``, with a block loader called
  before each block. GPT.forward itself runs once per batch with its blocks and ``ln_f`` swapped for
  recorders, so each block gets the rope ``cos``/``sin`` slices, mask and positions of a whole forward:
  the features equal ``litgpt_features``' bit for bit.
- Sharded by FSDP2 (DTensor weights, Fabric's ``ModelParallelStrategy``): probed through a meta twin,
  one gathered block at a time (:func:`extract_features_litgpt_gathered`, with
  :class:`~seedprints_lightning.core.sharded.GatheredBlockLoader`); the sharded GPT is never called.
- Controls block by block (:func:`probe_litgpt_streamed_control`): LitGPT's init draws the whole model
  from one RNG stream in ``GPT.modules()`` order, which is the probe's order, so each block is drawn
  from the stream's state just before it runs (:class:`LitGPTStreamedInit`): bit for bit
  ``build_litgpt_control``'s weights, the LM head drawn and dropped first to advance the stream.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
import weakref
from typing import Any

import torch
from torch import nn

from .checks import check_int
from .controls import INIT_SCHEME_ATTR, preserve_rng_state
from .errors import InputError
from .fingerprint import config_digest
from .layerwise import StreamedInit
from .probes import ProbeBatch, ProbeSpec, preserve_module_modes
from .sharded import GatheredBlockLoader, holds_dtensors, local_device, unsharded_class

__all__ = [
    "INIT_LITGPT",
    "LitGPTStreamedInit",
    "LITGPT_CONFIG_FILE",
    "LITGPT_CONFIG_KEY",
    "build_litgpt_control",
    "extract_features_litgpt_gathered",
    "extract_features_litgpt_layerwise",
    "find_litgpt_model",
    "litgpt_config_dict",
    "litgpt_config_digest",
    "litgpt_features",
    "litgpt_rebuild_info",
    "probe_litgpt_streamed_control",
    "resolve_litgpt_spec",
]

#: The key, in a face state's ``model_rebuild`` entry, of the LitGPT ``Config`` (as plain JSON types).
LITGPT_CONFIG_KEY = "litgpt_config"
#: The init scheme of LitGPT controls: ``GPT(config)`` drawn by ``litgpt.pretrain.initialize_weights``.
INIT_LITGPT = "litgpt-pretrain"
#: The config file LitGPT writes beside every ``lit_model.pth`` it saves.
LITGPT_CONFIG_FILE = "model_config.yaml"


def _gpt_class() -> type | None:
    """LitGPT's ``GPT`` class if ``litgpt.model`` is imported (a GPT cannot exist otherwise), else ``None``.

    Looked up in ``sys.modules`` so that checking a model never imports LitGPT.
    """
    module = sys.modules.get("litgpt.model")
    return getattr(module, "GPT", None) if module is not None else None


def find_litgpt_model(module: nn.Module | None) -> nn.Module | None:
    """The first LitGPT ``GPT`` in ``module`` (itself, Fabric's original module, or a submodule), or ``None``."""
    gpt_class = _gpt_class()
    if gpt_class is None or module is None:
        return None
    module = getattr(module, "_original_module", module)  # a _FabricModule: the module as set up
    for candidate in module.modules():
        if isinstance(candidate, gpt_class):
            return candidate
    return None


def _require_gpt(module: nn.Module) -> nn.Module:
    gpt = find_litgpt_model(module)
    if gpt is None:
        raise InputError(f"no LitGPT GPT found inside {type(module).__name__}: the LitGPT family probes "
                         "litgpt.model.GPT models")
    return gpt


def litgpt_config_dict(config: Any) -> dict[str, Any]:
    """A LitGPT ``Config`` as plain JSON types (what a checkpoint state holds; ``Config(**d)`` rebuilds it)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def litgpt_config_digest(config: Any) -> str:
    """The config digest of a LitGPT ``Config`` (or its dict), as fingerprints and controls files record it."""
    data = config if isinstance(config, dict) else litgpt_config_dict(config)
    return config_digest(data)


def resolve_litgpt_spec(spec: ProbeSpec | None, model: nn.Module) -> ProbeSpec:
    """``spec`` with every ``None`` field filled from the GPT's config (token range, width, INIT embedding stats).

    Refuses a probe longer than the model's ``max_seq_length`` (LitGPT's forward would) and a
    token range past its vocabulary.
    """
    spec = spec or ProbeSpec()
    gpt = _require_gpt(model)
    config = gpt.config
    if spec.length > gpt.max_seq_length:
        raise InputError(f"ProbeSpec.length={spec.length} exceeds the GPT's max_seq_length ({gpt.max_seq_length}); "
                         f"probe with ProbeSpec(length={gpt.max_seq_length}) or less")
    return spec.resolved_with(vocab_size=int(config.vocab_size), hidden_size=int(config.n_embd),
                              init_embedding=lambda: _full(gpt.transformer.wte.weight), owner="the GPT's",
                              width_name="n_embd")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (FSDP2: a collective, every rank calls it), else the tensor itself."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) and tensor.device.type != "meta" else tensor


class _FinalNormReached(Exception):
    """Raised by the hook on ``transformer.ln_f`` to end a probe forward there, carrying its output."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__("final norm reached")
        self.output = output


def litgpt_features(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
    """The ``[b, n_embd]`` last hidden state (``transformer.ln_f``'s output, last position) of a LitGPT GPT.

    The GPT itself is called (its own forward: positions, rope cache, causal mask), and a forward
    hook on ``ln_f`` ends the call there, so the LM head never runs; everything before it is the
    computation of a whole forward, so the features equal it bit for bit. Embedding probes replace
    ``transformer.wte``'s output by a forward hook (token ids of zeros keep the shapes). A
    ``feature_fn`` for any face: ``feature_fn=lambda module, batch: litgpt_features(module, batch)``.
    """
    gpt = _require_gpt(model)
    param = next(iter(gpt.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    handles = []

    def stop(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        raise _FinalNormReached(output)

    if batch.input_ids is not None:
        idx = batch.input_ids.to(device)
    else:
        embeds = batch.inputs_embeds.to(device=device, dtype=gpt.transformer.wte.weight.dtype)
        idx = torch.zeros(embeds.shape[:2], dtype=torch.long, device=device)
        handles.append(gpt.transformer.wte.register_forward_hook(lambda _m, _a, _o: embeds))
    handles.append(gpt.transformer.ln_f.register_forward_hook(stop))
    try:
        gpt(idx)
    except _FinalNormReached as reached:
        return reached.output[:, -1, :]
    finally:
        for handle in handles:
            handle.remove()
    raise InputError(f"{type(gpt).__name__}'s forward never ran transformer.ln_f: it cannot be probed as a LitGPT GPT")


def _init_like_pretrain(model: nn.Module, config: Any = None) -> None:
    """Draw ``model``'s weights by LitGPT's pretraining init (``litgpt.pretrain.initialize_weights``), one device.

    ``model`` may be a part of a GPT (a block, the LM head): ``config`` is then the GPT's. The init sets
    each Linear/Embedding's ``reset_parameters`` to its normal draw, then calls every submodule's
    ``reset_parameters`` in ``modules()`` order from the global RNG.
    """
    from litgpt.pretrain import initialize_weights

    config = config if config is not None else model.config
    # initialize_weights reads fabric.strategy only to skip the draw under FSDP (which draws per shard later).
    single_device = types.SimpleNamespace(strategy=None)
    initialize_weights(single_device, model, n_layer=config.n_layer, n_embd=config.n_embd)


def build_litgpt_control(config: Any, seed: int, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> nn.Module:
    """A fresh ``GPT(config)`` drawn by LitGPT's pretraining init under ``torch.manual_seed(seed)``.

    Built on the meta device, materialised on the CPU and drawn there (so a control is the same on
    every machine), cast to ``dtype``, moved to ``device``; eval mode, no gradients, every global RNG
    restored. It carries :data:`INIT_LITGPT` as its init scheme.
    """
    from litgpt.model import GPT

    with preserve_rng_state():
        torch.manual_seed(int(seed))
        with torch.device("meta"):
            control = GPT(config)
        control = control.to_empty(device="cpu")
        _init_like_pretrain(control)  # every parameter and the rope cache (GPT.reset_parameters)
    control = control.to(dtype=dtype, device=device if device is not None else "cpu")
    control.eval()
    control.requires_grad_(False)
    setattr(control, INIT_SCHEME_ATTR, INIT_LITGPT)
    return control


def litgpt_rebuild_info(module: nn.Module, gpt: nn.Module) -> dict[str, Any]:
    """What a checkpoint of ``module`` needs to rebuild its GPT offline: the ``Config`` and the weights' prefix."""
    name = next((n for n, m in getattr(module, "_original_module", module).named_modules() if m is gpt), None)
    if name is None:
        return {"why_not": "the LitGPT GPT is not a submodule of the set-up module"}
    for segment in ("_orig_mod.", "_forward_module."):
        name = name.replace(segment, "")
    return {LITGPT_CONFIG_KEY: litgpt_config_dict(gpt.config), "state_dict_prefix": f"{name}." if name else ""}


# --------------------------------------------------------------------------------------
# Layer-major probe: the embedding, then each block for every probe batch, then ln_f
# --------------------------------------------------------------------------------------

#: The final norm's name in the GPT (as in its state dict): its output is the last hidden state.
FINAL_NORM = "transformer.ln_f"
#: The token embedding's name in the GPT.
TOKEN_EMBEDDING = "transformer.wte"


def _block_name(index: int) -> str:
    return f"transformer.h.{index}"


class _GivenEmbeddings(nn.Module):
    """Stands in for ``transformer.wte`` for an embedding probe: hands the probe's embeddings on, whatever the ids.

    What :func:`litgpt_features`' forward hook on ``wte`` does, so ``config.scale_embeddings`` scales them the same.
    """

    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__()
        self.embeds = embeds

    def forward(self, _idx: torch.Tensor) -> torch.Tensor:
        return self.embeds


@dataclasses.dataclass
class _BlockCall:
    """The arguments GPT.forward gave one block, the hidden state left out: ``(cos, sin, mask, input_pos, ...)``."""

    index: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclasses.dataclass
class _BatchRecord:
    """One probe batch's recording forward: the hidden state entering block 0 and each block's call, in order."""

    first_hidden: torch.Tensor | None = None
    calls: list[_BlockCall | None] = dataclasses.field(default_factory=list)


class _BlockRecorder(nn.Module):
    """Stands in for ``transformer.h[i]`` while GPT.forward records: keeps the call's arguments (the rope cos/sin
    slices, per-block ``rope_indices`` columns, mask, ``input_pos``) and hands the hidden state on unchanged."""

    def __init__(self, index: int, record: _BatchRecord) -> None:
        super().__init__()
        self.index, self.record = index, record

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.record.first_hidden is None:
            self.record.first_hidden = x
        self.record.calls.append(_BlockCall(self.index, args, dict(kwargs)))
        return x


class _NormRecorder(nn.Module):
    """Stands in for ``transformer.ln_f`` while GPT.forward records: ends the forward there (the LM head never runs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise _FinalNormReached(x)


def _record_batch(gpt: nn.Module, batch: ProbeBatch, device: torch.device, dtype: torch.dtype) -> _BatchRecord:
    """GPT.forward on one probe batch with recorders in place of its blocks and ``ln_f`` (and, for an embedding
    probe, the batch's embeddings in place of ``wte``): every block's call as the whole forward makes it."""
    record = _BatchRecord()
    transformer = gpt.transformer
    blocks, final_norm, wte = list(transformer.h), transformer.ln_f, transformer.wte
    if batch.input_ids is not None:
        idx = batch.input_ids.to(device)
    else:
        embeds = batch.inputs_embeds.to(device=device, dtype=dtype)
        idx = torch.zeros(embeds.shape[:2], dtype=torch.long, device=device)  # the shape only: never looked up
        transformer["wte"] = _GivenEmbeddings(embeds)
    reached = False
    try:
        for i in range(len(blocks)):
            transformer.h[i] = _BlockRecorder(i, record)
        transformer["ln_f"] = _NormRecorder()
        gpt(idx)
    except _FinalNormReached:
        reached = True
    finally:
        for i, block in enumerate(blocks):
            transformer.h[i] = block
        transformer["ln_f"] = final_norm
        transformer["wte"] = wte
    order = [call.index for call in record.calls]
    if not reached or order != list(range(len(blocks))):
        raise InputError(f"{type(gpt).__name__}'s forward did not run transformer.h[0..{len(blocks) - 1}] once each "
                         f"in order then transformer.ln_f (it ran blocks {order}): it cannot be probed layer by layer; "
                         "probe it whole with litgpt_features")
    return record


class _Loaded:
    """Context: ``loader(name, module)`` before the block runs, the release it returns after (if any)."""

    def __init__(self, loader: Any, name: str, module: nn.Module) -> None:
        self.loader, self.name, self.module = loader, name, module
        self.release: Any = None

    def __enter__(self) -> nn.Module:
        if self.loader is not None:
            self.release = self.loader(self.name, self.module)
            if self.release is not None and not callable(self.release):
                raise InputError(f"loader({self.name!r}, ...) returned {type(self.release).__name__}: return None or "
                                 "a callable that frees the block")
        return self.module

    def __exit__(self, *exc: Any) -> None:
        if self.release is not None:
            self.release()


def _first_real_device(gpt: nn.Module) -> torch.device:
    for param in gpt.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if local.device.type != "meta":
            return local.device
    return torch.device("cpu")


class _RopeCache:
    """Context: the GPT's ``cos``/``sin`` buffers real for the probe, put back after.

    GPT.forward slices ``self.cos[:T]`` and ``self.sin[:T]`` (the rope cache of ``max_seq_length``
    positions) and hands them to every block. Real buffers are used as they are. A meta GPT (a twin
    filled by a loader) takes ``source``'s (the live sharded GPT's, whose buffers FSDP2 leaves whole),
    or, without one, LitGPT's own ``rope_cache()`` computed on the CPU, cast to ``dtype`` and moved to
    ``device``: what ``build_litgpt_control`` holds (``GPT.reset_parameters`` draws it on the CPU).
    """

    def __init__(self, gpt: nn.Module, source: nn.Module | None, device: torch.device, dtype: torch.dtype) -> None:
        self.gpt, self.source, self.device, self.dtype = gpt, source, device, dtype
        self.saved: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> None:
        gpt = self.gpt
        if gpt.cos.device.type != "meta" and gpt.sin.device.type != "meta":
            return
        if self.source is not None:
            cos, sin = _full(self.source.cos), _full(self.source.sin)
        else:
            with preserve_rng_state():
                cos, sin = gpt.rope_cache(device=torch.device("cpu"))
            cos, sin = (t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else None)
                        for t in (cos, sin))
        self.saved = (gpt.cos, gpt.sin)
        gpt.cos, gpt.sin = cos, sin

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            self.gpt.cos, self.gpt.sin = self.saved
            self.saved = None


def _probe_layer_major(gpt: nn.Module, spec: ProbeSpec, *, batch_size: int, sample_range: tuple[int, int] | None,
                       loader: Any, device: torch.device, dtype: torch.dtype,
                       rope_source: nn.Module | None = None) -> torch.Tensor:
    """The layer-major loop (see :func:`extract_features_litgpt_layerwise`), on a GPT that may be a meta twin."""

    check_int("batch_size", batch_size, low=1)
    start, stop = sample_range if sample_range is not None else (0, spec.num_samples)
    if stop <= start:
        return torch.empty(0, 0)
    transformer = gpt.transformer
    with preserve_module_modes(gpt), torch.no_grad(), _RopeCache(gpt, rope_source, device, dtype):
        # Stage 0: GPT.forward up to block 0, per batch (embedding lookup and scale, rope slices); it records
        # every block's call. Embedding probes never read wte: it is not loaded.
        records: list[_BatchRecord] = []
        hidden: list[torch.Tensor] = []
        stage0 = _Loaded(loader if spec.kind == "token" else None, TOKEN_EMBEDDING, transformer.wte)
        with stage0:
            for batch in spec.batches(batch_size, start, stop):
                record = _record_batch(gpt, batch, device, dtype)
                hidden.append(record.first_hidden)
                record.first_hidden = None  # the list above holds the only reference
                records.append(record)
        # Each block over every batch, then the final norm: the whole forward's computations in another order.
        for index, block in enumerate(transformer.h):
            with _Loaded(loader, _block_name(index), block):
                for b, record in enumerate(records):
                    call = record.calls[index]
                    hidden[b] = block(hidden[b], *call.args, **call.kwargs)
                    record.calls[index] = None  # free the call's slices once used
        with _Loaded(loader, FINAL_NORM, transformer.ln_f):
            # ln_f over the whole [b, T, d], as the forward runs it, then the last position.
            features = [transformer.ln_f(h)[:, -1, :].to(device="cpu", dtype=torch.float32) for h in hidden]
    return torch.cat(features)


def extract_features_litgpt_layerwise(
    model: nn.Module,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    sample_range: tuple[int, int] | None = None,
    loader: Any = None,
    block_loader: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The features of :func:`litgpt_features` computed layer-major: ``[n, n_embd]`` float32 on CPU.

    Every probe batch runs through ``transformer.wte`` (token probes; embedding probes bring their own
    embeddings), then through ``transformer.h[0]`` before any batch enters ``h[1]``, and so on, then
    ``transformer.ln_f``; only the hidden states between blocks are kept. GPT.forward itself is run once
    per batch with its blocks and ``ln_f`` swapped for recorders, so each block gets the very rope
    ``cos``/``sin`` slices (per-block ``rope_indices`` columns included), mask and positions a whole
    forward gives it: the features equal ``litgpt_features``' bit for bit at equal ``batch_size``
    (``tests/test_litgpt_layerwise.py``). The LM head never runs. The model is left as it was (its
    blocks are swapped back, its modes restored; nothing is drawn from a global RNG).

    A sharded GPT (DTensor weights: FSDP2's ``fully_shard``, as Fabric's ``ModelParallelStrategy`` shards
    it) is probed one gathered block at a time (:func:`extract_features_litgpt_gathered`), never through
    its FSDP hooks.

    Args:
        model: a LitGPT ``GPT`` or a module holding one (a Fabric-wrapped model), on any device, or on the
            meta device with a ``loader`` that fills each block.
        spec: the probe; an unresolved spec is resolved from the GPT (embedding probes on a meta GPT need a
            resolved one).
        sample_range: ``(start, stop)``: probe only that slice of the samples.
        loader: a :data:`~seedprints_lightning.core.layerwise.BlockLoader`, ``loader(name, module)``, called
            just before each block runs (``"transformer.wte"``, token probes only; ``"transformer.h.<i>"``;
            ``"transformer.ln_f"``), whose returned callable (if any) runs after it. For a sharded GPT: a
            :class:`~seedprints_lightning.core.sharded.GatheredBlockLoader` of that GPT, or ``None``.
            ``block_loader`` is accepted as another name for it (the OLMo-core and torchtitan probes' name).
        device: where inputs and activations live (default: the first materialised parameter's device).
        dtype: the dtype embedding-probe inputs (and a meta GPT's computed rope cache) are cast to (default:
            ``wte``'s).
    """

    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    if loader is not None and block_loader is not None and loader is not block_loader:
        raise InputError("pass the block loader once: loader=... or block_loader=..., not both")
    loader = loader if loader is not None else block_loader
    if loader is not None and not callable(loader):
        raise InputError(f"loader must be callable as loader(name, module), got {type(loader).__name__}")
    gpt = _require_gpt(model)
    if holds_dtensors(gpt):
        if device is not None or dtype is not None:
            raise InputError("a sharded GPT is probed where its shards are, in their dtype: leave device and "
                             "dtype unset")
        return extract_features_litgpt_gathered(gpt, spec, batch_size=batch_size, sample_range=sample_range,
                                                loader=loader)
    weight = gpt.transformer.wte.weight
    if loader is None and any(param.device.type == "meta" for param in gpt.parameters()):
        raise InputError("this GPT has weights on the meta device and no loader fills them: pass "
                         "loader=<a BlockLoader that materialises each block> (e.g. LitGPTStreamedInit for a control)")
    if not spec.is_resolved:
        if spec.kind == "embedding" and weight.device.type == "meta":
            raise InputError("embedding probes take their mean/std from the INIT embedding, which a meta-device "
                             "GPT does not hold: pass the reference's resolved spec")
        spec = resolve_litgpt_spec(spec, gpt)
    device = torch.device(device) if device is not None else _first_real_device(gpt)
    dtype = dtype if dtype is not None else weight.dtype
    return _probe_layer_major(gpt, spec, batch_size=batch_size, sample_range=sample_range, loader=loader,
                              device=device, dtype=dtype)


# --------------------------------------------------------------------------------------
# Sharded (FSDP2) GPTs: one gathered block at a time through a meta twin
# --------------------------------------------------------------------------------------

#: Meta twins, one per live sharded GPT (a twin holds no weights, only the module tree).
_TWINS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _meta_twin(gpt: nn.Module) -> nn.Module:
    """The live GPT's class (before ``fully_shard`` subclassed it) built on the meta device from a copy of its
    config, with the live ``max_seq_length``; eval mode, no gradients, every global RNG untouched."""

    twin = _TWINS.get(gpt)
    if twin is None:
        cls = unsharded_class(gpt)
        with preserve_rng_state(), torch.device("meta"):
            try:
                twin = cls(copy.deepcopy(gpt.config))
            except Exception as exc:
                raise InputError(f"{cls.__name__}(config) could not be built on the meta device for a layer-major "
                                 f"probe of the sharded GPT ({type(exc).__name__}: {exc})") from exc
        twin.eval()
        twin.requires_grad_(False)
        _TWINS[gpt] = twin
    if twin.max_seq_length != gpt.max_seq_length:  # the live one was set after it was built (litgpt pretrain does)
        with torch.device("meta"):
            twin.max_seq_length = gpt.max_seq_length
    return twin


def extract_features_litgpt_gathered(
    model: nn.Module,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    sample_range: tuple[int, int] | None = None,
    loader: Any = None,
) -> torch.Tensor:
    """:func:`litgpt_features`' features of a sharded GPT, one gathered block at a time: ``[n, n_embd]`` float32, CPU.

    The sharded GPT is never called (no FSDP2 hook runs, its root group with the LM head is never
    gathered). A twin of its class is built on the meta device from its config, and
    :func:`extract_features_litgpt_layerwise`'s loop runs each twin block filled just before it runs
    with the live block's full tensors by a
    :class:`~seedprints_lightning.core.sharded.GatheredBlockLoader` (an all-gather per tensor), then
    emptied again: one block's full weights per rank at a time. The rope cache is the live GPT's own
    (FSDP2 leaves buffers whole). Inputs and activations live where the shards do; embedding probes
    are cast to the shards' dtype.

    Every rank of the mesh must call this with the same number of samples (each gather is a
    collective), e.g. through :func:`~seedprints_lightning.core.processes.measure_over_ranks`. An
    unresolved embedding spec is resolved from the whole embedding (a collective too).

    Args:
        model: a LitGPT ``GPT`` (or a module holding one) with DTensor weights.
        loader: the :class:`~seedprints_lightning.core.sharded.GatheredBlockLoader` to use, built on this GPT
            (tests read its ``gathered``); default: a new one.
    """

    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    gpt = _require_gpt(model)
    if not holds_dtensors(gpt):
        raise InputError("this GPT holds no DTensor weights (it is not sharded): probe it with "
                         "extract_features_litgpt_layerwise")
    if loader is None:
        loader = GatheredBlockLoader(gpt)
    elif not isinstance(loader, GatheredBlockLoader) or loader.live is not gpt:
        raise InputError("a sharded GPT is probed through a GatheredBlockLoader built on that GPT "
                         "(GatheredBlockLoader(gpt)); leave loader=None for a new one")
    spec = spec if spec.is_resolved else resolve_litgpt_spec(spec, gpt)
    twin = _meta_twin(gpt)
    weight = gpt.transformer.wte.weight
    return _probe_layer_major(twin, spec, batch_size=batch_size, sample_range=sample_range, loader=loader,
                              device=local_device(weight), dtype=weight.dtype, rope_source=gpt)


# --------------------------------------------------------------------------------------
# Streamed controls: LitGPT's pretrain init drawn one block at a time, bit for bit the whole control
# --------------------------------------------------------------------------------------


class LitGPTStreamedInit(StreamedInit):
    """A block loader that draws a meta GPT's blocks by LitGPT's pretraining init, in the whole model's RNG stream.

    ``build_litgpt_control(config, seed)`` draws every weight from ONE global generator stream under
    ``torch.manual_seed(seed)``, in ``GPT.modules()`` order: ``lm_head``, ``transformer.wte``, each
    ``transformer.h[i]``, ``transformer.ln_f`` (norms draw nothing). That order is the probe's, so
    each unit can be drawn just before it runs, from the generator state the previous unit left
    (carried here; the global RNG is restored around every draw), and freed after: the weights are
    bit for bit the whole control's. A unit the probe never runs (the LM head, first in the stream;
    ``wte`` for embedding probes) is still drawn, to advance the stream, and freed at once, so the peak
    is one block or the ``[padded_vocab, n_embd]`` LM head, whichever is larger, plus the activations.

    Each unit is drawn on the CPU in the dtype the meta GPT was built in (as the whole control), then
    cast to ``dtype`` and moved to ``device``. ``drawn`` lists the units drawn, in order. A unit asked
    for after the stream has passed it is refused (its draw is gone).
    """

    stream = "LitGPT's init stream"
    order = "GPT.modules() order"

    def __init__(self, gpt: nn.Module, seed: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        gpt = _require_gpt(gpt)
        transformer = gpt.transformer
        units = [("lm_head", gpt.lm_head), (TOKEN_EMBEDDING, transformer.wte)]
        units += [(_block_name(i), block) for i, block in enumerate(transformer.h)]
        units.append((FINAL_NORM, transformer.ln_f))
        # The stream is GPT.modules() order: refuse a GPT whose modules are not exactly these units in this order.
        covered = [id(m) for _, unit in units for m in unit.modules()]
        whole = [id(m) for m in gpt.modules() if m not in (gpt, transformer, transformer.h)]
        if covered != whole:
            raise InputError(f"this {type(gpt).__name__} has modules outside lm_head, transformer.wte, transformer.h "
                             "and transformer.ln_f, or in another order: its init cannot be streamed block by block; "
                             "build the whole control with build_litgpt_control")
        super().__init__(units, device=device, dtype=dtype)
        self.config = gpt.config
        with preserve_rng_state():
            torch.manual_seed(int(seed))
            self.state = torch.random.get_rng_state()

    def _init_unit(self, name: str, unit: nn.Module) -> None:
        with preserve_rng_state():
            torch.random.set_rng_state(self.state)
            _init_like_pretrain(unit, self.config)
            self.state = torch.random.get_rng_state()


def probe_litgpt_streamed_control(
    config: Any,
    seed: int,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    sample_range: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Features ``[n, n_embd]`` of ``build_litgpt_control(config, seed)`` without the control ever existing whole.

    ``GPT(config)`` is built on the meta device and probed layer-major
    (:func:`extract_features_litgpt_layerwise`), each block drawn just before it runs by
    :class:`LitGPTStreamedInit` and freed after. The weights, the rope cache and so the features are bit
    for bit those of the whole control at equal ``batch_size`` (``tests/test_litgpt_layerwise.py``).
    Global RNGs are left untouched.

    Args:
        config: a LitGPT ``Config``.
        seed: the control's seed (``torch.manual_seed`` of LitGPT's pretraining init).
        spec: the run's resolved spec; an unresolved token spec takes the config's vocabulary (embedding
            probes need the run's resolved spec: their statistics are the run's INIT embedding's).
        device: where blocks and activations live (default CPU); the init is drawn on the CPU.
        dtype: the dtype the blocks run in (drawn in float32, then cast, as ``build_litgpt_control``).
    """
    from litgpt.model import GPT

    check_int("seed", seed, low=0)
    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    with preserve_rng_state(), torch.device("meta"):
        skeleton = GPT(config)
    skeleton.eval()
    skeleton.requires_grad_(False)
    device = torch.device(device) if device is not None else torch.device("cpu")
    loader = LitGPTStreamedInit(skeleton, seed, device=device, dtype=dtype)
    return extract_features_litgpt_layerwise(skeleton, spec, batch_size=batch_size, sample_range=sample_range,
                                             loader=loader, device=device, dtype=dtype)
