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
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from typing import Any

import torch
from torch import nn

from .controls import INIT_SCHEME_ATTR, preserve_rng_state
from .errors import InputError
from .fingerprint import config_digest
from .probes import ProbeBatch, ProbeSpec

__all__ = [
    "INIT_LITGPT",
    "LITGPT_CONFIG_FILE",
    "LITGPT_CONFIG_KEY",
    "build_litgpt_control",
    "find_litgpt_model",
    "litgpt_config_dict",
    "litgpt_config_digest",
    "litgpt_features",
    "litgpt_rebuild_info",
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
                              init_embedding=lambda: gpt.transformer.wte.weight, owner="the GPT's",
                              width_name="n_embd")


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


def _init_like_pretrain(model: nn.Module) -> None:
    """Draw ``model``'s weights by LitGPT's pretraining init (``litgpt.pretrain.initialize_weights``), one device."""
    from litgpt.pretrain import initialize_weights

    # initialize_weights reads fabric.strategy only to skip the draw under FSDP (which draws per shard later).
    single_device = types.SimpleNamespace(strategy=None)
    initialize_weights(single_device, model, n_layer=model.config.n_layer, n_embd=model.config.n_embd)


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
