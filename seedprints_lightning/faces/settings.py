"""The arguments every face takes, declared and checked once, and what the faces share about the probed model.

:class:`FaceArguments` declares them (name, type, default) and checks them in ``__post_init__``:
every bad value raises :class:`~seedprints_lightning.InputError` naming the argument and the fix,
when the face is constructed, before any training step.
:class:`~seedprints_lightning.faces.base.SeedPrintsFace` keeps an explicit signature of the same
arguments (for LightningCLI and IDEs) and builds a :class:`FaceArguments` from it;
``tests/test_face_arguments.py`` holds the signature, the docstring's ``Args:``, this dataclass
and docs/configuration.md's table to one another. :class:`FaceSettings` is the arguments resolved
(files loaded, paths as :class:`~pathlib.Path`, margins as :class:`~seedprints_lightning.core.chain.ChainRules`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core.chain import Anchor, ChainRules, CustodyChain
from ..core.checks import check_bool, check_choice, check_int, check_number
from ..core.controls import DEFAULT_NUM_CONTROLS, ControlSet, control_dtype
from ..core.errors import InputError
from ..core.families import TRANSFORMERS, MeasurementPlan, ModelFamily, family_of, plan_measurement, refuse_dedicated
from ..core.fingerprint import Fingerprint, config_digest
from ..core.ledger import check_save_dir
from ..core.opening import ControlsSource
from ..core.probes import ProbeBatch, ProbeSpec, find_causal_lm, find_causal_lm_or_none
from ..core.reference import resolve_reference
from ..core.schedule import DEFAULT_ADAPT_HEADROOM, ProbeSchedule
from ..core.signing import ENV_SIGNING_KEY, load_signing_key
from ..core.verdict import DEFAULT_BIRTH_Z_MARGIN, DEFAULT_LINK_TAU_MARGIN, DEFAULT_LINK_Z_MARGIN, FAIL_ON

__all__ = ["ACTIONS", "FaceArguments", "FaceSettings"]

ACTIONS = ("warn", "stop", "raise")


def _signing_key_path(signing_key: str | os.PathLike | None) -> Path | None:
    """The key file (``signing_key=`` or ``$SEEDPRINTS_SIGNING_KEY``), checked now: a bad key fails before step 0."""
    from_env = signing_key is None
    if signing_key is None:
        signing_key = os.environ.get(ENV_SIGNING_KEY) or None
    if signing_key is None:
        return None
    # Raises InputError naming the file (missing, not PEM, not Ed25519), and the variable when it came from one.
    load_signing_key(None if from_env else signing_key)
    return Path(signing_key)


@dataclass(frozen=True)
class FaceArguments:
    """The arguments every face takes, as given, checked in ``__post_init__``: the one declaration of each.

    What each means is in :class:`~seedprints_lightning.faces.base.SeedPrintsFace`'s ``Args:``
    (its signature repeats these fields, names, order and defaults, so that LightningCLI and IDEs
    read them; ``tests/test_face_arguments.py`` fails when the two differ). Build one from a call
    with :meth:`from_call`. Files are not read here: :meth:`FaceSettings.from_arguments` loads the
    controls file, the signing key and the reference.

    Raises:
        InputError: naming the first bad argument and what it must be.
    """

    every_n_steps: int = 1000
    probe: ProbeSpec | None = None
    alpha: float = 0.01
    patience: int = 2
    on_identity_lost: Literal["warn", "stop", "raise"] = "warn"
    fail_on: Literal["custody", "birth", "either"] = "custody"
    num_controls: int = DEFAULT_NUM_CONTROLS
    birth_z_margin: float = DEFAULT_BIRTH_Z_MARGIN
    link_z_margin: float = DEFAULT_LINK_Z_MARGIN
    link_tau_margin: float = DEFAULT_LINK_TAU_MARGIN
    adaptive_schedule: bool = True
    reference: Fingerprint | str | os.PathLike | None = None
    feature_fn: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None = None
    control_factory: Callable[[int], nn.Module] | None = None
    controls: str | os.PathLike | None = None
    save_dir: str | os.PathLike | None = None
    probe_batch_size: int = 64
    identity_ratio: float | None = None
    identity_mode: Literal["coset", "base"] = "coset"
    count_undetermined: bool = True
    signing_key: str | os.PathLike | None = None
    log_dir: str | os.PathLike | None = None
    bind_saves: bool = True

    def __post_init__(self) -> None:
        # Numbers are kept as Python ints (a numpy integer is accepted, and stored as an int).
        self._set("every_n_steps", check_int("every_n_steps", self.every_n_steps, low=1,
                                             hint="optimizer steps between probes"))
        check_bool("count_undetermined", self.count_undetermined,
                   hint="True counts a probe whose lineage cannot be measured towards patience")
        if self.probe is not None and not isinstance(self.probe, ProbeSpec):
            raise InputError(f"probe must be a seedprints_lightning.ProbeSpec or None, got {type(self.probe).__name__}")
        check_number("alpha", self.alpha, low=0.0, high=1.0, low_open=True, high_open=True, hint="e.g. 0.01")
        self._set("patience", check_int("patience", self.patience, low=1,
                                        hint="consecutive failed probes before acting"))
        check_choice("on_identity_lost", self.on_identity_lost, ACTIONS)
        check_choice("fail_on", self.fail_on, FAIL_ON)
        self._set("num_controls", check_int("num_controls", self.num_controls, low=0, high=64,
                                            hint="0 turns controls off"))
        check_bool("adaptive_schedule", self.adaptive_schedule)
        check_bool("bind_saves", self.bind_saves, hint="False records no digest of the weights at each checkpoint save")
        self._check_callables_and_controls()
        if self.save_dir is not None and not isinstance(self.save_dir, (str, os.PathLike)):
            raise InputError(f"save_dir must be a path (str or os.PathLike) or None, got "
                             f"{type(self.save_dir).__name__}")
        if self.save_dir is not None:  # not a regular file, and it (or its nearest existing parent) writable
            check_save_dir(self.save_dir)
        self._set("probe_batch_size", check_int("probe_batch_size", self.probe_batch_size, low=1))
        if self.identity_ratio is not None:
            check_number("identity_ratio", self.identity_ratio, low=0.0, high=1.0, low_open=True,
                         hint="a fraction; None, the default, is all dimensions")
        check_choice("identity_mode", self.identity_mode, ("coset", "base"))
        self.chain_rules()  # the margins are checked by the rules they make (VerdictRule), named as typed here
        for name in ("signing_key", "log_dir"):
            path = getattr(self, name)
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise InputError(f"{name} must be a path (str or os.PathLike) or None, got {type(path).__name__}")
        if self.reference is not None and not isinstance(self.reference, (Fingerprint, str, os.PathLike)):
            raise InputError(f"reference must be a Fingerprint, a path to a fingerprint file, or None, got "
                             f"{type(self.reference).__name__}")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: the checked value replaces the given one, once

    def _check_callables_and_controls(self) -> None:
        if self.feature_fn is not None and not callable(self.feature_fn):
            raise InputError(f"feature_fn must be callable as feature_fn(module, batch) -> [b, D], got "
                             f"{type(self.feature_fn).__name__}")
        if self.control_factory is not None and not callable(self.control_factory):
            raise InputError(f"control_factory must be callable as control_factory(seed) -> nn.Module, got "
                             f"{type(self.control_factory).__name__}")
        if self.controls is not None and not isinstance(self.controls, (str, os.PathLike)):
            raise InputError(f"controls must be the path of a controls file or None, got "
                             f"{type(self.controls).__name__}")
        if (self.feature_fn is not None and self.num_controls > 0 and self.control_factory is None
                and self.controls is None):
            raise InputError(
                "num_controls > 0 with a feature_fn needs control_factory(seed) -> a fresh init of your model (the "
                "monitor cannot rebuild a model it does not know); pass control_factory=..., or num_controls=0 to "
                "judge by the analytic threshold and the effect-size margin alone"
            )

    @classmethod
    def from_call(cls, frame_locals: dict[str, Any]) -> FaceArguments:
        """The arguments of a call whose parameters are these fields: ``FaceArguments.from_call(locals())``.

        Called first thing in :meth:`SeedPrintsFace.__init__ <seedprints_lightning.faces.base.SeedPrintsFace>`,
        whose ``locals()`` are then exactly its parameters (and ``self``, which is not a field), so the
        list of arguments is not written a third time. A field the call lacks is a ``KeyError`` naming
        it: the signature and this dataclass have drifted.
        """
        return cls(**{field.name: frame_locals[field.name] for field in dataclasses.fields(cls)})

    def chain_rules(self) -> ChainRules:
        """How the chain judges each probe: ``alpha``, the margins, ``fail_on`` and the identity dimensions."""
        return ChainRules.from_margins(alpha=self.alpha, birth_z_margin=self.birth_z_margin,
                                       link_z_margin=self.link_z_margin, link_tau_margin=self.link_tau_margin,
                                       fail_on=self.fail_on, identity_mode=self.identity_mode,
                                       identity_ratio=self.identity_ratio)


@dataclass(frozen=True)
class FaceSettings(FaceArguments):
    """The face's arguments resolved: what every face runs by, and what the faces share about the probed model.

    Built by :meth:`from_arguments` (once; not checked again). Its :class:`FaceArguments` fields hold
    the resolved values: ``reference`` is a :class:`~seedprints_lightning.Fingerprint` or ``None``
    (a parent run's directory resolved to its birth fingerprint, with :attr:`parent_anchor`);
    ``save_dir``, ``log_dir`` and ``signing_key`` are :class:`~pathlib.Path` (``signing_key`` read
    from ``$SEEDPRINTS_SIGNING_KEY`` when not given); ``num_controls`` is the ``controls=`` file's
    count when one is given. Also holds how the model's features are taken (:meth:`features_of`),
    what it is (:meth:`model_identity`) and where its controls come from (:meth:`controls_source`):
    each asks the measurement plan (:func:`~seedprints_lightning.core.families.plan_measurement`) of
    the model's family (:attr:`family`: the one a face adopted with :meth:`adopt`, else the registry's
    :func:`~seedprints_lightning.core.families.family_of`).
    """

    rules: ChainRules = dataclasses.field(default_factory=ChainRules)
    parent_anchor: Anchor | None = None
    reference_origin: str = ""
    controls_file: ControlSet | None = None
    controls_path: str | None = None
    family: ModelFamily | None = None

    def __post_init__(self) -> None:
        """Nothing: the arguments were checked as :class:`FaceArguments` and are resolved here, not checked again."""

    @classmethod
    def from_arguments(cls, arguments: FaceArguments | None = None, /, **kwargs: Any) -> FaceSettings:
        """Resolve ``arguments`` (or a :class:`FaceArguments` of ``kwargs``): read the files they name.

        The ``controls=`` file is loaded (its count becomes ``num_controls``), the signing key is
        read (``InputError`` naming a bad file) and ``reference`` is resolved (a parent run's
        ledger is re-verified first).
        """
        if arguments is None:
            arguments = FaceArguments(**kwargs)
        elif kwargs:
            raise InputError("FaceSettings.from_arguments takes a FaceArguments or keyword arguments, not both")
        controls_file = None if arguments.controls is None else ControlSet.load(arguments.controls)
        signing_key = _signing_key_path(arguments.signing_key)
        explicit, parent_anchor, origin = resolve_reference(arguments.reference, arguments.probe)
        given = {field.name: getattr(arguments, field.name) for field in dataclasses.fields(FaceArguments)}
        return cls(**{
            **given, "reference": explicit, "signing_key": signing_key,
            "num_controls": arguments.num_controls if controls_file is None else len(controls_file),
            "save_dir": None if arguments.save_dir is None else Path(arguments.save_dir),
            "log_dir": None if arguments.log_dir is None else Path(arguments.log_dir),
            "rules": arguments.chain_rules(), "parent_anchor": parent_anchor, "reference_origin": origin,
            "controls_file": controls_file,
            "controls_path": None if arguments.controls is None else os.fspath(arguments.controls)})

    def new_chain(self) -> CustodyChain:
        schedule = ProbeSchedule(every_n_steps=self.every_n_steps, adaptive=self.adaptive_schedule,
                                 adapt_headroom=DEFAULT_ADAPT_HEADROOM)
        return CustodyChain(self.reference, rules=self.rules, schedule=schedule, patience=self.patience,
                            anchor=self.parent_anchor, reference_source="explicit" if self.reference else None,
                            count_undetermined=self.count_undetermined)

    def signer(self) -> Any:
        """A fresh :class:`~seedprints_lightning.core.signing.RecordSigner` for the ledger, or ``None``.

        Loaded when the ledger opens (on the writing process only), never kept in the settings, so
        the key is never pickled, copied into a checkpoint or logged.
        """
        if self.signing_key is None:
            return None
        return load_signing_key(self.signing_key)

    def adopt(self, family: ModelFamily, probe: ProbeSpec | None) -> FaceSettings:
        """These settings with ``family`` adopted (a face that owns the family) and the probe spec it resolved."""
        return dataclasses.replace(self, family=family, probe=probe)

    def plan(self, module: nn.Module, *, strategy_wrapper: bool = False) -> MeasurementPlan:
        """How ``module`` is measured under these settings (``feature_fn``, ``control_factory``, the adopted family)."""
        return plan_measurement(module, feature_fn=self.feature_fn, control_factory=self.control_factory,
                                family=self.family, num_controls=self.num_controls,
                                controls_file=self.controls_file is not None, strategy_wrapper=strategy_wrapper)

    def features_of(self, module: nn.Module, spec: ProbeSpec,
                    sample_range: tuple[int, int] | None = None) -> torch.Tensor:
        """``module``'s ``[n, D]`` features (or the ``sample_range`` slice), as its :meth:`plan` says.

        Through ``feature_fn`` if given; a sharded (DTensor) model of an architecture the layer-major
        probe splits is probed one gathered block at a time (:mod:`~seedprints_lightning.core.sharded`):
        a forward through FSDP2's root would gather the embedding, final norm and LM head together.
        Anything else is called whole.
        """
        return self.plan(module).features(module, spec, self.probe_batch_size, sample_range)

    def resolve_spec(self, spec: ProbeSpec, module: nn.Module) -> ProbeSpec:
        """``spec`` with every ``None`` field filled from ``module``'s model (its family's rule)."""
        if self.feature_fn is not None:
            return spec.resolve(find_causal_lm(module))
        family = self.family or family_of(module)
        return (family or TRANSFORMERS).resolve_spec(spec, module)

    def check_model(self, module: nn.Module, spec: ProbeSpec | None, *, face: str = "this face") -> nn.Module | None:
        """The transformers model in ``module`` (``None`` for other families); raise if it cannot be probed.

        A generic face (no family adopted) given a model of a family that needs its own face raises,
        naming that face (``face`` is the asking face's name, for the message).
        """
        spec = spec or self.probe or ProbeSpec()
        if self.feature_fn is not None:
            lm = find_causal_lm_or_none(module)
            if lm is None and not spec.is_resolved:
                raise InputError(
                    "with feature_fn and no transformers model in the module the probe cannot be resolved from a "
                    "config: pass a resolved probe, e.g. ProbeSpec(kind='token', vocab_size=V) or "
                    "ProbeSpec(kind='embedding', hidden_size=d, embed_mean=m, embed_std=s)"
                )
        else:
            family = self.family or family_of(module)
            if family is None:
                find_causal_lm(module)  # raises ModelNotFoundError, naming feature_fn for other model types
            if self.family is None:
                refuse_dedicated(family, face)
            lm = find_causal_lm(module) if family is TRANSFORMERS else None
            if lm is None and self.family is None and self.reference is not None:
                family.resolve_spec(self.reference.spec, module)  # a reference the model cannot take fails now
        if lm is not None and self.reference is not None:
            self.reference.check_fits(lm)
        return lm

    def model_identity(self, module: nn.Module) -> dict[str, str | None]:
        """The class and config digest a fingerprint or controls file records for this run's model."""
        family = None if self.feature_fn is not None else self.family or family_of(module)
        if family is not None:
            return family.identity(module)
        lm = find_causal_lm_or_none(module)
        return {"model_class": type(lm if lm is not None else module).__name__,
                "config_digest": config_digest(lm.config) if lm is not None else None}

    def controls_source(self, module: nn.Module, *, device: torch.device | None, is_writer: bool,
                        context: Callable[[], Any] | None = None) -> ControlsSource:
        """Where the run's controls come from: the ``controls=`` file, or fresh inits of ``module``'s model.

        A build probes ``control_factory(seed)`` (default: the family's fresh init of ``module``'s
        model) for each seed on ``device`` under ``context``; the writer process prints one progress
        line each.
        """
        plan = self.plan(module)
        family = plan.model_family
        factory = self.control_factory or (lambda seed: family.build_control(module, seed))
        identity = self.model_identity(module)
        # The default controls of a model the layer-major probe splits are drawn and probed one block at a
        # time: a rank never holds a whole control (docs/benchmarks.md, step-0 memory under FSDP2).
        streamed = (self.control_factory is None and plan.how != "feature_fn" and family is not None
                    and family.streamed_control is not None and family.streams_controls(module))
        model = family.find(module) if streamed else None

        def build(seeds: tuple[int, ...], spec: ProbeSpec) -> ControlSet:
            log = (lambda message: print(f"[seedprints] {message}", flush=True)) if is_writer else None
            if streamed:
                return ControlSet.build_streamed(family.control_config(model), seeds, spec,
                                                 batch_size=self.probe_batch_size, device=device,
                                                 dtype=control_dtype(model), context=context, log=log,
                                                 probe_one=family.streamed_control,
                                                 init_scheme=family.streamed_init_scheme, **identity)
            return ControlSet.build(factory, seeds, spec, lambda control: self.features_of(control, spec),
                                    device=device, context=context, log=log, **identity)

        return ControlsSource(self.num_controls, build, identity, self.controls_file, self.controls_path)
