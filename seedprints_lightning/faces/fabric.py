"""``SeedPrintsFabricCallback``: the custody chain in a Lightning Fabric loop (LitGPT-style pretraining).

Fabric has no training loop and no step counter, and calls two hooks on its callbacks by
itself: ``on_after_setup(fabric, module)`` after ``fabric.setup(...)`` and
``on_after_optimizer_step(strategy, optimizer)`` after every ``optimizer.step()``. This face is
a :class:`~seedprints_lightning.faces.monitor.SeedPrintsMonitor` driven by them:

- ``on_after_setup`` remembers the module (the first one set up that holds a transformers
  model, or the first one with ``feature_fn``);
- the chain opens just before the first optimizer step, so a ``fabric.load(path, state)`` made
  after ``setup`` (the callback in ``state``, under any key) has restored it: at step 0 the init
  weights become the reference, on a resume the loaded weights are linked to the chain. Fabric
  calls no hook between ``setup`` and that step, hence a one-time optimizer step pre-hook;
- ``on_after_optimizer_step`` counts the steps of that optimizer (the count is in the state,
  so it survives ``fabric.save`` / ``fabric.load``) and probes when one is due.

Metrics go to ``fabric.log_dict`` (every Fabric logger; the Custom Scalars layout is added to
TensorBoard loggers), or to ``log_dir`` when Fabric has no logger: never both, so no metric is
written twice. ``"stop"`` sets :attr:`should_stop`: end the loop when it is True. The
ledger and verdicts are every face's, so ``seedprints audit --chain RUN_DIR/seedprints CKPT``
reads a ``fabric.save`` checkpoint file too.

Call ``callback.end(model)`` after the loop for a probe of the final weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..core.probes import find_causal_lm_or_none
from .base import refuse_unprobeable_sharding, sharding_of, write_layout
from .monitor import SeedPrintsMonitor

__all__ = ["SeedPrintsFabricCallback"]


class SeedPrintsFabricCallback(SeedPrintsMonitor):
    """Probe the model's SeedPrints lineage in a Fabric loop; register it with ``Fabric(callbacks=[...])``.

    Takes the arguments of :class:`~seedprints_lightning.SeedPrintsCallback`; ``save_dir``
    defaults to ``<first logger's log_dir>/seedprints`` (``./seedprints`` without a logger)::

        callback = SeedPrintsFabricCallback(every_n_steps=1000, on_identity_lost="stop")
        fabric = Fabric(callbacks=[callback], loggers=TensorBoardLogger("runs"))
        model, optimizer = fabric.setup(model, optimizer)
        fabric.load("last.ckpt", {"model": model, "optimizer": optimizer, "seedprints": callback})  # on a resume
        for batch in loader:                        # forward, fabric.backward(loss), optimizer.step()
            ...
            if callback.should_stop:
                break
        fabric.save("last.ckpt", {"model": model, "optimizer": optimizer, "seedprints": callback})
    """

    missing_state = ("SeedPrintsFabricCallback state (save it with fabric.save(path, {..., 'seedprints': callback}) "
                     "and restore it with fabric.load(path, {..., 'seedprints': callback}) before the first step)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fabric: Any = None
        self._module: nn.Module | None = None
        self._optimizer: Any = None
        self._hook: Any = None

    # ------------------------------------------------------------------ Fabric's hooks
    def on_after_setup(self, fabric: Any, module: nn.Module) -> None:
        original = getattr(module, "_original_module", module)  # weights as fabric.save stores them
        if self._module is not None or (self.settings.feature_fn is None and find_causal_lm_or_none(original) is None):
            return
        # Under FSDP1 the original module may hold no wrapper to tell it by: the strategy tells.
        refuse_unprobeable_sharding(sharding_of(strategy=getattr(fabric, "strategy", None)))
        self._fabric, self._module = fabric, original
        if self.save_dir is None:
            log_dir = next((getattr(logger, "log_dir", None) for logger in fabric.loggers), None)
            if log_dir:
                self.save_dir = Path(log_dir) / "seedprints"
        self._hook = register_optimizer_step_pre_hook(self._before_optimizer_step)

    def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
        if not self.started or not self._is_ours(optimizer):
            return
        self.step(self._module, (self.current_step or 0) + 1)

    def end(self, model: nn.Module | None = None, step: int | None = None) -> Any:
        """Probe the final weights (the set-up module unless ``model`` is given)."""
        return super().end(self._module if model is None else getattr(model, "_original_module", model), step)

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The state ``fabric.save`` stores; it binds the set-up module's weights as saved (a ledger save record)."""
        return super().state_dict(self._module if model is None else getattr(model, "_original_module", model))

    # ------------------------------------------------------------------ the chain opens before the first step
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.started or not self._steps_module(optimizer):
            return
        self._hook.remove()
        self._hook, self._optimizer = None, optimizer
        self.start(self._module, self.current_step or 0)

    def _steps_module(self, optimizer: torch.optim.Optimizer) -> bool:
        owned = {id(p) for p in self._module.parameters()}
        return any(id(p) in owned for group in optimizer.param_groups for p in group["params"])

    def _is_ours(self, optimizer: Any) -> bool:
        # DeepSpeed passes its engine, which wraps the torch optimizer the pre-hook saw.
        return optimizer is self._optimizer or getattr(optimizer, "optimizer", None) is self._optimizer

    # ------------------------------------------------------------------ logging through Fabric's loggers
    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self._fabric is None or not self._fabric.loggers:
            super()._log(metrics, step)  # log_dir, when given
            return
        self._log_layout()
        self._fabric.log_dict(metrics, step=step)

    def _log_layout(self) -> None:
        if self._fabric is None or not self._fabric.loggers:
            super()._log_layout()
        elif self._fabric.is_global_zero:
            for logger in self._fabric.loggers:
                write_layout(getattr(logger, "experiment", None), self._layouts)
