"""``SeedPrintsMonitor``: the custody chain for any training loop, with no trainer in it.

Every face takes the same arguments, validated once here (:class:`MonitorSettings`), and runs
the same probe cycle, measure -> :meth:`~seedprints_lightning.core.chain.CustodyChain.observe` ->
log -> act, so every loop writes the same run directory, ledger and verdicts:

- :class:`SeedPrintsMonitor`: a hand-written loop calls ``start(model, step)`` before its first
  optimizer step and ``step(model, step)`` after each one;
- :class:`~seedprints_lightning.faces.hf.SeedPrintsTrainerCallback` (Hugging Face ``Trainer``) and
  :class:`~seedprints_lightning.faces.fabric.SeedPrintsFabricCallback` (Lightning Fabric) are this
  class with the loop's hooks calling those two methods;
- :class:`~seedprints_lightning.SeedPrintsCallback` (Lightning ``Trainer``) shares the settings
  and measures through the Lightning strategy instead.

Several processes (``torch.distributed`` initialised, as under ``torchrun``, accelerate or
Fabric): each probes its slice of the samples, the slices are gathered in sample order, rank 0
writes the files and every decision is shared, so every rank acts alike. Every rank must call
``step`` at the same steps (a probe is a collective).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core.chain import Anchor, ChainRules, CustodyChain, resolve_reference
from ..core.checks import check_bool, check_choice, check_int, check_number
from ..core.controls import DEFAULT_NUM_CONTROLS, ControlSet, build_control_model, preserve_rng_state
from ..core.errors import IdentityLostError, IdentityWarning, InputError
from ..core.fingerprint import Fingerprint, config_digest
from ..core.ledger import RunDirectory, check_save_dir
from ..core.opening import ControlsSource, close_chain, open_chain
from ..core.probes import ProbeBatch, ProbeSpec, extract_features, find_causal_lm, find_causal_lm_or_none
from ..core.processes import Processes, measure_over_ranks, torch_processes
from ..core.schedule import DEFAULT_ADAPT_HEADROOM, ProbeSchedule
from ..core.verdict import (
    CUSTOM_SCALARS_LAYOUT,
    DEFAULT_BIRTH_Z_MARGIN,
    DEFAULT_LINK_TAU_MARGIN,
    DEFAULT_LINK_Z_MARGIN,
    FAIL_ON,
    ProbeVerdict,
)
from ..offline.sources import MODEL_STATE_KEY, STEP_STATE_KEY, model_rebuild_info

__all__ = ["ACTIONS", "MonitorSettings", "SeedPrintsMonitor", "act_on_identity_lost"]

ACTIONS = ("warn", "stop", "raise")



def act_on_identity_lost(action: str, message: str, *, stop: Callable[[], None], warn: Callable[[str], None]) -> None:
    """What every face does when the chain says the identity is lost: raise, stop (``stop()``) and warn, or warn."""
    if action == "raise":
        raise IdentityLostError(message)
    if action == "stop":
        stop()
        message += " Stopping the run (on_identity_lost='stop')."
    warn(message)


@dataclass(frozen=True)
class MonitorSettings:
    """The arguments every face takes (see :class:`SeedPrintsMonitor`), checked once.

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
    ) -> MonitorSettings:
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
        explicit, parent_anchor, origin = resolve_reference(reference, probe)
        return cls(every_n_steps=int(every_n_steps), probe=probe, patience=int(patience),
                   on_identity_lost=on_identity_lost, num_controls=int(num_controls), rules=rules,
                   adaptive_schedule=bool(adaptive_schedule), reference=explicit, parent_anchor=parent_anchor,
                   reference_origin=origin, feature_fn=feature_fn, control_factory=control_factory,
                   controls_file=controls_file, controls_path=controls_path,
                   save_dir=None if save_dir is None else Path(save_dir), probe_batch_size=int(probe_batch_size),
                   count_undetermined=count_undetermined)

    def new_chain(self) -> CustodyChain:
        schedule = ProbeSchedule(every_n_steps=self.every_n_steps, adaptive=self.adaptive_schedule,
                                 adapt_headroom=DEFAULT_ADAPT_HEADROOM)
        return CustodyChain(self.reference, rules=self.rules, schedule=schedule, patience=self.patience,
                            anchor=self.parent_anchor, reference_source="explicit" if self.reference else None,
                            count_undetermined=self.count_undetermined)

    def features_of(self, module: nn.Module, spec: ProbeSpec,
                    sample_range: tuple[int, int] | None = None) -> torch.Tensor:
        """``module``'s ``[n, D]`` features (or the ``sample_range`` slice), through ``feature_fn`` if given."""
        if self.feature_fn is not None:
            feature_fn = self.feature_fn
            return extract_features(module, spec, batch_size=self.probe_batch_size, sample_range=sample_range,
                                    forward_fn=lambda batch: feature_fn(module, batch))
        return extract_features(find_causal_lm(module), spec, batch_size=self.probe_batch_size,
                                sample_range=sample_range)

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

        def build(seeds: tuple[int, ...], spec: ProbeSpec) -> ControlSet:
            log = (lambda message: print(f"[seedprints] {message}", flush=True)) if is_writer else None
            return ControlSet.build(factory, seeds, spec, lambda control: self.features_of(control, spec),
                                    device=device, context=context, log=log, **identity)

        return ControlsSource(self.num_controls, build, identity, self.controls_file, self.controls_path)


def wrapped_sharding(model: nn.Module) -> str | None:
    """The name of a sharding whose shards a direct call of ``model`` does not gather, or ``None``.

    FSDP1 (``FullyShardedDataParallel``) gathers a unit's parameters only in its wrapper's
    forward. FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3 hook the modules themselves, so calling
    the model gathers its shards (a collective, which every rank makes alike).
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return "FSDP1 (FullyShardedDataParallel)"
    return None


def refuse_wrapped_sharding(what: str | None) -> None:
    if what is not None:
        raise InputError(
            f"the model is sharded by {what}, whose shards a probe from outside the training step cannot gather: "
            "this face probes by calling the model itself. Shard with FSDP2 (torch.distributed.fsdp.fully_shard, "
            "Lightning's ModelParallelStrategy, accelerate's fsdp_version=2), or train with the Lightning Trainer "
            "and SeedPrintsCallback, which probes through the strategy's root wrapper"
        )


def _device_of(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


class SeedPrintsMonitor:
    """Probe a model's SeedPrints lineage from any training loop; act when its custody breaks.

    Call :meth:`start` once before the first optimizer step (at step 0 it takes the reference;
    on a resume it links the loaded weights to the restored chain) and :meth:`step` after every
    optimizer step: it probes when the schedule says so. :meth:`end` probes the last weights and
    releases the run directory's writer lock (:meth:`close` only releases it).
    ``state_dict()`` / ``load_state_dict()`` go into your checkpoint (load before :meth:`start`).

    Args: those of :class:`~seedprints_lightning.SeedPrintsCallback` (same meaning, same
    defaults), and

        save_dir: the run's ``seedprints`` directory; default ``./seedprints``.
        log_dir: a TensorBoard directory for the metrics (rank 0); ``None`` logs nowhere but
            :attr:`history` (a face logs through its loop's loggers instead).

    Attributes:
        chain: the :class:`~seedprints_lightning.core.chain.CustodyChain`.
        should_stop: set (on every rank) when the identity is lost with ``on_identity_lost="stop"``.
        history, reference, reference_source, last_verdict: as on ``SeedPrintsCallback``.
    """

    #: What a resumed run without a restored state is missing, for the error that says so.
    missing_state = "SeedPrintsMonitor state (monitor.load_state_dict(...) before monitor.start(...))"

    def __init__(
        self,
        every_n_steps: int = 1000,
        probe: ProbeSpec | None = None,
        alpha: float = 0.01,
        patience: int = 2,
        on_identity_lost: Literal["warn", "stop", "raise"] = "warn",
        fail_on: Literal["custody", "birth", "either"] = "custody",
        num_controls: int = DEFAULT_NUM_CONTROLS,
        birth_z_margin: float = DEFAULT_BIRTH_Z_MARGIN,
        link_z_margin: float = DEFAULT_LINK_Z_MARGIN,
        link_tau_margin: float = DEFAULT_LINK_TAU_MARGIN,
        adaptive_schedule: bool = True,
        reference: Fingerprint | str | os.PathLike | None = None,
        feature_fn: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None = None,
        control_factory: Callable[[int], nn.Module] | None = None,
        controls: str | os.PathLike | None = None,
        save_dir: str | os.PathLike | None = None,
        probe_batch_size: int = 64,
        identity_ratio: float | None = None,
        identity_mode: Literal["coset", "base"] = "coset",
        count_undetermined: bool = True,
        log_dir: str | os.PathLike | None = None,
    ) -> None:
        self.settings = MonitorSettings.from_arguments(
            every_n_steps=every_n_steps, probe=probe, alpha=alpha, patience=patience,
            on_identity_lost=on_identity_lost, fail_on=fail_on, num_controls=num_controls,
            birth_z_margin=birth_z_margin, link_z_margin=link_z_margin, link_tau_margin=link_tau_margin,
            adaptive_schedule=adaptive_schedule, reference=reference, feature_fn=feature_fn,
            control_factory=control_factory, controls=controls, save_dir=save_dir,
            probe_batch_size=probe_batch_size, identity_ratio=identity_ratio, identity_mode=identity_mode,
            count_undetermined=count_undetermined)
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise InputError(f"log_dir must be a path (str or os.PathLike) or None, got {type(log_dir).__name__}")
        self.chain = self.settings.new_chain()
        self.save_dir: Path | None = self.settings.save_dir
        self.log_dir: Path | None = None if log_dir is None else Path(log_dir)
        self.should_stop = False
        self.started = False
        self.current_step: int | None = None
        self._model_rebuild: dict[str, Any] = {}
        self._writer: Any = None

    # ------------------------------------------------------------------ the chain's figures, read-only
    @property
    def history(self) -> list[dict[str, Any]]:
        return self.chain.history

    @property
    def reference(self) -> Fingerprint | None:
        return self.chain.reference

    @property
    def reference_source(self) -> str | None:
        return self.chain.reference_source

    @property
    def last_verdict(self) -> ProbeVerdict | None:
        return self.chain.last_verdict

    # ------------------------------------------------------------------ the loop's calls
    def start(self, model: nn.Module, step: int = 0) -> ProbeVerdict | None:
        """Open the chain before the optimizer step after ``step``; the resume link's verdict, if any.

        At step 0 without a restored state the model's features become the reference; with a
        restored state (a resume) or a parent's ``reference=``, the loaded weights are probed
        and linked to the chain at once, so resuming the wrong weights fails here.
        """
        if self.started:
            raise InputError("start() was already called on this monitor: call it once per run, then step()")
        step = check_int("step", step, low=0, hint="the optimizer steps already taken (0 for a new run)")
        refuse_wrapped_sharding(wrapped_sharding(model))
        lm = self.settings.check_model(model, self.reference.spec if self.reference is not None else None)
        if self.save_dir is None:
            self.save_dir = Path.cwd() / "seedprints"
        processes = self._processes()
        origin = (self.settings.reference_origin if self.reference_source == "explicit"
                  else f"the {type(self).__name__} state restored with load_state_dict()")
        fresh = open_chain(
            self.chain, step=step, run=RunDirectory(self.save_dir), processes=processes,
            take_reference=lambda: self._take_reference(model, step, processes),
            controls=self.settings.controls_source(model, device=_device_of(model), is_writer=processes.is_writer),
            origin=origin, warn=self._warn, missing_state=self.missing_state)
        self._model_rebuild = model_rebuild_info(model, lm, feature_fn=self.settings.feature_fn is not None)
        self.started, self.current_step = True, step
        if self.log_dir is not None and processes.is_writer:
            self._tensorboard()  # the Custom Scalars layout goes in before the first point
        if not fresh:
            return self._probe(model, step, "resume" if self.chain.restored else "train_start")
        return None

    def step(self, model: nn.Module, step: int) -> ProbeVerdict | None:
        """After the optimizer step that made ``step``: probe if one is due; its verdict, or ``None``."""
        if not self.started:
            raise InputError(f"{type(self).__name__}.step() before start(): call start(model, step=0) once before "
                             "the first optimizer step (a reference is never taken from trained weights)")
        step = check_int("step", step, low=0, hint="the number of optimizer steps taken")
        self.current_step = step
        if self.chain.due(step):
            return self._probe(model, step, "interval")
        return None

    def end(self, model: nn.Module, step: int | None = None) -> ProbeVerdict | None:
        """Probe the final weights (unless ``step`` was just probed), then :meth:`close`."""
        verdict = None
        step = self.current_step if step is None else check_int("step", step, low=0)
        try:
            if self.started and step is not None and self.chain.last_probed_step != step:
                self.current_step = step
                verdict = self._probe(model, step, "train_end")
        finally:
            self.close()
        return verdict

    def close(self) -> None:
        """Release the run directory's lock and close the TensorBoard writer (:meth:`end` does; no probe).

        Call it when a run ends without :meth:`end` (an exception in your loop) and this process
        goes on to write the same directory. A crashed process needs nothing: the OS releases its
        lock, and a monitor object that was dropped releases it when garbage collected.
        """
        close_chain(self.chain)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The chain's state, the step it stands at, and how to rebuild the model (for audits of the checkpoint)."""
        return {**self.chain.state_dict(), STEP_STATE_KEY: self.current_step,
                MODEL_STATE_KEY: dict(self._model_rebuild)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.started:
            raise InputError("load_state_dict() after start(): restore the monitor's state before start()")
        self.chain.load_state_dict(state_dict)
        step = state_dict.get(STEP_STATE_KEY)
        self.current_step = None if step is None else int(step)

    # ------------------------------------------------------------------ one probe: measure -> observe -> log -> act
    def _probe(self, model: nn.Module, step: int, event: str) -> ProbeVerdict:
        start = time.perf_counter()
        features = self._measure(model, self.chain.reference.spec)
        observed = self.chain.observe(step, features, event, measure_seconds=time.perf_counter() - start)
        self._log(observed.metrics, step)
        for note in observed.notes:
            self._warn(note)
        # Every rank judged the same features; the reduction makes sure no rank acts alone.
        if self._processes().any_rank(observed.identity_lost):
            self._act(observed.reason or self.chain.lost_message(observed.verdict))
        return observed.verdict

    def _act(self, message: str) -> None:
        act_on_identity_lost(self.settings.on_identity_lost, message, stop=lambda: setattr(self, "should_stop", True),
                             warn=self._warn)

    def _take_reference(self, model: nn.Module, step: int, processes: Processes) -> Fingerprint:
        spec = self.settings.probe or ProbeSpec()
        if not spec.is_resolved:
            with preserve_rng_state():
                spec = spec.resolve(find_causal_lm(model))
        spec = processes.broadcast(spec)
        return Fingerprint(features=self._measure(model, spec), spec=spec, step=step,
                           extra={"source": f"{type(self).__name__} step-0 reference"},
                           **self.settings.model_identity(model))

    # ------------------------------------------------------------------ what a loop's face may replace
    def _processes(self) -> Processes:
        """The loop's processes: ``torch.distributed`` when it is initialised, else one."""
        return torch_processes()

    def _measure(self, model: nn.Module, spec: ProbeSpec) -> torch.Tensor:
        """The live model's ``[n, D]`` features, identical on every rank; RNGs and modes untouched."""
        with preserve_rng_state():
            return measure_over_ranks(spec, lambda padded, sample_range: self.settings.features_of(
                model, padded, sample_range))

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.log_dir is not None and self._processes().is_writer:
            writer = self._tensorboard()
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
            writer.flush()

    def _tensorboard(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
            self._writer.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)
        return self._writer

    def _warn(self, message: str) -> None:
        if self._processes().is_writer:
            warnings.warn(message, IdentityWarning, stacklevel=3)
