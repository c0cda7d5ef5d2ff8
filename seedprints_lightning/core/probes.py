"""Probe inputs and feature extraction: the first stage of the flow.

``ProbeSpec`` says exactly which random inputs a model is fed; ``extract_features`` turns a
model plus a spec into the ``[n, D]`` matrix the statistical core tests. Inputs come from
per-sample generators derived from the spec's seed, so

* making them never touches the global RNG (a probe inside training changes nothing),
* the same spec gives the same inputs on every machine and for every batch size or shard,
  because sample ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .checks import check_choice, check_int, check_number
from .errors import InputError, ModelNotFoundError

__all__ = [
    "DEFAULT_PROBE_KIND",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_LENGTH",
    "DEFAULT_PROBE_SEED",
    "ProbeSpec",
    "ProbeBatch",
    "extract_features",
    "find_causal_lm",
    "submodule_output",
    "find_causal_lm_or_none",
    "hidden_size_of",
    "preserve_module_modes",
]

# Defaults chosen from the calibration runs recorded in docs/benchmarks.md: token probes
# (embedding probes share a response across unrelated small models: unrelated z up to 150),
# n = 1000 (own z grows like sqrt(n): min 9.9 / 14.1 / 22.5 at n = 250 / 500 / 1000, the
# unrelated maximum only 3.3 / 3.9 / 5.1), L = 32 (not varied yet).
DEFAULT_PROBE_KIND: Literal["token", "embedding"] = "token"
DEFAULT_NUM_SAMPLES = 1000
DEFAULT_LENGTH = 32
DEFAULT_PROBE_SEED = 42  # the paper's probe seed

ProbeKind = Literal["token", "embedding"]


@dataclass(frozen=True)
class ProbeBatch:
    """One batch of probe inputs: token ids ``[b, L]`` or input embeddings ``[b, L, d]``."""

    input_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None

    @property
    def size(self) -> int:
        tensor = self.input_ids if self.input_ids is not None else self.inputs_embeds
        return int(tensor.shape[0])

    def model_kwargs(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for a ``transformers`` forward."""
        if self.input_ids is not None:
            return {"input_ids": self.input_ids.to(device)}
        return {"inputs_embeds": self.inputs_embeds.to(device=device, dtype=dtype)}


@dataclass(frozen=True)
class ProbeSpec:
    """Which random inputs a model is probed with.

    Fields left ``None`` are filled from a model by :meth:`resolve`: the token range from
    its vocabulary, the embedding width from its hidden size, and the embedding mean and
    std from its input-embedding matrix (which must be the INIT matrix for the paper's
    embedding probes: the callback resolves the spec at step 0). Fingerprints store the
    resolved spec, and two fingerprints are comparable only if their specs are equal.
    """

    kind: ProbeKind = DEFAULT_PROBE_KIND
    num_samples: int = DEFAULT_NUM_SAMPLES
    length: int = DEFAULT_LENGTH
    seed: int = DEFAULT_PROBE_SEED
    vocab_size: int | None = None
    hidden_size: int | None = None
    embed_mean: float | None = None
    embed_std: float | None = None

    def __post_init__(self) -> None:
        check_choice("ProbeSpec.kind", self.kind, ("token", "embedding"))
        check_int("ProbeSpec.num_samples", self.num_samples, low=3)
        check_int("ProbeSpec.length", self.length, low=1)
        check_int("ProbeSpec.seed", self.seed, low=0)
        for name in ("vocab_size", "hidden_size"):
            if getattr(self, name) is not None:
                check_int(f"ProbeSpec.{name}", getattr(self, name), low=1, hint="or None")
        if self.embed_mean is not None:
            check_number("ProbeSpec.embed_mean", self.embed_mean, hint="or None")
        if self.embed_std is not None:
            check_number("ProbeSpec.embed_std", self.embed_std, low=0.0, low_open=True, hint="or None")

    # ------------------------------------------------------------------ resolution
    @property
    def is_resolved(self) -> bool:
        if self.kind == "token":
            return self.vocab_size is not None
        return None not in (self.hidden_size, self.embed_mean, self.embed_std)

    def resolve(self, model: nn.Module) -> ProbeSpec:
        """A copy with every ``None`` field filled from ``model`` (a transformers LM)."""
        lm = find_causal_lm(model)
        return self.resolved_with(vocab_size=int(lm.config.vocab_size), hidden_size=int(hidden_size_of(lm.config)),
                                  init_embedding=lambda: lm.get_input_embeddings().weight)

    def resolved_with(self, *, vocab_size: int, hidden_size: int, init_embedding: Callable[[], torch.Tensor],
                      owner: str = "the model's", width_name: str = "hidden size") -> ProbeSpec:
        """A copy with every ``None`` field filled from a model of any family (the one rule every family shares).

        Args:
            vocab_size: the model's vocabulary; a token probe's ``vocab_size`` may not exceed it.
            hidden_size: the model's width; an embedding probe's ``hidden_size`` must equal it.
            init_embedding: returns the model's input embedding matrix, whose mean and std an embedding
                probe takes (called only when they are missing; a meta-device matrix is refused).
            owner, width_name: how messages name the model and its width ("the GPT's", "n_embd").
        """
        if self.kind == "token":
            vocab = self.vocab_size if self.vocab_size is not None else int(vocab_size)
            if vocab > int(vocab_size):
                raise InputError(f"ProbeSpec.vocab_size={vocab} exceeds {owner} vocabulary ({vocab_size}); use the "
                                 "smallest vocabulary of the models you compare")
            return dataclasses.replace(self, vocab_size=vocab)
        if self.hidden_size is not None and self.hidden_size != int(hidden_size):
            raise InputError(f"ProbeSpec.hidden_size={self.hidden_size} but {owner} {width_name} is {hidden_size}: "
                             "embedding probes only compare models of one width; use kind='token' across widths")
        mean, std = self.embed_mean, self.embed_std
        if mean is None or std is None:
            weight = init_embedding().detach()
            if weight.device.type == "meta":
                raise InputError("embedding probes take their mean/std from the INIT embedding, which a meta-device "
                                 "model does not hold: pass the reference's resolved spec")
            weight = weight.float()
            mean = float(weight.mean()) if mean is None else mean
            std = float(weight.std()) if std is None else std
        return dataclasses.replace(self, hidden_size=int(hidden_size), embed_mean=mean, embed_std=std)

    def _require_resolved(self) -> None:
        if not self.is_resolved:
            missing = "vocab_size" if self.kind == "token" else "hidden_size, embed_mean and embed_std"
            raise InputError(f"this ProbeSpec has no {missing} yet: call spec.resolve(model) first")

    # ------------------------------------------------------------------ inputs
    def sample_generator(self, index: int) -> torch.Generator:
        """The CPU generator of sample ``index``: depends only on ``(seed, index)``."""
        state = np.random.SeedSequence([int(self.seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator(device="cpu").manual_seed(int(state) & ((1 << 63) - 1))

    def make_batch(self, start: int, stop: int) -> ProbeBatch:
        """Inputs of samples ``start .. stop - 1`` (on CPU)."""
        self._require_resolved()
        if not (0 <= start < stop <= self.num_samples):
            raise InputError(f"sample range [{start}, {stop}) is outside [0, {self.num_samples})")
        if self.kind == "token":
            ids = torch.stack([
                torch.randint(0, self.vocab_size, (self.length,), generator=self.sample_generator(i))
                for i in range(start, stop)
            ])
            return ProbeBatch(input_ids=ids)
        embeds = torch.stack([
            torch.randn(self.length, self.hidden_size, generator=self.sample_generator(i))
            for i in range(start, stop)
        ])
        return ProbeBatch(inputs_embeds=embeds * self.embed_std + self.embed_mean)

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[ProbeBatch]:
        stop = self.num_samples if stop is None else stop
        check_int("batch_size", batch_size, low=1)
        for lo in range(start, stop, batch_size):
            yield self.make_batch(lo, min(stop, lo + batch_size))

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown ProbeSpec field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def describe(self) -> str:
        if self.kind == "token":
            extra = f"V={self.vocab_size}"
        elif self.is_resolved:
            extra = f"d={self.hidden_size}, N({self.embed_mean:.3g}, {self.embed_std:.3g})"
        else:
            extra = "unresolved"
        return f"{self.kind} probes, n={self.num_samples}, L={self.length}, seed={self.seed}, {extra}"


def hidden_size_of(config: Any) -> int:
    """The hidden size of a transformers config, whatever the architecture calls it."""
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ModelNotFoundError(f"cannot tell the hidden size of a {type(config).__name__}")


def find_causal_lm_or_none(model: nn.Module) -> nn.Module | None:
    """:func:`find_causal_lm`, or ``None`` when ``model`` holds no transformers model (``feature_fn`` models)."""
    try:
        return find_causal_lm(model)
    except ModelNotFoundError:
        return None


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The first ``transformers.PreTrainedModel`` in ``model`` (itself included)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ModelNotFoundError(
        f"no transformers PreTrainedModel found inside {type(model).__name__}; pass a feature_fn(module, batch) -> "
        "[b, D] for other model types"
    )


@contextlib.contextmanager
def preserve_module_modes(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own train/eval flag after.

    A blanket ``.train()`` afterwards would un-freeze what the user froze (e.g. a frozen
    embedding kept in eval mode), so each module gets back exactly the flag it had.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def submodule_output(name: str) -> Callable[[nn.Module, ProbeBatch], torch.Tensor]:
    """A ``feature_fn`` for models that are not ``transformers`` models: ``name``'s output at the last position.

    ``feature_fn(module, batch)`` calls ``module(batch.input_ids)`` (the root, so sharded wrappers
    gather their parameters) and keeps what the submodule ``name`` returned, at the last
    position: the last hidden state, as for a transformers model, when ``name`` is the final
    norm. For a LitGPT ``GPT``: ``submodule_output("transformer.ln_f")``. Token probes only.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"name must be a submodule's dotted name, e.g. 'transformer.ln_f', got {name!r}")

    def feature_fn(module: nn.Module, batch: ProbeBatch) -> torch.Tensor:
        try:
            target = module.get_submodule(name)
        except AttributeError as exc:
            raise InputError(f"{type(module).__name__} has no submodule {name!r}: name the final norm as "
                             "module.named_modules() lists it") from exc
        if batch.input_ids is None:
            raise InputError(f"submodule_output({name!r}) takes token probes: use ProbeSpec(kind='token', ...)")
        captured: list[torch.Tensor] = []
        handle = target.register_forward_hook(lambda _module, _args, output: captured.append(
            output[0] if isinstance(output, tuple) else output))
        try:
            param = next(iter(module.parameters()), None)
            module(batch.input_ids.to(param.device if param is not None else "cpu"))
        finally:
            handle.remove()
        if not captured or captured[-1].dim() != 3:
            raise InputError(f"submodule {name!r} returned no [batch, length, hidden] output during the forward")
        return captured[-1][:, -1, :]

    return feature_fn


def _last_hidden_state(lm: nn.Module, batch: ProbeBatch, device: torch.device | None) -> torch.Tensor:
    """Last-layer hidden state at the last position: the decoder's output, taken by calling the ROOT model.

    The root is called (not the inner decoder) because under FSDP2 (``fully_shard``) only the
    root's forward gathers the root's own sharded parameters (embeddings, final norm): calling the
    decoder directly fails with "mixed torch.Tensor and DTensor". A forward hook on the decoder
    captures its output; ``logits_to_keep=1`` keeps the LM head to the last position, so the
    detour costs one ``[b, D] x [D, V]`` product.
    """
    decoder = getattr(lm, "base_model", None)
    dtype = lm.get_input_embeddings().weight.dtype
    kwargs = dict(batch.model_kwargs(device, dtype), use_cache=False)
    if decoder is None or decoder is lm:
        outputs = lm(**kwargs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        return hidden[:, -1, :]
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    if _accepts(lm, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    handle = decoder.register_forward_hook(keep)
    try:
        lm(**kwargs)
    finally:
        handle.remove()
    return captured[-1][:, -1, :]


def extract_features(
    model: nn.Module,
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
    sample_range: tuple[int, int] | None = None,
    forward_fn: Callable[[ProbeBatch], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Probe ``model`` with ``spec``'s inputs; return ``[n, D]`` float32 features on CPU.

    The model runs in eval mode under ``torch.no_grad()`` (not ``inference_mode``, which
    breaks FSDP), one batch at a time, and every submodule's mode is restored afterwards.

    Args:
        model: a ``transformers`` causal LM, or a module containing one.
        spec: the probe; unresolved fields are filled from ``model`` first.
        device: where inputs go; default: the model's parameter device.
        progress: show a tqdm bar.
        sample_range: ``(start, stop)`` to probe only that shard of the samples.
        forward_fn: ``forward_fn(batch) -> [b, D]`` replacing the default decoder forward,
            e.g. a model without ``transformers`` or a wrapped (FSDP) model.
    """
    if forward_fn is None:
        lm = find_causal_lm(model)
        spec = spec if spec.is_resolved else spec.resolve(lm)
        if device is None:
            device = next(lm.parameters()).device

        def forward_fn(batch: ProbeBatch) -> torch.Tensor:
            return _last_hidden_state(lm, batch, device)
    else:
        spec._require_resolved()
    start, stop = sample_range if sample_range is not None else (0, spec.num_samples)
    if stop <= start:
        return torch.empty(0, 0)
    chunks: list[torch.Tensor] = []
    batches = spec.batches(batch_size, start, stop)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil((stop - start) / batch_size), desc="probing", unit="batch")
    with preserve_module_modes(model), torch.no_grad():
        for batch in batches:
            features = forward_fn(batch)
            if features.dim() != 2 or features.shape[0] != batch.size:
                raise InputError(
                    f"the probe forward returned shape {tuple(features.shape)} for a batch of {batch.size}; "
                    "it must return [batch, hidden]"
                )
            chunks.append(features.detach().to(device="cpu", dtype=torch.float32))
    return torch.cat(chunks)
