"""The torchtitan model family: PyTorch's reference pretraining stack, its ``Decoder`` models (``Llama3Model``).

What the package needs of a family, for torchtitan's ``torchtitan.models.common.decoder.Decoder``
(read from torchtitan 0.3.0: ``Decoder.forward(tokens, positions, attention_masks)`` runs
``tok_embeddings``, each block of the ``layers`` dict as ``layer(h, attention_masks, positions)``,
``norm``, then ``lm_head`` unless ``_skip_lm_head``):

- **features**: the last hidden state at the last position, i.e. ``norm``'s output there. A probe
  sample is one document: ``positions`` is ``arange(L)`` on every row, and the attention masks are
  the model's own (``model.get_attention_masks(positions)``: FlexAttention's causal, per-document
  block mask, or varlen metadata), so the probe runs what training runs. The whole forward is the
  model's own with ``_skip_lm_head`` set (torchtitan's switch for a forward that ends at ``norm``),
  so the LM head never runs. Embedding probes enter where ``tok_embeddings`` would hand over: the
  embedding module is replaced, for that forward only, by one that passes its input through.
- **layer-major probe** (:func:`extract_features_titan_layerwise`): the embeddings, then each block,
  then ``norm``, every probe sample through one block before the next, with a
  :data:`~seedprints_lightning.core.layerwise.BlockLoader` called before each block. The model's own
  forward is run once per batch with its blocks and ``norm`` swapped for recorders (as for the
  transformers families), so each block gets exactly the arguments a whole forward gives it; the
  features equal the whole forward's bit for bit (``tests/test_titan.py``).
- **controls**: fresh inits with torchtitan's own ``init_states`` (each module's ``param_init``: the
  depth-scaled truncated normals of ``Llama3Model``) under ``torch.manual_seed(seed)``, on a model
  built from the live model's own config (``model.config``) on the meta device and materialised on
  the CPU (:func:`build_titan_control`). ``init_states`` draws the whole model from the global
  generator in module order, so a control is built whole, as the trainer builds the model.

Not here yet: a rebuild from torchtitan's distributed checkpoint (``seedprints audit`` cannot read
one), a ``Trainer`` subclass, and sharded (FSDP2 / tensor-parallel) torchtitan models. With
:func:`titan_feature_fn` and :func:`titan_control_factory`, ``SeedPrintsMonitor`` probes an unsharded
``Decoder`` in a loop of one's own today.

Nothing here imports ``torchtitan`` at module import: a model is recognised only when ``torchtitan``
is already imported (a model of it exists), so other users pay nothing (its import needs ``triton``).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .controls import INIT_SCHEME_ATTR, preserve_rng_state
from .errors import InputError
from .layerwise import BlockLoader, _Blocks, _Recorder, _Recording
from .probes import ProbeBatch, ProbeSpec, preserve_module_modes

__all__ = [
    "INIT_TITAN",
    "build_titan_control",
    "extract_features_titan",
    "extract_features_titan_layerwise",
    "find_titan_decoder",
    "resolve_titan_spec",
    "titan_control_factory",
    "titan_feature_fn",
]

#: The init scheme a control of this family records: torchtitan's ``init_states`` under ``torch.manual_seed(seed)``.
INIT_TITAN = "torchtitan-init_states"


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


def _require(model: nn.Module) -> nn.Module:
    found = find_titan_decoder(model)
    if found is None:
        raise InputError(f"no torchtitan Decoder (torchtitan.models.common.decoder.Decoder, e.g. Llama3Model) found "
                         f"inside {type(model).__name__}")
    for part in ("tok_embeddings", "layers", "norm"):
        if getattr(found, part, None) is None:
            raise InputError(f"this torchtitan {type(found).__name__} has no {part} (a pipeline-parallel stage): it "
                             "cannot be probed alone; probe the whole model")
    if any(hasattr(p, "device_mesh") for p in found.parameters()):
        raise InputError("this torchtitan model holds DTensor (sharded) weights: the torchtitan family probes "
                         "unsharded models only so far")
    return found


def resolve_titan_spec(spec: ProbeSpec | None, model: nn.Module) -> ProbeSpec:
    """``spec`` with every ``None`` field filled from the torchtitan model (vocabulary, width, init embedding)."""
    model = _require(model)
    spec = spec or ProbeSpec()
    return spec.resolved_with(vocab_size=int(model.config.vocab_size), hidden_size=int(model.config.dim),
                              init_embedding=lambda: model.tok_embeddings.weight, width_name="dim")


class _PassThrough(nn.Module):
    """Stands in for ``tok_embeddings`` in an embedding probe's forward: the probe's embeddings go on as they are."""

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds


@contextlib.contextmanager
def _probe_forward(lm: nn.Module, batch: ProbeBatch) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """The model set up for one probe forward that ends at ``norm``: ``(first argument, keyword arguments)``.

    ``_skip_lm_head`` (an instance attribute for the call, removed after) stops the forward at
    ``norm``; embedding probes swap ``tok_embeddings`` for a pass-through, put back after.
    """
    weight = lm.tok_embeddings.weight
    device, dtype = weight.device, (weight.dtype if weight.dtype.is_floating_point else torch.float32)
    if batch.input_ids is not None:
        first = batch.input_ids.to(device)
    else:
        first = batch.inputs_embeds.to(device=device, dtype=dtype)
    rows, length = first.shape[:2]
    positions = torch.arange(length, device=device).unsqueeze(0).expand(rows, length)  # one document per sample
    kwargs = {"positions": positions, "attention_masks": lm.get_attention_masks(positions=positions)}
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
    """``[n, dim]`` float32 CPU features of a torchtitan ``Decoder`` (whole forwards, ``batch_size`` samples each)."""
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
                                     block_loader: BlockLoader | None = None) -> torch.Tensor:
    """:func:`extract_features_titan`, one block at a time: every sample through a block before the next.

    ``block_loader(name, module)`` runs before each block (``"tok_embeddings"`` for token probes,
    ``"layers.<i>"``, ``"norm"``); peak memory is one block plus the probe activations.
    """
    lm = _require(model)
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
                with _probe_forward(lm, batch) as (first, kwargs):
                    recordings.append(_record(lm, first, kwargs))
        hidden = [recording.first_hidden for recording in recordings]
        blocks = [(f"layers.{key}", lm.layers[key]) for key in lm.layers.keys()] + [("norm", lm.norm)]
        for index, (name, block) in enumerate(blocks):
            with _Blocks(block_loader, [(name, block)]):
                for i, recording in enumerate(recordings):
                    call = recording.calls[index]
                    hidden[i] = call.run(block, hidden[i])
    return torch.cat([h[:, -1, :].float().cpu() for h in hidden])


def build_titan_control(model: nn.Module, seed: int) -> nn.Module:
    """A fresh init of the torchtitan model: its own config built on the meta device, materialised on the CPU and
    initialised by torchtitan's ``init_states`` under ``torch.manual_seed(seed)``; eval mode, no grads.

    Every global RNG is restored after. Cast to the live model's dtype and moved to its device.
    """
    lm = _require(model)
    weight = lm.tok_embeddings.weight
    with preserve_rng_state():
        with torch.device("meta"):
            control = copy.deepcopy(lm.config).build()
        control.to_empty(device="cpu")
        torch.manual_seed(int(seed))
        control.init_states(buffer_device=torch.device("cpu"))
    control = control.to(device=weight.device)
    # The parameters only: the RoPE cache is a complex buffer, which a module-wide cast would make real.
    for param in control.parameters():
        if param.dtype.is_floating_point and param.dtype != weight.dtype:
            param.data = param.data.to(weight.dtype)
    control.eval()
    control.requires_grad_(False)
    setattr(control, INIT_SCHEME_ATTR, INIT_TITAN)
    return control


def titan_control_factory(model: nn.Module) -> Callable[[int], nn.Module]:
    """``control_factory(seed)`` for a face: :func:`build_titan_control` of ``model``."""
    _require(model)
    return lambda seed: build_titan_control(model, seed)
