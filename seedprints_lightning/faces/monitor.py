"""``SeedPrintsMonitor``: the custody chain for any training loop, with no trainer in it.

A hand-written loop calls :meth:`SeedPrintsMonitor.start` before its first optimizer step,
:meth:`~SeedPrintsMonitor.step` after each one and :meth:`~SeedPrintsMonitor.end` at the end;
``state_dict()`` / ``load_state_dict()`` go into its checkpoint. The Hugging Face and Fabric faces
are this class with their loop's hooks calling those methods.

Several processes (``torch.distributed`` initialised, as under ``torchrun``, accelerate or
Fabric): each probes its slice of the samples, the slices are gathered in sample order, rank 0
writes the files and every decision is shared, so every rank acts alike. Every rank must call
``step`` at the same steps (a probe is a collective).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from torch import nn

from ..core.checks import check_int
from ..core.errors import InputError
from ..core.ledger import RunDirectory
from ..core.verdict import ProbeVerdict
from .base import SeedPrintsFace, refuse_unprobeable_sharding, sharding_of

__all__ = ["SeedPrintsMonitor"]


class SeedPrintsMonitor(SeedPrintsFace):
    """Probe a model's SeedPrints lineage from any training loop; act when its custody breaks.

    Call :meth:`start` once before the first optimizer step (at step 0 it takes the reference;
    on a resume it links the loaded weights to the restored chain) and :meth:`step` after every
    optimizer step: it probes when the schedule says so. :meth:`end` probes the last weights and
    releases the run directory's writer lock (:meth:`close` only releases it).
    ``state_dict()`` / ``load_state_dict()`` go into your checkpoint (load before :meth:`start`).

    Takes the arguments of :class:`~seedprints_lightning.faces.base.SeedPrintsFace`; ``save_dir``
    defaults to ``./seedprints``, and ``log_dir`` (a TensorBoard directory) to none: the metrics
    are then in :attr:`history` only.
    """

    missing_state = "SeedPrintsMonitor state (monitor.load_state_dict(...) before monitor.start(...))"
    #: The model last passed to start()/step() (a weak reference): what state_dict() binds by default.
    _last_model: Any = None

    def start(self, model: nn.Module, step: int = 0) -> ProbeVerdict | None:
        """Open the chain before the optimizer step after ``step``; the resume link's verdict, if any."""
        if self.started:
            raise InputError("start() was already called on this monitor: call it once per run, then step()")
        step = check_int("step", step, low=0, hint="the optimizer steps already taken (0 for a new run)")
        refuse_unprobeable_sharding(sharding_of(model=model))
        if self.save_dir is None:
            self.save_dir = Path.cwd() / "seedprints"
        origin = (self.settings.reference_origin if self.reference_source == "explicit"
                  else f"the {type(self).__name__} state restored with load_state_dict()")
        self._remember(model)
        return self._open(model, step, RunDirectory(self.save_dir), origin)

    def step(self, model: nn.Module, step: int) -> ProbeVerdict | None:
        """After the optimizer step that made ``step``: probe if one is due; its verdict, or ``None``."""
        if not self.started:
            raise InputError(f"{type(self).__name__}.step() before start(): call start(model, step=0) once before "
                             "the first optimizer step (a reference is never taken from trained weights)")
        step = check_int("step", step, low=0, hint="the number of optimizer steps taken")
        self.current_step = step
        self._remember(model)
        if self.chain.due(step):
            return self._probe(model, step, "interval")
        return None

    def end(self, model: nn.Module, step: int | None = None) -> ProbeVerdict | None:
        """Probe the final weights (unless ``step`` was just probed), then :meth:`close`."""
        step = self.current_step if step is None else check_int("step", step, low=0)
        return self._end(model, step)

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The state for your checkpoint, bound to the ``model`` you save with it.

        ``model`` defaults to the model last passed to :meth:`start` / :meth:`step`. While the run
        is open (after :meth:`start`, before :meth:`end`), a save record of the digest of its
        weights goes into the ledger first, so ``seedprints audit --chain RUN CKPT`` can say that
        CKPT holds exactly these weights (``bind_saves=False`` records none). A record that
        cannot be written (a read-only or full ``save_dir``) warns and never stops your save: the
        state then lists it under ``unrecorded_saves``. With DeepSpeed ZeRO-3 weights the digest is
        taken one gathered tensor at a time, a collective: call it on every rank, as
        ``engine.save_checkpoint(dir, tag, client_state={"seedprints": monitor.state_dict(model)})``
        already is.
        """
        if model is None and self._last_model is not None:
            model = self._last_model()
        self._bind_save(model, self.current_step if self.current_step is not None else 0)
        return super().state_dict()

    def _remember(self, model: nn.Module) -> None:
        # Weakly: the monitor must not keep a model alive that the loop has dropped.
        try:
            self._last_model = weakref.ref(model)
        except TypeError:  # an object without weak references: bound only when passed to state_dict()
            self._last_model = None

    def close(self) -> None:
        """Release the run directory's lock and close the TensorBoard writer (:meth:`end` does; no probe).

        Call it when a run ends without :meth:`end` (an exception in your loop) and this process
        goes on to write the same directory. A crashed process needs nothing: the OS releases its
        lock, and a monitor object that was dropped releases it when garbage collected.
        """
        self._close()
