"""``SeedPrintsCallback``: a birth certificate and a chain of custody for a Lightning run.

At step 0 the callback probes the model (the run's init, its "birth") and keeps the features
as the run's reference. Then it probes again on a schedule (:mod:`.schedule`: steps 1, 3, 7,
15, ... doubling up to ``every_n_steps``, closer when a link weakens) and makes two tests at
every probe (:mod:`.verdict`):

* the **birth test**, live model vs the step-0 reference (``seedprints/z``, the drift curve).
  It fades at ordinary learning rates; fading is reported (``seedprints/birth_detectable``,
  one warning), not treated as identity loss;
* the **custody link**, live model vs the last probe whose own link held, the anchor
  (``seedprints/link_z`` vs ``seedprints/link_threshold``). A failed link never becomes the
  anchor, so a swapped-in model keeps failing against the last good probe.

Both are judged against fresh-init negative controls (:mod:`.controls`). The verdict that
drives the action (``seedprints/related``) is chosen by ``fail_on``: the link (default), the
birth test, or either. After ``patience`` consecutive failed probes the callback warns,
stops the run or raises.

Reference resolution (in ``on_train_start``), first match wins:

1. ``reference=`` given (a parent's :class:`~seedprints_lightning.Fingerprint` or its file);
2. the callback state restored from the checkpoint (or kept in memory by this instance);
3. ``trainer.global_step == 0``: a new reference is taken from the current (init) weights;
4. otherwise a clear error: a reference is never silently taken from trained weights.

Resume: the checkpoint state holds the reference, the controls, the anchor's features, the
schedule and the ledger's position. The first thing a resumed run does is a probe linking the
loaded weights to the last probe before the save, so resuming the wrong weights breaks the
chain at train start. The same happens when a parent's ``reference=`` is given.

Files (rank 0, under ``save_dir``, default ``<trainer.log_dir or default_root_dir>/seedprints``):
``reference.safetensors``, ``controls.safetensors`` and the custody ledger ``custody.jsonl``
with one features file per probe under ``probes/`` (:mod:`.custody`), which
``seedprints audit --chain`` re-verifies offline. ``fast_dev_run`` writes no file.

Distributed: each rank probes its slice of the samples (every rank runs the same number of
forwards: a collective under sharded strategies) and the slices are all-gathered in sample
order, then broadcast from rank 0, so every rank tests the same numbers, takes the same
decision and follows the same schedule. Under FSDP, DeepSpeed and ModelParallel (recognised
by type) the probe goes through the root wrapper so that parameters are gathered.

Zero observer effect: probes and control builds run under
:func:`~seedprints_lightning.controls.preserve_rng_state`, ``torch.no_grad()`` and restored
module modes; the optimizer and the data are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ._lightning import CALLBACK_BASES, is_tensorboard_logger, shards_parameters, trainer_fn_value
from .checks import check_bool, check_choice, check_int, check_number
from .controls import DEFAULT_NUM_CONTROLS, control_seeds, preserve_rng_state, probe_control_models, save_controls
from .custody import CONTROLS_FILE, REFERENCE_FILE, CustodyLedger, last_held_probe, save_parent_anchor, storage_features
from .errors import FingerprintFileError, IdentityLostError, InputError, ModelNotFoundError
from .files import file_sha256
from .fingerprint import Fingerprint, config_digest
from .probes import ProbeBatch, ProbeSpec, _hidden_size, extract_features, find_causal_lm
from .schedule import DEFAULT_ADAPT_HEADROOM, ProbeSchedule
from .verdict import (
    CUSTOM_SCALARS_LAYOUT,
    DEFAULT_BIRTH_Z_MARGIN,
    DEFAULT_LINK_TAU_MARGIN,
    DEFAULT_LINK_Z_MARGIN,
    FAIL_ON,
    METRIC_NAMES,
    METRIC_TAGS,
    ProbeVerdict,
    VerdictRule,
    judge_probe,
)

__all__ = ["IdentityWarning", "SeedPrintsCallback", "METRIC_TAGS", "STATE_FORMAT_VERSION"]

#: Version of :meth:`SeedPrintsCallback.state_dict`'s layout (2: custody chain).
STATE_FORMAT_VERSION = 2

_ACTIONS = ("warn", "stop", "raise")


class IdentityWarning(UserWarning):
    """Warned (rank 0) when the run's identity is lost with ``on_identity_lost="warn"``, when the
    birth test stops being detectable, or when a probe is undetermined."""


def _parent_chain(run_dir: Path) -> tuple[Fingerprint, tuple[torch.Tensor, int]]:
    """A parent run's birth fingerprint and its last held probe, after re-verifying its ledger."""
    from .custody import verify_chain

    audit = verify_chain(run_dir)
    if not audit.ok:
        first = audit.problems[0].message if audit.problems else "no record"
        raise InputError(
            f"reference={str(run_dir)!r}: the parent run's custody chain does not verify ({first}); a child run can "
            "only continue an intact chain. Pass the parent's fingerprint file instead to start a new chain from it"
        )
    features, step = last_held_probe(audit)
    return Fingerprint.load(audit.run_dir / REFERENCE_FILE), (features, step)


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
        patience: consecutive failed probes before acting. Undetermined probes neither count
            as failures nor reset the count; a held verdict resets it.
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
            z and in ``tau_mean`` (effect size). See :mod:`seedprints_lightning.verdict`.
        adaptive_schedule: dense probes at the start and closer probes when a link weakens
            (:class:`~seedprints_lightning.schedule.ProbeSchedule`); ``False`` probes every
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
            :func:`~seedprints_lightning.controls.save_controls`): loaded instead of building the
            controls inside the run, so no rank ever holds an unsharded copy of the model. It must
            match the run's probe spec and, when it records one, the model's config digest; its
            control count replaces ``num_controls``.
        save_dir: where the fingerprint files and the custody ledger go.
        probe_batch_size: probe samples per forward.
        identity_ratio, identity_mode: forwarded to :func:`~seedprints_lightning.lineage_test`
            for the birth test (links always use ``"coset"``).

    Attributes:
        history: one plain dict per probe (``step``, ``event``, the logged metrics under short
            names, ``related``, ``birth_detectable``, ``anchor_step``, ``control_z``,
            ``reason``, ``consecutive_failures``, ``next_step``).
        last_verdict: the latest :class:`~seedprints_lightning.verdict.ProbeVerdict`.
        reference, reference_source (``"explicit"``, ``"checkpoint"`` or ``"step0"``).

    Logged (every logger, and ``trainer.callback_metrics``): :data:`METRIC_TAGS`, never NaN.
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
    ) -> None:
        super().__init__()
        check_int("every_n_steps", every_n_steps, low=1, hint="optimizer steps between probes")
        if probe is not None and not isinstance(probe, ProbeSpec):
            raise InputError(f"probe must be a seedprints_lightning.ProbeSpec or None, got {type(probe).__name__}")
        check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True, hint="e.g. 0.01")
        check_int("patience", patience, low=1, hint="consecutive failed probes before acting")
        check_choice("on_identity_lost", on_identity_lost, _ACTIONS)
        check_choice("fail_on", fail_on, FAIL_ON)
        check_int("num_controls", num_controls, low=0, high=64, hint="0 turns controls off")
        check_bool("adaptive_schedule", adaptive_schedule)
        if feature_fn is not None and not callable(feature_fn):
            raise InputError(f"feature_fn must be callable as feature_fn(module, batch) -> [b, D], got "
                             f"{type(feature_fn).__name__}")
        if control_factory is not None and not callable(control_factory):
            raise InputError(f"control_factory must be callable as control_factory(seed) -> nn.Module, got "
                             f"{type(control_factory).__name__}")
        self._controls_file: tuple[torch.Tensor, tuple[int, ...], ProbeSpec, dict[str, Any], str] | None = None
        if controls is not None:
            if not isinstance(controls, (str, os.PathLike)):
                raise InputError(f"controls must be the path of a controls file or None, got {type(controls).__name__}")
            from .controls import load_controls_with_meta

            self._controls_file = (*load_controls_with_meta(controls), os.fspath(controls))
            num_controls = int(self._controls_file[0].shape[0])
        if feature_fn is not None and num_controls > 0 and control_factory is None and controls is None:
            raise InputError(
                "num_controls > 0 with a feature_fn needs control_factory(seed) -> a fresh init of your model (the "
                "callback cannot rebuild a model it does not know); pass control_factory=..., or num_controls=0 to "
                "judge by the analytic threshold and the effect-size margin alone"
            )
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise InputError(f"save_dir must be a path (str or os.PathLike) or None, got {type(save_dir).__name__}")
        check_int("probe_batch_size", probe_batch_size, low=1)
        if identity_ratio is not None:
            check_number("identity_ratio", identity_ratio, low=0.0, high=1.0, low_open=True,
                         hint="a fraction; None, the default, is all dimensions")
        check_choice("identity_mode", identity_mode, ("coset", "base"))
        # VerdictRule validates the margins with the argument's name in the message.
        try:
            self.birth_rule = VerdictRule(alpha=float(alpha), z_margin=birth_z_margin, tau_margin=0.0)
        except InputError as exc:
            raise InputError(f"birth_{exc}") from None
        try:
            self.custody_rule = VerdictRule(alpha=float(alpha), z_margin=link_z_margin, tau_margin=link_tau_margin)
        except InputError as exc:
            raise InputError(f"link_{exc}") from None

        explicit: Fingerprint | None = None
        parent_anchor: tuple[torch.Tensor, int] | None = None
        self._reference_origin: str | None = None
        if reference is not None:
            if isinstance(reference, Fingerprint):
                explicit = reference
                self._reference_origin = "the Fingerprint passed as reference="
            elif isinstance(reference, (str, os.PathLike)) and Path(reference).is_dir():
                explicit, parent_anchor = _parent_chain(Path(reference))
                self._reference_origin = f"reference={os.fspath(reference)!r} (the parent run's birth fingerprint)"
            elif isinstance(reference, (str, os.PathLike)):
                explicit = Fingerprint.load(reference)  # raises FingerprintFileError with the path
                self._reference_origin = f"reference={os.fspath(reference)!r}"
            else:
                raise InputError(
                    f"reference must be a Fingerprint, a path to a fingerprint file, or None, got "
                    f"{type(reference).__name__}"
                )
            if probe is not None and probe != explicit.spec:
                raise InputError(
                    f"probe={probe} differs from the reference's spec ({explicit.spec.describe()}); the reference's "
                    "inputs must be used, so leave probe=None when you pass reference="
                )

        self.every_n_steps = int(every_n_steps)
        self.schedule = ProbeSchedule(every_n_steps=self.every_n_steps, adaptive=adaptive_schedule,
                                      adapt_headroom=DEFAULT_ADAPT_HEADROOM)
        self.probe = probe
        self.alpha = float(alpha)
        self.patience = int(patience)
        self.on_identity_lost = on_identity_lost
        self.fail_on = fail_on
        self.num_controls = int(num_controls)
        self.feature_fn = feature_fn
        self.control_factory = control_factory
        self.probe_batch_size = int(probe_batch_size)
        self.identity_ratio = None if identity_ratio is None else float(identity_ratio)
        self.identity_mode = identity_mode
        self._save_dir_arg = None if save_dir is None else Path(save_dir)
        self._explicit = explicit is not None

        self.reference: Fingerprint | None = explicit
        self.reference_source: str | None = "explicit" if explicit is not None else None
        self.control_features: torch.Tensor | None = None
        self.control_seeds: tuple[int, ...] = ()
        self.control_spec: ProbeSpec | None = None
        # The custody chain: the last held probe's features (None = the reference itself). A
        # parent run's directory as reference= starts the chain at the parent's last held probe.
        self._parent_anchor = parent_anchor
        self.anchor_features: torch.Tensor | None = None if parent_anchor is None else parent_anchor[0]
        self.anchor_step: int | None = None if parent_anchor is None else parent_anchor[1]
        self.anchor_index: int | None = None
        self.next_probe_step, self.interval = self.schedule.first()
        self.last_probed_step: int = -1
        self.consecutive_failures: int = 0
        self.history: list[dict[str, Any]] = []
        self.last_verdict: ProbeVerdict | None = None
        self.save_dir: Path | None = None
        self.ledger: CustodyLedger | None = None
        self._ledger_state: tuple[int, str | None] = (0, None)
        self._reference_sha: str | None = None
        self._controls_sha: str | None = None
        self._initial_anchor_sha: str | None = None
        self._restored = False
        self._warned_undetermined = False
        self._warned_birth = False
        self._layout_written: set[int] = set()

    # ------------------------------------------------------------------ Lightning API
    @property
    def state_key(self) -> str:
        return "SeedPrintsCallback"

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and plain types only (loads with ``torch.load(weights_only=True)``); never empty."""
        ref = self.reference
        ledger = self.ledger
        ledger_index, ledger_sha = (ledger.next_index, ledger.last_sha256) if ledger else self._ledger_state
        return {
            "format_version": STATE_FORMAT_VERSION,
            "reference_features": None if ref is None else ref.features.detach().cpu().clone(),
            "reference_meta": None if ref is None else ref.metadata(),
            "reference_source": self.reference_source,
            "control_features": None if self.control_features is None else self.control_features.detach().cpu().clone(),
            "control_seeds": [int(s) for s in self.control_seeds],
            "control_spec": None if self.control_spec is None else self.control_spec.to_dict(),
            "anchor_features": None if self.anchor_features is None else self.anchor_features.clone(),
            "anchor_step": self.anchor_step,
            "anchor_index": self.anchor_index,
            "next_probe_step": int(self.next_probe_step),
            "interval": int(self.interval),
            "ledger_next_index": int(ledger_index),
            "ledger_last_sha256": ledger_sha,
            "last_probed_step": int(self.last_probed_step),
            "consecutive_failures": int(self.consecutive_failures),
            "warned_undetermined": bool(self._warned_undetermined),
            "warned_birth": bool(self._warned_birth),
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= STATE_FORMAT_VERSION:
            raise InputError(
                f"the checkpoint's SeedPrintsCallback state has format version {version!r}; this "
                f"seedprints-lightning reads versions 1 to {STATE_FORMAT_VERSION}: upgrade the package"
            )
        features, meta = state_dict.get("reference_features"), state_dict.get("reference_meta")
        if features is not None and meta is not None and not self._explicit:
            self.reference = Fingerprint.from_metadata(features, meta)
            self.reference_source = "checkpoint"
        controls = state_dict.get("control_features")
        spec = state_dict.get("control_spec")
        self.control_features = None if controls is None else controls
        self.control_seeds = tuple(int(s) for s in state_dict.get("control_seeds", ()))
        self.control_spec = None if spec is None else ProbeSpec.from_dict(spec)
        self.last_probed_step = int(state_dict.get("last_probed_step", -1))
        self.consecutive_failures = int(state_dict.get("consecutive_failures", 0))
        self._warned_undetermined = bool(state_dict.get("warned_undetermined", False))
        self._warned_birth = bool(state_dict.get("warned_birth", False))
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        # Version 1 had no chain: its last probe is unknown, so the chain restarts at the reference.
        self.anchor_features = state_dict.get("anchor_features")
        self.anchor_step = state_dict.get("anchor_step")
        self.anchor_index = state_dict.get("anchor_index")
        if "next_probe_step" in state_dict:
            self.next_probe_step, self.interval = int(state_dict["next_probe_step"]), int(state_dict["interval"])
        else:
            self.next_probe_step = self.last_probed_step + self.every_n_steps
            self.interval = self.every_n_steps
        self._ledger_state = (int(state_dict.get("ledger_next_index", 0)), state_dict.get("ledger_last_sha256"))
        self._restored = True

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Checked here, not in setup(): a model built in configure_model() exists only now.
        lm = None
        if self.feature_fn is None:
            lm = find_causal_lm(pl_module)  # ModelNotFoundError names the fix
        else:
            with contextlib.suppress(ModelNotFoundError):
                lm = find_causal_lm(pl_module)
            spec = self.reference.spec if self.reference is not None else (self.probe or ProbeSpec())
            if lm is None and not spec.is_resolved:
                raise InputError(
                    "with feature_fn and no transformers model in the LightningModule the probe cannot be resolved "
                    "from a config: pass a resolved probe, e.g. ProbeSpec(kind='token', vocab_size=V) or "
                    "ProbeSpec(kind='embedding', hidden_size=d, embed_mean=m, embed_std=s)"
                )
        if lm is not None and self.reference is not None:
            self._check_compatible(lm, self.reference)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer_fn_value(trainer) != "fit" or getattr(trainer, "sanity_checking", False):
            return
        self.save_dir = self._resolve_save_dir(trainer)
        step = int(trainer.global_step)
        fresh = False
        if self.reference is None:
            if step != 0:
                raise InputError(
                    f"SeedPrintsCallback has no reference at global_step={step}: the checkpoint has no "
                    f"SeedPrintsCallback state (state_key {self.state_key!r}), so the run's step-0 reference is "
                    "unknown and will not be taken from trained weights. Pass "
                    f"reference=<run>/seedprints/{REFERENCE_FILE} (e.g. "
                    f"{self.save_dir / REFERENCE_FILE if self.save_dir else 'the run directory'}) or resume from a "
                    "checkpoint saved with the callback"
                )
            self.reference = self._take_reference(trainer, pl_module, step)
            self.reference_source = "step0"
            self.last_probed_step = step
            self.anchor_features, self.anchor_step, self.anchor_index = None, None, None
            self.next_probe_step, self.interval = self.schedule.first()
            self.next_probe_step += step
            self.ledger, self._ledger_state = None, (0, None)
            fresh = True
        self._sync_reference_file(trainer, fresh)
        self._ensure_controls(trainer, pl_module)
        self._open_ledger(trainer)
        self._write_layout(trainer)
        if not fresh:
            # A parent's reference, or a resume: link the loaded weights to the chain at once.
            self._probe(trainer, pl_module, "resume" if self._restored else "train_start")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer_fn_value(trainer) != "fit" or getattr(trainer, "sanity_checking", False) or self.reference is None:
            return
        step = int(trainer.global_step)
        # global_step counts optimizer steps: under accumulation this hook fires on every
        # micro-batch with the same step, hence the last_probed_step guard.
        if step >= self.next_probe_step and step != self.last_probed_step:
            self._probe(trainer, pl_module, "interval")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer_fn_value(trainer) != "fit" or self.reference is None:
            return
        if int(trainer.global_step) != self.last_probed_step:
            self._probe(trainer, pl_module, "train_end")

    # ------------------------------------------------------------------ set-up
    def _check_compatible(self, lm: nn.Module, reference: Fingerprint) -> None:
        hidden = _hidden_size(lm.config)
        if reference.hidden_size != hidden:
            raise InputError(
                f"the reference fingerprint has D={reference.hidden_size} features but the model's hidden size is "
                f"{hidden}: the lineage test compares coordinates one to one, so the reference must come from a "
                "model of this width"
            )
        spec = reference.spec
        if spec.kind == "token" and spec.vocab_size > int(lm.config.vocab_size):
            raise InputError(
                f"the reference's token probes use vocab_size={spec.vocab_size} but the model's vocabulary has "
                f"{lm.config.vocab_size} tokens; re-fingerprint the parent with vocab_size <= {lm.config.vocab_size}"
            )

    def _resolve_save_dir(self, trainer: Any) -> Path:
        if self._save_dir_arg is not None:
            return self._save_dir_arg
        base = trainer.log_dir  # a collective under DDP: every rank gets here
        return Path(base if base else trainer.default_root_dir) / "seedprints"

    @staticmethod
    def _writes_files(trainer: Any) -> bool:
        return not getattr(trainer, "fast_dev_run", False)

    def _run_model_code(self, trainer: Any, pl_module: Any, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (probe forwards) so that parameters are usable on every strategy.

        Sharded strategies: route the LightningModule's ``forward`` to ``fn`` and call the root
        wrapper, which gathers the sharded parameters around it. Everything else (DDP
        included: its wrapper's forward is a collective that routes to ``training_step``):
        call ``fn`` directly.
        """
        wrapper = getattr(trainer.strategy, "model", None)
        with preserve_rng_state(), trainer.precision_plugin.forward_context():
            if not shards_parameters(trainer.strategy) or wrapper is None or wrapper is pl_module:
                return fn()
            result: dict[str, Any] = {}
            had_own = "forward" in pl_module.__dict__
            previous = pl_module.__dict__.get("forward")

            def routed(*args: Any, **kwargs: Any) -> torch.Tensor:
                result["value"] = fn()
                return torch.zeros((), device=pl_module.device)

            pl_module.forward = routed
            try:
                with torch.no_grad():
                    wrapper()
            finally:
                if had_own:
                    pl_module.forward = previous
                else:
                    del pl_module.forward
            return result["value"]

    def _features_of(self, module: nn.Module, spec: ProbeSpec,
                     sample_range: tuple[int, int] | None = None) -> torch.Tensor:
        if self.feature_fn is not None:
            feature_fn = self.feature_fn
            return extract_features(module, spec, batch_size=self.probe_batch_size, sample_range=sample_range,
                                    forward_fn=lambda batch: feature_fn(module, batch))
        return extract_features(find_causal_lm(module), spec, batch_size=self.probe_batch_size,
                                sample_range=sample_range)

    def _measure(self, trainer: Any, pl_module: Any, spec: ProbeSpec) -> torch.Tensor:
        """The live model's ``[n, D]`` features, identical on every rank.

        With several ranks each probes its own slice of the samples and the slices are
        all-gathered in sample order, so more ranks make a probe faster. Every rank runs the
        same number of forwards (under FSDP a forward is a collective): the samples are padded
        to a multiple of the world size with further samples of the same probe seed, which are
        dropped after the gather. Rank 0's result is then broadcast, so every rank tests the same
        numbers whatever the collective's arithmetic.
        """
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world == 1:
            return self._run_model_code(trainer, pl_module, lambda: self._features_of(pl_module, spec))
        n = spec.num_samples
        per_rank = math.ceil(n / world)
        padded = dataclasses.replace(spec, num_samples=per_rank * world)
        start = int(trainer.global_rank) * per_rank

        mine = self._run_model_code(
            trainer, pl_module, lambda: self._features_of(pl_module, padded, (start, start + per_rank)))
        device = getattr(trainer.strategy, "root_device", mine.device)
        gathered = trainer.strategy.all_gather(mine.to(device))  # [world, per_rank, D]
        features = gathered.reshape(world * per_rank, -1)[:n].to("cpu")
        return trainer.strategy.broadcast(features, src=0)

    def _take_reference(self, trainer: Any, pl_module: Any, step: int) -> Fingerprint:
        spec = self.probe or ProbeSpec()
        lm = None
        with contextlib.suppress(ModelNotFoundError):
            lm = find_causal_lm(pl_module)
        if not spec.is_resolved:
            if lm is None:  # on_fit_start() already refused this; keep a clear message anyway
                raise InputError("the probe spec is not resolved and the module holds no transformers model")
            base_spec = spec
            spec = self._run_model_code(trainer, pl_module, lambda: base_spec.resolve(lm))
        spec = trainer.strategy.broadcast(spec, src=0)
        return Fingerprint(
            features=self._measure(trainer, pl_module, spec), spec=spec,
            model_class=type(lm).__name__ if lm is not None else type(pl_module).__name__,
            config_digest=config_digest(lm.config) if lm is not None else None, step=step,
            extra={"source": "SeedPrintsCallback step-0 reference"},
        )

    def _control_factory(self, pl_module: Any) -> Callable[[int], nn.Module]:
        if self.control_factory is not None:
            return self.control_factory
        from .controls import build_control_model

        return lambda seed: build_control_model(pl_module, seed)

    def _ensure_controls(self, trainer: Any, pl_module: Any) -> None:
        seeds = control_seeds(self.num_controls)
        spec = self.reference.spec
        if not seeds:
            self.control_features, self.control_seeds, self.control_spec = None, (), None
            return
        restored = (self.control_features is not None and self.control_seeds == seeds and self.control_spec == spec
                    and self.control_features.shape[1:] == self.reference.features.shape)
        if not restored and self._controls_file is not None:
            self._use_controls_file(pl_module, spec)
            restored = True
        if not restored:
            features = probe_control_models(
                self._control_factory(pl_module), seeds, lambda control: self._features_of(control, spec),
                device=pl_module.device, context=trainer.precision_plugin.forward_context,
                log=self._progress(trainer),
            )
            self.control_features = trainer.strategy.broadcast(features, src=0)
            self.control_seeds, self.control_spec = seeds, spec
        if self._writes_files(trainer) and trainer.is_global_zero:
            path = self.save_dir / CONTROLS_FILE
            if not restored or not path.exists():
                lm = None
                with contextlib.suppress(ModelNotFoundError):
                    lm = find_causal_lm(pl_module)
                extra = {"model_class": type(lm if lm is not None else pl_module).__name__,
                         "config_digest": config_digest(lm.config) if lm is not None else None}
                save_controls(path, self.control_features, seeds, spec, extra=extra)

    def _use_controls_file(self, pl_module: Any, spec: ProbeSpec) -> None:
        features, seeds, file_spec, extra, path = self._controls_file
        if file_spec != spec:
            raise InputError(
                f"the controls file {path} was made on another probe ({file_spec.describe()}) than this run's "
                f"reference ({spec.describe()}); re-create it with `seedprints controls ... --spec-from "
                "<reference.safetensors>`"
            )
        lm = None
        with contextlib.suppress(ModelNotFoundError):
            lm = find_causal_lm(pl_module)
        digest = extra.get("config_digest")
        if lm is not None and digest is not None and digest != config_digest(lm.config):
            raise InputError(
                f"the controls file {path} was made from another model config (digest {digest[:12]}...) than this "
                f"run's model ({config_digest(lm.config)[:12]}...): controls must be fresh inits of the SAME config"
            )
        self.control_features, self.control_seeds, self.control_spec = features.float(), tuple(seeds), spec

    @staticmethod
    def _progress(trainer: Any) -> Callable[[str], None]:
        def log(message: str) -> None:
            if trainer.is_global_zero:
                print(f"[seedprints] {message}", flush=True)
        return log

    def _sync_reference_file(self, trainer: Any, fresh: bool) -> None:
        """Write ``reference.safetensors`` (rank 0); refuse a different reference for this directory."""
        if not self._writes_files(trainer):
            return
        error: str | None = None
        if trainer.is_global_zero:
            path = self.save_dir / REFERENCE_FILE
            ref = self.reference
            existing = None
            if path.exists():
                try:
                    existing = Fingerprint.load(path)
                except FingerprintFileError as exc:
                    if not fresh:
                        error = f"{exc}; move it away or pass save_dir=<another directory>"
            same = existing is not None and existing.spec == ref.spec and torch.equal(existing.features, ref.features)
            if error is None and existing is not None and not same:
                if fresh:
                    self._warn(trainer, f"SeedPrints: replacing {path} (another run's reference, taken at step "
                                        f"{existing.step}) with this run's new step-0 reference; its custody "
                                        "ledger starts anew")
                else:
                    origin = self._reference_origin if self.reference_source == "explicit" else (
                        f"the SeedPrintsCallback state in checkpoint {getattr(trainer, 'ckpt_path', None)!r}")
                    error = (
                        f"the reference from {origin} (step {ref.step}, created {ref.created}) differs from {path} "
                        f"(step {existing.step}, created {existing.created}), the reference of the run that owns "
                        "this directory: another run's checkpoint or reference is being used in this run's "
                        "directory. Resume this run from its own checkpoint, or log to another directory "
                        "(save_dir=...)"
                    )
            if error is None and not same:
                ref.save(path)
            if error is None:
                self._reference_sha = file_sha256(path)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise InputError(error)

    def _open_ledger(self, trainer: Any) -> None:
        """Start the custody ledger (a new reference) or continue it where the checkpoint left it (rank 0)."""
        if not self._writes_files(trainer) or not trainer.is_global_zero:
            return
        if self.control_features is not None:
            self._controls_sha = file_sha256(self.save_dir / CONTROLS_FILE)
        ledger = CustodyLedger(self.save_dir)
        next_index, last_sha = self._ledger_state
        if self.ledger is not None:  # the same instance fits again: continue its chain
            next_index, last_sha = self.ledger.next_index, self.ledger.last_sha256
        if self._parent_anchor is not None:
            path = save_parent_anchor(self.save_dir, *self._parent_anchor)
            self._initial_anchor_sha = file_sha256(path)
        new_chain = last_sha is None or next_index == 0
        if new_chain:  # rooted in the reference file; an earlier run's records in this directory move aside
            next_index, last_sha = 0, self._reference_sha
        moved = ledger.rewind_to(last_sha, next_index)
        if moved is not None and new_chain:
            self._warn(trainer, f"SeedPrints: a new chain starts in {ledger.path}; the previous records were moved "
                                f"to {moved}")
        elif moved is not None:
            self._warn(trainer, f"SeedPrints: resumed from a checkpoint older than the last probe; the ledger's "
                                f"records after it (an abandoned branch of the run) were moved to {moved}")
        self.ledger = ledger

    # ------------------------------------------------------------------ a probe: measure -> decide -> record -> act
    def _probe(self, trainer: Any, pl_module: Any, event: str) -> ProbeVerdict:
        start = time.perf_counter()
        step = int(trainer.global_step)
        ref = self.reference
        live = self._measure(trainer, pl_module, ref.spec)
        if live.shape != ref.features.shape:
            raise InputError(
                f"the probe returned features of shape {tuple(live.shape)} but the reference has "
                f"{tuple(ref.features.shape)}: the model (or feature_fn) no longer matches the reference"
            )
        stored = storage_features(live)
        live = stored.float()
        anchor = self.anchor_features.float() if self.anchor_features is not None else ref.features
        verdict = judge_probe(
            step, live, reference=ref.features, anchor=anchor,
            anchor_step=self.anchor_step if self.anchor_step is not None else int(ref.step or 0),
            controls=() if self.control_features is None else list(self.control_features),
            birth_rule=self.birth_rule, custody_rule=self.custody_rule, fail_on=self.fail_on,
            identity_mode=self.identity_mode, identity_ratio=self.identity_ratio,
        )
        seconds = time.perf_counter() - start
        self._record(trainer, verdict, stored, event, seconds)
        if verdict.link.related is True:
            self.anchor_features, self.anchor_step = stored, step
            self.anchor_index = self.history[-1].get("record_index")
        self.last_probed_step = step
        self.last_verdict = verdict
        self.next_probe_step, self.interval = self.schedule.after(step, self.interval, verdict.link.related,
                                                                  verdict.link.headroom)
        self.history[-1]["next_step"] = int(self.next_probe_step)
        self._act(trainer, verdict, step)
        return verdict

    def _record(self, trainer: Any, verdict: ProbeVerdict, stored: torch.Tensor, event: str, seconds: float) -> None:
        metrics = verdict.to_metrics(seconds)
        self._log(trainer, metrics, verdict.step)
        entry: dict[str, Any] = {"step": verdict.step, "event": event}
        entry.update({name: metrics[tag] for name, tag in zip(METRIC_NAMES, METRIC_TAGS)})
        entry.update({"related": verdict.related, "birth_detectable": verdict.birth_detectable,
                      "link_related": verdict.link.related, "anchor_step": verdict.anchor_step,
                      "control_z": [float(z) for z in verdict.birth.control_z], "reason": verdict.reason})
        if self.ledger is not None:
            record = self.ledger.append(
                verdict, stored, event=event, anchor_index=self.anchor_index, reference_sha256=self._reference_sha,
                controls_sha256=self._controls_sha, identity_mode=self.identity_mode,
                identity_ratio=self.identity_ratio,
                initial_anchor_sha256=self._initial_anchor_sha)
            entry["record_index"] = record["index"]
        # Rank 0 writes the ledger; every rank keeps the same anchor index.
        entry["record_index"] = trainer.strategy.broadcast(entry.get("record_index"), src=0)
        self.history.append(entry)

    def _act(self, trainer: Any, verdict: ProbeVerdict, step: int) -> None:
        # Reduced over ranks so that every rank updates the same counter and acts alike.
        failed = bool(trainer.strategy.reduce_boolean_decision(verdict.related is False, all=False))
        kept = bool(trainer.strategy.reduce_boolean_decision(verdict.related is True, all=True))
        if failed:
            self.consecutive_failures += 1
        elif kept:
            self.consecutive_failures = 0
        self.history[-1]["consecutive_failures"] = int(self.consecutive_failures)
        if verdict.related is None and not failed and not self._warned_undetermined:
            self._warned_undetermined = True
            self._warn(trainer, f"SeedPrints: the lineage probe at step {step} is undetermined ({verdict.reason}); "
                                "it counts neither as a failure nor as a success. Further undetermined probes are "
                                "not reported")
        if (self.fail_on == "custody" and verdict.birth.related is False and verdict.link.related
                and not self._warned_birth):
            self._warned_birth = True
            self._warn(trainer, (
                f"SeedPrints: the birth test is no longer detectable at step {step} (z={verdict.birth.z:.2f}, "
                f"threshold {verdict.birth.threshold:.2f}): training has moved the weights far from their init, as "
                "it does at ordinary learning rates. This is NOT identity loss: the custody chain holds (link z="
                f"{verdict.link.z:.2f} from step {verdict.anchor_step}). To keep the birth test itself detectable, "
                "probe with more samples (ProbeSpec(num_samples=4000 or more): z grows like sqrt(n)) or the other "
                "probe kind; pass fail_on='birth' or 'either' if your audit needs it to hold."))
        if failed and self.consecutive_failures >= self.patience:
            self._identity_lost(trainer, verdict, step)

    def _identity_lost(self, trainer: Any, verdict: ProbeVerdict, step: int) -> None:
        link, birth = verdict.link, verdict.birth
        controls = ", ".join(f"{z:.2f}" for z in birth.control_z) or "none"
        reason = f" {verdict.reason.rstrip('.')}." if verdict.reason else ""
        message = (
            f"SeedPrints: the run lost its lineage identity at step {step} ({self.consecutive_failures} "
            f"consecutive failed probes, patience {self.patience}, fail_on={self.fail_on!r}): custody link from "
            f"step {verdict.anchor_step} z={link.z:.2f} (threshold {link.threshold:.2f}), birth z={birth.z:.2f} "
            f"(threshold {birth.threshold:.2f}), controls z [{controls}].{reason} The weights do not descend from "
            f"the run's last good probe (reference: {self.reference_source}, step {self.reference.step}): check "
            "for a swapped or wrongly loaded checkpoint."
        )
        if self.on_identity_lost == "raise":
            raise IdentityLostError(message)
        if self.on_identity_lost == "stop":
            trainer.should_stop = True
            message += " Stopping the run (on_identity_lost='stop')."
        self._warn(trainer, message)

    # ------------------------------------------------------------------ logging
    @staticmethod
    def _warn(trainer: Any, message: str) -> None:
        if trainer.is_global_zero:
            warnings.warn(message, IdentityWarning, stacklevel=3)

    def _log(self, trainer: Any, metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        callback_metrics = trainer.callback_metrics
        for tag, value in metrics.items():
            callback_metrics[tag] = torch.tensor(float(value))

    def _write_layout(self, trainer: Any) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not is_tensorboard_logger(logger):
                continue
            writer = logger.experiment
            if id(writer) in self._layout_written or not hasattr(writer, "add_custom_scalars"):
                continue
            writer.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)
            self._layout_written.add(id(writer))
