"""File writing and hashing shared by fingerprints, controls, the custody ledger and the corpus.

Every file this package writes goes through :func:`atomic_write`: a reader (another rank, an
auditor, a resumed run) sees either the old file or the complete new one, never half of one,
and a failed write leaves no temp file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_write", "file_sha256", "save_safetensors"]


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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (the custody ledger's hash of feature and reference files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
