"""``SeedPrintsCallback``: a birth certificate and a chain of custody for a Lightning run.

The callback is the Lightning face of :class:`~seedprints_lightning.faces.base.SeedPrintsFace`
(its arguments and probe cycle), over :class:`~seedprints_lightning.core.chain.CustodyChain`,
which does the work: at step 0 the model's features become the run's reference (its "birth");
then on a schedule (``core.schedule``) each probe is judged twice (``core.verdict``), the
**birth test** against the reference (it fades at ordinary learning rates: reported, not acted
on) and the **custody link** against the last probe whose own link held (a failed link never
becomes the anchor), both against fresh-init negative controls (``core.controls``), and
recorded in the hash-chained ledger (``core.ledger``). The callback measures the features over
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
(:func:`~seedprints_lightning.faces._lightning.measure_features`), or, for DTensor (FSDP2) weights,
one gathered block at a time (:mod:`~seedprints_lightning.core.sharded`), so every rank tests the same
numbers, follows the same schedule and takes the same decision, reduced over ranks before it
acts. Checkpoint state: under :attr:`SeedPrintsCallback.state_key`, derived from ``probe`` as
``EarlyStopping`` derives its own, so two callbacks in one ``Trainer`` keep their
own states; a checkpoint written with the former constant key ``"SeedPrintsCallback"`` still
resumes. A resume with another ``probe`` (so another key) finds the SeedPrints state stored under
the other key, continues its chain with the chain's spec and warns once, naming both specs
(:meth:`SeedPrintsCallback.on_load_checkpoint`), unless another callback of the Trainer claims it.
Zero observer effect: probes and control builds leave RNG states and module modes as they were
and keep no gradient; the optimizer and the data are never touched.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..core.chain import STATE_FORMAT_VERSION
from ..core.errors import IdentityWarning, InputError
from ..core.files import is_seedprints_state
from ..core.fingerprint import Fingerprint
from ..core.ledger import RunDirectory
from ..core.opening import probe_spec_differs
from ..core.probes import ProbeSpec
from ..core.processes import Processes
from ..core.state import LEGACY_STATE_KEY
from ..core.verdict import METRIC_TAGS
from ._lightning import (
    CALLBACK_BASES,
    forwards_in_wrapper,
    is_tensorboard_logger,
    log_metrics,
    measure_features,
    processes_of,
    run_model_code,
    shards_parameters,
    trainer_fn_value,
)
from .base import SeedPrintsFace, write_layout
from .messages import probe_spec_message

__all__ = ["IdentityWarning", "SeedPrintsCallback", "METRIC_TAGS", "STATE_FORMAT_VERSION"]


class SeedPrintsCallback(SeedPrintsFace, *CALLBACK_BASES):  # type: ignore[misc]
    """Probe the model's SeedPrints lineage during a Lightning ``Trainer.fit``; act when its custody breaks.

    Works with both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``. Takes the
    arguments of :class:`~seedprints_lightning.faces.base.SeedPrintsFace` (all but ``log_dir``:
    the metrics go to every logger of the Trainer, and into ``trainer.callback_metrics`` so that
    ``EarlyStopping`` / ``ModelCheckpoint`` can monitor them); ``save_dir`` defaults to
    ``<trainer.log_dir or default_root_dir>/seedprints``. ``on_identity_lost="stop"`` sets
    ``trainer.should_stop`` on every rank. See the module docstring for reference resolution,
    resume, files and distributed behaviour.

    Logged: :data:`METRIC_TAGS`, never NaN; ``seedprints/related`` is 1 held, 0 not related, -1
    undetermined (with ``seedprints/undetermined`` = 1), and a test that could not be made logs
    no figures.
    """

    #: The Trainer of the fit in progress (set in ``on_fit_start``): what the adapters below work through.
    _trainer: Any = None

    def _check_arguments(self) -> None:
        if self.log_dir is not None:
            raise InputError("SeedPrintsCallback logs through the Trainer's loggers, not log_dir: pass "
                             "Trainer(logger=TensorBoardLogger(...)) and leave log_dir=None")

    # ------------------------------------------------------------------ Lightning API
    @property
    def state_key(self) -> str:
        # From what lets two callbacks share a Trainer (their probe specs), as EarlyStopping derives its
        # key from monitor and mode; not from save_dir, so a run directory moved between save and resume
        # still finds its state.
        probe = self.settings.probe
        return self._generate_state_key(probe=None if probe is None else repr(probe))

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        # Lightning loads this key when state_key is missing from a checkpoint: the former constant.
        return LEGACY_STATE_KEY

    @property
    def missing_state(self) -> str:  # type: ignore[override]
        return f"SeedPrintsCallback state (state_key {self.state_key!r})"

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Adopt a SeedPrints state stored under another key when this callback's own key is not in ``checkpoint``.

        Lightning hands a callback only the state under its :attr:`state_key` (or the former constant
        key), right after this hook. The key is derived from ``probe``, so a resume constructed with
        another probe spec would find "no state" although the run's state is there. Such a state is
        adopted when it is the only SeedPrints state that no callback of this Trainer claims and this
        is the only SeedPrints callback without its own: two callbacks in one Trainer keep their own
        states. The chain's spec is then used, with one warning naming both keys and both specs;
        several candidates are an error (which state is whose cannot be told).
        """
        callbacks = checkpoint.get("callbacks")
        if not isinstance(callbacks, dict) or self.state_key in callbacks or self._legacy_state_key in callbacks:
            return
        claimed = {getattr(cb, "state_key", None) for cb in trainer.callbacks}
        unclaimed = [key for key, state in callbacks.items()
                     if isinstance(key, str) and key not in claimed and is_seedprints_state(state)]
        if not unclaimed:
            return  # start() says that the checkpoint has no state for this callback
        orphans = [cb for cb in trainer.callbacks
                   if isinstance(cb, SeedPrintsCallback) and cb.state_key not in callbacks]
        ckpt = getattr(trainer, "ckpt_path", None)
        ckpt = f"checkpoint {str(ckpt)!r}" if ckpt else "the checkpoint"
        if len(unclaimed) > 1 or len(orphans) > 1:
            raise InputError(
                f"{ckpt} holds no state under the state_key of {len(orphans)} SeedPrintsCallback(s) of "
                f"this Trainer ({', '.join(repr(cb.state_key) for cb in orphans)}) and {len(unclaimed)} SeedPrints "
                f"state(s) that no callback claims ({', '.join(map(repr, unclaimed))}): which state belongs to which "
                "callback cannot be told. Construct each SeedPrintsCallback with the probe= its state was saved with "
                "(the key names it)")
        key = unclaimed[0]
        self._trainer = trainer
        self.load_state_dict(copy.deepcopy(callbacks[key]))
        message = (f"SeedPrints: {ckpt} holds no state under this SeedPrintsCallback's state_key "
                   f"{self.state_key!r} (derived from its probe=), but the SeedPrints state stored under {key!r}, "
                   "which no callback of this Trainer claims: this callback continues that chain")
        used = _state_spec(callbacks[key])
        if used is not None and self.reference_source != "explicit":
            if probe_spec_differs(self.settings.probe, used):
                self._spec_warned = (self.settings.probe, used)
                message += ". " + probe_spec_message(type(self).__name__, self.settings.probe, used,
                                                     ckpt).removeprefix("SeedPrints: ")
        self._warn(message)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Checked here, not in setup(): a model built in configure_model() exists only now.
        self._trainer = trainer
        self.settings.check_model(pl_module, self.reference.spec if self.reference is not None else None,
                                  face=type(self).__name__)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._skips(trainer):
            return
        self._trainer, self._process_group = trainer, processes_of(trainer)
        if self.settings.save_dir is None:
            base = trainer.log_dir  # a collective under DDP: every rank gets here
            self.save_dir = Path(base if base else trainer.default_root_dir) / "seedprints"
        origin = self.settings.reference_origin if self.reference_source == "explicit" else (
            f"the SeedPrintsCallback state in checkpoint {getattr(trainer, 'ckpt_path', None)!r}")
        run = None if getattr(trainer, "fast_dev_run", False) else RunDirectory(self.save_dir)  # fast_dev_run: no file
        self._open(pl_module, int(trainer.global_step), run, origin)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._skips(trainer) and self.chain.due(int(trainer.global_step)):
            self._probe(pl_module, int(trainer.global_step), "interval")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._end(None if self._skips(trainer) else pl_module, int(trainer.global_step))

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Lightning took the callback state before this hook: bind the save, then store the state
        # again so the checkpoint's ledger head includes its own save record (or, when the record could
        # not be written, the state lists this save as unrecorded).
        unrecorded = len(self.unrecorded_saves)
        if self._bind_save(pl_module, int(trainer.global_step)) is None and len(self.unrecorded_saves) == unrecorded:
            return
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.state_dict()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    @staticmethod
    def _skips(trainer: Any) -> bool:
        """Probes belong to fitting only: not to sanity checks, validate, test or predict."""
        return trainer_fn_value(trainer) != "fit" or bool(getattr(trainer, "sanity_checking", False))

    # ------------------------------------------------------------------ the Trainer's adapters
    def _processes(self) -> Processes:
        if self._process_group is None:
            self._process_group = processes_of(self._trainer)
        return self._process_group

    def _measure(self, model: nn.Module, spec: ProbeSpec) -> Any:
        return measure_features(self._trainer, model, spec, self.settings.features_of)

    def _run_model_code(self, model: nn.Module, fn: Any) -> Any:
        return run_model_code(self._trainer, model, fn)

    def _forwards_in_wrapper(self) -> bool:
        return forwards_in_wrapper(self._trainer, self._trainer.lightning_module)

    def _forward_context(self) -> Any:
        return self._trainer.precision_plugin.forward_context

    def _log(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self._trainer, metrics, step)

    def _log_layout(self) -> None:
        if self._trainer.is_global_zero:
            for logger in self._trainer.loggers:
                if is_tensorboard_logger(logger):
                    write_layout(logger.experiment, self._layouts)

    def _warn(self, message: str) -> None:
        if self._trainer is None or self._trainer.is_global_zero:
            warnings.warn(message, IdentityWarning, stacklevel=3)

    def _stop(self) -> None:
        self._trainer.should_stop = True

    def _shards_weights(self, model: nn.Module) -> bool:
        return shards_parameters(self._trainer.strategy) or super()._shards_weights(model)


def _state_spec(state: dict[str, Any]) -> Any:
    """The probe spec of the chain a SeedPrints state holds (``None`` when it cannot be read)."""
    try:
        return Fingerprint.from_metadata(state["reference_features"], state["reference_meta"]).spec
    except Exception:  # a damaged state: load_state_dict has already said what is wrong with it, or will
        return None
