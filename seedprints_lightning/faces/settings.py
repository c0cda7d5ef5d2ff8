"""The arguments every face takes, checked once, and what the faces share about the probed model.

:class:`FaceSettings` is built by :meth:`FaceSettings.from_arguments` from the arguments of
:class:`~seedprints_lightning.faces.base.SeedPrintsFace` (the one place they are declared); every
bad value raises :class:`~seedprints_lightning.InputError` naming the argument and the fix,
when the face is constructed, before any training step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.chain import Anchor, ChainRules, CustodyChain, resolve_reference
from ..core.checks import check_bool, check_choice, check_int, check_number
from ..core.controls import DEFAULT_NUM_CONTROLS, ControlSet, build_control_model, control_dtype, streams_controls
from ..core.errors import InputError
from ..core.fingerprint import Fingerprint, config_digest
from ..core.ledger import check_save_dir
from ..core.opening import ControlsSource
from ..core.probes import ProbeBatch, ProbeSpec, extract_features, find_causal_lm, find_causal_lm_or_none
from ..core.schedule import DEFAULT_ADAPT_HEADROOM, ProbeSchedule
from ..core.sharded import extract_features_gathered, probes_gathered
from ..core.signing import ENV_SIGNING_KEY, load_signing_key
from ..core.verdict import DEFAULT_BIRTH_Z_MARGIN, DEFAULT_LINK_TAU_MARGIN, DEFAULT_LINK_Z_MARGIN, FAIL_ON

__all__ = ["ACTIONS", "FaceSettings"]

ACTIONS = ("warn", "stop", "raise")


def _signing_key_path(signing_key: str | os.PathLike | None) -> Path | None:
    """The key file (``signing_key=`` or ``$SEEDPRINTS_SIGNING_KEY``), checked now: a bad key fails before step 0."""
    if signing_key is None:
        signing_key = os.environ.get(ENV_SIGNING_KEY) or None
    if signing_key is None:
        return None
    load_signing_key(signing_key)  # raises InputError naming the file (missing, not PEM, not Ed25519)
    return Path(signing_key)


@dataclass(frozen=True)
class FaceSettings:
    """The arguments every face takes (see :class:`~seedprints_lightning.faces.base.SeedPrintsFace`), checked once.

    Built by :meth:`from_arguments`, which raises :class:`~seedprints_lightning.InputError`
    naming the argument and the fix. Also holds what the faces share about the probed model:
    how its features are taken (:meth:`features_of`), what it is (:meth:`model_identity`) and
    and where its controls come from (:meth:`controls_source`).
    """

    every_n_steps: int
    probe: ProbeSpec | None
    patience: int
    on_identity_lost: str
    num_controls: int
    rules: ChainRules
    adaptive_schedule: bool
    reference: Fingerprint | None
    parent_anchor: Anchor | None
    reference_origin: str
    feature_fn: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None
    control_factory: Callable[[int], nn.Module] | None
    controls_file: ControlSet | None
    controls_path: str | None
    save_dir: Path | None
    probe_batch_size: int
    count_undetermined: bool = True
    signing_key: Path | None = None
    log_dir: Path | None = None
    bind_saves: bool = True

    @classmethod
    def from_arguments(
        cls, *, every_n_steps: int = 1000, probe: ProbeSpec | None = None, alpha: float = 0.01, patience: int = 2,
        on_identity_lost: str = "warn", fail_on: str = "custody", num_controls: int = DEFAULT_NUM_CONTROLS,
        birth_z_margin: float = DEFAULT_BIRTH_Z_MARGIN, link_z_margin: float = DEFAULT_LINK_Z_MARGIN,
        link_tau_margin: float = DEFAULT_LINK_TAU_MARGIN, adaptive_schedule: bool = True,
        reference: Fingerprint | str | os.PathLike | None = None,
        feature_fn: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None = None,
        control_factory: Callable[[int], nn.Module] | None = None, controls: str | os.PathLike | None = None,
        save_dir: str | os.PathLike | None = None, probe_batch_size: int = 64, identity_ratio: float | None = None,
        identity_mode: str = "coset", count_undetermined: bool = True,
        signing_key: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None,
        bind_saves: bool = True,
    ) -> FaceSettings:
        check_int("every_n_steps", every_n_steps, low=1, hint="optimizer steps between probes")
        check_bool("count_undetermined", count_undetermined,
                   hint="True counts a probe whose lineage cannot be measured towards patience")
        if probe is not None and not isinstance(probe, ProbeSpec):
            raise InputError(f"probe must be a seedprints_lightning.ProbeSpec or None, got {type(probe).__name__}")
        check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True, hint="e.g. 0.01")
        check_int("patience", patience, low=1, hint="consecutive failed probes before acting")
        check_choice("on_identity_lost", on_identity_lost, ACTIONS)
        check_choice("fail_on", fail_on, FAIL_ON)
        check_int("num_controls", num_controls, low=0, high=64, hint="0 turns controls off")
        check_bool("adaptive_schedule", adaptive_schedule)
        check_bool("bind_saves", bind_saves, hint="False records no digest of the weights at each checkpoint save")
        if feature_fn is not None and not callable(feature_fn):
            raise InputError(f"feature_fn must be callable as feature_fn(module, batch) -> [b, D], got "
                             f"{type(feature_fn).__name__}")
        if control_factory is not None and not callable(control_factory):
            raise InputError(f"control_factory must be callable as control_factory(seed) -> nn.Module, got "
                             f"{type(control_factory).__name__}")
        controls_file = controls_path = None
        if controls is not None:
            if not isinstance(controls, (str, os.PathLike)):
                raise InputError(f"controls must be the path of a controls file or None, got {type(controls).__name__}")
            controls_file, controls_path = ControlSet.load(controls), os.fspath(controls)
            num_controls = len(controls_file)
        if feature_fn is not None and num_controls > 0 and control_factory is None and controls is None:
            raise InputError(
                "num_controls > 0 with a feature_fn needs control_factory(seed) -> a fresh init of your model (the "
                "monitor cannot rebuild a model it does not know); pass control_factory=..., or num_controls=0 to "
                "judge by the analytic threshold and the effect-size margin alone"
            )
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise InputError(f"save_dir must be a path (str or os.PathLike) or None, got {type(save_dir).__name__}")
        if save_dir is not None:  # not a regular file, and it (or its nearest existing parent) writable
            check_save_dir(save_dir)
        check_int("probe_batch_size", probe_batch_size, low=1)
        if identity_ratio is not None:
            check_number("identity_ratio", identity_ratio, low=0.0, high=1.0, low_open=True,
                         hint="a fraction; None, the default, is all dimensions")
        check_choice("identity_mode", identity_mode, ("coset", "base"))
        rules = ChainRules.from_margins(alpha=alpha, birth_z_margin=birth_z_margin, link_z_margin=link_z_margin,
                                        link_tau_margin=link_tau_margin, fail_on=fail_on, identity_mode=identity_mode,
                                        identity_ratio=identity_ratio)
        for name, path in (("signing_key", signing_key), ("log_dir", log_dir)):
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise InputError(f"{name} must be a path (str or os.PathLike) or None, got {type(path).__name__}")
        signing_key = _signing_key_path(signing_key)
        explicit, parent_anchor, origin = resolve_reference(reference, probe)
        return cls(every_n_steps=int(every_n_steps), probe=probe, patience=int(patience),
                   on_identity_lost=on_identity_lost, num_controls=int(num_controls), rules=rules,
                   adaptive_schedule=bool(adaptive_schedule), reference=explicit, parent_anchor=parent_anchor,
                   reference_origin=origin, feature_fn=feature_fn, control_factory=control_factory,
                   controls_file=controls_file, controls_path=controls_path,
                   save_dir=None if save_dir is None else Path(save_dir), probe_batch_size=int(probe_batch_size),
                   count_undetermined=count_undetermined, signing_key=signing_key,
                   log_dir=None if log_dir is None else Path(log_dir), bind_saves=bool(bind_saves))

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

    def features_of(self, module: nn.Module, spec: ProbeSpec,
                    sample_range: tuple[int, int] | None = None) -> torch.Tensor:
        """``module``'s ``[n, D]`` features (or the ``sample_range`` slice), through ``feature_fn`` if given.

        A sharded (DTensor) model of an architecture the layer-major probe splits is probed one gathered
        block at a time (:mod:`~seedprints_lightning.core.sharded`): a forward through FSDP2's root would
        gather the embedding, final norm and LM head together. Anything else is called.
        """
        if self.feature_fn is not None:
            feature_fn = self.feature_fn
            return extract_features(module, spec, batch_size=self.probe_batch_size, sample_range=sample_range,
                                    forward_fn=lambda batch: feature_fn(module, batch))
        lm = find_causal_lm(module)
        if probes_gathered(lm):
            return extract_features_gathered(lm, spec, batch_size=self.probe_batch_size, sample_range=sample_range)
        return extract_features(lm, spec, batch_size=self.probe_batch_size, sample_range=sample_range)

    def check_model(self, module: nn.Module, spec: ProbeSpec | None) -> nn.Module | None:
        """The transformers model in ``module`` (``None`` for a ``feature_fn`` model); raise if it cannot be probed."""
        lm = find_causal_lm(module) if self.feature_fn is None else find_causal_lm_or_none(module)
        spec = spec or self.probe or ProbeSpec()
        if lm is None and not spec.is_resolved:
            raise InputError(
                "with feature_fn and no transformers model in the module the probe cannot be resolved from a config: "
                "pass a resolved probe, e.g. ProbeSpec(kind='token', vocab_size=V) or "
                "ProbeSpec(kind='embedding', hidden_size=d, embed_mean=m, embed_std=s)"
            )
        if lm is not None and self.reference is not None:
            self.reference.check_fits(lm)
        return lm

    @staticmethod
    def model_identity(module: nn.Module) -> dict[str, str | None]:
        """The class and config digest a fingerprint or controls file records for this run's model."""
        lm = find_causal_lm_or_none(module)
        return {"model_class": type(lm if lm is not None else module).__name__,
                "config_digest": config_digest(lm.config) if lm is not None else None}

    def controls_source(self, module: nn.Module, *, device: torch.device | None, is_writer: bool,
                        context: Callable[[], Any] | None = None) -> ControlsSource:
        """Where the run's controls come from: the ``controls=`` file, or fresh inits of ``module``'s model.

        A build probes ``control_factory(seed)`` (default: ``module``'s class and config) for each
        seed on ``device`` under ``context``; the writer process prints one progress line each.
        """
        factory = self.control_factory or (lambda seed: build_control_model(module, seed))
        identity = self.model_identity(module)
        lm = find_causal_lm_or_none(module)
        # The default controls of a model the layer-major probe splits are drawn and probed one block at a
        # time: a rank never holds a whole control (docs/benchmarks.md, step-0 memory under FSDP2).
        streamed = (self.control_factory is None and self.feature_fn is None and lm is not None
                    and streams_controls(lm))

        def build(seeds: tuple[int, ...], spec: ProbeSpec) -> ControlSet:
            log = (lambda message: print(f"[seedprints] {message}", flush=True)) if is_writer else None
            if streamed:
                return ControlSet.build_streamed(lm.config, seeds, spec, batch_size=self.probe_batch_size,
                                                 device=device, dtype=control_dtype(lm), context=context, log=log,
                                                 **identity)
            return ControlSet.build(factory, seeds, spec, lambda control: self.features_of(control, spec),
                                    device=device, context=context, log=log, **identity)

        return ControlsSource(self.num_controls, build, identity, self.controls_file, self.controls_path)
