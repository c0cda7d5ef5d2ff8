"""Negative controls: fresh inits of the run's config, built, probed, stored and checked. No Lightning.

Why controls exist
------------------
The lineage test's analytic null (``z ~ N(0, 1)`` for unrelated models) is not always
calibrated. ``docs/method.md`` records unrelated pairs at z = 4 to 9.5 (token probes with few
identity dimensions on a 160M LLaMA; embedding probes on a narrow 256-wide model), and
permuting the samples did not remove it: it is a real response shared by every model of the
architecture, not a variance error. A bare ``z > z_threshold(alpha)`` would then call an
unrelated model "related".

The cheapest empirical null inside a training run is a handful of fresh inits of the SAME
config with other seeds ("controls"), probed once. Testing the live model against each of
them (each control as the base, the live model as the target: the "cross" relation)
measures, in real time, the z an unrelated model of this architecture gets. On the narrow
model at step 400 six fresh inits gave z = 1.7, 3.1, 2.3, 2.9, 4.9, 2.4 against the live
model, whose own z was 17.7; against a swapped-in unrelated model (z = 4.1) the controls gave
2.3 to 6.2. So the verdict asks the run to stand clear of its controls, not just to pass the
analytic threshold; how far is :mod:`.verdict`'s rule.

:class:`ControlSet` is the one value for a set of controls wherever it comes from: built in a
run (:meth:`ControlSet.build`), a ``seedprints controls`` file (:meth:`ControlSet.load`), a
checkpoint's callback state, or the offline audit's evidence.

Everything here is deterministic and leaves every global RNG (Python, NumPy, torch CPU and
CUDA) exactly as it found it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from .checks import check_int
from .errors import FingerprintFileError, InputError
from .files import read_safetensors, save_safetensors
from .layerwise import SUPPORTED_MODEL_TYPES, build_streamed_control_model, probe_streamed_control
from .probes import ProbeSpec, extract_features, find_causal_lm
from .rng import preserve_rng_state
from .sharded import unsharded_class

__all__ = [
    "CONTROL_SEED_BASE",
    "DEFAULT_NUM_CONTROLS",
    "INIT_CUSTOM",
    "INIT_STREAMED",
    "INIT_WHOLE",
    "streams_controls",
    "build_control_model",
    "control_dtype",
    "control_seeds",
    "ControlSet",
    "preserve_rng_state",
    "controls_from_config",
    "load_config",
    "probe_control_models",
    "probe_controls",
    "probe_streamed_controls",
    "built_init_scheme",
    "init_scheme_of",
    "save_controls",
]

#: Negative controls per run. 2 controls let larger unrelated excursions through than 4;
#: 6 gained nothing over 4 (docs/benchmarks.md).
DEFAULT_NUM_CONTROLS = 4

#: Control seeds are ``CONTROL_SEED_BASE + i``: a fixed prime far from the seeds people
#: type (0, 1, 42, 123, 1234, 2024, ...), so a control is never the run's own init.
CONTROL_SEED_BASE = 1_000_003

_CONTROLS_FORMAT = "seedprints-controls"
#: 2 records the init scheme of the controls (``init_scheme``); version 1 files predate streamed
#: controls, so their controls are whole-model inits (:data:`INIT_WHOLE`).
_CONTROLS_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_META_KEY = "seedprints"

#: How a control's weights were drawn. ``"streamed-v1"``: every block under its own seed
#: (:func:`~seedprints_lightning.core.layerwise.streamed_block_seed`), so the control can be built
#: whole (:func:`~seedprints_lightning.core.layerwise.build_streamed_control_model`) or one block at
#: a time (:func:`~seedprints_lightning.core.layerwise.probe_streamed_control`) with the same weights.
#: ``"whole"``: ``type(lm)(config)`` under ``torch.manual_seed(seed)``, one RNG stream over the whole
#: model (architectures the layer-major probe cannot split, and every file before version 2).
#: ``"custom"``: a user's ``control_factory``. Both built-in schemes are draws of one init
#: distribution (tests/test_layerwise.py, benchmarks/streamed_controls.py): files of either scheme
#: are valid nulls for any run of the config.
INIT_STREAMED = "streamed-v1"
INIT_WHOLE = "whole"
INIT_CUSTOM = "custom"
#: The attribute :func:`build_control_model` sets on a control model to say how it was drawn.
INIT_SCHEME_ATTR = "seedprints_init_scheme"


# --------------------------------------------------------------------------------------
# Control models
# --------------------------------------------------------------------------------------


def control_seeds(num_controls: int, base: int = CONTROL_SEED_BASE) -> tuple[int, ...]:
    """The init seeds of the negative controls: ``base, base + 1, ..., base + num_controls - 1``.

    Fixed and documented, so every run (and every rank) builds the same controls, and
    distinct from typical user seeds (see :data:`CONTROL_SEED_BASE`).
    """
    num = check_int("num_controls", num_controls, low=0)
    start = check_int("base", base, low=0)
    return tuple(start + i for i in range(num))


def streams_controls(model_or_config: Any) -> bool:
    """Whether controls of this causal LM (or config) are drawn block by block (:data:`INIT_STREAMED`).

    True for the architectures :mod:`.layerwise` can split (``config.model_type`` in its
    ``SUPPORTED_MODEL_TYPES``) when the model is the class ``AutoModelForCausalLM`` builds for the
    config: the streamed control is that class. Anything else gets the whole-model recipe.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if isinstance(model_or_config, nn.Module):
        try:
            from transformers import AutoModelForCausalLM

            expected = AutoModelForCausalLM._model_mapping[type(config)]
        except (KeyError, ImportError, AttributeError):
            return False
        return unsharded_class(model_or_config) is expected  # FSDP2 swaps in an FSDP<Class> subclass
    return True


def control_dtype(lm: nn.Module) -> torch.dtype:
    """The dtype a control of the live causal LM ``lm`` runs in: its parameters' (float32 when not floating)."""
    param = next(iter(lm.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    return dtype if dtype.is_floating_point else torch.float32


def build_control_model(model: nn.Module, seed: int) -> nn.Module:
    """A fresh init of ``model``'s causal LM: same class and config, init seed ``seed``.

    For the architectures the layer-major probe splits (:func:`streams_controls`: LLaMA, Qwen2,
    Mistral, GPT-2) this is :func:`~seedprints_lightning.core.layerwise.build_streamed_control_model`
    ``(config, seed)``: every block drawn under its own seed on the CPU, in the dtype
    ``from_config`` builds, then cast to the live model's parameter dtype, so an in-run control
    is, bit for bit, the model a precomputed ``seedprints controls`` file probed for that seed.
    Other classes get ``type(lm)(lm.config)`` under ``torch.manual_seed(seed)`` on the CPU, cast
    to the live dtype. Either way the control is moved to the live model's device, in eval mode,
    and carries its scheme in the attribute :data:`INIT_SCHEME_ATTR`. Every global RNG is
    restored after: building a control never changes the data order or dropout of the run.

    ``model`` is a ``transformers.PreTrainedModel`` or a module containing one. The control
    holds a full copy of the model's parameters: for very large models that is the cost of a
    control (built one at a time by :func:`probe_controls`, and only when the reference is
    taken; ``seedprints controls`` precomputes them without ever holding one whole).
    """
    seed = check_int("seed", seed, low=0)
    lm = find_causal_lm(model)
    reference_param = next(iter(lm.parameters()), None)
    device = reference_param.device if reference_param is not None else torch.device("cpu")
    if device.type == "meta":
        raise InputError("the live model is on the meta device; controls need materialised weights")
    dtype = control_dtype(lm)
    if streams_controls(lm):
        control = build_streamed_control_model(lm.config, seed, device="cpu", dtype=dtype)
        scheme = INIT_STREAMED
    else:
        with preserve_rng_state():
            torch.manual_seed(seed)
            with torch.device("cpu"):
                control = type(lm)(lm.config)
        control = control.to(dtype=dtype)
        scheme = INIT_WHOLE
    control = control.to(device=device)
    control.eval()
    control.requires_grad_(False)
    setattr(control, INIT_SCHEME_ATTR, scheme)
    return control


def probe_controls(
    model: nn.Module,
    spec: ProbeSpec,
    seeds: Sequence[int],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Features ``[c, n, D]`` (CPU float32) of a fresh init per seed on ``spec``'s probes.

    Controls are built one at a time (:func:`build_control_model`), probed with
    :func:`~seedprints_lightning.core.probes.extract_features` and freed before the next, so at
    most one extra model lives at a time. ``context`` (e.g. a Lightning precision plugin's
    ``forward_context``) wraps each probe. ``spec`` must be resolved (the run's reference
    spec: controls see exactly the reference's inputs). Global RNGs are left untouched.
    """
    if not isinstance(spec, ProbeSpec):
        raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
    if not spec.is_resolved:
        raise InputError("probe_controls needs a resolved ProbeSpec (the reference's spec); call spec.resolve(model)")
    seeds = [check_int("seed", s, low=0) for s in seeds]
    if not seeds:
        return torch.empty(0, spec.num_samples, 0)
    out = []
    with preserve_rng_state():
        for seed in seeds:
            control = build_control_model(model, seed)
            try:
                with (context() if context is not None else contextlib.nullcontext()):
                    out.append(extract_features(control, spec, batch_size=batch_size, device=device))
            finally:
                del control
    return torch.stack(out)


def probe_control_models(
    factory: Callable[[int], nn.Module],
    seeds: Sequence[int],
    features_of: Callable[[nn.Module], torch.Tensor],
    *,
    device: torch.device | str | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
    log: Callable[[str], None] | None = None,
    schemes: list[str] | None = None,
) -> torch.Tensor:
    """Features ``[c, n, D]`` of ``factory(seed)`` for each seed, one control alive at a time.

    ``factory(seed)`` returns a fresh init of the model (it runs under ``torch.manual_seed(seed)``
    with every global RNG restored after, so a factory that just constructs the model is seeded
    too); the control is moved to ``device``, put in eval mode, probed by ``features_of`` and
    freed before the next is built. ``log`` gets one progress line per control: for a large
    model the step-0 work takes minutes. ``schemes``, if given, gets each control's init scheme
    (the :data:`INIT_SCHEME_ATTR` :func:`build_control_model` sets; :data:`INIT_CUSTOM` without it).
    """
    seeds = [check_int("seed", s, low=0) for s in seeds]
    out = []
    with preserve_rng_state():
        for i, seed in enumerate(seeds):
            start = time.perf_counter()
            torch.manual_seed(seed)
            control = factory(seed)
            if not isinstance(control, nn.Module):
                raise InputError(f"control_factory({seed}) returned {type(control).__name__}, not a torch.nn.Module")
            if schemes is not None:
                schemes.append(getattr(control, INIT_SCHEME_ATTR, INIT_CUSTOM))
            if device is not None:
                control = control.to(device)
            control.eval()
            control.requires_grad_(False)
            try:
                with (context() if context is not None else contextlib.nullcontext()):
                    out.append(features_of(control).to(device="cpu", dtype=torch.float32))
            finally:
                del control
            if log is not None:
                log(f"control {i + 1}/{len(seeds)} (init seed {seed}) probed in {time.perf_counter() - start:.1f} s")
    return torch.stack(out)


def built_init_scheme(model_or_config: Any) -> str:
    """The scheme :func:`build_control_model` (and so :func:`probe_controls`) draws this model's controls with."""
    return INIT_STREAMED if streams_controls(model_or_config) else INIT_WHOLE


def probe_streamed_controls(
    config: Any,
    seeds: Sequence[int],
    spec: ProbeSpec,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
    log: Callable[[str], None] | None = None,
    probe_one: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Features ``[c, n, D]`` (CPU float32) of the streamed control of each seed, drawn and probed block by block.

    Each is ``probe_one(config, seed, spec, batch_size=, device=, dtype=)``: by default
    :func:`~seedprints_lightning.core.layerwise.probe_streamed_control` (a transformers config; the
    same weights as :func:`build_control_model`'s control of the seed), or a model family's own
    (:attr:`~seedprints_lightning.core.families.ModelFamily.streamed_control`). Peak memory: one
    block plus the probe activations, on ``device`` in ``dtype``; ``context`` (a precision plugin's
    ``forward_context``) wraps each. Global RNGs are left untouched.
    """
    probe_one = probe_streamed_control if probe_one is None else probe_one
    out = []
    with preserve_rng_state():
        for i, seed in enumerate(seeds):
            start = time.perf_counter()
            with (context() if context is not None else contextlib.nullcontext()):
                features = probe_one(config, seed, spec, batch_size=batch_size, device=device, dtype=dtype)
            out.append(features.to(device="cpu", dtype=torch.float32))
            if log is not None:
                log(f"control {i + 1}/{len(seeds)} (init seed {seed}, streamed block by block) probed in "
                    f"{time.perf_counter() - start:.1f} s")
    return torch.stack(out)


def init_scheme_of(schemes: Sequence[str]) -> str | None:
    """One scheme for a set of controls: the common one, ``"mixed"`` when they differ, ``None`` for none."""
    distinct = sorted(set(schemes))
    return None if not distinct else distinct[0] if len(distinct) == 1 else "mixed"


def save_controls(path: str | os.PathLike, features: torch.Tensor, seeds: Sequence[int], spec: ProbeSpec,
                  extra: dict[str, Any] | None = None, *, init_scheme: str | None = INIT_STREAMED) -> Path:
    """Write control features ``[c, n, D]`` with their seeds, spec and init scheme (safetensors, atomic).

    Format version :data:`_CONTROLS_FORMAT_VERSION` (2): the metadata records ``init_scheme``
    (:data:`INIT_STREAMED`, :data:`INIT_WHOLE`, :data:`INIT_CUSTOM`, ``"mixed"``, or ``None``: unknown).
    """
    features = features.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if features.dim() != 3 or features.shape[0] != len(seeds):
        raise InputError(f"control features must be [len(seeds)={len(seeds)}, n, D], got {tuple(features.shape)}")
    meta = {"format": _CONTROLS_FORMAT, "format_version": _CONTROLS_FORMAT_VERSION, "seeds": [int(s) for s in seeds],
            "spec": spec.to_dict(), "init_scheme": init_scheme, "extra": dict(extra or {})}
    return save_safetensors(path, {"features": features}, {_META_KEY: json.dumps(meta)})


@dataclass(frozen=True)
class ControlSet:
    """The negative controls a verdict is judged against, and where they came from.

    ``features`` is ``[c, n, D]`` (CPU float32) of ``c`` fresh inits (``seeds``) probed on
    ``spec``, or ``None`` when there are none: the verdict then rests on the analytic threshold
    and the effect-size margin alone. ``config_digest`` and ``model_class`` name the config the
    inits were made from (``None`` when unknown); ``description`` says, for reports, where they
    came from. ``init_scheme`` says how the inits were drawn (:data:`INIT_STREAMED`,
    :data:`INIT_WHOLE`, ...; ``None``: unknown). One value for the callback's controls, a
    ``seedprints controls`` file and the offline audit's evidence.
    """

    features: torch.Tensor | None = None
    seeds: tuple[int, ...] = ()
    spec: ProbeSpec | None = None
    config_digest: str | None = None
    model_class: str | None = None
    description: str = "no controls: analytic threshold and effect-size margin only"
    init_scheme: str | None = None

    def __post_init__(self) -> None:
        if self.features is None:
            return
        if not isinstance(self.features, torch.Tensor) or self.features.dim() != 3:
            shape = getattr(self.features, "shape", None)
            raise InputError(f"control features must be a [c, n, D] tensor, got {shape}")
        if self.seeds and len(self.seeds) != self.features.shape[0]:
            raise InputError(f"{self.features.shape[0]} control feature matrices but {len(self.seeds)} seeds")
        object.__setattr__(self, "features", self.features.detach().to(device="cpu", dtype=torch.float32))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

    @classmethod
    def none(cls, description: str = "no controls: analytic threshold and effect-size margin only") -> ControlSet:
        return cls(description=description)

    def __len__(self) -> int:
        return 0 if self.features is None else int(self.features.shape[0])

    def as_list(self) -> list[torch.Tensor]:
        """One ``[n, D]`` matrix per control (empty without controls)."""
        return [] if self.features is None else list(self.features)

    def head(self, count: int, description: str | None = None) -> ControlSet:
        """The first ``count`` controls (all of them when there are fewer)."""
        if self.features is None:
            return self
        count = min(int(count), len(self))
        return dataclasses.replace(self, features=self.features[:count], seeds=self.seeds[:count],
                                   description=self.description if description is None else description)

    def matches(self, spec: ProbeSpec, shape: Sequence[int]) -> bool:
        """Whether these controls were probed on ``spec`` with ``[n, D]`` = ``shape`` features."""
        return (self.features is not None and self.spec == spec
                and tuple(self.features.shape[1:]) == tuple(shape))

    def check_fits(self, spec: ProbeSpec, config_digest: str | None, where: str) -> None:
        """Refuse controls made on another probe, or from another model config, than the run's."""
        if self.spec != spec:
            raise InputError(
                f"the controls file {where} was made on another probe "
                f"({self.spec.describe() if self.spec else 'none'}) than this run's reference ({spec.describe()}); "
                "re-create it with `seedprints controls ... --spec-from <reference.safetensors>`"
            )
        if config_digest is not None and self.config_digest is not None and self.config_digest != config_digest:
            raise InputError(
                f"the controls file {where} was made from another model config (digest {self.config_digest[:12]}...) "
                f"than this run's model ({config_digest[:12]}...): controls must be fresh inits of the SAME config"
            )

    def save(self, path: str | os.PathLike, **extra: Any) -> Path:
        if self.features is None or self.spec is None:
            raise InputError("an empty ControlSet has nothing to save")
        meta = {"model_class": self.model_class, "config_digest": self.config_digest, **extra}
        return save_controls(path, self.features, self.seeds, self.spec, extra=meta, init_scheme=self.init_scheme)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ControlSet:
        """Read a file written by :func:`save_controls` (or :meth:`save`).

        Version 1 files (before the init scheme was recorded) load as :data:`INIT_WHOLE`; a version
        this package does not know is refused, naming it and the versions it reads.
        """
        path = Path(path)
        tensors, file_meta = read_safetensors(path, "seedprints controls file")
        try:
            meta, features = json.loads(file_meta[_META_KEY]), tensors["features"]
        except (KeyError, ValueError) as exc:
            raise FingerprintFileError(f"{path} is not a readable seedprints controls file ({exc!r})") from exc
        if not isinstance(meta, dict) or meta.get("format") != _CONTROLS_FORMAT:
            raise FingerprintFileError(f"{path}: not a seedprints controls file (metadata format "
                                       f"{meta.get('format') if isinstance(meta, dict) else None!r})")
        version = meta.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise FingerprintFileError(
                f"{path}: seedprints controls file format version {version!r} is not supported by seedprints-lightning "
                f"{__version__} (it reads versions {', '.join(map(str, _READABLE_VERSIONS))}); upgrade the package or "
                "re-create the file with `seedprints controls`")
        init_scheme = INIT_WHOLE if version == 1 else meta.get("init_scheme")
        if features.dim() != 3 or features.shape[0] != len(meta["seeds"]):
            raise FingerprintFileError(f"{path}: the features tensor {tuple(features.shape)} does not match its "
                                       f"{len(meta['seeds'])} seeds; re-create the file")
        extra = dict(meta.get("extra") or {})
        seeds = tuple(int(s) for s in meta["seeds"])
        return cls(features=features, seeds=seeds, spec=ProbeSpec.from_dict(meta["spec"]),
                   config_digest=extra.get("config_digest"), model_class=extra.get("model_class"),
                   description=f"{len(seeds)} fresh-init controls from {path}", init_scheme=init_scheme)

    @classmethod
    def build(cls, factory: Callable[[int], nn.Module], seeds: Sequence[int], spec: ProbeSpec,
              features_of: Callable[[nn.Module], torch.Tensor], *, config_digest: str | None = None,
              model_class: str | None = None, **probe_kwargs: Any) -> ControlSet:
        """Probe ``factory(seed)`` for each seed (:func:`probe_control_models`, one alive at a time)."""
        seeds = tuple(seeds)
        if not seeds:
            return cls.none("no controls (num_controls=0): analytic threshold and effect-size margin only")
        schemes: list[str] = []
        features = probe_control_models(factory, seeds, features_of, schemes=schemes, **probe_kwargs)
        return cls(features=features, seeds=seeds, spec=spec, config_digest=config_digest, model_class=model_class,
                   description=f"{len(seeds)} fresh inits (seeds {seeds[0]}..{seeds[-1]})",
                   init_scheme=init_scheme_of(schemes))

    @classmethod
    def build_streamed(cls, config: Any, seeds: Sequence[int], spec: ProbeSpec, *, config_digest: str | None = None,
                       model_class: str | None = None, init_scheme: str = INIT_STREAMED,
                       **probe_kwargs: Any) -> ControlSet:
        """The streamed control of each seed, block by block (:func:`probe_streamed_controls`), never whole.

        ``init_scheme`` is what the controls file records: :data:`INIT_STREAMED` for the transformers
        draw, or a family's own scheme where its streamed draw equals its whole one (LitGPT).
        """
        seeds = tuple(seeds)
        if not seeds:
            return cls.none("no controls (num_controls=0): analytic threshold and effect-size margin only")
        features = probe_streamed_controls(config, seeds, spec, **probe_kwargs)
        return cls(features=features, seeds=seeds, spec=spec, config_digest=config_digest, model_class=model_class,
                   description=f"{len(seeds)} fresh inits (seeds {seeds[0]}..{seeds[-1]}, drawn block by block)",
                   init_scheme=init_scheme)


# --------------------------------------------------------------------------------------
# Precomputed controls: once per (config, probe spec, seeds), outside the training run
# --------------------------------------------------------------------------------------


def load_config(source: str | os.PathLike) -> Any:
    """A transformers config from a model directory (its ``config.json``) or a ``config.json`` file.

    Only the config is read: controls are fresh inits, so no weights are needed (nothing is
    downloaded: ``local_files_only``).
    """
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FingerprintFileError(f"{path} does not exist: give a model directory or its config.json")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for a bad config
        raise FingerprintFileError(
            f"{path} is not a readable transformers config ({type(exc).__name__}: {exc})"
        ) from exc


def controls_from_config(
    config: Any,
    spec: ProbeSpec,
    num_controls: int,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] | None = None,
    whole: bool = False,
    info: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(features [c, n, D], seeds)`` of ``num_controls`` fresh inits of ``config`` (the callback's seeds).

    What ``SeedPrintsCallback(controls=FILE)`` loads instead of building the controls inside the
    run, so the training ranks never hold an unsharded copy. ``spec`` must be the run's reference
    spec (token probes resolve from the config alone; embedding probes need the run's init
    statistics).

    For the architectures :func:`streams_controls` accepts, each control is
    :func:`~seedprints_lightning.core.layerwise.probe_streamed_control`: drawn and probed one block
    at a time (peak memory one block plus the probe activations), the same weights the run's
    in-run control of that seed has (:func:`build_control_model`). ``whole=True``, or any other
    architecture (``log`` says so), probes ``AutoModelForCausalLM.from_config(config)`` whole under
    the seed (:data:`INIT_WHOLE`: one copy of the model in memory). ``info``, if given, gets
    ``init_scheme`` and, on a fallback, ``note``.
    """
    from transformers import AutoModelForCausalLM

    if not spec.is_resolved:
        if spec.kind != "token":
            raise InputError("embedding probes take mean/std from the run's INIT embedding: pass the run's "
                             "resolved spec (seedprints controls --spec-from <reference.safetensors>)")
        spec = dataclasses.replace(spec, vocab_size=int(config.vocab_size))
    seeds = control_seeds(num_controls)
    info = info if info is not None else {}
    if not whole and streams_controls(config):
        info["init_scheme"] = INIT_STREAMED
        return probe_streamed_controls(config, seeds, spec, batch_size=batch_size, device=device, dtype=dtype,
                                       log=log), seeds
    if not whole:
        note = (f"model_type {getattr(config, 'model_type', None)!r} cannot be drawn block by block (streamed "
                f"controls support {', '.join(SUPPORTED_MODEL_TYPES)}): each control is built whole")
        info["note"] = note
        if log is not None:
            log(note)
    info["init_scheme"] = INIT_WHOLE

    def factory(seed: int) -> nn.Module:
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(config)
        return model.to(dtype=dtype)

    features = probe_control_models(factory, seeds, lambda model: extract_features(model, spec, batch_size=batch_size),
                                    device=device, log=log)
    return features, seeds
