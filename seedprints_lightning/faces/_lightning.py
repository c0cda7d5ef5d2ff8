"""Import compatibility for Lightning's two package names.

``pytorch_lightning`` and ``lightning.pytorch`` ship separate ``Callback`` classes, and each
Trainer refuses a callback built on the other's. :data:`CALLBACK_BASES` holds every
``Callback`` class importable here (``pytorch_lightning`` always, it is a dependency;
``lightning.pytorch`` when installed) so ``class X(*CALLBACK_BASES)`` is accepted by both.

:func:`run_model_code` and :func:`measure_features` are the Lightning side of a probe: forwards
through the strategy's root wrapper, and features gathered over ranks.

Nothing else is imported from either package by the callback: enums are compared by value
(``trainer.state.fn == "fit"``) and loggers are recognised by class name, so a
``lightning.pytorch`` Trainer never meets a ``pytorch_lightning`` object it would refuse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytorch_lightning as _pl
import torch

from ..core.controls import preserve_rng_state
from ..core.probes import ProbeSpec
from ..core.processes import Processes, measure_over_ranks, torch_processes
from ..core.verdict import METRIC_TAGS
from .base import sharding_of

__all__ = ["CALLBACK_BASES", "call_inside_wrapper", "forwards_in_wrapper", "is_tensorboard_logger", "log_metrics",
           "measure_features", "processes_of", "run_model_code", "shards_parameters", "trainer_fn_value"]

try:  # the unified package is optional
    import lightning.pytorch as _lpl
except Exception:  # pragma: no cover - depends on the environment
    _lpl = None

CALLBACK_BASES: tuple[type, ...] = (_pl.Callback,) + ((_lpl.Callback,) if _lpl is not None else ())


def shards_parameters(strategy: Any) -> bool:
    """True when ``strategy`` shards the parameters (FSDP, DeepSpeed, ModelParallel/FSDP2): a probe must go
    through the root module so that every rank's shard is gathered (a collective)."""
    return sharding_of(strategy=strategy) is not None


def trainer_fn_value(trainer: Any) -> str | None:
    """``trainer.state.fn`` as a plain string ("fit", "validate", ...), whichever package."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    if fn is None:
        return None
    return str(getattr(fn, "value", fn))


def is_tensorboard_logger(logger: Any) -> bool:
    """True for either package's ``TensorBoardLogger`` (or a subclass), by class name."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def run_model_code(trainer: Any, pl_module: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (probe forwards) so that parameters are usable on every strategy, leaving RNGs untouched.

    Sharded strategies whose root wrapper is not the LightningModule (FSDP1, DeepSpeed): inside the
    wrapper's forward (:func:`call_inside_wrapper`). Everything else (DDP included: its wrapper's
    forward is a collective that routes to ``training_step``; FSDP2, whose ``fully_shard``-ed
    modules gather their own shards): call ``fn`` directly. Callback hooks run outside the training
    step's autocast, hence the precision plugin's context.
    """
    with preserve_rng_state(), trainer.precision_plugin.forward_context():
        if not forwards_in_wrapper(trainer, pl_module):
            return fn()
        return call_inside_wrapper(trainer.strategy.model, pl_module, fn)


def forwards_in_wrapper(trainer: Any, pl_module: Any) -> bool:
    """Whether the probe's forwards must run inside the strategy's root wrapper (FSDP1, DeepSpeed): a sharding
    strategy whose wrapper is not the LightningModule itself."""
    wrapper = getattr(trainer.strategy, "model", None)
    return shards_parameters(trainer.strategy) and wrapper is not None and wrapper is not pl_module


def call_inside_wrapper(wrapper: torch.nn.Module, pl_module: Any, fn: Callable[[], Any]) -> Any:
    """``fn()``, run inside the forward of the strategy's root ``wrapper`` (one call; no gradient kept).

    Why the LightningModule's ``forward`` is replaced for one call: FSDP1's
    ``FullyShardedDataParallel`` gathers a unit's shards only inside its wrapper's forward, so
    code that needs the parameters must run there, and Lightning has no public API to run other
    code there (as of 2.6). Lightning's own strategies reach ``training_step`` the same way
    (``Strategy.training_step`` -> ``_ForwardRedirection``): an instance ``forward`` set on the
    LightningModule, then the wrapper called. ``fn`` could not be the user's ``forward``, whose
    arguments the probe does not know.

    The assumption: calling the wrapper calls ``pl_module.forward`` as looked up on the instance.
    If it did not, the probe would silently run nothing: this raises instead, naming the Lightning
    version, and ``tests/test_face_hooks.py`` fails when Lightning stops routing its own steps so.
    The instance's own ``forward`` attribute, if it had one, is put back.
    """
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
    if "value" not in result:
        raise RuntimeError(
            f"SeedPrints: calling the strategy's root wrapper ({type(wrapper).__name__}) did not call the "
            f"LightningModule's forward (pytorch_lightning {_pl.__version__}), so the probe could not run inside "
            "it. The Lightning face assumes, as Lightning's own strategies do, that the wrapper calls the "
            "LightningModule's forward; train with ModelParallelStrategy (FSDP2) meanwhile, and report this")
    return result["value"]


def measure_features(trainer: Any, pl_module: Any, spec: ProbeSpec,
                     features_of: Callable[[Any, ProbeSpec, tuple[int, int] | None], torch.Tensor]) -> torch.Tensor:
    """The live model's ``[n, D]`` features on ``spec``, identical on every rank.

    :func:`~seedprints_lightning.core.processes.measure_over_ranks` over the strategy's collectives:
    each rank probes its slice (``features_of(module, spec, sample_range)``) through
    :func:`run_model_code`, so more ranks make a probe faster.
    """
    world = int(getattr(trainer, "world_size", 1) or 1)
    strategy = trainer.strategy

    def probe_slice(padded: ProbeSpec, sample_range: tuple[int, int] | None) -> torch.Tensor:
        return run_model_code(trainer, pl_module, lambda: features_of(pl_module, padded, sample_range))

    def all_gather(mine: torch.Tensor) -> torch.Tensor:
        return strategy.all_gather(mine.to(getattr(strategy, "root_device", mine.device)))

    return measure_over_ranks(spec, probe_slice, rank=int(trainer.global_rank) if world > 1 else 0, world=world,
                              all_gather=all_gather, broadcast=lambda features: strategy.broadcast(features, src=0))


def processes_of(trainer: Any) -> Processes:
    """The trainer's ranks as :class:`~seedprints_lightning.core.processes.Processes` (rank 0 writes).

    Decisions go through the strategy's broadcast and reduce; the object all-gather that splits the
    controls' build is ``torch.distributed``'s (a strategy has none for objects), so with
    ``torch.distributed`` not initialised the controls are built whole and broadcast.
    """
    strategy = trainer.strategy
    return dataclasses.replace(
        torch_processes(), is_writer=bool(trainer.is_global_zero), broadcast=lambda obj: strategy.broadcast(obj, src=0),
        any_rank=lambda flag: bool(strategy.reduce_boolean_decision(flag, all=False)))


def log_metrics(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` to every logger at ``step`` now, and into ``trainer.callback_metrics``.

    ``callback_metrics`` lets ``EarlyStopping`` and ``ModelCheckpoint`` monitor a tag; the values are
    the same on every rank (never ``rank_zero_only``: ranks would diverge).
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    for tag, value in metrics.items():
        trainer.callback_metrics[tag] = torch.tensor(float(value))
    # A figure this probe could not measure must not be read from an earlier probe.
    for tag in METRIC_TAGS:
        if tag not in metrics:
            trainer.callback_metrics.pop(tag, None)
