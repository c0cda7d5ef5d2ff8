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
  calls no hook between ``setup`` and that step, hence torch's optimizer step pre-hook, until
  that first step (:func:`open_before_first_step` says why and how it is scoped); a step of the
  model's optimizer that the pre-hook did not see raises rather than leave the run unprobed;
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

import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ..core.errors import InputError
from ..core.families import family_of, refuse_dedicated
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
        if self._module is not None:
            return
        if self.settings.feature_fn is None and self.settings.family is None:
            family = family_of(original)
            if family is None:  # a module no family measures (a second model set up beside the watched one)
                return
            refuse_dedicated(family, type(self).__name__)  # a GPT (or an OLMo-core model) is never skipped silently
        # Under FSDP1 the original module may hold no wrapper to tell it by: the strategy tells.
        refuse_unprobeable_sharding(sharding_of(strategy=getattr(fabric, "strategy", None)))
        self._fabric, self._module = fabric, original
        if self.save_dir is None:
            log_dir = next((getattr(logger, "log_dir", None) for logger in fabric.loggers), None)
            if log_dir:
                self.save_dir = Path(log_dir) / "seedprints"
        self._hook = open_before_first_step(self)

    def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
        if not self.started:
            if self._module is not None and self._optimizer is None and self._steps_module(optimizer):
                self._refuse_unopened(optimizer)
            return
        if self._is_ours(optimizer):
            self.step(self._module, (self.current_step or 0) + 1)

    def end(self, model: nn.Module | None = None, step: int | None = None) -> Any:
        """Probe the final weights (the set-up module unless ``model`` is given)."""
        return super().end(self._module if model is None else getattr(model, "_original_module", model), step)

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The state ``fabric.save`` stores; it binds the set-up module's weights as saved (a ledger save record)."""
        return super().state_dict(self._module if model is None else getattr(model, "_original_module", model))

    # ------------------------------------------------------------------ the chain opens before the first step
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.started or self._module is None or not self._steps_module(optimizer):
            return
        self._remove_hook()
        self._optimizer = optimizer
        self.start(self._module, self.current_step or 0)

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _close(self) -> None:
        self._remove_hook()  # a run that ended before its first step leaves no hook behind
        super()._close()

    def _steps_module(self, optimizer: Any) -> bool:
        """True when ``optimizer`` steps the set-up module: it holds one of its parameters, or it is the
        DeepSpeed engine around it (Fabric passes the engine to ``on_after_optimizer_step``)."""
        if getattr(optimizer, "module", None) is self._module:
            return True
        owned = {id(p) for p in self._module.parameters()}
        return any(id(p) in owned for group in getattr(optimizer, "param_groups", ()) for p in group["params"])

    def _refuse_unopened(self, optimizer: Any) -> None:
        """The set-up model's optimizer stepped and the chain is not open: no step-0 reference can be taken now."""
        raise InputError(
            f"{type(self).__name__}: the optimizer of the model set up with fabric.setup ({type(optimizer).__name__}) "
            "took a step before the SeedPrints chain opened, so the weights are no longer the ones a reference must be "
            "taken from. The chain opens just before the first step of an optimizer holding the model's parameters, "
            f"in torch's optimizer step pre-hook (torch {torch.__version__}); this step did not call it with them: "
            "an optimizer that is not a torch.optim.Optimizer, or one that steps copies of the parameters (DeepSpeed "
            "ZeRO's flat partitions), or close()/end() was called before the first step. Drive the chain yourself "
            "with SeedPrintsMonitor: start(model) before the first step, step(model, n) after each")

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


def open_before_first_step(face: SeedPrintsFabricCallback) -> RemovableHandle:
    """Call ``face._before_optimizer_step(optimizer)`` before each optimizer step of the process, until removed.

    Why torch's process-global step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``,
    public API): the chain must open after every load made after ``setup`` (``fabric.load`` of a
    resume, ``fabric.load_raw`` of initial weights, as LitGPT does) and before the first step changes
    the weights. Fabric calls its callbacks' ``on_after_setup`` and ``on_after_optimizer_step`` only
    (as of Lightning 2.6), and ``on_after_setup`` is not given the optimizer, so no per-optimizer hook
    (``Optimizer.register_step_pre_hook``) can be placed. A module forward pre-hook was no substitute:
    a LightningModule's ``training_step`` set up by Fabric, or a loop that calls ``model.module``,
    never calls the wrapper's forward, and a forward may run under the loop's autocast.

    Its reach is kept to this run: the hook holds the face weakly (the hook of a face that was
    dropped removes itself), the face removes it at the first step of an optimizer that holds its
    model's parameters and when it closes, and a step of that model's optimizer taken before the
    chain opened raises (:meth:`SeedPrintsFabricCallback.on_after_optimizer_step`).
    ``tests/test_face_hooks.py`` fails, naming the torch and Lightning versions, if a Fabric-wrapped
    optimizer's step stops calling it.
    """
    owner = weakref.ref(face)
    handle: RemovableHandle | None = None

    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        live = owner()
        if live is None:
            handle.remove()
            return
        live._before_optimizer_step(optimizer)

    handle = register_optimizer_step_pre_hook(before_step)
    return handle
