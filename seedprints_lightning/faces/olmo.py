"""``SeedPrintsOLMoCallback``: the custody chain in an OLMo-core ``Trainer`` run (OLMo 2 / OLMo 3 pretraining).

An OLMo-core :class:`olmo_core.train.callbacks.Callback` over the one face base
(:class:`~seedprints_lightning.faces.base.SeedPrintsFace`); register it in one line::

    trainer_config = TrainerConfig(save_folder=..., ...).with_callback(
        "seedprints", SeedPrintsOLMoCallback(every_n_steps=1000, on_identity_lost="stop", model_config=model_config))

The model family is built in (:mod:`seedprints_lightning.core.olmo`): no ``feature_fn`` or
``control_factory`` to write. OLMo-core's hooks drive it:

- ``pre_train`` (after a resume's ``load_state_dict``, which OLMo-core makes while loading the
  checkpoint in ``fit()``): the chain opens at ``trainer.global_step``: the reference at step 0, or
  a link of the loaded weights to the restored chain. It runs before the ``CheckpointerCallback``'s
  (``priority`` 2 over its 1), so the step-0 checkpoint already holds the chain and is bound;
- ``post_train_batch`` (after the optimizer step, before the ``CheckpointerCallback`` saves that step):
  a probe when the shared schedule says so (the step is the one just completed), so the checkpoint
  of a probed step holds that probe and a resume from it continues from its own head;
- ``state_dict`` (OLMo-core calls it while it saves, on every rank at the same point, with the
  weights being saved, even for an asynchronous save): the save is bound here, a ledger record of
  the digest of those weights naming the checkpoint by its path (``save_folder/stepN``), and then
  the chain's state goes into ``train/rank<N>.pt``. The record comes first so the checkpoint's
  state holds its own save record: a resume from it continues from its own head (a record written
  after the state, e.g. in ``post_checkpoint_saved``, would make every resume fork the ledger);
- ``post_checkpoint_saved(path)``: an asynchronous save confirms a step or more later, from another
  thread; the confirmations are kept by path, and ``close`` warns about a bound save that OLMo-core
  never confirmed as written (a failed asynchronous save);
- ``post_train``: a last probe of the final weights; ``close``: the run directory's lock released.

Metrics go through ``trainer.record_metric`` (``seedprints/...``), so OLMo-core's console, W&B and
Comet callbacks show them with the training metrics; ``log_dir`` also writes them to a TensorBoard
directory. ``"stop"`` calls ``trainer.cancel_run(reason, no_sync=True)`` on every rank (the decision is
reduced first), which ends the run cleanly and still writes its final checkpoint; ``"raise"`` raises
:class:`~seedprints_lightning.IdentityLostError` on every rank ("Training failed due to: ...").

Files go to ``<save_folder>/seedprints`` (``save_dir`` overrides), so
``seedprints audit --chain SAVE_FOLDER/seedprints SAVE_FOLDER/stepN`` audits a checkpoint directory.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

try:
    from olmo_core.train.callbacks import Callback
except ImportError as exc:  # pragma: no cover - the [olmo] extra is missing
    raise ImportError("SeedPrintsOLMoCallback needs OLMo-core: pip install 'seedprints-lightning[olmo]' "
                      "(ai2-olmo-core>=3.0)") from exc

from ..core.errors import InputError
from ..core.families import OLMO_CORE
from ..core.ledger import RunDirectory
from ..core.olmo import find_olmo_transformer, olmo_config_from_dict, olmo_rebuild_info, register_olmo_config
from .base import SeedPrintsFace

__all__ = ["CONSOLE_PATTERN", "SeedPrintsOLMoCallback"]

#: What the face adds to OLMo-core's ConsoleLoggerCallback.metrics so the console shows its metrics.
CONSOLE_PATTERN = "seedprints/*"


class SeedPrintsOLMoCallback(SeedPrintsFace, Callback):
    """Probe an OLMo-core model's SeedPrints lineage during ``Trainer.fit()``; act when its custody breaks.

    Takes the arguments of :class:`~seedprints_lightning.faces.base.SeedPrintsFace` (``feature_fn`` and
    ``control_factory`` are not needed: the OLMo-core family is built in), plus:

    Args:
        model_config: the ``TransformerConfig`` the model was built from. Recorded in the checkpoint
            state, so ``seedprints audit --chain RUN CKPT`` rebuilds the model from a checkpoint
            directory; controls are built from it; under FSDP2 the probe gathers one block at a time
            through it (required there). Default: the ``"model"`` entry of an OLMo-core
            ``ConfigSaverCallback``'s config, if the trainer has one; otherwise controls are re-inits of
            a copy of the live (unsharded) model and the audit of a checkpoint needs its ``config.json``.

    ``save_dir`` defaults to ``<save_folder>/seedprints`` (a local save folder), else
    ``<work_dir>/seedprints``. See the module docstring for the hooks.
    """

    #: Runs before OLMo-core's CheckpointerCallback (priority 1): the step-0 save holds the opened chain.
    priority: ClassVar[int] = 2
    missing_state = ("SeedPrintsOLMoCallback state (kept in the checkpoint's train/rank0.pt under the callback's "
                     "name: resume with the same callback name, e.g. 'seedprints')")

    # A dataclass base with no fields would make every callback equal to every other, and unhashable.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, *args: Any, model_config: Any = None, **kwargs: Any) -> None:
        if kwargs.get("feature_fn") is not None or kwargs.get("control_factory") is not None:
            self._refuse_custom_family()
        SeedPrintsFace.__init__(self, *args, **kwargs)
        if model_config is not None and not callable(getattr(model_config, "as_config_dict", None)):
            raise InputError(f"model_config must be an OLMo-core TransformerConfig (the one the model was built from), "
                             f"got {type(model_config).__name__}")
        self.model_config = model_config
        self._lm: nn.Module | None = None
        self._config: Any = None
        # The saves bound in the ledger (path -> step) and the paths OLMo-core confirmed as written.
        self._bound: dict[str, int] = {}
        self._confirmed: set[str] = set()
        self._lock = threading.Lock()
        self._failed = False

    def __getstate__(self) -> dict[str, Any]:
        # TrainerConfig.with_callback deep-copies the callbacks already registered: a lock does not copy.
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _check_arguments(self) -> None:
        if self.settings.feature_fn is not None or self.settings.control_factory is not None:
            self._refuse_custom_family()

    @staticmethod
    def _refuse_custom_family() -> None:
        raise InputError("SeedPrintsOLMoCallback probes OLMo-core's Transformer itself: drop feature_fn and "
                         "control_factory (pass model_config=<TransformerConfig> for controls from the config)")

    # ------------------------------------------------------------------ OLMo-core's hooks
    def post_attach(self) -> None:
        # The console logger prints only the metric names it lists (W&B and Comet take every metric).
        from olmo_core.train.callbacks import ConsoleLoggerCallback

        for callback in self.trainer.callbacks.values():
            if isinstance(callback, ConsoleLoggerCallback) and CONSOLE_PATTERN not in callback.metrics:
                callback.metrics = [*callback.metrics, CONSOLE_PATTERN]

    def pre_train(self) -> None:
        trainer = self.trainer
        model = getattr(trainer.train_module, "model", None)
        lm = find_olmo_transformer(model) if model is not None else None
        if lm is None:
            raise InputError(f"SeedPrintsOLMoCallback needs an OLMo-core Transformer in the train module "
                             f"({type(trainer.train_module).__name__}.model is {type(model).__name__})")
        self._failed = False
        self._lm, self._config = lm, self.model_config if self.model_config is not None else _saved_config(trainer)
        if self._config is not None:
            register_olmo_config(lm, self._config)
        if self.save_dir is None:
            self.save_dir = _default_save_dir(trainer)
        self._install_family(lm)
        step = int(trainer.global_step)
        origin = (self.settings.reference_origin if self.reference_source == "explicit"
                  else "the SeedPrintsOLMoCallback state restored from the checkpoint")
        self._open(lm, step, RunDirectory(self.save_dir), origin)
        self._model_rebuild = olmo_rebuild_info(self._config)

    def post_train_batch(self) -> None:
        # After the optimizer step (self.step is the step just completed), and before the
        # CheckpointerCallback's save of this step (its post_train_batch, lower priority): a probe due
        # at a save step is in that checkpoint's state, so a resume from it continues from its own
        # head. post_step would come after the save, and the resume would find one record too many.
        if not self.started:
            return
        step = int(self.trainer.global_step)
        self.current_step = step
        if self.chain.due(step):
            self._probe(self._lm, step, "interval")

    def post_train(self) -> None:
        # The chain stays open: the CheckpointerCallback's final save (after this hook) is still bound.
        if self.started and self.reference is not None and self.chain.last_probed_step != self.current_step:
            self._probe(self._lm, int(self.trainer.global_step), "train_end")

    def post_checkpoint_saved(self, path: Any) -> None:
        with self._lock:  # an asynchronous save confirms from OLMo-core's saving thread
            self._confirmed.add(str(path))

    def on_error(self, exc: BaseException) -> None:
        self._failed = True  # close() then does not ask after unconfirmed saves: the run failed

    def close(self) -> None:
        try:
            with self._lock:
                missing = [path for path in self._bound if path not in self._confirmed]
            if missing and not self._failed:
                self._warn(f"SeedPrints: the ledger binds {len(missing)} checkpoint save(s) that OLMo-core never "
                           f"confirmed as written ({', '.join(missing[:3])}): if a save failed, no checkpoint holds "
                           "those weights (the audit matches a checkpoint to a save by its weights, so nothing "
                           "vouches for a checkpoint that is not there)")
        finally:
            self._close()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The chain's state for ``train/rank<N>.pt``, after the save record of the weights being saved."""
        if self._trainer is not None and self.started:
            self._bind_olmo_save(int(self.trainer.global_step))
        return SeedPrintsFace.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        SeedPrintsFace.load_state_dict(self, state_dict)

    # ------------------------------------------------------------------ the family, built in
    def _install_family(self, lm: nn.Module) -> None:
        """Adopt the OLMo-core family (:data:`~seedprints_lightning.core.families.OLMO_CORE`) with its resolved spec.

        Its probe (whole forwards, or gathered blocks when sharded) and its controls (OLMo-core's own
        init, from the registered ``TransformerConfig`` or a copy of the unsharded model) come from the
        registry; a parent's (or restored) reference fixes the probe, which must fit this model.
        """
        spec = self.reference.spec if self.reference is not None else self.settings.probe
        spec = self._run_model_code(lm, lambda: OLMO_CORE.resolve_spec(spec, lm))
        self.settings = self.settings.adopt(OLMO_CORE, spec)

    # ------------------------------------------------------------------ save binding, by path
    def _bind_olmo_save(self, step: int) -> None:
        """The save record of the checkpoint being written at ``step``, named by its path (every rank numbers it)."""
        from olmo_core.io import join_path

        path = str(join_path(self.trainer.save_folder, self.trainer.checkpointer.checkpoint_dirname(step)))
        # The base's binding: a save record that cannot be written warns and never stops OLMo-core's save.
        if self._bind_save(self._lm, step, checkpoint=path) is not None:
            with self._lock:
                self._bound[path] = step

    def _bound_weights(self, model: nn.Module) -> nn.Module | None:
        """The OLMo-core ``Transformer``'s weights (the base binds transformers models only)."""
        return find_olmo_transformer(model)

    def _shards_weights(self, model: nn.Module) -> bool:
        # Sharded (FSDP2) weights are bound too: every rank is in OLMo-core's save when it asks for the state, so
        # the base hashes them one gathered tensor at a time (core/sharded.py::weights_digest_gathered).
        return False

    # ------------------------------------------------------------------ OLMo-core's logging and stop
    def _log(self, metrics: dict[str, float], step: int) -> None:
        super()._log(metrics, step)  # log_dir, when given
        if self._trainer is None:
            return
        from olmo_core.train.common import MetricMergeStrategy

        for tag, value in metrics.items():
            # Recorded at trainer.global_step (the probe's step) on every rank alike: no reduction needed.
            self.trainer.record_metric(tag, float(value), merge_strategy=MetricMergeStrategy.latest)

    def _stop(self) -> None:
        super()._stop()
        self.trainer.cancel_run(f"SeedPrints: the run lost its lineage identity at step {self.current_step} "
                                "(on_identity_lost='stop')", no_sync=True)


def _saved_config(trainer: Any) -> Any:
    """The model's ``TransformerConfig`` from a ``ConfigSaverCallback``'s config (its ``"model"`` entry), if any."""
    from olmo_core.train.callbacks import ConfigSaverCallback

    for callback in trainer.callbacks.values():
        config = getattr(callback, "config", None) if isinstance(callback, ConfigSaverCallback) else None
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            return olmo_config_from_dict(config["model"])
    return None


def _default_save_dir(trainer: Any) -> Path:
    from olmo_core.io import is_url

    if not is_url(trainer.save_folder):
        return Path(trainer.save_folder) / "seedprints"
    return Path(trainer.work_dir) / "seedprints"
