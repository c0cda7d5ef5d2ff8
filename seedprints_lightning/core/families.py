"""Model families, and the one place that decides how a model is measured.

A :class:`ModelFamily` is everything the package needs of one kind of model: how to find it inside
the module a training loop hands over, how to resolve a probe spec from it, the feature functions
it offers (a whole forward; layer-major; gathered blocks for sharded weights), how to draw a fresh
init of it (a control), what it is called in a fingerprint (class and config digest), and, for the
offline CLI, how to recognise and rebuild one of its checkpoints (:class:`CheckpointSide`).

The registry holds the built-in families (``transformers``, ``olmo-core``, ``litgpt``,
``torchtitan``) and any a user adds with :func:`register_family`; :func:`family_of` and
:func:`family_of_checkpoint` answer which family a module or checkpoint belongs to.
:func:`plan_measurement` turns a module (and a face's ``feature_fn`` / ``control_factory``) into a
:class:`MeasurementPlan`: how it is measured, why, and where its controls come from. The faces
(through :class:`~seedprints_lightning.faces.settings.FaceSettings`: features, controls, identity), the
offline readers and the audit ask it; none of them branches on a family.

Adding a family is one module (its functions) plus one :class:`ModelFamily` entry::

    register_family(ModelFamily(
        name="my-lm", find=find_my_lm, resolve_spec=resolve_my_spec, whole=extract_my_features,
        build_control=lambda model, seed, config=None: build_my_control(model, seed),
        identity=lambda module: {"model_class": "MyLM", "config_digest": None},
        sizes=lambda model: (model.vocab_size, model.width)))

Nothing here imports an optional library (olmo-core, litgpt, torchtitan) at module import: each
family's ``find`` recognises a model only once its library is imported, and the checkpoint side
(which lives in :mod:`seedprints_lightning.offline`, a layer the core may not import) is named by
``"module:function"`` strings, imported on first use like an entry point.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import litgpt as _litgpt_family
from . import olmo as _olmo_family
from . import titan as _titan_family
from .controls import INIT_STREAMED, build_control_model, control_dtype, streams_controls
from .errors import InputError, ModelNotFoundError
from .fingerprint import config_digest
from .layerwise import extract_features_layerwise, probe_streamed_control
from .probes import ProbeBatch, ProbeSpec, extract_features, find_causal_lm, find_causal_lm_or_none, hidden_size_of
from .sharded import extract_features_gathered, holds_dtensors, probes_gathered

__all__ = [
    "BUILT_IN",
    "CONTROL_SOURCES",
    "HOWS",
    "LITGPT",
    "OLMO_CORE",
    "TORCHTITAN",
    "TRANSFORMERS",
    "CheckpointSide",
    "MeasurementPlan",
    "ModelFamily",
    "families",
    "family_named",
    "family_of",
    "family_of_checkpoint",
    "plan_measurement",
    "refuse_dedicated",
    "register_family",
    "unregister_family",
]

#: How a model's features are taken (:attr:`MeasurementPlan.how`).
HOWS = ("whole", "layer-major", "gathered-blocks", "strategy-wrapper", "feature_fn")
#: Where a run's controls come from (:attr:`MeasurementPlan.controls`).
CONTROL_SOURCES = ("streamed block by block", "whole fresh init", "control_factory", "file", "none")

Features = Callable[..., torch.Tensor]  # (model, spec, *, batch_size, sample_range) -> [n, D] float32 CPU
Ref = Callable[..., Any] | str | None  # a function, or "package.module:function" imported on first use


def _resolve_ref(ref: Ref) -> Callable[..., Any] | None:
    """The function ``ref`` names; ``None`` when it is ``None`` or its module does not exist (yet)."""
    if ref is None or callable(ref):
        return ref
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:  # the module itself is missing: no such side (yet); a missing dependency raises
            return None
        raise
    return getattr(module, attr, None)


@dataclass(frozen=True)
class CheckpointSide:
    """How the offline CLI recognises and rebuilds a family's checkpoints; every entry optional.

    Each is a function or a ``"package.module:function"`` string imported on first use (the
    readers live in :mod:`seedprints_lightning.offline`, or need the family's library).

    Args:
        is_checkpoint: ``(path) -> bool``: the path is one of this family's checkpoints.
        load_model: ``(path, *, dtype, trust_pickle) -> nn.Module``: the model rebuilt whole, on the CPU.
        open: ``(source, runtime) -> handle``: an offline handle (:mod:`~seedprints_lightning.offline.streaming`).
        read_state: ``(path, *, trust_pickle) -> dict``: the trainer state (step, callback states), no weights.
        read_weights: ``(path) -> dict[str, Tensor]``: the model's weights as saved (a save record's digest).
        fingerprint: ``(path, spec, *, step, runtime, num_controls, extra) -> Fingerprint | None``: a
            checkpoint file recognised by reading it (``None``: not one of this family's).
    """

    is_checkpoint: Ref = None
    load_model: Ref = None
    open: Ref = None
    read_state: Ref = None
    read_weights: Ref = None
    fingerprint: Ref = None

    def get(self, name: str) -> Callable[..., Any] | None:
        """The function of entry ``name`` (``None``: this family has none, or its module is not installed)."""
        return _resolve_ref(getattr(self, name))


@dataclass(frozen=True)
class ModelFamily:
    """One kind of model: what the package needs to find, probe, re-init and rebuild it.

    Args:
        name: the family's name in logs, fingerprints and errors (``"transformers"``).
        find: ``find(module) -> model | None``: the family's model inside ``module`` (itself included).
        resolve_spec: ``resolve_spec(spec, model) -> ProbeSpec``: every ``None`` field filled from the model.
        whole: ``whole(model, spec, *, batch_size, sample_range) -> [n, D]``: whole forwards.
        forward_features: ``(model, batch) -> [b, D]`` on one probe batch (a ``feature_fn``), if the family has one.
        layer_major: the same features, every sample through one block before the next (``None``: not offered).
        gathered: the features of a sharded model, one gathered block at a time (``None``: not offered).
        gathers: ``gathers(model) -> bool``: whether :attr:`gathered` (not :attr:`whole`) probes this model.
        build_control: ``build_control(model, seed, config=None) -> nn.Module``: a fresh init of ``model`` (from
            ``config`` where given), in the live model's dtype.
        streams_controls: ``streams_controls(model) -> bool``: its controls are drawn and probed block by block,
            by :attr:`streamed_control` (the faces' default controls, when it is set).
        streamed_control: ``(config, seed, spec, *, batch_size, device, dtype) -> [n, D]``: the features of the
            seed's fresh init, each block drawn just before it runs and freed after.
        control_config: ``control_config(model) -> config``: what :attr:`streamed_control` builds a control from.
        streamed_init_scheme: the init scheme a streamed controls file records (the family's whole-init scheme
            where its streamed draw is the same weights).
        identity: ``identity(module) -> {"model_class", "config_digest"}``, recorded by fingerprints and controls.
        sizes: ``sizes(model) -> (vocabulary, width)`` from its config (a meta-device model too); ``-1``: unknown.
        checkpoint: how the offline CLI reads its checkpoints (:class:`CheckpointSide`).
        dedicated_face: the face that must probe this family (``None``: every face can), named in the error
            a generic face raises when given one.
    """

    name: str
    find: Callable[[Any], nn.Module | None]
    resolve_spec: Callable[[ProbeSpec | None, nn.Module], ProbeSpec]
    whole: Features
    build_control: Callable[..., nn.Module]
    identity: Callable[[nn.Module], dict[str, str | None]]
    sizes: Callable[[nn.Module], tuple[int, int]]
    forward_features: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None = None
    layer_major: Features | None = None
    gathered: Features | None = None
    gathers: Callable[[nn.Module], bool] = field(default=lambda model: False)
    streams_controls: Callable[[nn.Module], bool] = field(default=lambda model: False)
    streamed_control: Callable[..., torch.Tensor] | None = None
    control_config: Callable[[nn.Module], Any] | None = None
    streamed_init_scheme: str = INIT_STREAMED
    checkpoint: CheckpointSide = field(default_factory=CheckpointSide)
    dedicated_face: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a ModelFamily needs a non-empty name, got {self.name!r}")
        for name in ("find", "resolve_spec", "whole", "build_control", "identity", "sizes"):
            if not callable(getattr(self, name)):
                raise InputError(f"ModelFamily {self.name!r}: {name} must be callable, got "
                                 f"{type(getattr(self, name)).__name__}")


# --------------------------------------------------------------------------------------
# The built-in families
# --------------------------------------------------------------------------------------


def _hf_resolve(spec: ProbeSpec | None, model: nn.Module) -> ProbeSpec:
    return (spec or ProbeSpec()).resolve(find_causal_lm(model))


def _hf_whole(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
              sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    return extract_features(find_causal_lm(model), spec, batch_size=batch_size, sample_range=sample_range)


def _hf_layer_major(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                    sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    return extract_features_layerwise(find_causal_lm(model), spec, batch_size=batch_size, sample_range=sample_range)


def _hf_gathered(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                 sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    return extract_features_gathered(find_causal_lm(model), spec, batch_size=batch_size, sample_range=sample_range)


def _hf_identity(module: nn.Module) -> dict[str, str | None]:
    lm = find_causal_lm(module)
    return {"model_class": type(lm).__name__, "config_digest": config_digest(lm.config)}


def _hf_sizes(model: nn.Module) -> tuple[int, int]:
    config = find_causal_lm(model).config
    try:
        return int(config.vocab_size), hidden_size_of(config)
    except ModelNotFoundError:  # a config that names its width otherwise: unknown, an embedding probe is refused
        return int(config.vocab_size), -1


def _hf_streams(model: nn.Module) -> bool:
    lm = find_causal_lm_or_none(model)
    return lm is not None and streams_controls(lm)


TRANSFORMERS = ModelFamily(
    name="transformers",
    find=find_causal_lm_or_none,
    resolve_spec=_hf_resolve,
    whole=_hf_whole,
    layer_major=_hf_layer_major,
    gathered=_hf_gathered,
    gathers=lambda model: probes_gathered(model),
    build_control=lambda model, seed, config=None: build_control_model(model, seed),
    streams_controls=_hf_streams,
    streamed_control=probe_streamed_control,
    control_config=lambda model: find_causal_lm(model).config,
    identity=_hf_identity,
    sizes=_hf_sizes,
    # Model directories and Lightning / DCP checkpoints are the offline default (offline/sources.py,
    # offline/streaming.py read them directly), so this family needs no checkpoint entries.
)


def _olmo_whole(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    # Whole forwards of an unsharded model; a sharded one (DTensor) is probed one gathered block at a time inside.
    return _olmo_family.extract_features_olmo(model, spec, batch_size=batch_size, sample_range=sample_range)


def _olmo_control(model: nn.Module, seed: int, config: Any = None) -> nn.Module:
    lm = _olmo_family.find_olmo_transformer(model)
    source = config if config is not None else _olmo_family.registered_olmo_config(lm)
    return _olmo_family.build_olmo_control(source if source is not None else lm, seed, dtype=control_dtype(lm))


def _olmo_streams(model: nn.Module) -> bool:
    """OLMo-core's init streams block by block from the run's registered config, for a dense Transformer."""
    lm = _olmo_family.find_olmo_transformer(model)
    return lm is not None and _olmo_family.olmo_streams_controls(_olmo_family.registered_olmo_config(lm))


OLMO_CORE = ModelFamily(
    name="olmo-core",
    find=_olmo_family.find_olmo_transformer,
    resolve_spec=_olmo_family.resolve_olmo_spec,
    whole=_olmo_whole,
    forward_features=_olmo_family.olmo_forward_features,
    gathered=_olmo_whole,
    gathers=lambda model: holds_dtensors(_olmo_family.find_olmo_transformer(model)),
    build_control=_olmo_control,
    # Controls drawn block by block from the run's TransformerConfig (without one: whole fresh inits).
    streams_controls=_olmo_streams,
    streamed_control=_olmo_family.probe_olmo_streamed_control,
    control_config=lambda model: _olmo_family.registered_olmo_config(_olmo_family.find_olmo_transformer(model)),
    streamed_init_scheme=_olmo_family.INIT_OLMO,
    # As recorded before the registry: the class of the module the face was given, no config digest.
    identity=lambda module: {"model_class": type(module).__name__, "config_digest": None},
    sizes=lambda model: (int(_olmo_family.find_olmo_transformer(model).vocab_size),
                         int(_olmo_family.find_olmo_transformer(model).d_model)),
    checkpoint=CheckpointSide(
        is_checkpoint=_olmo_family.is_olmo_checkpoint,
        load_model=_olmo_family.load_olmo_model,
        open="seedprints_lightning.offline.olmo:open_olmo_checkpoint",
        read_state=_olmo_family.read_olmo_checkpoint,
        read_weights=_olmo_family.read_olmo_weights,
    ),
    dedicated_face="seedprints_lightning.faces.olmo.SeedPrintsOLMoCallback (OLMo-core's Trainer)",
)


def _litgpt_whole(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                  sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    return extract_features(model, spec, batch_size=batch_size, sample_range=sample_range,
                            forward_fn=lambda batch: _litgpt_family.litgpt_features(model, batch))


def _litgpt_layer_major(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                        sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    return _litgpt_family.extract_features_litgpt_layerwise(_litgpt_family.find_litgpt_model(model), spec,
                                                            batch_size=batch_size, sample_range=sample_range)


def _litgpt_gathered(model: nn.Module, spec: ProbeSpec, *, batch_size: int = 64,
                     sample_range: tuple[int, int] | None = None) -> torch.Tensor:
    return _litgpt_family.extract_features_litgpt_gathered(_litgpt_family.find_litgpt_model(model), spec,
                                                           batch_size=batch_size, sample_range=sample_range)


def _litgpt_streams(model: nn.Module) -> bool:
    """LitGPT's init streams block by block when the GPT's modules are exactly its draw order (no extra modules)."""
    try:
        _litgpt_family.LitGPTStreamedInit(_litgpt_family.find_litgpt_model(model), 0)
    except InputError:
        return False
    return True


def _litgpt_control(model: nn.Module, seed: int, config: Any = None) -> nn.Module:
    gpt = _litgpt_family.find_litgpt_model(model)
    device = next(iter(gpt.parameters())).device
    return _litgpt_family.build_litgpt_control(config if config is not None else gpt.config, seed,
                                               dtype=control_dtype(gpt), device=device)


def _litgpt_identity(module: nn.Module) -> dict[str, str | None]:
    gpt = _litgpt_family.find_litgpt_model(module)
    return {"model_class": type(gpt).__name__, "config_digest": _litgpt_family.litgpt_config_digest(gpt.config)}


LITGPT = ModelFamily(
    name="litgpt",
    find=_litgpt_family.find_litgpt_model,
    resolve_spec=_litgpt_family.resolve_litgpt_spec,
    whole=_litgpt_whole,
    forward_features=_litgpt_family.litgpt_features,
    layer_major=_litgpt_layer_major,
    gathered=_litgpt_gathered,
    gathers=lambda model: holds_dtensors(_litgpt_family.find_litgpt_model(model)),
    build_control=_litgpt_control,
    streams_controls=_litgpt_streams,
    streamed_control=_litgpt_family.probe_litgpt_streamed_control,
    control_config=lambda model: _litgpt_family.find_litgpt_model(model).config,
    streamed_init_scheme=_litgpt_family.INIT_LITGPT,
    identity=_litgpt_identity,
    sizes=lambda model: (int(_litgpt_family.find_litgpt_model(model).config.vocab_size),
                         int(_litgpt_family.find_litgpt_model(model).config.n_embd)),
    checkpoint=CheckpointSide(
        load_model="seedprints_lightning.offline.litgpt:load_litgpt_checkpoint",
        fingerprint="seedprints_lightning.offline.litgpt:fingerprint_litgpt_checkpoint",
    ),
    dedicated_face="seedprints_lightning.SeedPrintsLitGPTCallback (the same arguments; it probes the GPT's "
                   "transformer.ln_f with LitGPT's own init for the controls and binds fabric.save), or pass "
                   "feature_fn=seedprints_lightning.core.litgpt.litgpt_features with a control_factory",
)


def _without_reprs(value: Any) -> Any:
    """A config record without its ``repr`` entries (a closure's repr holds its address: not the same twice)."""
    if isinstance(value, dict):
        return {key: _without_reprs(item) for key, item in value.items() if key != "repr"}
    if isinstance(value, list):
        return [_without_reprs(item) for item in value]
    return value


def _titan_identity(module: nn.Module) -> dict[str, str | None]:
    decoder = _titan_family.find_titan_decoder(module)
    try:
        record = _without_reprs(_titan_family.titan_config_record(decoder.config))
    except InputError:  # a config a record cannot hold: no digest rather than one that is not the same twice
        return {"model_class": type(decoder).__name__, "config_digest": None}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return {"model_class": type(decoder).__name__, "config_digest": digest}


def _titan_load(path: Path, *, dtype: torch.dtype = torch.float32, trust_pickle: bool = False) -> nn.Module | None:
    load = _resolve_ref("seedprints_lightning.offline.titan:load_titan_model")
    return None if load is None else load(Path(path), dtype=dtype)


TORCHTITAN = ModelFamily(
    name="torchtitan",
    find=_titan_family.find_titan_decoder,
    resolve_spec=_titan_family.resolve_titan_spec,
    whole=_titan_family.extract_features_titan,
    forward_features=_titan_family.titan_feature_fn,
    layer_major=_titan_family.extract_features_titan_layerwise,
    gathered=_titan_family.extract_features_titan_gathered,
    gathers=_titan_family.titan_gathers,
    build_control=lambda model, seed, config=None: _titan_family.build_titan_control(
        config if config is not None else model, seed),
    identity=_titan_identity,
    sizes=lambda model: (int(_titan_family.find_titan_decoder(model).config.vocab_size),
                         int(_titan_family.find_titan_decoder(model).config.dim)),
    checkpoint=CheckpointSide(is_checkpoint="seedprints_lightning.offline.titan:is_titan_checkpoint",
                              load_model=_titan_load,
                              read_state="seedprints_lightning.offline.titan:read_titan_state",
                              read_weights="seedprints_lightning.offline.titan:read_titan_weights"),
)

#: The built-in families, in the order :func:`family_of` asks them (transformers first, as before the registry).
BUILT_IN: tuple[ModelFamily, ...] = (TRANSFORMERS, OLMO_CORE, LITGPT, TORCHTITAN)
_REGISTERED: list[ModelFamily] = []


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a user's family; asked before the built-in ones (latest first). Registering a name again replaces it.

    Returns ``family`` (usable as a decorator's result). Raises :class:`InputError` for anything but a
    :class:`ModelFamily`, or a name a built-in family has.
    """
    if not isinstance(family, ModelFamily):
        raise InputError(f"register_family takes a seedprints_lightning.core.families.ModelFamily, got "
                         f"{type(family).__name__}")
    if any(family.name == built_in.name for built_in in BUILT_IN):
        raise InputError(f"{family.name!r} is a built-in family's name: give yours another name")
    _REGISTERED[:] = [known for known in _REGISTERED if known.name != family.name] + [family]
    return family


def unregister_family(name: str) -> None:
    """Remove a user's family by name (a no-op when none has it)."""
    _REGISTERED[:] = [known for known in _REGISTERED if known.name != name]


def families() -> tuple[ModelFamily, ...]:
    """Every family, in the order they are asked: the user's (latest first), then the built-in ones."""
    return (*reversed(_REGISTERED), *BUILT_IN)


def family_named(name: str) -> ModelFamily:
    """The family called ``name``; :class:`InputError` naming the known ones otherwise."""
    found = next((family for family in families() if family.name == name), None)
    if found is None:
        raise InputError(f"no model family {name!r}; the known ones: {', '.join(f.name for f in families())}")
    return found


def family_of(module: Any) -> ModelFamily | None:
    """The first family whose ``find`` finds a model in ``module``, or ``None``."""
    if not isinstance(module, nn.Module):
        return None
    return next((family for family in families() if family.find(module) is not None), None)


def family_of_checkpoint(path: str | Path) -> ModelFamily | None:
    """The family whose :attr:`CheckpointSide.is_checkpoint` recognises ``path``, or ``None`` (the default readers')."""
    for family in families():
        is_checkpoint = family.checkpoint.get("is_checkpoint")
        if is_checkpoint is not None and is_checkpoint(Path(path)):
            return family
    return None


# --------------------------------------------------------------------------------------
# The measurement plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasurementPlan:
    """How a model's features are taken, by which family, why, and where its controls come from.

    Args:
        how: one of :data:`HOWS`: ``"whole"`` forwards, ``"layer-major"`` (every sample through a block
            before the next), ``"gathered-blocks"`` (sharded weights, one block gathered at a time),
            ``"strategy-wrapper"`` (whole forwards run inside a sharding strategy's root wrapper) or
            ``"feature_fn"`` (the user's function).
        family: the family's name (``"custom"`` for a ``feature_fn`` model no family knows).
        reason: one sentence saying why, for the run's log and the CLI.
        controls: one of :data:`CONTROL_SOURCES`.
    """

    how: Literal["whole", "layer-major", "gathered-blocks", "strategy-wrapper", "feature_fn"]
    family: str
    reason: str
    controls: str
    model_family: ModelFamily | None = field(default=None, repr=False, compare=False)
    feature_fn: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None = field(default=None, repr=False,
                                                                                compare=False)

    def features(self, module: nn.Module, spec: ProbeSpec, batch_size: int = 64,
                 sample_range: tuple[int, int] | None = None) -> torch.Tensor:
        """``module``'s ``[n, D]`` float32 CPU features (or the ``sample_range`` slice), as this plan says."""
        if self.how == "feature_fn":
            feature_fn = self.feature_fn
            return extract_features(module, spec, batch_size=batch_size, sample_range=sample_range,
                                    forward_fn=lambda batch: feature_fn(module, batch))
        family = self.model_family
        probe = {"gathered-blocks": family.gathered, "layer-major": family.layer_major}.get(self.how) or family.whole
        return probe(module, spec, batch_size=batch_size, sample_range=sample_range)

    def line(self) -> str:
        """``measuring: <how> (<family>): <reason>``: what a run logs once and the CLI prints."""
        return f"measuring: {self.how} ({self.family}): {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"how": self.how, "family": self.family, "reason": self.reason, "controls": self.controls}


def _controls_of(family: ModelFamily | None, model: nn.Module | None, *, num_controls: int, controls_file: bool,
                 control_factory: bool) -> str:
    if controls_file:
        return "file"
    if num_controls == 0:
        return "none"
    if control_factory:
        return "control_factory"
    if (family is not None and model is not None and family.streamed_control is not None
            and family.streams_controls(model)):
        return "streamed block by block"
    return "whole fresh init"


def _controls_words(controls: str) -> str:
    return {"file": "controls from the controls= file", "none": "no controls",
            "control_factory": "controls from control_factory(seed)",
            "streamed block by block": "controls drawn and probed block by block",
            "whole fresh init": "controls are whole fresh inits"}[controls]


def plan_measurement(
    module: nn.Module,
    *,
    feature_fn: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None = None,
    control_factory: Callable[[int], nn.Module] | None = None,
    family: ModelFamily | None = None,
    num_controls: int = 4,
    controls_file: bool = False,
    strategy_wrapper: bool = False,
    layer_major: bool = False,
) -> MeasurementPlan:
    """How ``module`` is measured: the one decision every face, the controls, streaming and the audit ask.

    Args:
        module: the model, or a module holding it.
        feature_fn: the user's ``feature_fn(module, batch)``; it wins over any family.
        control_factory: the user's ``control_factory(seed)``; it wins over the family's controls.
        family: the family a face adopted (default: :func:`family_of`).
        num_controls: how many controls the run draws (0: none).
        controls_file: the run's controls come from a ``controls=`` file.
        strategy_wrapper: the face runs the forwards inside a sharding strategy's root wrapper.
        layer_major: probe one block at a time where the family offers it (the offline streaming path).

    Raises:
        ModelNotFoundError: no ``feature_fn`` and no family finds a model in ``module``.
    """
    controls_of = dict(num_controls=num_controls, controls_file=controls_file,
                       control_factory=control_factory is not None)
    if feature_fn is not None:
        found = family if family is not None else family_of(module)
        controls = _controls_of(None, None, **controls_of)
        return MeasurementPlan("feature_fn", found.name if found is not None else "custom",
                               f"feature_fn was given: it is called on each probe batch; {_controls_words(controls)}",
                               controls, model_family=found, feature_fn=feature_fn)
    if family is None:
        family = family_of(module)
    if family is None:
        find_causal_lm(module)  # raises ModelNotFoundError, naming feature_fn for other model types
        raise AssertionError("unreachable: find_causal_lm found a model no family found")  # pragma: no cover
    model = family.find(module)
    controls = _controls_of(family, model, **controls_of)
    name = type(model).__name__
    if family.gathered is not None and family.gathers(model):
        how, why = "gathered-blocks", (f"the {name}'s weights are sharded, so each block is gathered and probed in "
                                       "turn (never the whole model on one rank)")
    elif strategy_wrapper:
        how, why = "strategy-wrapper", (f"the strategy shards the {name}'s parameters inside its root wrapper, so "
                                        "the whole forwards run inside that wrapper's forward")
    elif layer_major and family.layer_major is not None:
        how, why = "layer-major", f"the {name} is read one block at a time: every probe sample through a block first"
    else:
        how, why = "whole", f"an unsharded {name}: one whole forward per probe batch"
    return MeasurementPlan(how, family.name, f"{why}; {_controls_words(controls)}", controls, model_family=family)


def refuse_dedicated(family: ModelFamily | None, face: str) -> None:
    """Raise when ``face`` (a generic face) is given a model of a family that only its own face probes."""
    if family is not None and family.dedicated_face is not None:
        raise InputError(f"{face} was set up with a {family.name} model, which it cannot probe by itself: use "
                         f"{family.dedicated_face}")

