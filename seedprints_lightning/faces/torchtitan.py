"""The custody chain in a torchtitan run: a ``Trainer`` subclass and the config entry that selects it.

torchtitan (PyTorch's reference pretraining stack) has no callbacks; a run is one ``Trainer`` built
from a ``Trainer.Config`` that a ``config_registry`` function returns. This module is such a
registry, so a run adds SeedPrints on its command line::
    torchtitan/train.py --module seedprints_lightning.faces.torchtitan --config llama3_debugmodel \\
        --seedprints.every-n-steps 100 --seedprints.on-identity-lost raise

``--config NAME`` is any config function of torchtitan's own models (``llama3_debugmodel``,
``llama3_8b``, ``qwen3_...``): the module finds it in ``torchtitan.models.<model>.config_registry``
and returns its config as a :class:`SeedPrintsTitanTrainer.Config`, which builds
:class:`SeedPrintsTitanTrainer`. A registry of one's own adds one line instead:
``return with_seedprints(my_config(), every_n_steps=100)``. The face's arguments are every face's
(:class:`~seedprints_lightning.faces.settings.FaceArguments`) under ``--seedprints.<name>``, less
``feature_fn`` and ``control_factory`` (the ``Decoder`` family is built in:
:mod:`seedprints_lightning.core.titan`), with the probe spec's fields under ``--seedprints.probe.<field>``.

What the trainer does (every rank alike):

- **step 0** (or the step a resume loaded): in the first ``train_step``, after ``train()`` loaded the
  checkpoint and before the first optimizer step, the chain opens: the reference at step 0, or a
  link of the loaded weights to the chain restored from the checkpoint, so resuming other weights
  fails at once. Files go to ``<dump_folder>/seedprints`` (``--seedprints.save-dir`` overrides).
- **probes**: after each ``train_step`` (the optimizer step just taken), on the shared schedule, and a
  last one at ``training.steps``; before the checkpointer's save of that step, so the checkpoint of
  a probed step holds its probe. The metrics go to torchtitan's metric logger (TensorBoard / W&B).
- **checkpoints**: the face's state is a ``Stateful`` registered in ``checkpointer.states`` (under
  ``"seedprints"``), so torchtitan's DCP checkpoints save and restore it. When the checkpointer asks
  it for its state during a save, the save is bound first: a ledger record of the digest of the
  weights being saved, naming ``<checkpoint folder>/step-N``, so the checkpoint holds its own save
  record. A final model-only save (``checkpoint.last_save_model_only``) does not hold the face's
  state; it is bound just before it is written. Sharded (FSDP2 / TP) weights are hashed one gathered
  tensor at a time on every rank.
- **stop**: ``on_identity_lost="raise"`` raises :class:`~seedprints_lightning.IdentityLostError` on
  every rank (the decision is reduced first); ``"stop"`` ends the loop through
  ``should_continue_training``.
- **sharded models**: torchtitan shards the model with FSDP2 even on one GPU; the ``Decoder`` is
  then probed one gathered block at a time (never the whole model on one rank) on a meta twin
  built from its config. Pipeline parallelism (several model parts) is refused.

``seedprints audit --chain DUMP/seedprints DUMP/checkpoint/step-N`` audits a checkpoint directory
offline (:mod:`seedprints_lightning.offline.titan` rebuilds the model from the config the face
records in its state).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

try:
    from torch.distributed.checkpoint.stateful import Stateful
    from torchtitan.trainer import Trainer
except ImportError as exc:  # pragma: no cover - the [torchtitan] extra is missing
    raise ImportError("the torchtitan face needs torchtitan: pip install 'seedprints-lightning[torchtitan]' "
                      "(torchtitan>=0.3, whose import needs triton)") from exc

from ..core.errors import InputError
from ..core.families import TORCHTITAN
from ..core.ledger import RunDirectory
from ..core.probes import ProbeSpec
from ..core.titan import (
    TITAN_STATE_ENTRY,
    TITAN_STATE_KEY,
    decode_titan_state,
    encode_titan_state,
    find_titan_decoder,
    resolve_titan_spec,
    titan_rebuild_info,
)
from .base import SeedPrintsFace
from .settings import FaceArguments

__all__ = ["SeedPrintsTitanArguments", "SeedPrintsTitanFace", "SeedPrintsTitanTrainer", "with_seedprints"]

_DEFAULTS = FaceArguments()


@dataclass(kw_only=True, slots=True)
class SeedPrintsTitanArguments:
    """The face's arguments on torchtitan's command line: ``--seedprints.<name>`` (tyro writes ``-`` for ``_``).

    Every face's arguments (:class:`~seedprints_lightning.faces.settings.FaceArguments`, documented in
    :class:`~seedprints_lightning.faces.base.SeedPrintsFace`) but ``feature_fn`` and ``control_factory``,
    which a command line cannot carry and the built-in ``Decoder`` family makes unneeded; paths are
    strings; ``probe`` is the :class:`~seedprints_lightning.ProbeSpec` (``--seedprints.probe.num-samples``).
    ``enable=False`` builds the plain trainer's behaviour (no face). Checked when the trainer is built,
    before the model: a bad value raises :class:`~seedprints_lightning.InputError` naming it.
    """

    enable: bool = True
    every_n_steps: int = _DEFAULTS.every_n_steps
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    alpha: float = _DEFAULTS.alpha
    patience: int = _DEFAULTS.patience
    on_identity_lost: Literal["warn", "stop", "raise"] = _DEFAULTS.on_identity_lost
    fail_on: Literal["custody", "birth", "either"] = _DEFAULTS.fail_on
    num_controls: int = _DEFAULTS.num_controls
    birth_z_margin: float = _DEFAULTS.birth_z_margin
    link_z_margin: float = _DEFAULTS.link_z_margin
    link_tau_margin: float = _DEFAULTS.link_tau_margin
    adaptive_schedule: bool = _DEFAULTS.adaptive_schedule
    reference: str | None = None
    controls: str | None = None
    save_dir: str | None = None
    probe_batch_size: int = _DEFAULTS.probe_batch_size
    identity_ratio: float | None = _DEFAULTS.identity_ratio
    identity_mode: Literal["coset", "base"] = _DEFAULTS.identity_mode
    count_undetermined: bool = _DEFAULTS.count_undetermined
    signing_key: str | None = None
    log_dir: str | None = None
    bind_saves: bool = _DEFAULTS.bind_saves

    def face_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :class:`SeedPrintsTitanFace` (``probe`` ``None`` when it is the default spec)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "enable"}
        if values["probe"] == ProbeSpec():
            values["probe"] = None  # the default spec: a resumed chain's spec is then used without a warning
        return values


def _model_parts_decoder(trainer: Any) -> nn.Module:
    parts = list(getattr(trainer, "model_parts", []) or [])
    if len(parts) != 1:
        raise InputError(f"the torchtitan face probes one whole model; this trainer holds {len(parts)} model parts "
                         "(pipeline parallelism): train without --parallelism.pipeline_parallel_degree, or probe "
                         "its checkpoints offline with seedprints audit")
    lm = find_titan_decoder(parts[0])
    if lm is None:
        raise InputError(f"the torchtitan face needs a torchtitan Decoder (Llama3Model, Qwen3Model, ...); the "
                         f"trainer's model is a {type(parts[0]).__name__}")
    return lm


class _TitanState(Stateful):
    """The face's state as torchtitan's checkpointer keeps it: one bytes entry, bound to the save asking for it."""

    def __init__(self, face: SeedPrintsTitanFace) -> None:
        self.face = face

    def state_dict(self) -> dict[str, Any]:
        # The checkpointer asks while it saves (every rank, inside dcp.save); a load asks before the chain opens.
        if self.face.started:
            self.face.bind_checkpoint(self.face.saving_step())
        return {TITAN_STATE_ENTRY: encode_titan_state(self.face.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.face.load_state_dict(decode_titan_state(state_dict[TITAN_STATE_ENTRY]))


class SeedPrintsTitanFace(SeedPrintsFace):
    """The face a :class:`SeedPrintsTitanTrainer` drives (module docstring): probes, checkpoint state, save records.

    Takes the arguments of :class:`~seedprints_lightning.faces.base.SeedPrintsFace` but ``feature_fn`` and
    ``control_factory`` (the torchtitan ``Decoder`` family is built in). :meth:`attach` ties it to a
    built ``Trainer``; :meth:`begin`, :meth:`after_step` and :meth:`close` are what the trainer calls.
    """

    missing_state = ("SeedPrints state (kept in torchtitan's checkpoint under 'seedprints'; a checkpoint written "
                     "without the face has none: resume it with --checkpoint.exclude_from_loading seedprints and a "
                     "new --seedprints.save-dir, which starts a new chain from its weights, or audit it offline)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("feature_fn") is not None or kwargs.get("control_factory") is not None:
            self._refuse_custom_family()
        super().__init__(*args, **kwargs)
        self.trainer: Any = None
        self._lm: nn.Module | None = None
        self._bound_steps: set[int] = set()

    def _check_arguments(self) -> None:
        if self.settings.feature_fn is not None or self.settings.control_factory is not None:
            self._refuse_custom_family()

    @staticmethod
    def _refuse_custom_family() -> None:
        raise InputError("the torchtitan face probes torchtitan's Decoder itself: drop feature_fn and control_factory")

    # ------------------------------------------------------------------ what the trainer calls
    def attach(self, trainer: Any) -> None:
        """Tie the face to a built torchtitan ``Trainer``: its model, run directory and checkpointer's states."""
        self.trainer = trainer
        self._lm = _model_parts_decoder(trainer)
        if self.save_dir is None:
            self.save_dir = Path(trainer.config.dump_folder) / "seedprints"
        checkpointer = trainer.checkpointer
        if getattr(checkpointer, "enable", False):
            if TITAN_STATE_KEY in checkpointer.states:
                raise InputError(f"torchtitan's checkpointer already keeps a state named {TITAN_STATE_KEY!r}: one "
                                 "SeedPrints face per trainer")
            checkpointer.states[TITAN_STATE_KEY] = _TitanState(self)

    def begin(self, step: int) -> None:
        """Open the chain at ``step`` (0, or the step a resume loaded), before the next optimizer step."""
        lm = self._lm
        spec = self.reference.spec if self.reference is not None else self.settings.probe
        # An embedding probe reads the (gathered) init embedding: a collective, so every rank resolves.
        spec = self._run_model_code(lm, lambda: resolve_titan_spec(spec, lm))
        self.settings = self.settings.adopt(TORCHTITAN, spec)
        self._bound_steps.clear()
        origin = (self.settings.reference_origin if self.reference_source == "explicit"
                  else "the SeedPrints state restored from torchtitan's checkpoint")
        self._open(lm, int(step), RunDirectory(self.save_dir), origin)
        model_spec = getattr(self.trainer.config, "model_spec", None)
        self._model_rebuild = titan_rebuild_info(lm, model_name=getattr(model_spec, "name", None),
                                                 flavor=getattr(model_spec, "flavor", None))

    def after_step(self, step: int, *, last: bool) -> None:
        """After the optimizer step that made ``step``: a probe when due (and at the last step), before its save."""
        if not self.started:
            return
        self.current_step = int(step)
        if self.chain.due(step):
            self._probe(self._lm, int(step), "interval")
        elif last and self.reference is not None and self.chain.last_probed_step != step:
            self._probe(self._lm, int(step), "train_end")
        if last and self._final_save_is_model_only():
            self.bind_checkpoint(int(step))  # the face's state is not in that save: bind it before it is written

    def close(self) -> None:
        """Release the run directory's lock (the trainer calls it when ``train()`` ends, also on an error)."""
        self._close()

    # ------------------------------------------------------------------ checkpoints
    def saving_step(self) -> int:
        """The step the checkpointer is saving: the trainer's (its save follows the step's ``train_step``)."""
        return int(self.trainer.step)

    def checkpoint_path(self, step: int) -> str:
        """Where torchtitan writes the checkpoint of ``step``: ``<checkpoint folder>/step-N``."""
        return os.path.join(str(self.trainer.checkpointer.folder), f"step-{int(step)}")

    def bind_checkpoint(self, step: int) -> int | None:
        """The save record of the checkpoint of ``step`` (once per step), naming its directory; every rank calls it."""
        if step in self._bound_steps:
            return None
        self._bound_steps.add(step)
        return self._bind_save(self._lm, step, checkpoint=self.checkpoint_path(step))

    def _final_save_is_model_only(self) -> bool:
        checkpointer = getattr(self.trainer, "checkpointer", None)
        if not getattr(checkpointer, "enable", False) or getattr(checkpointer, "load_only", False) \
                or not getattr(checkpointer, "last_save_model_only", False):
            return False
        export = getattr(checkpointer, "export_dtype", None)
        param = next(iter(self._lm.parameters()), None)
        if export is not None and param is not None and param.dtype != export:
            # The export casts the weights: a digest of the live ones would match no file, so none is recorded.
            self._warn(f"SeedPrints: the final model-only checkpoint is exported in {export}, not the weights' "
                       f"{param.dtype}, so it is not bound in the ledger (the lineage audit still applies to it)")
            return False
        return True

    def _bound_weights(self, model: nn.Module) -> nn.Module | None:
        return find_titan_decoder(model)

    def _shards_weights(self, model: nn.Module) -> bool:
        return False  # sharded weights are bound too: hashed one gathered tensor at a time (the base's)

    # ------------------------------------------------------------------ torchtitan's logging
    def _log(self, metrics: dict[str, float], step: int) -> None:
        super()._log(metrics, step)  # log_dir, when given
        processor = getattr(self.trainer, "metrics_processor", None)
        logger = getattr(processor, "logger", None)
        if logger is not None:
            logger.log({tag: float(value) for tag, value in metrics.items()}, step)


# --------------------------------------------------------------------------------------
# The trainer and its config
# --------------------------------------------------------------------------------------


class SeedPrintsTitanTrainer(Trainer):
    """torchtitan's ``Trainer`` with the SeedPrints custody chain (module docstring); built by its ``Config``."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        """torchtitan's ``Trainer.Config`` plus the face's arguments (``--seedprints.<name>``)."""

        seedprints: SeedPrintsTitanArguments = field(default_factory=SeedPrintsTitanArguments)

    def __init__(self, config: Config) -> None:
        arguments = getattr(config, "seedprints", None) or SeedPrintsTitanArguments()
        # The face's arguments are checked before the model is built: a bad value fails in seconds.
        self.seedprints: SeedPrintsTitanFace | None = (
            SeedPrintsTitanFace(**arguments.face_arguments()) if arguments.enable else None)
        super().__init__(config)
        if self.seedprints is not None:
            self.seedprints.attach(self)

    def train_step(self, data_iterator: Any) -> None:
        face = self.seedprints
        if face is not None and not face.started:
            # train() has loaded any checkpoint and counted this step: the weights are those of step - 1.
            face.begin(self.step - 1)
        super().train_step(data_iterator)
        if face is not None:
            face.after_step(self.step, last=self.step == self.config.training.steps)

    def train(self) -> None:
        try:
            super().train()
        finally:
            if self.seedprints is not None:
                self.seedprints.close()

    def should_continue_training(self) -> bool:
        stop = self.seedprints is not None and self.seedprints.should_stop
        return super().should_continue_training() and not stop


def with_seedprints(config: Any, **arguments: Any) -> SeedPrintsTitanTrainer.Config:
    """``config`` (a torchtitan ``Trainer.Config``) as a :class:`SeedPrintsTitanTrainer.Config` with the face's
    ``arguments`` (:class:`SeedPrintsTitanArguments`' fields): the one line for a ``config_registry`` of one's own.

    Raises:
        InputError: ``config`` is not a ``Trainer.Config``, or is a subclass with fields of its own (its
            own trainer: subclass :class:`SeedPrintsTitanTrainer` instead), or an argument is unknown.
    """
    if not isinstance(config, Trainer.Config):
        raise InputError(f"with_seedprints takes a torchtitan Trainer.Config, got {type(config).__name__}")
    own = {f.name for f in dataclasses.fields(config)} - {f.name for f in dataclasses.fields(Trainer.Config)}
    own.discard("seedprints")
    if own:
        raise InputError(f"{type(config).__name__} adds fields to Trainer.Config ({', '.join(sorted(own))}) for a "
                         "trainer of its own: subclass SeedPrintsTitanTrainer (and its Config) instead")
    known = {f.name for f in dataclasses.fields(SeedPrintsTitanArguments)}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise InputError(f"with_seedprints got unknown arguments {unknown}; the face's are {sorted(known)}")
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(Trainer.Config) if f.init}
    base = getattr(config, "seedprints", None) or SeedPrintsTitanArguments()
    return SeedPrintsTitanTrainer.Config(**values, seedprints=dataclasses.replace(base, **arguments))


def _registry_function(name: str) -> Callable[[], Any] | None:
    """torchtitan's own config function ``name`` (``torchtitan.models.<model>.config_registry.<name>``), or None.

    The models whose name starts ``name`` are asked first (``llama3`` for ``llama3_debugmodel``), then the rest.
    """
    from torchtitan.models import _supported_models

    models = sorted(_supported_models, key=lambda model: (not name.startswith(model), -len(model)))
    for model in models:
        try:
            registry = importlib.import_module(f"torchtitan.models.{model}.config_registry")
        except ImportError:  # a model whose extra dependencies are not installed
            continue
        function = getattr(registry, name, None)
        if callable(function):
            return function
    return None


def __getattr__(name: str) -> Any:
    """``--config NAME``: torchtitan's config function ``NAME``, its config returned as the SeedPrints trainer's.

    torchtitan's ``ConfigManager`` imports ``--module`` (this module: it is no package, so its
    ``config_registry`` submodule does not exist) and calls ``getattr(module, NAME)()``.
    """
    if name.startswith("_"):
        raise AttributeError(name)
    function = _registry_function(name)
    if function is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (no torchtitan model has a config "
                             f"function {name!r} in its config_registry)")

    def config_function() -> SeedPrintsTitanTrainer.Config:
        return with_seedprints(function())

    config_function.__name__ = config_function.__qualname__ = name
    config_function.__doc__ = f"torchtitan's {function.__module__}.{name}, trained by SeedPrintsTitanTrainer."
    return config_function
