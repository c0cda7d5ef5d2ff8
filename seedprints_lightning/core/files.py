"""File writing and hashing shared by fingerprints, controls, the custody ledger and the corpus.

Every whole file this package writes goes through :func:`atomic_write` (the custody ledger
only appends lines): a reader (another rank, an auditor, a resumed run) sees either the old
file or the complete new one, never half of one, and a failed write leaves no temp file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import FingerprintFileError, SeedPrintsError

__all__ = ["atomic_write", "file_sha256", "is_distributed_checkpoint", "is_seedprints_state",
           "load_lightning_checkpoint", "read_safetensors", "save_safetensors"]

#: What Lightning writes beside the shards of a distributed (DCP) checkpoint directory
#: (``ModelParallelStrategy`` / FSDP with ``save_distributed_checkpoint=True``): everything but
#: the weights and optimizer states, the callback states included.
DISTRIBUTED_META_FILE = "meta.pt"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp_path)`` for a temp file beside ``path``, then rename it over ``path``.

    The temp file is removed when ``write`` or the rename fails (the error propagates).
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (see :func:`atomic_write`)."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: str | os.PathLike, what: str, *, detail: str = "",
                     hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file and its metadata, or :class:`FingerprintFileError` naming ``what``.

    ``what`` names the kind of file in the messages ("fingerprint file"); ``detail`` prefixes the
    reader's own error and ``hint`` says how to fix it.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FingerprintFileError(f"{what} {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise FingerprintFileError(f"{path} is not a readable {what} ({detail}{exc}){hint}") from exc


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the custody ledger's hash of feature and reference files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_seedprints_state(value: Any) -> bool:
    """True for a face's checkpoint state (a dict with the chain's ``format_version``), whatever key holds it."""
    return isinstance(value, dict) and "format_version" in value


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """True for a Lightning distributed checkpoint directory (DCP shards, ``.metadata`` and ``meta.pt``)."""
    folder = Path(path)
    return folder.is_dir() and (folder / ".metadata").is_file() and (folder / DISTRIBUTED_META_FILE).is_file()


def _load_distributed_checkpoint(folder: Path, *, trust_pickle: bool, error: type[SeedPrintsError],
                                 weights: bool) -> dict[str, Any]:
    """A DCP checkpoint directory as one dict: ``meta.pt``, and with ``weights`` the gathered ``state_dict``.

    The shards are gathered offline in one process (``dcp_to_torch_save``, no process group):
    the whole model and optimizer state pass through host memory once.
    """
    try:
        checkpoint = torch.load(folder / DISTRIBUTED_META_FILE, map_location="cpu", weights_only=not trust_pickle)
        if weights:
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            with tempfile.TemporaryDirectory() as scratch:
                dcp_to_torch_save(folder, Path(scratch) / "full.pt")
                full = torch.load(Path(scratch) / "full.pt", map_location="cpu", weights_only=not trust_pickle)
            checkpoint["state_dict"] = full.get("state_dict", {})
    except Exception as exc:
        raise error(f"{folder} is a distributed checkpoint directory that could not be read ({type(exc).__name__}: "
                    f"{exc}); pass trust_pickle=True (--trust-pickle) if you created it yourself") from exc
    if not isinstance(checkpoint, dict):
        raise error(f"{folder / DISTRIBUTED_META_FILE} is not a Lightning checkpoint's metadata")
    checkpoint.setdefault("state_dict", {})  # without ``weights``: the step and the callback states only
    return checkpoint


def load_lightning_checkpoint(path: str | os.PathLike, *, trust_pickle: bool,
                              error: type[SeedPrintsError], mmap: bool = False) -> dict[str, Any]:
    """Read a training checkpoint on CPU, or raise ``error`` saying why not.

    A Lightning ``.ckpt`` (a dict with a ``state_dict``), a Lightning distributed checkpoint
    directory (sharded strategies), or a Fabric / hand-written one (a dict with a SeedPrints
    state among its values, beside the model's state dict).

    ``mmap`` maps the tensors instead of reading them (for a checkpoint's step or callback state).

    Read with ``torch.load(weights_only=True)`` unless ``trust_pickle``: unpickling a file
    from someone else can run arbitrary code. ``error`` is the caller's error type (the
    auditor's ``SourceError``, the training package's ``InputError``); the messages are one.
    """
    import zipfile

    file = Path(path).expanduser()
    if is_distributed_checkpoint(file):
        return _load_distributed_checkpoint(file, trust_pickle=trust_pickle, error=error, weights=not mmap)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise error(f"checkpoint {file} {what}: pass the path of a .ckpt file")
    # torch.save has written zip archives since torch 1.6 and Lightning always uses it; checking
    # the container first tells "not a checkpoint" apart from "a checkpoint a safe load refuses",
    # which torch reports with the same exception type.
    if not zipfile.is_zipfile(file):
        raise error(f"{file} is not a PyTorch checkpoint (not a torch.save zip archive): pass a .ckpt written by a "
                    "Trainer")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except Exception as exc:
        if not trust_pickle:
            raise error(
                f"{file} contains Python objects beyond tensors and plain containers (often callback state), which a "
                "safe load refuses; if you created this checkpoint yourself, pass trust_pickle=True (command line: "
                f"--trust-pickle) ({type(exc).__name__}: {exc})"
            ) from exc
        raise error(f"{file} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict) or ("state_dict" not in checkpoint and not any(
            is_seedprints_state(value) for value in checkpoint.values())):
        raise error(f"{file} is neither a Lightning checkpoint (no 'state_dict') nor a checkpoint holding a SeedPrints "
                    "state: save it with Trainer.save_checkpoint, or with fabric.save(path, {'model': model, ..., "
                    "'seedprints': callback}) (any key) / torch.save({..., 'seedprints': monitor.state_dict()}, path)")
    return checkpoint
