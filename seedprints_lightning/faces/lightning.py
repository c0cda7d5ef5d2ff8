"""``SeedPrintsCallback``: a birth certificate and a chain of custody for a Lightning run.

The callback is a thin Lightning face over :class:`~seedprints_lightning.core.chain.CustodyChain`,
which does the work: at step 0 the model's features become the run's reference (its "birth");
then on a schedule (:mod:`.schedule`) each probe is judged twice (:mod:`.verdict`), the
**birth test** against the reference (it fades at ordinary learning rates: reported, not acted
on) and the **custody link** against the last probe whose own link held (a failed link never
becomes the anchor), both against fresh-init negative controls (:mod:`.controls`), and
recorded in the hash-chained ledger (:mod:`.custody`). The callback measures the features over
the ranks, logs the result and, after ``patience`` failed probes, warns, stops or raises.

Reference resolution (in ``on_train_start``), first match wins:

1. ``reference=`` given (a parent's :class:`~seedprints_lightning.Fingerprint`, its file, or the
   parent run's ``seedprints`` directory);
2. the callback state restored from the checkpoint (or kept in memory by this instance);
3. ``trainer.global_step == 0``: a new reference is taken from the current (init) weights;
4. otherwise a clear error: a reference is never silently taken from trained weights.

A resumed run (or one given a parent's ``reference=``) first links the loaded weights to the
chain, so resuming the wrong weights breaks the chain at train start.

Files (rank 0, under ``save_dir``, default ``<trainer.log_dir or default_root_dir>/seedprints``,
:class:`~seedprints_lightning.core.ledger.RunDirectory`): ``reference.safetensors``,
``controls.safetensors``, ``custody.jsonl`` and ``probes/``. ``fast_dev_run`` writes no file.
The directory belongs to this run: rank 0 holds its lock (``custody.lock``) from train start to
``on_train_end`` / ``on_exception`` / ``teardown``, and a new run refuses a directory that holds
another run's ledger (:func:`~seedprints_lightning.core.opening.open_chain`).

Distributed: each rank probes its slice of the samples through the strategy's root wrapper
(:func:`~seedprints_lightning.faces._lightning.measure_features`), so every rank tests the same
numbers, follows the same schedule and takes the same decision, reduced over ranks before it
acts. Zero observer effect: probes and control builds leave RNG states and module modes as they
were and keep no gradient; the optimizer and the data are never touched.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core.chain import STATE_FORMAT_VERSION
from ..core.controls import DEFAULT_NUM_CONTROLS
from ..core.errors import IdentityWarning, InputError
from ..core.fingerprint import Fingerprint
from ..core.ledger import RunDirectory
from ..core.opening import close_chain, open_chain
from ..core.probes import ProbeBatch, ProbeSpec, find_causal_lm_or_none
from ..core.verdict import (
    CUSTOM_SCALARS_LAYOUT,
    DEFAULT_BIRTH_Z_MARGIN,
    DEFAULT_LINK_TAU_MARGIN,
    DEFAULT_LINK_Z_MARGIN,
    METRIC_TAGS,
    ProbeVerdict,
)
from ..offline.sources import MODEL_STATE_KEY, model_rebuild_info
from ._lightning import (
    CALLBACK_BASES,
    add_custom_scalars_once,
    log_metrics,
    measure_features,
    processes_of,
    run_model_code,
    trainer_fn_value,
)
from .monitor import MonitorSettings, act_on_identity_lost

__all__ = ["IdentityWarning", "SeedPrintsCallback", "METRIC_TAGS", "STATE_FORMAT_VERSION"]

class SeedPrintsCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Probe the model's SeedPrints lineage during training; act when its custody breaks.

    Works with both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``. See the
    module docstring for the two tests, reference resolution, resume, files and distributed
    behaviour.

    Args:
        every_n_steps: the longest interval between probes, in optimizer steps
            (``trainer.global_step``; gradient accumulation does not multiply probes).
        probe: the :class:`~seedprints_lightning.ProbeSpec`; ``None`` = ``ProbeSpec()``.
            Ignored when ``reference`` is given (a different ``probe`` is an error).
        alpha: significance level of the one-sided lineage tests.
        patience: consecutive failed probes before acting; a held verdict resets the count.
        on_identity_lost: ``"warn"``, ``"stop"`` (``trainer.should_stop`` on every rank, after
            reducing the decision) or ``"raise"`` (:class:`~seedprints_lightning.IdentityLostError`
            on every rank).
        fail_on: which verdict is the run's identity: ``"custody"`` (the link to the last good
            probe; default), ``"birth"`` (the step-0 test itself must stay detectable) or
            ``"either"`` (both must hold).
        num_controls: fresh-init negative controls; 0 turns them off (the verdicts then use
            the analytic threshold and the effect-size margin alone).
        birth_z_margin: z over the largest control z that the birth test must clear.
        link_z_margin, link_tau_margin: what a custody link must clear over the controls, in
            z and in ``tau_mean`` (effect size). See :mod:`seedprints_lightning.core.verdict`.
        adaptive_schedule: dense probes at the start and closer probes when a link weakens
            (:class:`~seedprints_lightning.core.schedule.ProbeSchedule`); ``False`` probes every
            ``every_n_steps`` only (custody then needs a gentle learning rate: measured in
            docs/benchmarks.md).
        reference: a parent's :class:`~seedprints_lightning.Fingerprint`, its file path, or the
            parent run's ``seedprints`` directory: then the birth test uses the parent's step-0
            reference and the custody chain continues from the parent's last held probe (its
            ledger is re-verified first), as continued training needs.
        feature_fn: ``feature_fn(module, batch: ProbeBatch) -> [b, D]`` for models that are not
            ``transformers`` PreTrainedModels. ``module`` is the LightningModule during
            training and a control model (from ``control_factory``) for the controls.
        control_factory: ``control_factory(seed) -> nn.Module``: a fresh init of the model with
            that seed, for controls of models the callback cannot rebuild itself (needed with
            ``feature_fn`` and ``num_controls > 0``). Default: ``type(lm)(lm.config)``.
        controls: a controls file precomputed with ``seedprints controls`` (or
            :func:`~seedprints_lightning.core.controls.save_controls`): loaded instead of building the
            controls inside the run, so no rank ever holds an unsharded copy of the model. It must
            match the run's probe spec and, when it records one, the model's config digest; its
            control count replaces ``num_controls``.
        save_dir: where the fingerprint files and the custody ledger go.
        probe_batch_size: probe samples per forward.
        identity_ratio, identity_mode: forwarded to :func:`~seedprints_lightning.lineage_test`
            for the birth test (links always use ``"coset"``).
        count_undetermined: an undetermined probe (the lineage could not be measured: NaN or
            constant hidden states of a diverged run, or of a swapped-in degenerate model)
            counts towards ``patience`` like a failed one, so a model the chain cannot measure
            is acted on rather than vouched for. ``False`` only reports it (once) and neither
            counts nor resets the count: for runs that tolerate a transient diverged stretch.

    Attributes:
        chain: the :class:`~seedprints_lightning.core.chain.CustodyChain` (reference, controls,
            anchor, schedule position, failure count, ledger); its state is this callback's.
        history: one plain dict per probe (``step``, ``event``, the logged metrics under short
            names, ``related``, ``birth_detectable``, ``anchor_step``, ``control_z``,
            ``reason``, ``record_index``, ``consecutive_failures``, ``next_step``).
        last_verdict: the latest :class:`~seedprints_lightning.core.verdict.ProbeVerdict`.
        reference, reference_source (``"explicit"``, ``"checkpoint"`` or ``"step0"``).

    Logged (every logger, and ``trainer.callback_metrics``): :data:`METRIC_TAGS`, never NaN;
    ``seedprints/related`` is 1 held, 0 not related, -1 undetermined (with
    ``seedprints/undetermined`` = 1), and a test that could not be made logs no figures.
    """

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
    ) -> None:
        super().__init__()
        self.settings = MonitorSettings.from_arguments(
            every_n_steps=every_n_steps, probe=probe, alpha=alpha, patience=patience,
            on_identity_lost=on_identity_lost, fail_on=fail_on, num_controls=num_controls,
            birth_z_margin=birth_z_margin, link_z_margin=link_z_margin, link_tau_margin=link_tau_margin,
            adaptive_schedule=adaptive_schedule, reference=reference, feature_fn=feature_fn,
            control_factory=control_factory, controls=controls, save_dir=save_dir,
            probe_batch_size=probe_batch_size, identity_ratio=identity_ratio, identity_mode=identity_mode,
            count_undetermined=count_undetermined)
        self.save_dir: Path | None = self.settings.save_dir
        self.chain = self.settings.new_chain()
        self._layout_written: set[int] = set()
        self._model_rebuild: dict[str, Any] = {}

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

    @property
    def every_n_steps(self) -> int:
        return self.settings.every_n_steps

    @property
    def probe(self) -> ProbeSpec | None:
        return self.settings.probe

    @property
    def on_identity_lost(self) -> str:
        return self.settings.on_identity_lost

    @property
    def num_controls(self) -> int:
        return self.settings.num_controls

    @property
    def alpha(self) -> float:
        return self.chain.rules.birth_rule.alpha

    @property
    def patience(self) -> int:
        return self.chain.patience

    @property
    def identity_ratio(self) -> float | None:
        return self.chain.rules.identity_ratio

    # ------------------------------------------------------------------ Lightning API
    @property
    def state_key(self) -> str:
        return "SeedPrintsCallback"

    def state_dict(self) -> dict[str, Any]:
        # The chain's state, and how to rebuild the model from this checkpoint (read by
        # ``seedprints audit --chain RUN CKPT`` and ``compare CKPT``; not needed to resume).
        return {**self.chain.state_dict(), MODEL_STATE_KEY: dict(self._model_rebuild)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chain.load_state_dict(state_dict)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Checked here, not in setup(): a model built in configure_model() exists only now.
        lm = self.settings.check_model(pl_module, self.reference.spec if self.reference is not None else None)
        self._model_rebuild = model_rebuild_info(pl_module, lm, feature_fn=self.settings.feature_fn is not None)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._skips(trainer):
            return
        if not self._start_chain(trainer, pl_module):
            # A parent's reference, or a resume: link the loaded weights to the chain at once.
            self._probe(trainer, pl_module, "resume" if self.chain.restored else "train_start")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._skips(trainer) and self.chain.due(int(trainer.global_step)):
            self._probe(trainer, pl_module, "interval")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        step = int(trainer.global_step)
        try:
            if not self._skips(trainer) and self.reference is not None and self.chain.last_probed_step != step:
                self._probe(trainer, pl_module, "train_end")
        finally:
            close_chain(self.chain)  # the run directory's lock goes with the run

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        close_chain(self.chain)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        close_chain(self.chain)

    @staticmethod
    def _skips(trainer: Any) -> bool:
        """Probes belong to fitting only: not to sanity checks, validate, test or predict."""
        return trainer_fn_value(trainer) != "fit" or bool(getattr(trainer, "sanity_checking", False))

    # ------------------------------------------------------------------ a probe: measure -> observe -> log -> act
    def _probe(self, trainer: Any, pl_module: Any, event: str) -> ProbeVerdict:
        start = time.perf_counter()
        features = measure_features(trainer, pl_module, self.reference.spec, self.settings.features_of)
        step = self.chain.observe(int(trainer.global_step), features, event,
                                  measure_seconds=time.perf_counter() - start)
        log_metrics(trainer, step.metrics, step.verdict.step)
        for note in step.notes:
            self._warn(trainer, note)
        # Every rank judged the same broadcast features; the reduction makes sure no rank acts alone.
        if trainer.strategy.reduce_boolean_decision(step.identity_lost, all=False):
            self._act(trainer, step.reason or self.chain.lost_message(step.verdict))
        return step.verdict

    def _act(self, trainer: Any, message: str) -> None:
        act_on_identity_lost(self.on_identity_lost, message, stop=lambda: setattr(trainer, "should_stop", True),
                             warn=lambda text: self._warn(trainer, text))

    # ------------------------------------------------------------------ set-up at train start
    def _start_chain(self, trainer: Any, pl_module: Any) -> bool:
        """Reference, files, controls and ledger (:func:`~seedprints_lightning.core.opening.open_chain`)."""
        if self.settings.save_dir is None:
            base = trainer.log_dir  # a collective under DDP: every rank gets here
            self.save_dir = Path(base if base else trainer.default_root_dir) / "seedprints"
        step, identity = int(trainer.global_step), self.settings.model_identity(pl_module)
        origin = self.settings.reference_origin if self.reference_source == "explicit" else (
            f"the SeedPrintsCallback state in checkpoint {getattr(trainer, 'ckpt_path', None)!r}")
        run = None if getattr(trainer, "fast_dev_run", False) else RunDirectory(self.save_dir)  # fast_dev_run: no file
        fresh = open_chain(
            self.chain, step=step, run=run, processes=processes_of(trainer),
            take_reference=lambda: self._take_reference(trainer, pl_module, step, identity),
            controls=self.settings.controls_source(pl_module, device=pl_module.device,
                                                   is_writer=bool(trainer.is_global_zero),
                                                   context=trainer.precision_plugin.forward_context),
            origin=origin, warn=lambda message: self._warn(trainer, message),
            missing_state=f"SeedPrintsCallback state (state_key {self.state_key!r})")
        add_custom_scalars_once(trainer, CUSTOM_SCALARS_LAYOUT, self._layout_written)
        return fresh

    def _take_reference(self, trainer: Any, pl_module: Any, step: int, identity: dict[str, Any]) -> Fingerprint:
        spec = self.probe or ProbeSpec()
        lm = find_causal_lm_or_none(pl_module)
        if not spec.is_resolved:
            if lm is None:  # on_fit_start() already refused this; keep a clear message anyway
                raise InputError("the probe spec is not resolved and the module holds no transformers model")
            base_spec = spec
            spec = run_model_code(trainer, pl_module, lambda: base_spec.resolve(lm))
        spec = trainer.strategy.broadcast(spec, src=0)
        return Fingerprint(features=measure_features(trainer, pl_module, spec, self.settings.features_of), spec=spec,
                           step=step, extra={"source": "SeedPrintsCallback step-0 reference"}, **identity)

    # ------------------------------------------------------------------ logging
    @staticmethod
    def _warn(trainer: Any, message: str) -> None:
        if trainer.is_global_zero:
            warnings.warn(message, IdentityWarning, stacklevel=3)
