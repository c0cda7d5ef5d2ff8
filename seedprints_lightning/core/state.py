"""What a face's checkpoint state holds: the chain's own (:class:`ChainState`) and the face's keys beside it.

One place for the keys that the faces write and the offline readers (:mod:`~seedprints_lightning.offline.sources`)
read, so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .files import is_seedprints_state

__all__ = ["HF_CONFIG_KEY", "HF_TRAINER_STATE_FILE", "LEGACY_STATE_KEY", "MODEL_STATE_KEY", "STATE_FORMAT_VERSION",
           "STEP_STATE_KEY", "UNRECORDED_SAVES_KEY", "ChainState", "FaceState", "model_rebuild_info",
           "model_weights_prefix"]

#: Checkpoint key under which a LightningModule stores its model's transformers config
#: (``CausalLMModule.on_save_checkpoint`` does; any module can).
HF_CONFIG_KEY = "hf_config"
#: Key, in a face's checkpoint state, of what rebuilds the model from any module's checkpoint:
#: ``{"hf_config": ..., "state_dict_prefix": ...}`` or ``{"why_not": ...}``.
MODEL_STATE_KEY = "model_rebuild"
#: Key, in a face's checkpoint state, of the optimizer step the state was saved at.
STEP_STATE_KEY = "step"
#: The file in a Hugging Face ``Trainer`` checkpoint directory (``checkpoint-N/``) that holds the
#: ``SeedPrintsTrainerCallback`` state.
HF_TRAINER_STATE_FILE = "seedprints_state.pt"
#: The Lightning ``state_key`` of every ``SeedPrintsCallback`` before it was derived from the
#: callback's arguments: checkpoints written with it still resume and audit.
LEGACY_STATE_KEY = "SeedPrintsCallback"
#: Key, in a face's checkpoint state, of the saves whose ledger record could not be written (a read-only or full
#: run directory): ``[{"step", "checkpoint", "weights_sha256", "error"}, ...]``. The user's save went on; this
#: says which of its saves the ledger does not bind, and why.
UNRECORDED_SAVES_KEY = "unrecorded_saves"
#: The prefix of the transformers model's weights in a checkpoint that records no other (CausalLMModule's ``model``).
DEFAULT_WEIGHTS_PREFIX = "model."
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def model_rebuild_info(module: torch.nn.Module, lm: torch.nn.Module | None, *, feature_fn: bool) -> dict[str, Any]:
    """What a checkpoint of ``module`` needs to rebuild its transformers model ``lm`` offline.

    The config as plain JSON types and the prefix of ``lm``'s weights in the module's state dict
    (``"net."`` for ``self.net = LlamaForCausalLM(...)``; wrapper segments that sharded strategies
    add to module names are not in a saved state dict, so they are dropped). Without a
    transformers model (a ``feature_fn`` model) it says why the checkpoint cannot be rebuilt.
    """
    if lm is None:
        what = "a feature_fn model" if feature_fn else "a module without a transformers model"
        return {"why_not": f"the run probed {what}, which this package cannot rebuild from a checkpoint: fingerprint "
                           "its features yourself (Fingerprint(features=extract_features(model, spec, forward_fn=...), "
                           "spec=spec).save(...)) and pass that fingerprint file instead of the checkpoint"}
    name = next((n for n, m in module.named_modules() if m is lm), None)
    if name is None:
        return {"why_not": "the transformers model is not a submodule of the LightningModule"}
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return {"hf_config": json.loads(lm.config.to_json_string()), "state_dict_prefix": f"{name}." if name else ""}


def model_weights_prefix(checkpoint: dict[str, Any], state: dict[str, Any] | None) -> str:
    """The prefix of the transformers model's weights in a training checkpoint holding the face ``state``.

    A checkpoint with :data:`HF_CONFIG_KEY` (``CausalLMModule``) keeps them under ``"model."``; otherwise the
    prefix the face recorded (:func:`model_rebuild_info`) is used as it is: ``""`` (the saved module IS the
    transformers model: ``torch.save({"model": lm.state_dict(), ...})``) is a prefix, not a missing one.
    Without either, ``"model."``. The lineage probe (``offline.sources.checkpoint_config``) and the save
    digest (``offline.audit.checkpoint_weights_digest``) must read the same weights, hence one rule.
    """
    rebuild = (state or {}).get(MODEL_STATE_KEY)
    if isinstance(checkpoint.get(HF_CONFIG_KEY), dict) or not isinstance(rebuild, dict):
        return DEFAULT_WEIGHTS_PREFIX
    prefix = rebuild.get("state_dict_prefix")
    return prefix if isinstance(prefix, str) else DEFAULT_WEIGHTS_PREFIX


# --------------------------------------------------------------------------------------
# The checkpoint state, typed: one definition of its keys, its checks and its versions
# --------------------------------------------------------------------------------------

#: Version of the chain's checkpoint state (:class:`ChainState`): 2 is the custody chain; 1 had no
#: anchor, no schedule position and no ledger position. Readers take 1 to this; a newer one asks to upgrade.
STATE_FORMAT_VERSION = 2
#: Keys every SeedPrints state has had, in every format version (with ``format_version``).
_STATE_KEYS = ("reference_features", "reference_meta")


def _is_int(value: Any) -> bool:
    # A numpy integer is an int here (stored as one); a bool is not, though Python calls it one.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _key(default: Any, check: Callable[[Any], bool], what: str, *, factory: Callable[[], Any] | None = None) -> Any:
    """A :class:`ChainState` field: its default, and what its key must hold, for the error that names the key."""
    metadata = {"check": check, "what": what}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: _is_int(value) and value >= low


@dataclass(frozen=True)
class ChainState:
    """A custody chain's checkpoint state (:meth:`~seedprints_lightning.core.chain.CustodyChain.state_dict`), typed.

    The one definition of what a checkpoint holds for the chain. Its fields are the keys of the
    dict that goes into a checkpoint, spelled as every version since 0.5 wrote them, so checkpoints
    move both ways between versions: :meth:`to_dict` writes them (CPU tensors and plain types only:
    the dict loads with ``torch.load(weights_only=True)``), :meth:`from_dict` reads format 1 or 2
    and checks each key. A format-1 state has no anchor, no schedule position (``next_probe_step``
    and ``interval`` are ``None``: the chain restarts its schedule from ``last_probed_step``) and no
    ledger position.

    Args:
        reference_features, reference_meta: the birth fingerprint (its ``[n, D]`` features and
            :meth:`~seedprints_lightning.Fingerprint.metadata`); ``None`` before the chain began.
        reference_source: where the reference came from (``"explicit"``, ``"checkpoint"``, ``"step0"``).
        control_features, control_seeds, control_spec: the fresh-init controls (``[k, n, D]``),
            their seeds and the probe spec (``ProbeSpec.to_dict()``) they were taken with.
        anchor_features, anchor_step, anchor_index: the last held probe (stored features, its step,
            its ledger record), or ``None`` (the reference is the anchor).
        next_probe_step, interval: the schedule position.
        ledger_next_index, ledger_last_sha256: the ledger position (the next record's index, the
            sha256 of the last record written).
        last_probed_step, consecutive_failures, warned_undetermined, warned_birth: the chain's counters.
        history: one plain dict per probe (``CustodyChain.history``).
        format_version: the layout version (:data:`STATE_FORMAT_VERSION` when written).
    """

    reference_features: torch.Tensor | None = _key(None, _optional(_is_tensor), "a torch.Tensor [n, D] or None")
    reference_meta: dict[str, Any] | None = _key(None, _optional(_is_dict), "a dict (a fingerprint's metadata) or None")
    reference_source: str | None = _key(None, _optional(_is_str), "a str or None")
    control_features: torch.Tensor | None = _key(None, _optional(_is_tensor), "a torch.Tensor [k, n, D] or None")
    control_seeds: tuple[int, ...] = _key((), lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)),
                                          "a list of int seeds")
    control_spec: dict[str, Any] | None = _key(None, _optional(_is_dict), "a dict (a ProbeSpec's) or None")
    anchor_features: torch.Tensor | None = _key(None, _optional(_is_tensor), "a torch.Tensor [n, D] or None")
    anchor_step: int | None = _key(None, _optional(_at_least(0)), "an int >= 0 or None")
    anchor_index: int | None = _key(None, _optional(_at_least(0)), "an int >= 0 or None")
    next_probe_step: int | None = _key(None, _optional(_is_int), "an int or None")
    interval: int | None = _key(None, _optional(_at_least(1)), "an int >= 1 or None")
    ledger_next_index: int = _key(0, _at_least(0), "an int >= 0")
    ledger_last_sha256: str | None = _key(None, _optional(_is_str), "a sha256 hex str or None")
    last_probed_step: int = _key(-1, _at_least(-1), "an int >= -1")
    consecutive_failures: int = _key(0, _at_least(0), "an int >= 0")
    warned_undetermined: bool = _key(False, _is_bool, "True or False")
    warned_birth: bool = _key(False, _is_bool, "True or False")
    history: list[dict[str, Any]] = _key(None, lambda v: isinstance(v, list) and all(map(_is_dict, v)),
                                         "a list of dicts", factory=list)
    format_version: int = STATE_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's dict: ``format_version`` first, then every field under its own name.

        A format-1 state's missing schedule is left out rather than written as ``None`` (a reader
        of format 1 looks for the key, not for a value).
        """
        state: dict[str, Any] = {"format_version": int(self.format_version)}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "format_version" or (field.name in ("next_probe_step", "interval") and value is None):
                continue
            if field.name == "control_seeds":
                value = [int(seed) for seed in value]
            elif field.name == "history":
                value = [dict(entry) for entry in value]
            state[field.name] = value
        return state

    @classmethod
    def from_dict(cls, state: Any) -> ChainState:
        """Read a checkpoint's SeedPrints state (format 1 or 2), checking every key it holds.

        Raises:
            InputError: for anything but a SeedPrints state (``None``, another callback's state, an
                empty dict: it says what it got); for a SeedPrints state of a newer format (it asks to
                upgrade); and for a key of the wrong type or an anchor without its step (naming the key).
        """
        if not (is_seedprints_state(state) and all(key in state for key in _STATE_KEYS)):
            raise InputError(f"this is not a SeedPrints state: {_describe_state(state)}. Pass what "
                             "CustodyChain.state_dict() (or a SeedPrints callback's state_dict()) returned, e.g. a "
                             "Lightning checkpoint's checkpoint['callbacks']['SeedPrintsCallback']")
        version = state.get("format_version")
        if not _is_int(version) or not 1 <= version <= STATE_FORMAT_VERSION:
            raise InputError(
                f"the checkpoint's SeedPrintsCallback state has format version {version!r}; this "
                f"seedprints-lightning reads versions 1 to {STATE_FORMAT_VERSION}: upgrade the package"
            )
        for field in dataclasses.fields(cls):
            key, check, what = field.name, field.metadata.get("check"), field.metadata.get("what")
            if check is not None and key in state and not check(state[key]):
                raise InputError(f"the SeedPrints state's {key!r} must be {what}, got {_shown_briefly(state[key])} "
                                 f"(format version {version}): the checkpoint is damaged or was not written by "
                                 "seedprints-lightning")
        if state.get("anchor_features") is not None and state.get("anchor_step") is None:
            raise InputError("the SeedPrints state holds anchor_features without an anchor_step: the checkpoint is "
                             "damaged or was not written by seedprints-lightning")
        if ("next_probe_step" in state) != ("interval" in state):
            raise InputError("the SeedPrints state holds one of next_probe_step and interval without the other: the "
                             "checkpoint is damaged or was not written by seedprints-lightning")
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in state.items() if key in known}
        for key, value in values.items():
            if _is_int(value):
                values[key] = int(value)
        values["control_seeds"] = tuple(int(seed) for seed in values.get("control_seeds", ()))
        values["history"] = [dict(entry) for entry in values.get("history", [])]
        return cls(**values)


def _describe_state(state: Any) -> str:
    if state is None:
        return "got None (no state was saved, or it was read from the wrong key)"
    if not isinstance(state, dict):
        return f"got {type(state).__name__} {_shown_briefly(state)}, not a dict"
    if not state:
        return "got an empty dict"
    keys = sorted(map(str, state))
    shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
    missing = [key for key in ("format_version", *_STATE_KEYS) if key not in state]
    return (f"got a dict with the keys {shown} but without {', '.join(map(repr, missing))} (another callback's "
            "state?)")


def _shown_briefly(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class FaceState:
    """A face's checkpoint state: the chain's (:class:`ChainState`) and, beside its keys, the face's own.

    :meth:`to_dict` is the one flat dict every face has written since 0.5 (the chain's keys, then
    :data:`STEP_STATE_KEY`, :data:`MODEL_STATE_KEY` and :data:`UNRECORDED_SAVES_KEY`); :meth:`from_dict`
    reads it, a state without the face's keys (a chain's alone, or one written before a key existed)
    included.

    Args:
        chain: the chain's state.
        step: the optimizer step the state was saved at (``None``: the face never stepped).
        model_rebuild: how to rebuild the model from the checkpoint (:func:`model_rebuild_info`).
        unrecorded_saves: the saves whose ledger record could not be written (``step``,
            ``checkpoint``, ``weights_sha256``, ``error``).
    """

    chain: ChainState
    step: int | None = None
    model_rebuild: dict[str, Any] = dataclasses.field(default_factory=dict)
    unrecorded_saves: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.chain.to_dict(), STEP_STATE_KEY: self.step, MODEL_STATE_KEY: dict(self.model_rebuild),
                UNRECORDED_SAVES_KEY: [dict(save) for save in self.unrecorded_saves]}

    @classmethod
    def from_dict(cls, state: Any) -> FaceState:
        """Read a face's checkpoint state: :class:`InputError` naming what is wrong (:meth:`ChainState.from_dict`)."""
        chain = ChainState.from_dict(state)
        step, rebuild = state.get(STEP_STATE_KEY), state.get(MODEL_STATE_KEY)
        saves = state.get(UNRECORDED_SAVES_KEY)
        for key, value, ok, what in (
                (STEP_STATE_KEY, step, step is None or (_is_int(step) and step >= 0), "an int >= 0 or None"),
                (MODEL_STATE_KEY, rebuild, rebuild is None or isinstance(rebuild, dict), "a dict or None"),
                (UNRECORDED_SAVES_KEY, saves, saves is None or (isinstance(saves, list)
                                                               and all(isinstance(s, dict) for s in saves)),
                 "a list of dicts or None")):
            if not ok:
                raise InputError(f"the SeedPrints state's {key!r} must be {what}, got {_shown_briefly(value)}: the "
                                 "checkpoint is damaged or was not written by seedprints-lightning")
        return cls(chain, None if step is None else int(step), dict(rebuild or {}),
                   [dict(save) for save in saves or []])
