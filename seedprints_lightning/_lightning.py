"""Import compatibility for Lightning's two package names.

``pytorch_lightning`` and ``lightning.pytorch`` ship separate ``Callback`` classes, and each
Trainer refuses a callback built on the other's. :data:`CALLBACK_BASES` holds every
``Callback`` class importable here (``pytorch_lightning`` always, it is a dependency;
``lightning.pytorch`` when installed) so ``class X(*CALLBACK_BASES)`` is accepted by both.

Nothing else is imported from either package by the callback: enums are compared by value
(``trainer.state.fn == "fit"``) and loggers are recognised by class name, so a
``lightning.pytorch`` Trainer never meets a ``pytorch_lightning`` object it would refuse.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as _pl

__all__ = ["CALLBACK_BASES", "is_tensorboard_logger", "shards_parameters", "trainer_fn_value"]

try:  # the unified package is optional
    import lightning.pytorch as _lpl
except Exception:  # pragma: no cover - depends on the environment
    _lpl = None

CALLBACK_BASES: tuple[type, ...] = (_pl.Callback,) + ((_lpl.Callback,) if _lpl is not None else ())


def _strategy_classes(*names: str) -> tuple[type, ...]:
    found = []
    for package in (_pl, _lpl):
        strategies = getattr(package, "strategies", None) if package is not None else None
        for name in names:
            cls = getattr(strategies, name, None) if strategies is not None else None
            if isinstance(cls, type):
                found.append(cls)
    return tuple(found)


#: Strategies whose parameters are sharded over ranks, from both package names: a probe must go
#: through the root module so that every rank's shard is gathered (a collective).
SHARDED_STRATEGIES: tuple[type, ...] = _strategy_classes("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def shards_parameters(strategy: Any) -> bool:
    """True when ``strategy`` shards the parameters (FSDP, DeepSpeed, ModelParallel/FSDP2), by type."""
    return isinstance(strategy, SHARDED_STRATEGIES)


def trainer_fn_value(trainer: Any) -> str | None:
    """``trainer.state.fn`` as a plain string ("fit", "validate", ...), whichever package."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    if fn is None:
        return None
    return str(getattr(fn, "value", fn))


def is_tensorboard_logger(logger: Any) -> bool:
    """True for either package's ``TensorBoardLogger`` (or a subclass), by class name."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)
