"""Checkpoint binding: a digest of a model's exact weights, recorded in the ledger when a checkpoint is saved.

A face that saves a checkpoint appends a save record (``{"kind": "save", "step",
"weights_sha256", ...}``, :meth:`~seedprints_lightning.core.ledger.CustodyLedger.record_save`) whose
``weights_sha256`` is :func:`weights_digest` of the state dict it saves. The audit
(``seedprints audit --chain RUN CKPT``) recomputes the digest of CKPT's weights and names the
save record holding it: CKPT then holds *exactly* the weights saved at that step (bit for bit),
which the lineage test alone cannot say.

The digest
----------
For each tensor, in the order of its name: ``sha256(name, dtype, shape, raw bytes)``; the
digest is the sha256 of those per-tensor digests (each preceded by its name). Tensors are moved
to the CPU one at a time (a GPU model is never copied whole), made contiguous, and read as raw
bytes, so the dtype is part of the identity: a checkpoint saved in bf16 and the same weights
upcast to fp32 differ. Entries that are not tensors (``_extra_state`` objects) are left out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .errors import InputError
from .records import SAVE_KIND

__all__ = ["find_saves", "tensor_digest", "weights_digest"]


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """sha256 of one named tensor: its name, dtype, shape and bytes (one entry of :func:`weights_digest`)."""
    digest = hashlib.sha256()
    digest.update(name.encode("utf-8") + b"\0")
    digest.update(str(tensor.dtype).removeprefix("torch.").encode("ascii") + b"\0")
    digest.update(repr(tuple(int(s) for s in tensor.shape)).encode("ascii") + b"\0")
    cpu = tensor.detach()
    if cpu.device.type != "cpu":
        cpu = cpu.to("cpu")
    cpu = cpu.contiguous()
    if cpu.numel():
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(state_dict: Mapping[str, Any]) -> str:
    """The sha256 hex digest of a state dict's tensors: names, dtypes, shapes and bytes (see the module docstring).

    ``state_dict`` maps names to tensors (``model.state_dict()``, or a checkpoint's weights with
    their prefix removed). Raises :class:`InputError` when it holds no tensor.
    """
    if not isinstance(state_dict, Mapping):
        raise InputError(f"weights_digest needs a state dict (a mapping of names to tensors), got "
                         f"{type(state_dict).__name__}")
    names = sorted(str(name) for name, value in state_dict.items() if isinstance(value, torch.Tensor))
    if not names:
        raise InputError("weights_digest: the state dict holds no tensor")
    by_name = {str(name): value for name, value in state_dict.items()}
    combined = hashlib.sha256()
    for name in names:
        combined.update(name.encode("utf-8") + b"\0" + tensor_digest(name, by_name[name]).encode("ascii"))
    return combined.hexdigest()


def find_saves(records: Iterable[Any], digest: str) -> list[dict[str, Any]]:
    """The save records (``kind == "save"``) among ``records`` whose ``weights_sha256`` is ``digest``."""

    return [r for r in records if isinstance(r, dict) and r.get("kind") == SAVE_KIND
            and r.get("weights_sha256") == digest]
