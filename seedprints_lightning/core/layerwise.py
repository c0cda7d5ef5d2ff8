"""Probes and controls of models that are never whole in memory: layer-major feature extraction.

:func:`~seedprints_lightning.core.probes.extract_features` runs each batch of probes through the
whole model, so the whole model must be materialised. Here every probe sample goes through ONE
block at a time (the embeddings, then each decoder layer, then the final norm), and only the
activations between blocks are kept. A ``block_loader(name, module)`` callback may materialise
a block just before it runs and free it after, so peak memory is one block plus the
probe activations ``[n, L, d]``: what lets a meta-device model be streamed from disk, and a
fresh-init control (:func:`probe_streamed_control`) be probed without ever existing whole.

Nothing about the architectures is re-implemented. The base model's OWN forward is run once per
batch with its decoder layers and final norm swapped for recorders: it computes the embeddings
(and GPT-2's position embeddings, the rotary ``position_embeddings``, the causal or
sliding-window masks of each layer type...) exactly as it does in a normal forward, and each
recorder keeps the arguments its layer was called with. The real layers are then called with
those arguments, layer-major. The features equal ``extract_features``' to float tolerance
(bit-identical in practice at equal batch size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checks import check_int
from .errors import InputError
from .probes import ProbeSpec, find_causal_lm, preserve_module_modes
from .rng import preserve_rng_state

__all__ = [
    "Block",
    "BlockLoader",
    "Blocks",
    "Recorder",
    "Recording",
    "SUPPORTED_MODEL_TYPES",
    "StreamedInit",
    "block_storage",
    "build_streamed_control_model",
    "empty_model",
    "extract_features_layerwise",
    "probe_streamed_control",
    "split_blocks",
    "splits_into_blocks",
    "streamed_block_seed",
]

#: ``block_loader(name, module)``: called just before the block ``name`` (its dotted name in the
#: causal LM, as in the state dict: ``"model.layers.3"``) runs; it may materialise the block's
#: weights and returns ``None`` or a callable, called once the block has run (e.g. to free it).
BlockLoader = Callable[[str, nn.Module], "Callable[[], None] | None"]


@dataclass(frozen=True)
class _Layout:
    """Where a base model keeps its decoder layers and final norm (attribute names on the base model)."""

    layers: str
    norm: str


#: ``config.model_type`` -> layout. Only architectures whose base forward was read (transformers
#: 5.24: ``LlamaModel``, ``Qwen2Model``, ``MistralModel``, ``GPT2Model``) and is known to do
#: nothing between its layers but pass the hidden state on.
_LAYOUTS: dict[str, _Layout] = {
    "llama": _Layout(layers="layers", norm="norm"),
    "qwen2": _Layout(layers="layers", norm="norm"),
    "mistral": _Layout(layers="layers", norm="norm"),
    "gpt2": _Layout(layers="h", norm="ln_f"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_LAYOUTS)
_SUPPORTED_TEXT = ("LLaMA, Qwen2, Mistral and GPT-2 causal LMs (LlamaForCausalLM, Qwen2ForCausalLM, "
                   "MistralForCausalLM, GPT2LMHeadModel, or their base models)")


# --------------------------------------------------------------------------------------
# Splitting a model into blocks
# --------------------------------------------------------------------------------------


@dataclass
class _Split:
    """A causal LM seen as blocks: the base model, its layers and norm, and the pre-layer modules."""

    lm: nn.Module
    base: nn.Module
    prefix: str  # the base model's dotted name in ``lm`` plus ".", or "" when ``lm`` is the base
    layout: _Layout

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.base, self.layout.layers)

    def name(self, attr: str) -> str:
        return f"{self.prefix}{attr}"

    def embedding_stage(self, token_probes: bool) -> list[tuple[str, nn.Module]]:
        """The base model's children that run before the first layer: every child holding tensors but
        the layers and the final norm (token embedding, GPT-2's ``wpe``, the rotary embedding), without
        the token embedding for embedding probes (which never read it)."""
        token_embedding = self.base.get_input_embeddings()
        stage = []
        for attr, child in self.base.named_children():
            if attr in (self.layout.layers, self.layout.norm) or not _holds_tensors(child):
                continue
            if child is token_embedding and not token_probes:
                continue
            stage.append((self.name(attr), child))
        return stage


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def split_blocks(model: nn.Module) -> _Split:
    lm = find_causal_lm(model)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    layout = _LAYOUTS.get(model_type)
    base = getattr(lm, "base_model", lm)
    if layout is None or not isinstance(getattr(base, layout.layers, None), nn.ModuleList) \
            or not isinstance(getattr(base, layout.norm, None), nn.Module):
        raise InputError(
            f"layer-by-layer probing cannot split a {type(lm).__name__} (model_type {model_type!r}); it supports "
            f"{_SUPPORTED_TEXT}. Probe it whole with extract_features"
        )
    prefix = "" if base is lm else f"{lm.base_model_prefix}."
    return _Split(lm=lm, base=base, prefix=prefix, layout=layout)


def splits_into_blocks(model: nn.Module) -> bool:
    """Whether the layer-major probe can split this model (or the causal LM it contains) into blocks."""
    try:
        split_blocks(model)
    except InputError:
        return False
    return True


# --------------------------------------------------------------------------------------
# Recording each layer's call arguments with the base model's own forward
# --------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One call of a layer (or of the final norm) by the base forward, hidden state left out."""

    index: int  # position in the layers list; -1 for the final norm
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool

    def run(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = module(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = module(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Recording:
    """What one base forward did, for one batch: the hidden state entering the first layer and every call."""

    calls: list[_Call] = field(default_factory=list)
    first_hidden: torch.Tensor | None = None


class Recorder(nn.Module):
    """Stands in for a layer (or the final norm) during the recording forward: keeps its arguments and
    hands the hidden state on unchanged, so no layer's weights are touched."""

    def __init__(self, index: int, recording: Recording) -> None:
        super().__init__()
        self.index = index
        self.recording = recording

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs = dict(kwargs)
        if args:
            hidden, rest, as_kwarg = args[0], tuple(args[1:]), False
        elif "hidden_states" in kwargs:
            hidden, rest, as_kwarg = kwargs.pop("hidden_states"), (), True
        else:
            raise InputError("a decoder layer was called without a hidden state: this architecture cannot be "
                             "probed layer by layer")
        if self.recording.first_hidden is None:
            self.recording.first_hidden = hidden
        self.recording.calls.append(_Call(self.index, rest, kwargs, as_kwarg))
        return hidden


def _record(split: _Split, model_kwargs: dict[str, torch.Tensor]) -> Recording:
    """Run the base model's forward with recorders in place of its layers and final norm."""
    recording = Recording()
    layers, originals = split.layers, list(split.layers)
    norm = getattr(split.base, split.layout.norm)
    try:
        for i in range(len(layers)):
            layers[i] = Recorder(i, recording)
        setattr(split.base, split.layout.norm, Recorder(-1, recording))
        split.base(**model_kwargs, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        setattr(split.base, split.layout.norm, norm)
    if not recording.calls or recording.calls[-1].index != -1:
        raise InputError(f"the forward of {type(split.base).__name__} did not end with its final norm "
                         f"{split.layout.norm!r}: it cannot be probed layer by layer")
    return recording


# --------------------------------------------------------------------------------------
# Layer-major probe
# --------------------------------------------------------------------------------------


class Block:
    """Context: ``block_loader(name, module)`` before the block runs, its release callable after."""

    def __init__(self, loader: BlockLoader | None, name: str, module: nn.Module) -> None:
        self.loader, self.name, self.module = loader, name, module
        self.release: Callable[[], None] | None = None

    def __enter__(self) -> nn.Module:
        if self.loader is not None:
            self.release = self.loader(self.name, self.module)
            if self.release is not None and not callable(self.release):
                raise InputError(f"block_loader({self.name!r}, ...) returned {type(self.release).__name__}: "
                                 "return None or a callable that frees the block")
        return self.module

    def __exit__(self, *exc: Any) -> None:
        if self.release is not None:
            self.release()


def _default_device(lm: nn.Module) -> torch.device:
    for param in lm.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def extract_features_layerwise(
    model: nn.Module,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    sample_range: tuple[int, int] | None = None,
    block_loader: BlockLoader | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``extract_features(model, spec)`` computed layer-major: ``[n, D]`` float32 features on CPU.

    Every probe sample runs through one block before the next block runs (embeddings, each
    decoder layer, the final norm), in chunks of ``batch_size``; only the hidden states between
    blocks are kept (``n * L * d`` values, on ``device``). With ``block_loader`` the model may be
    on the meta device: ``block_loader(name, module)`` materialises each block just before it runs
    and its returned callable (if any) frees it after, so one block is materialised at a time.
    The LM head never runs (the features are the last hidden state).

    Args:
        model: a LLaMA / Qwen2 / Mistral / GPT-2 causal LM (or a module containing one).
        spec: the probe; an unresolved token spec is resolved from the config. Embedding probes on
            a meta model need a resolved spec (their statistics come from the INIT embedding).
        sample_range: ``(start, stop)`` to probe only that shard of the samples.
        block_loader: see :data:`BlockLoader`; ``None`` uses the model's own weights.
        device: where inputs and activations live; default: the first materialised parameter's
            device, else the CPU.
        dtype: the dtype embedding-probe inputs are cast to; default: the input embedding's (as
            ``extract_features``). Give it when ``block_loader`` casts blocks away from the dtype
            the meta model was built in.

    Raises:
        InputError: the model's class cannot be split into blocks (the message lists what can).
    """
    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    split = split_blocks(model)
    lm = split.lm
    check_int("batch_size", batch_size, low=1)
    embedding_weight = lm.get_input_embeddings().weight
    if not spec.is_resolved:
        if spec.kind == "embedding" and embedding_weight.device.type == "meta":
            raise InputError("embedding probes take their mean/std from the INIT embedding, which a meta-device "
                             "model does not hold: pass the reference's resolved spec")
        spec = spec.resolve(lm)
    device = torch.device(device) if device is not None else _default_device(lm)
    start, stop = sample_range if sample_range is not None else (0, spec.num_samples)
    if stop <= start:
        return torch.empty(0, 0)
    dtype = dtype if dtype is not None else embedding_weight.dtype

    with preserve_module_modes(model), torch.no_grad():
        # Stage 0: the base forward up to the first layer, per chunk; it records every call.
        hidden: list[torch.Tensor] = []
        recordings: list[Recording] = []
        with Blocks(block_loader, split.embedding_stage(spec.kind == "token")):
            for batch in spec.batches(batch_size, start, stop):
                recording = _record(split, batch.model_kwargs(device, dtype))
                hidden.append(recording.first_hidden)
                recording.first_hidden = None  # the list above holds the only reference
                recordings.append(recording)
        order = [call.index for call in recordings[0].calls]
        if any([call.index for call in r.calls] != order for r in recordings):
            raise InputError(f"{type(split.base).__name__} called its layers in a batch-dependent order")
        # Stages 1..: each layer, then the final norm, over all chunks.
        for position, index in enumerate(order):
            is_norm = index == -1
            module = getattr(split.base, split.layout.norm) if is_norm else split.layers[index]
            name = split.name(split.layout.norm if is_norm else f"{split.layout.layers}.{index}")
            with Block(block_loader, name, module):
                for c, recording in enumerate(recordings):
                    call = recording.calls[position]
                    out = call.run(module, hidden[c])
                    hidden[c] = out[:, -1, :].to(device="cpu", dtype=torch.float32) if is_norm else out
                    recording.calls[position] = None  # free masks etc. once used
    return torch.cat(hidden)


class Blocks:
    """Several blocks loaded together (the modules of the embedding stage), released in reverse order."""

    def __init__(self, loader: BlockLoader | None, blocks: list[tuple[str, nn.Module]]) -> None:
        self.blocks = [Block(loader, name, module) for name, module in blocks]
        self.entered: list[Block] = []

    def __enter__(self) -> Blocks:
        try:
            for block in self.blocks:
                block.__enter__()
                self.entered.append(block)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        while self.entered:
            self.entered.pop().__exit__()


# --------------------------------------------------------------------------------------
# Streamed controls: fresh inits drawn one block at a time
# --------------------------------------------------------------------------------------


def streamed_block_seed(seed: int, name: str) -> int:
    """The torch seed a streamed control's block ``name`` is initialised under.

    A stable hash of ``(control seed, block name)`` (not Python's salted ``hash``), so a block's
    init depends on nothing else: not on the order blocks are drawn in, nor on which other blocks
    were materialised, nor on the machine.
    """
    digest = hashlib.sha256(f"seedprints-streamed-control/{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_storage(like: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Uninitialised tensors of the (global) shapes and dtypes of ``like`` on ``device``, views of ONE allocation.

    A block's weights are freed together, so they are allocated together: glibc serves blocks over
    its mmap threshold (at most 32 MB) from a fresh mapping and unmaps it when freed, whereas
    tensor-by-tensor allocations of a few MB each come from the heap, which keeps them after they
    are freed (on a 200M LLaMA under FSDP2 that read as 100-250 MB of RSS left after step 0).
    """
    align = 64
    offsets, total = [], 0
    for tensor in like:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // align) * align
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    views = []
    for tensor, offset in zip(like, offsets):
        nbytes = tensor.numel() * tensor.element_size()
        views.append(flat[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape))
    return views


def _iter_tensor_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
    """``(owner, "_parameters" | "_buffers", name, tensor)`` of every tensor in ``module`` and below."""
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(owner, kind).items():
                if tensor is not None:
                    yield owner, kind, name, tensor


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Children before parents: the order ``PreTrainedModel.initialize_weights`` visits modules in
    (GPT-2's attention re-draws its ``c_proj`` with the depth-scaled std after the Conv1D's own init)."""
    for child in module.children():
        yield from _post_order(child)
    yield module


class StreamedInit:
    """A block loader that draws a meta model's units in its init's own random stream, each just before it runs.

    A family whose init draws its weights unit by unit in the layer-major probe's order (LitGPT's
    pretraining init, OLMo-core's ``init_weights``) can give its controls without a control ever
    existing whole: each unit is drawn when the probe asks for it, from the stream state the previous
    unit left, and freed after, so the weights are bit for bit the whole control's. A unit the probe
    never runs but the stream passes through (an LM head drawn first, an embedding under embedding
    probes) is drawn to advance the stream and freed at once. A unit asked for after the stream has
    passed it is refused: its draw is gone.

    Each unit is drawn on the CPU in the dtype the meta model was built in (as the whole control),
    then cast to ``dtype`` and moved to ``device``; ``drawn`` lists the units drawn, in order. A
    family subclasses it with :meth:`_init_unit` (its draws of one unit, carrying its stream's state)
    and names its stream (:attr:`stream`) and order (:attr:`order`) for the errors.

    Args:
        units: ``(name, module)`` of the meta model in the stream's order, with the names the probe's
            block loader is called with.
        device: where the drawn blocks live while they run (default CPU).
        dtype: the dtype they run in.
    """

    #: The init stream and its order, as the errors name them.
    stream = "the init stream"
    order = "init order"

    def __init__(self, units: list[tuple[str, nn.Module]], *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.pending = list(units)
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.drawn: list[str] = []

    def __call__(self, name: str, module: nn.Module) -> Callable[[], None]:
        names = [unit_name for unit_name, _ in self.pending]
        if name not in names:
            raise InputError(f"block {name!r} was asked for after {self.stream} passed it (or is not a unit of the "
                             f"model; still to draw: {names}): blocks are drawn in {self.order}")
        while True:
            unit_name, unit = self.pending.pop(0)
            release = self._draw(unit_name, unit)
            if unit_name == name:
                if unit is not module:
                    release()
                    raise InputError(f"block {name!r} is another module than the model's own")
                return release
            release()  # drawn only to advance the stream

    def _init_unit(self, name: str, unit: nn.Module) -> None:
        """Draw ``unit``'s weights (materialised on the CPU, uninitialised) from the stream, advancing its state."""
        raise NotImplementedError

    def _draw(self, name: str, unit: nn.Module) -> Callable[[], None]:
        slots = [(owner, kind, key, tensor) for owner in unit.modules() for kind in ("_parameters", "_buffers")
                 for key, tensor in getattr(owner, kind).items() if tensor is not None]
        unit.to_empty(device="cpu")
        with torch.no_grad():
            self._init_unit(name, unit)
        self.drawn.append(name)
        for owner, kind, key, _ in slots:
            tensor = getattr(owner, kind)[key]
            moved = tensor.detach().to(device=self.device, dtype=self.dtype if tensor.is_floating_point() else None)
            getattr(owner, kind)[key] = nn.Parameter(moved, requires_grad=False) if kind == "_parameters" else moved

        def release() -> None:
            for owner, kind, key, tensor in slots:
                getattr(owner, kind)[key] = tensor

        return release


class _FreshInitLoader:
    """A :data:`BlockLoader` drawing each block from the model's init distribution, then freeing it.

    The block's meta tensors are materialised on the CPU (what was already real, e.g. the rotary
    ``inv_freq`` buffers ``init_empty_weights`` leaves on the CPU, is kept), initialised by the
    model's own ``_init_weights`` on every submodule in post-order under
    ``torch.manual_seed(streamed_block_seed(seed, name))`` (global RNGs restored after) in the dtype
    ``from_config`` built it in (as ``controls_from_config``'s whole model), then cast to ``dtype``
    and moved to ``device``. Drawing on the CPU makes a control the same on every
    device, as ``build_control_model`` does. The release puts the original (meta) tensors back.
    ``to_empty`` is not used: it would also replace the real buffers with uninitialised memory.
    """

    def __init__(self, init_owner: nn.Module, seed: int, device: torch.device, dtype: torch.dtype,
                 release: bool = True) -> None:
        self.init_owner, self.seed, self.device, self.dtype, self.release = init_owner, seed, device, dtype, release
        self.drawn: list[str] = []  # names of the blocks drawn, in order (what tests count)

    def _in_place(self, tensor: torch.Tensor) -> bool:
        """Already where (and in the dtype) the block runs: ``"cuda"`` matches ``"cuda:0"`` (the current one)."""
        same_device = tensor.device.type == self.device.type and (
            self.device.index is None or tensor.device.index == self.device.index)
        return same_device and (tensor.dtype == self.dtype or not tensor.is_floating_point())

    def __call__(self, name: str, module: nn.Module) -> Callable[[], None] | None:
        slots = list(_iter_tensor_slots(module))
        meta = [slot for slot in slots if slot[3].device.type == "meta"]
        if not meta and all(self._in_place(tensor) for *_, tensor in slots):
            return None
        storage = block_storage([tensor for *_, tensor in meta], torch.device("cpu"))
        for (owner, kind, key, _), empty in zip(meta, storage):
            getattr(owner, kind)[key] = nn.Parameter(empty, requires_grad=False) if kind == "_parameters" else empty
        if meta:
            self.drawn.append(name)
            with preserve_rng_state(), torch.no_grad():
                torch.manual_seed(streamed_block_seed(self.seed, name))
                for submodule in _post_order(module):
                    self.init_owner._init_weights(submodule)
        for owner, kind, key, _ in slots:
            tensor = getattr(owner, kind)[key]
            moved = tensor.detach().to(device=self.device, dtype=self.dtype if tensor.is_floating_point() else None)
            getattr(owner, kind)[key] = nn.Parameter(moved, requires_grad=False) if kind == "_parameters" else moved
        if not self.release:
            return None

        def release() -> None:
            for owner, kind, key, tensor in slots:
                getattr(owner, kind)[key] = tensor

        return release


def _no_zero3_init() -> Any:
    """A context in which ``from_config`` builds a plain model even while DeepSpeed ZeRO-3 is on.

    While a ZeRO-3 ``HfDeepSpeedConfig`` is alive (``TrainingArguments(deepspeed=...)`` makes one),
    transformers builds every ``from_config`` model under ``deepspeed.zero.Init``, which partitions
    it over the ranks (and cannot partition meta tensors). A control or a meta skeleton belongs to
    this process alone. transformers' own guard against a nested ``zero.Init``
    (``modeling_utils.set_zero3_state``) turns that off; a no-op context where it does not exist.
    """
    import contextlib

    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
        from transformers.modeling_utils import set_zero3_state
    except ImportError:  # a transformers without either: it has no such hook to turn off
        return contextlib.nullcontext()
    return set_zero3_state() if is_deepspeed_zero3_enabled() else contextlib.nullcontext()


def empty_model(config: Any) -> nn.Module:
    """The causal LM of ``config`` on the meta device (no weights), every global RNG untouched."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with preserve_rng_state(), init_empty_weights(), _no_zero3_init():
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    model.requires_grad_(False)
    return model


def _check_control_args(seed: int, spec: ProbeSpec, config: Any) -> ProbeSpec:
    check_int("seed", seed, low=0)
    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    if spec.is_resolved:
        return spec
    if spec.kind != "token":
        raise InputError("embedding probes take mean/std from the run's INIT embedding: pass the run's resolved "
                         "spec (seedprints controls --spec-from <reference.safetensors>)")
    return ProbeSpec.from_dict({**spec.to_dict(), "vocab_size": int(config.vocab_size)})


def probe_streamed_control(
    config: Any,
    seed: int,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Features ``[n, D]`` of a fresh init of ``config`` that never exists whole.

    A control is a draw from the model's init distribution, so each block can be drawn, probed
    and freed in turn: the model is built on the meta device (accelerate's ``init_empty_weights``),
    and :func:`extract_features_layerwise` materialises each block with the model's own init,
    seeded by :func:`streamed_block_seed` ``(seed, block name)``. Peak memory: one block plus the
    probe activations. The LM head is never drawn (the probe reads the last hidden state), so a
    tied embedding is initialised once, as the embedding.

    :func:`build_streamed_control_model` is the whole-model twin of this control (what
    ``build_control_model`` builds for these architectures); the ``"whole"`` scheme,
    ``from_config`` under one seed, draws other weights from the same distribution
    (``docs/benchmarks.md``). Global RNGs are left untouched.

    Args:
        config: a transformers config of a supported architecture (see :data:`SUPPORTED_MODEL_TYPES`).
        seed: the control's init seed.
        spec: the run's reference spec; an unresolved token spec takes the config's vocabulary.
        device: where blocks and activations live (default CPU); the init is drawn on the CPU.
        dtype: the floating dtype the blocks run in (drawn in the dtype ``from_config`` builds, then cast,
            as ``controls_from_config`` does).
    """
    spec = _check_control_args(seed, spec, config)
    model = empty_model(config)
    split = split_blocks(model)  # refuse an unsupported architecture before anything is drawn
    device = torch.device(device) if device is not None else torch.device("cpu")
    loader = _FreshInitLoader(split.base, seed, device, dtype)
    return extract_features_layerwise(model, spec, batch_size=batch_size, block_loader=loader, device=device,
                                      dtype=dtype)


def build_streamed_control_model(
    config: Any,
    seed: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The whole model whose every block equals what :func:`probe_streamed_control` draws for ``seed``.

    The whole-model twin of a streamed control (blocks seeded by name, so drawing them all at once
    or one at a time gives the same weights): a streamed control file and an in-run control of the
    same seed can then be the same model. An untied LM head is drawn as the block ``lm_head`` (its
    output-embedding name); a tied one is re-tied to the embedding. In eval mode, no gradients.
    """
    check_int("seed", seed, low=0)
    model = empty_model(config)
    split = split_blocks(model)
    device = torch.device(device) if device is not None else torch.device("cpu")
    loader = _FreshInitLoader(split.base, seed, device, dtype, release=False)
    blocks = split.embedding_stage(token_probes=True)
    blocks += [(split.name(f"{split.layout.layers}.{i}"), layer) for i, layer in enumerate(split.layers)]
    blocks.append((split.name(split.layout.norm), getattr(split.base, split.layout.norm)))
    for name, module in blocks:
        loader(name, module)
    model.tie_weights()
    for name, module in model.named_children():
        if module is not split.base:
            loader(name, module)
    leftover = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.device.type == "meta"]
    if leftover:
        raise InputError(f"{type(model).__name__}: tensors {leftover[:5]} are outside every block and stayed on meta")
    return model
