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
audit --chain OUTPUT_DIR/seedprints OUTPUT_DIR/checkpoint-N`` verifies it) and the metrics to
TensorBoard (:meth:`SeedPrintsTrainerCallback.tensorboard_dir`: where the ``Trainer`` writes its
own events when it names the folder). ``"stop"`` sets
``control.should_training_stop``. Several processes (``torchrun`` / ``accelerate launch``):
every rank probes its slice through the unwrapped model the ``Trainer`` passes its callbacks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..core.errors import InputError
from ..offline.sources import HF_TRAINER_STATE_FILE
from .monitor import SeedPrintsMonitor

__all__ = ["SeedPrintsTrainerCallback"]


class SeedPrintsTrainerCallback(SeedPrintsMonitor, TrainerCallback):
    """Probe the model's SeedPrints lineage during ``transformers.Trainer.train()``.

    Takes the arguments of :class:`~seedprints_lightning.SeedPrintsCallback`; ``save_dir``
    defaults to ``<output_dir>/seedprints`` and ``log_dir`` to :meth:`tensorboard_dir`::

        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[SeedPrintsTrainerCallback(every_n_steps=1000, on_identity_lost="stop")])
    """

    missing_state = f"{HF_TRAINER_STATE_FILE} (written by SeedPrintsTrainerCallback.on_save beside the checkpoint)"

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        if model is None:
            raise InputError("the Trainer passed no model to SeedPrintsTrainerCallback.on_train_begin")
        step = int(state.global_step)
        if self.save_dir is None:
            self.save_dir = Path(args.output_dir) / "seedprints"
        if self.log_dir is None:
            self.log_dir = self.tensorboard_dir(args)
        if step > 0 and not self.chain.restored:
            saved = self.checkpoint_dir(args, step) / HF_TRAINER_STATE_FILE
            if saved.is_file():  # otherwise start() names what is missing
                self.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
        self.start(model, step)
        return self._control(control)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        self.step(model, int(state.global_step))
        return self._control(control)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.started and self._processes().is_writer:
            folder = self.checkpoint_dir(args, int(state.global_step))
            if folder.is_dir():
                torch.save(self.state_dict(), folder / HF_TRAINER_STATE_FILE)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        self.end(model, int(state.global_step))
        return self._control(control)

    @staticmethod
    def tensorboard_dir(args: Any) -> Path:
        """Where the ``Trainer``'s TensorBoard events go: ``args.logging_dir`` (transformers 4), else
        ``$TENSORBOARD_LOGGING_DIR`` (transformers 5), else ``<output_dir>/runs/seedprints``."""
        named = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
        return Path(named).expanduser() if named else Path(args.output_dir) / "runs" / "seedprints"

    @staticmethod
    def checkpoint_dir(args: Any, step: int) -> Path:
        """Where the ``Trainer`` saves (and resumes) step ``step``: ``<output_dir>/checkpoint-<step>``."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"

    def _control(self, control: Any) -> Any:
        if self.should_stop:
            control.should_training_stop = True
        return control
