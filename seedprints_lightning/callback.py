"""``SeedPrintsCallback``: a birth certificate for a Lightning pretraining run.

At step 0 the callback probes the model (the run's init, its "birth") and keeps the features
as the run's reference; every ``every_n_steps`` optimizer steps it probes again and tests the
live model against the reference (:func:`~seedprints_lightning.stats.lineage_test`) and
against a few fresh-init negative controls (:mod:`~seedprints_lightning.controls`). If the
run stops being of its own lineage for ``patience`` consecutive probes (weights swapped,
a wrong checkpoint loaded, a merge gone wrong), it warns, stops the run or raises.

Reference resolution (in ``on_train_start``), first match wins:

1. ``reference=`` given (a parent's :class:`~seedprints_lightning.Fingerprint` or its file);
2. the callback state restored from the checkpoint (or kept in memory by this instance);
3. ``trainer.global_step == 0``: a new reference is taken from the current (init) weights;
4. otherwise a clear error: a reference is never silently taken from trained weights.

Whenever the reference was not taken from the current weights (cases 1 and 2) and this
step was not probed yet, a probe runs right at train start, so a checkpoint holding another
run's weights is caught before the first training step. Taking the own step-0 reference is
not logged as a probe (the model against itself has no information).

Files (rank 0, under ``save_dir``, default ``<trainer.log_dir or default_root_dir>/seedprints``):
``reference.safetensors`` (a fingerprint file, :class:`~seedprints_lightning.Fingerprint`)
and ``controls.safetensors`` (:func:`~seedprints_lightning.controls.save_controls`). Once a
reference file exists, a DIFFERENT reference coming from a checkpoint or from ``reference=``
is an error naming both (another run's checkpoint resumed into this run's directory); a new
step-0 reference (a fresh run in a reused directory) replaces it with a warning.

``fast_dev_run``: Lightning swaps the loggers for dummies and writes nothing; so does this
callback. It still takes the step-0 reference, builds the controls and probes once at
train end (``fast_dev_run`` runs fewer steps than ``every_n_steps``), so the whole code path
is exercised and ``history``/``trainer.callback_metrics`` are filled; no file is written.

Distributed: every rank runs every probe forward (all ``num_samples`` samples: the probe
does not get cheaper with more ranks, but no rank can skip a collective forward). The step-0
reference and the controls are broadcast from rank 0 so every rank holds identical state;
decisions are reduced over ranks; errors found on rank 0 are broadcast and raised on all
ranks. Under DDP the inner model is called directly (the DDP wrapper's forward is a
collective that routes to ``training_step``). Under FSDP and DeepSpeed the probe goes
through the root wrapper ``trainer.strategy.model`` so parameters are gathered: the
LightningModule's ``forward`` is temporarily replaced (an instance attribute) by the probe,
the wrapper is called, and ``forward`` is restored. The FSDP/DeepSpeed path is NOT tested
(those strategies need GPUs and none was available when this was written).

Zero observer effect: every probe and control build runs under
:func:`~seedprints_lightning.controls.preserve_rng_state` (Python, NumPy, torch CPU and CUDA
RNG states restored), with ``torch.no_grad()`` and submodule train/eval flags restored
(:func:`~seedprints_lightning.probes.extract_features`); the optimizer and data loaders are
never touched. A seeded fit ends with bit-identical parameters with or without the callback.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ._lightning import CALLBACK_BASES, is_tensorboard_logger, trainer_fn_value
from .controls import (
    DEFAULT_CONTROL_MARGIN,
    DEFAULT_NUM_CONTROLS,
    IdentityVerdict,
    control_seeds,
    decide_identity,
    preserve_rng_state,
    probe_controls,
    save_controls,
)
from .errors import FingerprintFileError, IdentityLostError, InputError, ModelNotFoundError
from .fingerprint import Fingerprint, config_digest
from .probes import ProbeBatch, ProbeSpec, _hidden_size, extract_features, find_causal_lm
from .stats import LineageResult, lineage_test

__all__ = ["IdentityWarning", "SeedPrintsCallback", "METRIC_TAGS", "STATE_FORMAT_VERSION"]

#: Version of :meth:`SeedPrintsCallback.state_dict`'s layout.
STATE_FORMAT_VERSION = 1

#: Every tag the callback logs, in order.
METRIC_TAGS = (
    "seedprints/z",
    "seedprints/log10_p",
    "seedprints/tau_mean",
    "seedprints/identity_dims",
    "seedprints/related",
    "seedprints/control_z_max",
    "seedprints/control_z_mean",
    "seedprints/threshold",
    "seedprints/probe_seconds",
)

#: TensorBoard custom-scalars layout: the run's z, its controls and the threshold on one chart.
CUSTOM_SCALARS_LAYOUT = {
    "seedprints": {
        "lineage z vs fresh-init controls": [
            "Multiline",
            [r"^seedprints/z$", r"^seedprints/control_z_max$", r"^seedprints/control_z_mean$",
             r"^seedprints/threshold$"],
        ],
    },
}

_ACTIONS = ("warn", "stop", "raise")
_REFERENCE_FILE = "reference.safetensors"
_CONTROLS_FILE = "controls.safetensors"


class IdentityWarning(UserWarning):
    """Warned (rank 0) when the run's identity is lost with ``on_identity_lost="warn"``, or
    when a probe is undetermined."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SeedPrintsCallback(*CALLBACK_BASES):  # type: ignore[misc]
    """Probe the model's SeedPrints lineage during training; act when it is lost.

    Works with both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``. See the
    module docstring for reference resolution, files, ``fast_dev_run`` and distributed
    behaviour.

    Args:
        every_n_steps: optimizer steps (``trainer.global_step``) between probes; gradient
            accumulation does not multiply probes. One more probe runs at train end if the
            last step was not probed.
        probe: the :class:`~seedprints_lightning.ProbeSpec`; ``None`` = ``ProbeSpec()``.
            Unresolved fields are filled from the model at step 0 (embedding probes take
            mean/std from the INIT embedding). Ignored when ``reference`` is given (the
            reference's spec is used; a different ``probe`` is an error).
        alpha: significance level of the one-sided lineage test.
        patience: consecutive failed probes before acting. Undetermined probes neither
            count as failures nor reset the count; a kept identity resets it.
        on_identity_lost: ``"warn"`` (an :class:`IdentityWarning` with the figures, rank 0),
            ``"stop"`` (``trainer.should_stop = True`` on every rank, after reducing the
            decision), ``"raise"`` (:class:`~seedprints_lightning.IdentityLostError` on every
            rank).
        num_controls: fresh-init negative controls (seeds
            :func:`~seedprints_lightning.controls.control_seeds`); 0 turns them off and the
            verdict uses the analytic threshold alone. Needs a transformers model (not
            available with ``feature_fn``).
        control_margin: how far above the largest control z the run's z must be
            (:func:`~seedprints_lightning.decide_identity`).
        reference: a parent's :class:`~seedprints_lightning.Fingerprint` or the path of its
            file; ``None`` = this run's step-0 reference.
        feature_fn: ``feature_fn(pl_module, batch: ProbeBatch) -> [b, D]`` for models that
            are not ``transformers`` PreTrainedModels (batch tensors are on the CPU: move
            them, e.g. ``batch.model_kwargs(pl_module.device)``). ``probe`` must then be
            resolved unless the module also holds a PreTrainedModel.
        save_dir: where fingerprint files go; default
            ``<trainer.log_dir or trainer.default_root_dir>/seedprints``.
        probe_batch_size: probe samples per forward.
        identity_ratio, identity_mode: forwarded to
            :func:`~seedprints_lightning.lineage_test`.

    Attributes:
        history: one plain dict per probe: ``step``, ``event``, the metrics under short
            names (``z``, ``log10_p``, ...), ``control_z`` (list), ``related``
            (True/False/None), ``reason``, ``consecutive_failures``.
        last_verdict: the latest :class:`~seedprints_lightning.IdentityVerdict`.
        reference: the reference :class:`~seedprints_lightning.Fingerprint` in use.
        reference_source: ``"explicit"``, ``"checkpoint"`` (restored state) or ``"step0"``.

    Logged (every logger via ``log_metrics(step=global_step)``, and into
    ``trainer.callback_metrics`` as tensors for ModelCheckpoint/EarlyStopping): the tags in
    :data:`METRIC_TAGS`, never NaN. An undetermined probe logs z = log10_p = 0 and
    related = 0 (related is 1 only for a confirmed lineage). On TensorBoard a custom-scalars
    chart puts z, control_z_max, control_z_mean and threshold together.

    Only one instance per Trainer (its ``state_key`` is fixed, ``"SeedPrintsCallback"``, so
    a resumed run finds its state even if arguments changed). One instance = one run: the
    reference it holds in memory is reused by a later ``fit`` with the same instance.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        probe: ProbeSpec | None = None,
        alpha: float = 0.01,
        patience: int = 2,
        on_identity_lost: str = "warn",
        num_controls: int = DEFAULT_NUM_CONTROLS,
        control_margin: float = DEFAULT_CONTROL_MARGIN,
        reference: Fingerprint | str | os.PathLike | None = None,
        feature_fn: Callable[[nn.Module, ProbeBatch], torch.Tensor] | None = None,
        save_dir: str | os.PathLike | None = None,
        probe_batch_size: int = 64,
        identity_ratio: float | None = None,
        identity_mode: str = "coset",
    ) -> None:
        super().__init__()
        if not _is_int(every_n_steps) or every_n_steps < 1:
            raise InputError(f"every_n_steps must be an integer >= 1 (optimizer steps between probes), got {every_n_steps!r}")
        if probe is not None and not isinstance(probe, ProbeSpec):
            raise InputError(f"probe must be a seedprints_lightning.ProbeSpec or None, got {type(probe).__name__}")
        if not _is_number(alpha) or not (0.0 < float(alpha) < 1.0) or not math.isfinite(alpha):
            raise InputError(f"alpha must be a number in (0, 1), e.g. 0.01, got {alpha!r}")
        if not _is_int(patience) or patience < 1:
            raise InputError(f"patience must be an integer >= 1 (consecutive failed probes before acting), got {patience!r}")
        if on_identity_lost not in _ACTIONS:
            raise InputError(f"on_identity_lost must be one of {', '.join(map(repr, _ACTIONS))}, got {on_identity_lost!r}")
        if not _is_int(num_controls) or not (0 <= num_controls <= 64):
            raise InputError(f"num_controls must be an integer in [0, 64] (0 turns controls off), got {num_controls!r}")
        if not _is_number(control_margin) or not math.isfinite(control_margin) or control_margin < 0:
            raise InputError(f"control_margin must be a finite number >= 0 (z units), got {control_margin!r}")
        if feature_fn is not None and not callable(feature_fn):
            raise InputError(f"feature_fn must be callable as feature_fn(pl_module, batch) -> [b, D], got {type(feature_fn).__name__}")
        if feature_fn is not None and num_controls > 0:
            raise InputError(
                "num_controls > 0 needs a transformers model to re-initialise, and a control cannot go through a custom "
                "feature_fn: pass num_controls=0 with feature_fn (the verdict then uses the analytic threshold alone)"
            )
        if save_dir is not None and not isinstance(save_dir, (str, os.PathLike)):
            raise InputError(f"save_dir must be a path (str or os.PathLike) or None, got {type(save_dir).__name__}")
        if not _is_int(probe_batch_size) or probe_batch_size < 1:
            raise InputError(f"probe_batch_size must be an integer >= 1, got {probe_batch_size!r}")
        if identity_ratio is not None and (not _is_number(identity_ratio) or not (0.0 < float(identity_ratio) <= 1.0)):
            raise InputError(f"identity_ratio must be a fraction in (0, 1] or None (the default, all dimensions), got {identity_ratio!r}")
        if identity_mode not in ("coset", "base"):
            raise InputError(f"identity_mode must be 'coset' or 'base', got {identity_mode!r}")

        explicit: Fingerprint | None = None
        self._reference_origin: str | None = None
        if reference is not None:
            if isinstance(reference, Fingerprint):
                explicit = reference
                self._reference_origin = "the Fingerprint passed as reference="
            elif isinstance(reference, (str, os.PathLike)):
                explicit = Fingerprint.load(reference)  # raises FingerprintFileError with the path
                self._reference_origin = f"reference={os.fspath(reference)!r}"
            else:
                raise InputError(
                    f"reference must be a Fingerprint, a path to a fingerprint file, or None, got {type(reference).__name__}"
                )
            if probe is not None and probe != explicit.spec:
                raise InputError(
                    f"probe={probe} differs from the reference's spec ({explicit.spec.describe()}); the reference's "
                    "inputs must be used, so leave probe=None when you pass reference="
                )

        self.every_n_steps = int(every_n_steps)
        self.probe = probe
        self.alpha = float(alpha)
        self.patience = int(patience)
        self.on_identity_lost = on_identity_lost
        self.num_controls = int(num_controls)
        self.control_margin = float(control_margin)
        self.feature_fn = feature_fn
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
        self.last_probed_step: int = -1
        self.consecutive_failures: int = 0
        self.history: list[dict[str, Any]] = []
        self.last_verdict: IdentityVerdict | None = None
        self.save_dir: Path | None = None
        self._warned_undetermined = False
        self._layout_written: set[int] = set()

    # ------------------------------------------------------------------ Lightning API
    @property
    def state_key(self) -> str:
        return "SeedPrintsCallback"

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and plain types only (loads with ``torch.load(weights_only=True)``); never empty."""
        ref = self.reference
        return {
            "format_version": STATE_FORMAT_VERSION,
            "reference_features": None if ref is None else ref.features.detach().cpu().clone(),
            "reference_meta": None if ref is None else ref.metadata(),
            "reference_source": self.reference_source,
            "control_features": None if self.control_features is None else self.control_features.detach().cpu().clone(),
            "control_seeds": [int(s) for s in self.control_seeds],
            "control_spec": None if self.control_spec is None else self.control_spec.to_dict(),
            "last_probed_step": int(self.last_probed_step),
            "consecutive_failures": int(self.consecutive_failures),
            "warned_undetermined": bool(self._warned_undetermined),
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("format_version")
        if not _is_int(version) or version > STATE_FORMAT_VERSION or version < 1:
            raise InputError(
                f"the checkpoint's SeedPrintsCallback state has format version {version!r}; this seedprints-lightning reads "
                f"version {STATE_FORMAT_VERSION}: upgrade the package"
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
        self.history = [dict(entry) for entry in state_dict.get("history", [])]

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
                    f"SeedPrintsCallback has no reference at global_step={step}: the checkpoint has no SeedPrintsCallback "
                    f"state (state_key {self.state_key!r}), so the run's step-0 reference is unknown and will not be "
                    f"taken from trained weights. Pass reference=<run>/seedprints/{_REFERENCE_FILE} (e.g. "
                    f"{self.save_dir / _REFERENCE_FILE if self.save_dir else 'the run directory'}) or resume from a "
                    "checkpoint saved with the callback"
                )
            self.reference = self._take_reference(trainer, pl_module, step)
            self.reference_source = "step0"
            self.last_probed_step = step
            fresh = True
        self._sync_reference_file(trainer, fresh)
        self._ensure_controls(trainer, pl_module)
        self._write_layout(trainer)
        if not fresh and self.last_probed_step != step:
            self._probe(trainer, pl_module, "train_start")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer_fn_value(trainer) != "fit" or getattr(trainer, "sanity_checking", False) or self.reference is None:
            return
        step = int(trainer.global_step)
        # global_step counts optimizer steps: under accumulation this hook fires on every
        # micro-batch with the same step, hence the last_probed_step guard.
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_probed_step:
            self._probe(trainer, pl_module, "interval")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer_fn_value(trainer) != "fit" or self.reference is None:
            return
        if int(trainer.global_step) != self.last_probed_step:
            self._probe(trainer, pl_module, "train_end")

    # ------------------------------------------------------------------ probing
    def _check_compatible(self, lm: nn.Module, reference: Fingerprint) -> None:
        hidden = _hidden_size(lm.config)
        if reference.hidden_size != hidden:
            raise InputError(
                f"the reference fingerprint has D={reference.hidden_size} features but the model's hidden size is {hidden}: "
                "the lineage test compares coordinates one to one, so the reference must come from a model of this width"
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
    def _uses_root_wrapper(trainer: Any) -> bool:
        name = type(trainer.strategy).__name__
        return "FSDP" in name or "DeepSpeed" in name

    def _run_model_code(self, trainer: Any, pl_module: Any, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (probe forwards) so that parameters are usable on every strategy.

        FSDP/DeepSpeed (untested here): route the LightningModule's ``forward`` to ``fn``
        and call the root wrapper, which gathers the sharded parameters around it.
        Everything else: call ``fn`` directly (the DDP wrapper is not called).
        """
        wrapper = getattr(trainer.strategy, "model", None)
        with preserve_rng_state(), trainer.precision_plugin.forward_context():
            if not self._uses_root_wrapper(trainer) or wrapper is None or wrapper is pl_module:
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

    def _features(self, trainer: Any, pl_module: Any, spec: ProbeSpec) -> torch.Tensor:
        def fn() -> torch.Tensor:
            if self.feature_fn is not None:
                feature_fn = self.feature_fn
                return extract_features(pl_module, spec, batch_size=self.probe_batch_size,
                                        forward_fn=lambda batch: feature_fn(pl_module, batch))
            return extract_features(find_causal_lm(pl_module), spec, batch_size=self.probe_batch_size)

        return self._run_model_code(trainer, pl_module, fn)

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
        features = trainer.strategy.broadcast(self._features(trainer, pl_module, spec), src=0)
        return Fingerprint(
            features=features, spec=spec,
            model_class=type(lm).__name__ if lm is not None else type(pl_module).__name__,
            config_digest=config_digest(lm.config) if lm is not None else None, step=step,
            extra={"source": "SeedPrintsCallback step-0 reference"},
        )

    def _ensure_controls(self, trainer: Any, pl_module: Any) -> None:
        seeds = control_seeds(self.num_controls)
        spec = self.reference.spec
        if not seeds:
            self.control_features, self.control_seeds, self.control_spec = None, (), None
            return
        if (self.control_features is not None and self.control_seeds == seeds and self.control_spec == spec
                and self.control_features.shape[1:] == self.reference.features.shape):
            return  # restored from the checkpoint: kept bit for bit
        features = probe_controls(
            pl_module, spec, seeds, batch_size=self.probe_batch_size,
            context=trainer.precision_plugin.forward_context,
        )
        self.control_features = trainer.strategy.broadcast(features, src=0)
        self.control_seeds, self.control_spec = seeds, spec
        if self._writes_files(trainer) and trainer.is_global_zero:
            lm = find_causal_lm(pl_module)
            save_controls(self.save_dir / _CONTROLS_FILE, self.control_features, seeds, spec,
                          extra={"model_class": type(lm).__name__, "config_digest": config_digest(lm.config)})

    @staticmethod
    def _writes_files(trainer: Any) -> bool:
        return not getattr(trainer, "fast_dev_run", False)

    def _sync_reference_file(self, trainer: Any, fresh: bool) -> None:
        """Write ``reference.safetensors`` (rank 0); refuse a different reference for this directory."""
        if not self._writes_files(trainer):
            return
        error: str | None = None
        if trainer.is_global_zero:
            path = self.save_dir / _REFERENCE_FILE
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
                                        f"{existing.step}) with this run's new step-0 reference")
                else:
                    origin = self._reference_origin if self.reference_source == "explicit" else (
                        f"the SeedPrintsCallback state in checkpoint {getattr(trainer, 'ckpt_path', None)!r}")
                    error = (
                        f"the reference from {origin} (step {ref.step}, created {ref.created}) differs from {path} "
                        f"(step {existing.step}, created {existing.created}), the reference of the run that owns this "
                        "directory: another run's checkpoint or reference is being used in this run's directory. Resume "
                        "this run from its own checkpoint, or log to another directory (save_dir=...)"
                    )
            if error is None and not same:
                ref.save(path)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise InputError(error)

    def _test(self, base: torch.Tensor, live: torch.Tensor) -> LineageResult:
        try:
            return lineage_test(base, live, identity_mode=self.identity_mode, identity_ratio=self.identity_ratio,
                                alpha=self.alpha)
        except InputError as exc:  # e.g. non-finite hidden states of a diverged model
            return LineageResult(z=0.0, log10_p=0.0, p_value=1.0, tau_mean=0.0, k=0, n=int(live.shape[0]),
                                 related=None, alpha=self.alpha, identity_mode=self.identity_mode, reason=str(exc))

    def _probe(self, trainer: Any, pl_module: Any, event: str) -> IdentityVerdict:
        start = time.perf_counter()
        step = int(trainer.global_step)
        ref = self.reference
        live = self._features(trainer, pl_module, ref.spec)
        if live.shape != ref.features.shape:
            raise InputError(
                f"the probe returned features of shape {tuple(live.shape)} but the reference has "
                f"{tuple(ref.features.shape)}: the model (or feature_fn) no longer matches the reference"
            )
        ref_result = self._test(ref.features, live)
        controls = tuple(self._test(c, live) for c in (self.control_features if self.control_features is not None else ()))
        verdict = decide_identity(ref_result, controls, alpha=self.alpha, control_margin=self.control_margin)
        seconds = time.perf_counter() - start
        metrics = verdict.to_metrics(seconds)
        self.last_probed_step = step
        self.last_verdict = verdict
        self._log(trainer, metrics, step)

        # Reduced over ranks so that every rank updates the same counter and acts alike.
        failed = bool(trainer.strategy.reduce_boolean_decision(verdict.related is False, all=False))
        kept = bool(trainer.strategy.reduce_boolean_decision(verdict.related is True, all=True))
        if failed:
            self.consecutive_failures += 1
        elif kept:
            self.consecutive_failures = 0
        entry: dict[str, Any] = {"step": step, "event": event}
        entry.update({tag.split("/", 1)[1]: value for tag, value in metrics.items()})
        entry.update({"related": verdict.related, "control_z": [float(z) for z in verdict.control_z],
                      "reason": verdict.reason, "consecutive_failures": int(self.consecutive_failures)})
        self.history.append(entry)

        if verdict.related is None and not failed and not self._warned_undetermined:
            self._warned_undetermined = True
            self._warn(trainer, f"SeedPrints: the lineage probe at step {step} is undetermined ({verdict.reason}); "
                                "it counts neither as a failure nor as a success. Further undetermined probes are not reported")
        if failed and self.consecutive_failures >= self.patience:
            self._act(trainer, verdict, step)
        return verdict

    def _act(self, trainer: Any, verdict: IdentityVerdict, step: int) -> None:
        ref = verdict.reference
        controls = ", ".join(f"{z:.2f}" for z in verdict.control_z) or "none"
        reason = f" {verdict.reason.rstrip('.')}." if verdict.reason else ""
        message = (
            f"SeedPrints: the run lost its lineage identity at step {step} ({self.consecutive_failures} consecutive failed "
            f"probes, patience {self.patience}): z={ref.z:.2f}, log10 p={ref.log10_p:.2f}, threshold={verdict.threshold:.2f} "
            f"(alpha={self.alpha:g}, control margin {self.control_margin:g}), controls z max={verdict.control_z_max:.2f}, "
            f"mean={verdict.control_z_mean:.2f} [{controls}].{reason} The weights no longer descend from the "
            f"reference ({self.reference_source}, step {self.reference.step}): check for a swapped or wrongly loaded checkpoint."
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
