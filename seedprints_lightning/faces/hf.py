"""``SeedPrintsTrainerCallback``: the custody chain in a Hugging Face ``transformers.Trainer`` run.

A :class:`~seedprints_lightning.faces.monitor.SeedPrintsMonitor` whose hooks the ``Trainer`` calls:

- ``on_train_begin``: the reference at step 0, or, on ``trainer.train(resume_from_checkpoint=...)``,
  the chain state from ``<output_dir>/checkpoint-<step>/seedprints_state.pt`` and a link of the
  loaded weights to it;
- ``on_step_end`` (after each optimizer step; ``state.global_step`` already counts it, so a
  probe at step N sees the weights after N steps, as under Lightning): a probe when one is due;
- ``on_save``: the chain state beside the checkpoint the ``Trainer`` just wrote;
- ``on_train_end``: a last probe of the final weights.

Files go to ``<output_dir>/seedprints`` (the same run directory as every face: ``seedprints
audit --chain OUTPUT_DIR/seedprints OUTPUT_DIR/checkpoint-N`` verifies it). The metrics go
through ``trainer.log``, so they reach every integration in ``report_to`` (TensorBoard, W&B,
MLflow, ...) and ``trainer.state.log_history`` at the probe's step, like the Trainer's own loss
(the ``Trainer`` is the one whose hooks call this face: :func:`calling_trainer` says why and
how it is found, and ``tests/test_face_hooks.py`` fails, naming the transformers version, if a
release stops calling the hooks from the Trainer's own methods). The
Custom Scalars layout is added to the Trainer's TensorBoard writer. ``log_dir`` (default none)
also writes them to a TensorBoard directory of this face's own. ``"stop"`` sets
``control.should_training_stop``. Several processes (``torchrun`` / ``accelerate launch``):
every rank probes its slice through the unwrapped model the ``Trainer`` passes its callbacks.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..core.errors import InputError
from ..core.files import atomic_write
from ..core.state import HF_TRAINER_STATE_FILE
from .base import SeedPrintsFace, write_layout
from .monitor import SeedPrintsMonitor

__all__ = ["SeedPrintsTrainerCallback"]


class SeedPrintsTrainerCallback(SeedPrintsMonitor, TrainerCallback):
    """Probe the model's SeedPrints lineage during ``transformers.Trainer.train()``.

    Takes the arguments of :class:`~seedprints_lightning.faces.base.SeedPrintsFace`; ``save_dir``
    defaults to ``<output_dir>/seedprints``; the metrics go through the Trainer's ``report_to``
    integrations (module docstring)::

        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[SeedPrintsTrainerCallback(every_n_steps=1000, on_identity_lost="stop")])
    """

    #: The Trainer whose hooks call this face (found in ``on_train_begin``), through which it logs.
    _trainer: Any = None
    missing_state = f"{HF_TRAINER_STATE_FILE} (written by SeedPrintsTrainerCallback.on_save beside the checkpoint)"

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if model is None:
            raise InputError("the Trainer passed no model to SeedPrintsTrainerCallback.on_train_begin")
        step = int(state.global_step)
        if self.save_dir is None:
            self.save_dir = Path(args.output_dir) / "seedprints"
        self._trainer = calling_trainer(self)
        if self._trainer is None and self.log_dir is None:
            import transformers

            self._warn(f"SeedPrints: SeedPrintsTrainerCallback could not find the transformers Trainer calling it "
                       f"(transformers {transformers.__version__}; a hook called by hand, or a Trainer that calls its "
                       "callbacks from outside its own methods), so its metrics reach no report_to integration (only "
                       ".history and the ledger); pass log_dir=... to write them to TensorBoard")
        if step > 0 and not self.chain.restored:
            saved = self.checkpoint_dir(args, step) / HF_TRAINER_STATE_FILE
            if saved.is_file():  # otherwise start() names what is missing
                self.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
        self.start(model, step)
        return self._control(control)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        self.step(model, int(state.global_step))
        return self._control(control)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if self.started:
            step = int(state.global_step)
            folder = self.checkpoint_dir(args, step)
            self._bind_save(model, step, checkpoint=folder.name)  # every rank numbers the record
            if self._processes().is_writer and folder.is_dir():
                self._write_state(folder / HF_TRAINER_STATE_FILE)
        return control

    def _write_state(self, path: Path) -> None:
        """Write the state beside the Trainer's checkpoint, whole or not at all; a failure warns and never stops it.

        The Trainer has already saved its checkpoint: a full or read-only disk must not fail the run
        from here. A resume from that checkpoint then names the missing file.
        """
        state = SeedPrintsFace.state_dict(self)  # the save was bound above (the monitor's state_dict would bind again)
        try:
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        except OSError as exc:
            self._warn(f"SeedPrints: could not write {path} ({type(exc).__name__}: {exc}). The Trainer's checkpoint "
                       f"{path.parent} is saved, without the SeedPrints state: a resume from it will stop at train "
                       "start and name the missing file; `seedprints audit --chain` still audits its weights by "
                       "lineage. Free space (or make the directory writable) for the next saves")

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        self.end(model, int(state.global_step))
        return self._control(control)

    @staticmethod
    def checkpoint_dir(args: Any, step: int) -> Path:
        """Where the ``Trainer`` saves (and resumes) step ``step``: ``<output_dir>/checkpoint-<step>``."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"

    def _control(self, control: Any) -> Any:
        if self.should_stop:
            control.should_training_stop = True
        return control

    # ------------------------------------------------------------------ logging through the Trainer
    def _log(self, metrics: dict[str, float], step: int) -> None:
        super()._log(metrics, step)  # log_dir, when given
        if self._trainer is not None:
            self._log_layout()
            self._trainer.log(dict(metrics))  # every report_to integration's on_log, at state.global_step

    def _log_layout(self) -> None:
        super()._log_layout()
        handler = getattr(self._trainer, "callback_handler", None)
        if handler is not None and self._processes().is_writer:
            for callback in handler.callbacks:  # the Trainer's TensorBoardCallback opens its writer in on_train_begin
                write_layout(getattr(callback, "tb_writer", None), self._layouts)


def calling_trainer(callback: Any) -> Any:
    """The ``transformers.Trainer`` whose callback handler is calling ``callback``'s hook, or ``None``.

    Why a stack walk: the face logs through ``trainer.log`` (the only way a metric reaches every
    ``report_to`` integration's ``on_log`` and ``state.log_history``) and gives the Trainer's
    TensorBoard writer the Custom Scalars layout, but transformers passes its callbacks ``args,
    state, control`` and the ``model`` / ``optimizer`` / ``lr_scheduler`` / dataloaders, never the
    Trainer, and has no documented way for a callback to reach it (as of transformers 5.25). Adding
    to ``logs`` in this face's own ``on_log`` is too late: the Trainer registers the ``report_to``
    integrations before the user's callbacks, and ``log_history`` holds a copy of ``logs``.

    The assumption (checked in ``on_train_begin`` only, once per ``train()``): a method of the
    Trainer is on the call stack of every hook (``Trainer._inner_training_loop`` ->
    ``CallbackHandler.call_event``). The nearest frame whose ``self`` is a ``Trainer`` that holds
    ``callback`` in its ``callback_handler`` is taken, at any depth, so neither an extra wrapper
    frame nor an outer Trainer (a hyper-parameter search) can give the wrong one.
    ``tests/test_face_hooks.py`` fails, naming the transformers version, when it no longer holds.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                handler = getattr(candidate, "callback_handler", None)
                if any(held is callback for held in getattr(handler, "callbacks", ())):
                    return candidate
            frame = frame.f_back
        return None
    finally:
        del frame
