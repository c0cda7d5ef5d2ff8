"""torchtitan's distributed checkpoints as offline sources: ``compare``, ``audit`` and ``audit --chain RUN CKPT``.

torchtitan's ``CheckpointManager`` writes ``<dump_folder>/<checkpoint.folder>/step-N/``: one
``torch.distributed.checkpoint`` (DCP) directory (``.metadata`` and ``__<rank>_<n>.distcp`` files)
holding the model's tensors under their own names (``tok_embeddings.weight``,
``layers.0.attention.qkv_linear.wq.weight``, ...), the optimizer, the scheduler, the data loader,
the trainer's ``train_state`` and, with the torchtitan face, ``seedprints.face_state``: the face's
state, whose ``model_rebuild`` holds the model's config record
(:func:`~seedprints_lightning.core.titan.titan_config_record`).

:func:`load_titan_model` rebuilds the ``Decoder`` from that record on the meta device, materialises
it on the CPU (torchtitan's ``init_states`` for the buffers: the RoPE cache is not saved) and reads
the model's tensors into it with ``torch.distributed.checkpoint.load`` in this one process (no
process group). Nothing is unpickled but the face's state, read with ``weights_only=True``; the
record imports only ``torchtitan`` and ``torch.nn.init`` names. The optimizer state is never read.
A final model-only save (``checkpoint.last_save_model_only``, torchtitan's default) holds no face
state: its model's record is read from the latest other ``step-K`` of the same folder (one run, one model).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.controls import preserve_rng_state
from ..core.errors import InputError, SourceError
from ..core.titan import (
    MISSING_INITS_ATTR,
    TITAN_CONFIG_KEY,
    TITAN_STATE_ENTRY,
    TITAN_STATE_KEY,
    decode_titan_state,
    fill_inits_from_registry,
    titan_config_from_record,
)

__all__ = ["is_titan_checkpoint", "load_titan_model", "read_titan_state", "read_titan_weights"]

#: The key of the face's state in the checkpoint's (flattened) DCP metadata.
_STATE_FQN = f"{TITAN_STATE_KEY}.{TITAN_STATE_ENTRY}"
#: Keys every torchtitan Decoder checkpoint holds (the model's tensors are saved at the top level).
_DECODER_KEYS = ("tok_embeddings.weight", "norm.weight")


def _metadata(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata()


def is_titan_checkpoint(path: Path) -> bool:
    """True for a torchtitan checkpoint directory: a DCP ``.metadata`` whose keys include a Decoder's own tensors.

    Lightning's distributed checkpoints (with ``meta.pt``) and OLMo-core's (``model_and_optim/``) are not.
    """
    folder = Path(path)
    if not (folder.is_dir() and (folder / ".metadata").is_file()) or (folder / "meta.pt").exists():
        return False
    try:
        keys = _metadata(folder).state_dict_metadata
    except Exception:  # an unreadable or foreign .metadata: not one of ours to judge
        return False
    return all(key in keys for key in _DECODER_KEYS)


class _WeightsOnlyPlanner:
    """DCP's default load planner, but the non-tensor entries (the face's state, the step) load with
    ``weights_only=True``: a checkpoint under audit may come from anyone."""

    def __new__(cls) -> Any:
        import io

        from torch.distributed.checkpoint import DefaultLoadPlanner

        class Planner(DefaultLoadPlanner):
            def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
                loaded = torch.load(value, map_location="cpu", weights_only=True)
                fqn = read_item.dest_index.fqn
                if self.flatten_state_dict:
                    from torch.distributed.checkpoint._nested_dict import set_element

                    set_element(self.original_state_dict, self.mappings[fqn], loaded)
                else:
                    self.state_dict[fqn] = loaded

        return Planner()


def _dcp_load(state_dict: dict[str, Any], path: Path) -> None:
    """``torch.distributed.checkpoint.load`` into ``state_dict`` in this one process, never unpickling code."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state_dict, checkpoint_id=str(path), planner=_WeightsOnlyPlanner(), no_dist=True)


def read_titan_state(path: Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """The trainer state of a torchtitan checkpoint, with no weights: ``{"global_step": N, "seedprints": state}``.

    ``seedprints`` is present when the torchtitan face wrote the checkpoint. ``trust_pickle`` is
    accepted for the readers' common signature; nothing here needs it (``weights_only`` reads).
    """
    folder = Path(path)
    try:
        keys = _metadata(folder).state_dict_metadata
        wanted: dict[str, Any] = {key: None for key in (_STATE_FQN, "train_state.step") if key in keys}
        if wanted:
            _dcp_load(wanted, folder)
    except Exception as exc:
        raise SourceError(f"{folder}: the torchtitan checkpoint's trainer state could not be read "
                          f"({type(exc).__name__}: {exc})") from exc
    out: dict[str, Any] = {"global_step": wanted.get("train_state.step")}
    if wanted.get(_STATE_FQN) is not None:
        try:
            out["seedprints"] = decode_titan_state(wanted[_STATE_FQN])
        except Exception as exc:
            raise SourceError(f"{folder}: the SeedPrints state in this torchtitan checkpoint could not be read "
                              f"({type(exc).__name__}: {exc})") from exc
    return out


def _recorded_rebuild(state: dict[str, Any] | None) -> dict[str, Any] | None:
    rebuild = state.get("model_rebuild") if isinstance(state, dict) else None
    return rebuild if isinstance(rebuild, dict) else None


def _sibling_rebuild(folder: Path) -> dict[str, Any] | None:
    """The config record of the latest other checkpoint of the same run (``../step-K``) that holds the face's state.

    A final model-only save (``checkpoint.last_save_model_only``, torchtitan's default) holds the
    weights only; the run's model is the same in every checkpoint, so its record is read there.
    """
    siblings = []
    for other in folder.parent.glob("step-*"):
        suffix = other.name.removeprefix("step-")
        if other != folder and suffix.isdigit() and (other / ".metadata").is_file():
            siblings.append((int(suffix), other))
    for _step, other in sorted(siblings, reverse=True):
        try:
            rebuild = _recorded_rebuild(read_titan_state(other).get("seedprints"))
        except SourceError:
            continue
        if rebuild is not None and isinstance(rebuild.get(TITAN_CONFIG_KEY), dict):
            return rebuild
    return None


def _rebuild_config(folder: Path, state: dict[str, Any] | None) -> tuple[Any, list[str]]:
    rebuild = _recorded_rebuild(state)
    if rebuild is None:
        rebuild = _sibling_rebuild(folder)
    record = rebuild.get(TITAN_CONFIG_KEY) if isinstance(rebuild, dict) else None
    if not isinstance(record, dict):
        why = rebuild.get("why_not") if isinstance(rebuild, dict) else None
        raise SourceError(
            f"{folder} is a torchtitan checkpoint without the model's config"
            + (f" ({why})" if why else " (no SeedPrints state in it nor in another step-N of its folder: it was not "
                                       "written by the torchtitan face)")
            + ": train with `--module seedprints_lightning.faces.torchtitan`, or fingerprint the model yourself and "
              "pass that fingerprint file")
    try:
        config, missing = titan_config_from_record(record)
    except InputError as exc:
        raise SourceError(f"{folder}: the torchtitan model config recorded in its SeedPrints state cannot be "
                          f"rebuilt: {exc}") from exc
    missing = fill_inits_from_registry(config, missing, rebuild.get("model_name"), rebuild.get("flavor"))
    return config, missing


def _build(config: Any, missing: list[str]) -> nn.Module:
    """The config's model on the CPU, its buffers (the RoPE cache) computed by torchtitan's ``init_states``."""
    with preserve_rng_state():
        with torch.device("meta"):
            model = config.build()
        model.to_empty(device="cpu")
        torch.manual_seed(0)  # the parameters drawn here are overwritten by the checkpoint's
        model.init_states(buffer_device=torch.device("cpu"))
    if missing:
        setattr(model, MISSING_INITS_ATTR, list(missing))
    return model


def read_titan_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a torchtitan checkpoint as saved (their names and dtypes), for a save's digest.

    The model is rebuilt from the checkpoint's SeedPrints state to know which keys are the model's.
    """
    folder = Path(path)
    state = read_titan_state(folder).get("seedprints")
    config, missing = _rebuild_config(folder, state)
    model = _build(config, missing)
    return _read_into(model, folder)


def _read_into(model: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """Read the checkpoint's tensors of ``model``'s state dict, in the saved dtypes; the dict read."""
    try:
        metadata = _metadata(folder).state_dict_metadata
    except Exception as exc:
        raise SourceError(f"{folder}: not a readable torchtitan checkpoint ({type(exc).__name__}: {exc})") from exc
    wanted = model.state_dict()
    absent = [key for key in wanted if key not in metadata]
    if absent:
        raise SourceError(f"{folder}: the checkpoint lacks {len(absent)} tensor(s) of the model its config describes "
                          f"({', '.join(absent[:3])}): not this model's checkpoint")
    # Read in the saved dtypes (a final model-only save may be in its export dtype), into fresh CPU tensors.
    weights: dict[str, Any] = {}
    for key, value in wanted.items():
        saved = metadata[key].properties.dtype
        weights[key] = torch.empty(value.shape, dtype=saved)
    try:
        _dcp_load(weights, folder)
    except Exception as exc:
        raise SourceError(f"{folder}: the model's tensors could not be read ({type(exc).__name__}: {exc})") from exc
    return weights


def load_titan_model(path: Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The torchtitan ``Decoder`` of a checkpoint directory, rebuilt from its recorded config, on the CPU, in eval mode.

    Its parameters are in ``dtype``; the RoPE cache (a complex buffer) as torchtitan computes it.

    Raises:
        SourceError: the directory is not a torchtitan checkpoint of a model the face recorded.
    """
    folder = Path(path)
    if not is_titan_checkpoint(folder):
        raise SourceError(f"{folder} is not a torchtitan checkpoint directory (a DCP .metadata with the Decoder's "
                          "tok_embeddings.weight and norm.weight)")
    state = read_titan_state(folder).get("seedprints")
    config, missing = _rebuild_config(folder, state)
    model = _build(config, missing)
    weights = _read_into(model, folder)
    try:
        model.load_state_dict(weights, strict=True)
    except Exception as exc:
        raise SourceError(f"{folder}: the weights do not match the model its config describes "
                          f"({type(exc).__name__}: {exc})") from exc
    for param in model.parameters():  # parameters only: a module-wide cast would make the complex RoPE cache real
        if param.dtype.is_floating_point and param.dtype != dtype:
            param.data = param.data.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model
