"""LitGPT with no code change: ``SeedPrintsLitGPTCallback`` and the ``SEEDPRINTS_CONFIG`` Fabric callback.

LitGPT (``litgpt pretrain``) has no callback API: it builds ``L.Fabric(...)`` with no callbacks. Fabric
still adds the callbacks returned by the factories registered under the entry-point group
``lightning.fabric.callbacks_factory``; this package registers one
(:func:`seedprints_lightning.faces.fabric_factory.fabric_callbacks`), which is inert unless the
environment variable :data:`ENV_CONFIG` names a YAML file of the face's arguments::

    # seedprints.yaml
    save_dir: out/pretrain/seedprints
    every_n_steps: 1000
    on_identity_lost: raise

    SEEDPRINTS_CONFIG=seedprints.yaml litgpt pretrain ...

The face (:class:`SeedPrintsLitGPTCallback`) is the Fabric face with LitGPT's ``GPT`` family
(:mod:`seedprints_lightning.core.litgpt`: its probe, its controls drawn by LitGPT's own init, the
``Config`` its checkpoints are rebuilt from), plus what LitGPT's scripts need since they call no
SeedPrints code: ``fabric.save`` / ``fabric.load`` are wrapped on the run's Fabric
(:func:`bind_fabric_checkpoints`) to bind every save and carry the chain's state through LitGPT's
checkpoints, and a stop raises (LitGPT reads no stop flag).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..core.errors import IdentityLostError, InputError
from ..core.families import LITGPT, family_of, refuse_dedicated
from ..core.litgpt import find_litgpt_model, litgpt_rebuild_info
from ..core.probes import ProbeSpec, find_causal_lm_or_none
from .base import SeedPrintsFace
from .fabric import SeedPrintsFabricCallback
from .messages import identity_lost_message

__all__ = [
    "ENV_CONFIG",
    "STATE_KEY",
    "SeedPrintsLitGPTCallback",
    "bind_fabric_checkpoints",
    "callback_from_config",
    "refuse_unadopted_litgpt",
    "yaml_arguments",
]

#: The environment variable naming the YAML file of the face's arguments; unset, the factory adds nothing.
ENV_CONFIG = "SEEDPRINTS_CONFIG"
#: The key under which the face's state is added to the checkpoints ``fabric.save`` writes.
STATE_KEY = "seedprints"


def refuse_unadopted_litgpt(face: str, module: nn.Module) -> None:
    """Raise when ``face`` (a Fabric face without the LitGPT family) is set up with a LitGPT GPT it would skip.

    The registry's rule for every family with a face of its own
    (:func:`~seedprints_lightning.core.families.refuse_dedicated`); kept under this name for callers of 0.8.
    """
    family = family_of(module)
    refuse_dedicated(family if family is LITGPT else None, face)


# --------------------------------------------------------------------------------------
# The face
# --------------------------------------------------------------------------------------


class SeedPrintsLitGPTCallback(SeedPrintsFabricCallback):
    """The Fabric face for LitGPT's ``GPT`` (and any transformers model), for scripts that call no SeedPrints code.

    Takes the arguments of :class:`~seedprints_lightning.SeedPrintsFabricCallback`; ``feature_fn`` and
    ``control_factory`` are not needed for a GPT (the family supplies them). Usually built by the
    ``SEEDPRINTS_CONFIG`` factory, never by hand; by hand::

        fabric = L.Fabric(callbacks=[SeedPrintsLitGPTCallback(save_dir="out/seedprints", every_n_steps=1000)])

    What it adds to the Fabric face, because LitGPT's scripts call nothing of it:

    - every ``fabric.save`` of the set-up model is bound (a ledger record of its weights' digest and
      path) and carries the face's state under ``"seedprints"``; ``fabric.load`` restores it (on
      ``--resume``, after ``on_after_setup``: the chain opens at the first optimizer step, after the load);
      :func:`bind_fabric_checkpoints`;
    - a resume from a checkpoint without that state is refused (a reference is never taken from
      trained weights), unless ``reference=`` names the parent run;
    - ``on_identity_lost="stop"`` raises :class:`~seedprints_lightning.IdentityLostError` (LitGPT reads
      no stop flag: the run ends with exit 1, its last checkpoint intact);
    - an optimizer step with no model set up by ``fabric.setup`` (LoRA / adapter fine-tuning sets it up
      with ``setup_module``, which calls no hook) warns, once, that nothing is probed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gpt: nn.Module | None = None
        self._warned_unwatched = False

    # ------------------------------------------------------------------ Fabric's hooks
    def on_after_setup(self, fabric: Any, module: nn.Module) -> None:
        if self._module is None and self.settings.feature_fn is None:
            gpt = find_litgpt_model(module)
            if gpt is not None and find_causal_lm_or_none(getattr(module, "_original_module", module)) is None:
                self._adopt(gpt)
        super().on_after_setup(fabric, module)
        if self._module is not None and self._fabric is fabric:
            bind_fabric_checkpoints(fabric, self)

    def on_after_optimizer_step(self, strategy: Any, optimizer: Any) -> None:
        if self._module is None:
            self._warn_unwatched(strategy)
            return
        super().on_after_optimizer_step(strategy, optimizer)

    # ------------------------------------------------------------------ the GPT family in the face
    def _adopt(self, gpt: nn.Module) -> None:
        """Adopt the LitGPT family (:data:`~seedprints_lightning.core.families.LITGPT`) with a spec resolved now.

        Its probe (``transformer.ln_f``'s output), controls (LitGPT's own init, unless ``control_factory``
        is given) and identity (the LitGPT ``Config``'s digest) come from the registry. Resolved now, at
        setup, when the weights are the init ones (embedding probes take the INIT embedding's
        statistics); on a resume the restored chain's spec is used instead.
        """
        probe = self.settings.probe
        if self.settings.reference is not None:
            LITGPT.resolve_spec(self.settings.reference.spec, gpt)  # a reference the GPT cannot take fails now
        else:
            probe = LITGPT.resolve_spec(probe, gpt)
        self.settings = self.settings.adopt(LITGPT, probe)
        self._gpt = gpt

    def _open(self, model: nn.Module, step: int, run: Any, origin: str) -> Any:
        verdict = super()._open(model, step, run, origin)
        if self._gpt is not None:  # the base records why a feature_fn model cannot be rebuilt; a GPT can
            self._model_rebuild = litgpt_rebuild_info(model, self._gpt)
        return verdict

    def _bound_weights(self, model: nn.Module) -> nn.Module | None:
        """The GPT's weights (the base binds transformers models only)."""
        gpt = find_litgpt_model(model)
        return gpt if gpt is not None else super()._bound_weights(model)

    def _stop(self) -> None:
        # LitGPT's loop reads no flag: raising is the only stop (the CLI exits 1; the last checkpoint is intact).
        verdict = self.last_verdict
        message = identity_lost_message(self.chain, verdict) if verdict is not None else "identity lost"
        raise IdentityLostError(message + " (on_identity_lost='stop' raises under LitGPT, whose loop has no stop "
                                          "flag: the run ends here with exit code 1)")

    def _warn_unwatched(self, strategy: Any) -> None:
        if self._warned_unwatched:
            return
        self._warned_unwatched = True
        if getattr(strategy, "is_global_zero", True):
            warnings.warn(
                f"SeedPrints ({ENV_CONFIG}={os.environ.get(ENV_CONFIG, '')!r}): an optimizer step ran, but no model "
                "was set up with fabric.setup(model, ...), so NOTHING is probed or recorded in this run. LitGPT's LoRA "
                "and adapter fine-tuning (litgpt finetune_lora / finetune_adapter) set the model up with "
                "fabric.setup_module(), which calls no callback hook. Audit the fine-tuned checkpoint offline "
                "against the parent run instead (seedprints audit --chain PARENT_RUN/seedprints CKPT), or unset "
                f"{ENV_CONFIG} for this run", UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ state carried by LitGPT's checkpoints
    def _checkpoint_state(self, path: Any, bind: bool = True) -> dict[str, Any]:
        """Bind a save of the set-up model to ``path`` (unless ``bind`` is False); the state that goes into it."""
        if bind:
            self._bind_save(self._module, self.current_step or 0, checkpoint=str(path))
        return SeedPrintsFace.state_dict(self)  # the base's: the monitor's would bind the save a second time

    def _restore_from(self, path: Any, remainder: dict[str, Any], state: dict[str, Any]) -> None:
        """After ``fabric.load(path, state)``: restore the face's state from the checkpoint, or refuse the resume."""
        saved = remainder.pop(STATE_KEY, None)
        if saved is not None:
            self.load_state_dict(saved)
            return
        loads_our_model = any(getattr(value, "_original_module", value) is self._module for value in state.values())
        if loads_our_model and not self.chain.restored and self.reference_source != "explicit":
            raise InputError(
                f"SeedPrints ({ENV_CONFIG}): fabric.load({str(path)!r}) loaded the watched model from a checkpoint "
                "that holds no SeedPrints state (it was saved without SeedPrints), so this run's chain cannot "
                "continue: a step-0 reference is never taken from trained weights. Resume from a checkpoint saved with "
                f"{ENV_CONFIG} set, set 'reference: <the parent run's seedprints directory>' in the YAML to continue "
                f"its chain, or unset {ENV_CONFIG} for this run")


def bind_fabric_checkpoints(fabric: Any, face: SeedPrintsLitGPTCallback) -> None:
    """Route this Fabric's ``save`` and ``load`` through ``face``: the one place SeedPrints patches Fabric.

    Why: Fabric calls no hook around ``save``/``load``, and LitGPT's scripts save a state the face is
    not in (``pretrain.py``: ``{"model", "optimizer", "train_dataloader", "iter_num", "step_count"}``).
    So the methods of THIS Fabric object are wrapped (an instance attribute; the class and every other
    Fabric are untouched), and only while the face watches a model:

    - ``save(path, state, filter=None)``: once the chain is open, binds the save (a ledger record of
      the weights' digest, with ``path``; not when ``filter`` filters the model's entry) and saves
      ``{**state, "seedprints": <the face's state>}``;
    - ``load(path, state=None, strict=True, **kwargs)``: Fabric returns the checkpoint entries that
      ``state`` did not ask for; the face's state is taken from them (the caller never sees it).

    A state that holds the face itself (``{"seedprints": callback}``, as the Fabric face's own
    docstring shows) is left to Fabric, which calls the face's ``state_dict`` / ``load_state_dict``.
    ``tests/test_litgpt.py::test_fabric_save_and_load_keep_the_signatures_wrapped_here`` fails if
    Fabric's ``save``/``load`` signatures change, and the LitGPT CLI test if the wrapping stops working.
    """
    if getattr(fabric, "_seedprints_bound", None) is face:
        return
    original_save, original_load = fabric.save, fabric.load

    @functools.wraps(original_save)
    def save(path: Any, state: dict[str, Any], filter: dict[str, Callable] | None = None) -> None:
        if face.started and isinstance(state, dict) and not any(value is face for value in state.values()):
            if STATE_KEY in state:
                raise InputError(f"fabric.save: the state already has a {STATE_KEY!r} entry, where SeedPrints "
                                 f"({ENV_CONFIG}) keeps its own: rename that entry")
            # A filter on the model's entry saves other weights than the model's: nothing to bind them to.
            filtered = any(getattr(state.get(key), "_original_module", state.get(key)) is face._module
                           for key in (filter or {}))
            state = {**state, STATE_KEY: face._checkpoint_state(path, bind=not filtered)}
        return original_save(path, state, filter=filter)

    @functools.wraps(original_load)
    def load(path: Any, state: dict[str, Any] | None = None, strict: bool = True, **kwargs: Any) -> dict[str, Any]:
        remainder = original_load(path, state, strict, **kwargs)
        if state and isinstance(remainder, dict) and not any(value is face for value in state.values()):
            face._restore_from(path, remainder, state)
        return remainder

    fabric.save, fabric.load = save, load
    fabric._seedprints_bound = face


# --------------------------------------------------------------------------------------
# SEEDPRINTS_CONFIG: the face's arguments from a YAML file
# --------------------------------------------------------------------------------------

#: Arguments a YAML file cannot give (functions).
_NOT_IN_YAML = ("feature_fn", "control_factory")


def yaml_arguments() -> tuple[str, ...]:
    """The face arguments a ``SEEDPRINTS_CONFIG`` file may set (every face argument but the functions)."""
    names = [name for name in inspect.signature(SeedPrintsFace.__init__).parameters if name != "self"]
    return tuple(name for name in names if name not in _NOT_IN_YAML)


def callback_from_config(path: str | os.PathLike) -> SeedPrintsLitGPTCallback:
    """A :class:`SeedPrintsLitGPTCallback` from the YAML file ``path``; every problem names the variable and the fix.

    The file is a mapping of face arguments (:func:`yaml_arguments`); ``save_dir`` is required (a
    resumed run must name the same directory: LitGPT's logger directory changes on every resume);
    ``probe`` is a mapping of :class:`~seedprints_lightning.ProbeSpec` fields. Relative paths are
    relative to the working directory, as LitGPT's ``--out_dir``.
    """
    where = f"{ENV_CONFIG}={os.fspath(path)!r}"
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"{where}: {'is a directory' if file.is_dir() else 'no such file'}. Point {ENV_CONFIG} at a "
                         "YAML file of SeedPrints arguments (e.g. 'save_dir: out/seedprints'), or unset it to train "
                         "without SeedPrints")
    import yaml

    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{where}: not readable YAML ({exc}); fix the file or unset {ENV_CONFIG}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{where}: the file must be a YAML mapping of SeedPrints arguments (e.g. "
                         f"'save_dir: out/seedprints'), got {type(data).__name__}")
    allowed = yaml_arguments()
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        why = (" (functions cannot be given in YAML; a LitGPT GPT needs neither)"
               if set(unknown) & set(_NOT_IN_YAML) else "")
        raise InputError(f"{where}: unknown argument(s) {unknown}{why}; the arguments are: {', '.join(allowed)}")
    if not data.get("save_dir"):
        raise InputError(f"{where}: 'save_dir' is required: the run's seedprints directory (e.g. "
                         "'save_dir: out/pretrain/seedprints'); a resumed run must name the same one")
    arguments = dict(data)
    if arguments.get("probe") is not None:
        if not isinstance(arguments["probe"], dict):
            raise InputError(f"{where}: 'probe' must be a mapping of ProbeSpec fields (e.g. 'probe: {{kind: token, "
                             f"num_samples: 1000}}'), got {type(arguments['probe']).__name__}")
        try:
            arguments["probe"] = ProbeSpec.from_dict(arguments["probe"])
        except InputError as exc:
            raise InputError(f"{where}: probe: {exc}") from exc
    try:
        return SeedPrintsLitGPTCallback(**arguments)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from exc
    except TypeError as exc:  # a value of the wrong type that the face's checks did not name
        raise InputError(f"{where}: {exc}") from exc
