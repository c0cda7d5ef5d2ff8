"""What ``identify``'s screen reads of a fingerprint, chosen and stored when the run writes it.

``seedprints identify`` first tests every recorded fingerprint on a fixed, seeded subset of
``s`` columns (:mod:`seedprints_lightning.offline.identify`), from the dense ranks of its
softmax-normalised values on those columns (:func:`~seedprints_lightning.core.stats.normalised_column_ranks`).
Everything that decides those ranks is known when the run writes the fingerprint: the width
``D``, the subset's size and seed (:func:`screen_columns`: a draw that depends on nothing else)
and the softmax temperature (the tests' default). So the run stores them as it writes:

* each probe file holds them as its own small tensor, ``screen_ranks`` (``[s, n]`` int16: 128 KB
  beside the 7 MB of packed features at n = 1000, D = 4096), which safetensors reads without
  inflating the rest; the probe's ledger record holds what they are and their sha256 under
  ``"screen"`` (:class:`StoredScreen`), so the hash-chained ledger binds them as it binds the
  features file;
* ``reference.safetensors`` holds them too, described (with their sha256) in its metadata under
  ``seedprints_screen``: the file's own sha256 (in every record, checked by ``identify`` when it
  loads the run) binds them.

A run narrower than ``2 s`` columns stores none (``identify`` tests it exactly), nor does a
fingerprint with non-finite values (the exact test says why it cannot be tested). Old run
directories (no stored screen) and a screen of other options are ranked from the probe files
(``identify``'s index, built once beside the run). A stored screen whose bytes do not match its
recorded sha256 is never used (:func:`read_stored_screen` raises): ``identify`` reads the whole
file instead, whose sha256 it checks against the ledger.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import check_int
from .errors import FingerprintFileError, InputError
from .stats import DEFAULT_TEMPERATURE, normalised_column_ranks

__all__ = ["SCREEN_COLUMNS", "SCREEN_FIELD", "SCREEN_META_KEY", "SCREEN_SEED", "SCREEN_TENSOR", "StoredScreen",
           "is_screened", "make_screen", "read_stored_screen", "screen_columns", "screen_digest", "screen_metadata",
           "stored_screen_of_file"]

#: ``s``: the columns each fingerprint is screened on (``ScreenOptions.columns``' default).
SCREEN_COLUMNS = 64
#: Seeds the draw of the screen's columns (``ScreenOptions.seed``' default).
SCREEN_SEED = 0
#: The probe file's (and the reference file's) tensor of stored screen ranks.
SCREEN_TENSOR = "screen_ranks"
#: The ledger record's field that describes a probe file's stored screen (:meth:`StoredScreen.to_json`).
SCREEN_FIELD = "screen"
#: The reference file's metadata key that describes its stored screen.
SCREEN_META_KEY = "seedprints_screen"


def screen_columns(dim: int, columns: int = SCREEN_COLUMNS, seed: int = SCREEN_SEED) -> np.ndarray:
    """The sorted column indices screened at width ``dim``: a uniform draw of ``columns`` without replacement.

    Args:
        dim: ``D``, the fingerprint's width.
        columns: ``s``, how many columns (at most ``dim``).
        seed: seeds the draw.

    The draw depends on ``(seed, dim, columns)`` only, never on any data, so a run computes it
    when it writes a fingerprint and ``identify`` gets the same columns (the screen's bound
    needs a draw made before the data are seen: :func:`~seedprints_lightning.core.stats.subset_tau_bounds`).
    """
    dim, columns, seed = check_int("dim", dim, low=1), check_int("columns", columns, low=1), check_int("seed", seed,
                                                                                                      low=0)
    rng = np.random.default_rng([seed, dim, columns])
    return np.sort(rng.choice(dim, size=min(columns, dim), replace=False)).astype(np.int64)


def is_screened(dim: int, columns: int = SCREEN_COLUMNS) -> bool:
    """Whether a run of width ``dim`` is screened on ``columns`` columns (narrower runs are tested exactly)."""
    return int(dim) >= 2 * int(columns)


def screen_digest(ranks: np.ndarray) -> str:
    """sha256 of stored screen ranks: their dtype, shape and little-endian bytes."""
    ranks = np.ascontiguousarray(ranks)
    little = ranks.astype(ranks.dtype.newbyteorder("<"), copy=False)
    digest = hashlib.sha256(f"{little.dtype.str}{list(ranks.shape)}".encode())
    digest.update(little.tobytes())
    return digest.hexdigest()


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class StoredScreen:
    """What a stored screen is: its tensor's name, the options it was made with, and the sha256 of its ranks.

    Args:
        sha256: :func:`screen_digest` of the ranks.
        columns: ``s``, the size of the subset (:func:`screen_columns`).
        seed: the subset's seed.
        temperature: the softmax temperature the ranks were made at.
        tensor: the tensor's name in the file.
    """

    sha256: str
    columns: int = SCREEN_COLUMNS
    seed: int = SCREEN_SEED
    temperature: float = DEFAULT_TEMPERATURE
    tensor: str = SCREEN_TENSOR

    def matches(self, columns: int, seed: int, temperature: float) -> bool:
        """Whether these ranks are the ones a screen of these options needs."""
        return (self.columns, self.seed, self.temperature) == (int(columns), int(seed), float(temperature))

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "columns": self.columns, "seed": self.seed, "temperature": self.temperature,
                "tensor": self.tensor}

    @classmethod
    def from_json(cls, data: Any) -> StoredScreen:
        """The description from its JSON object; :class:`InputError` naming what is wrong with it."""
        if not isinstance(data, dict):
            raise InputError(f"a stored screen's description must be a JSON object, got {type(data).__name__}")
        problems = []
        if not _is_sha256(data.get("sha256")):
            problems.append("its 'sha256' is no sha256 hex digest")
        for key in ("columns", "seed"):
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "columns" else 0):
                problems.append(f"its {key!r} is no integer >= {1 if key == 'columns' else 0}")
        temperature = data.get("temperature")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            problems.append("its 'temperature' is no positive number")
        if not isinstance(data.get("tensor"), str) or not data.get("tensor"):
            problems.append("its 'tensor' is no tensor name")
        if problems:
            raise InputError(f"the stored screen's description is malformed: {'; '.join(problems)}")
        return cls(sha256=data["sha256"], columns=data["columns"], seed=data["seed"],
                   temperature=float(temperature), tensor=data["tensor"])


def make_screen(features: torch.Tensor | np.ndarray, *, columns: int = SCREEN_COLUMNS, seed: int = SCREEN_SEED,
                temperature: float = DEFAULT_TEMPERATURE) -> tuple[torch.Tensor, StoredScreen] | None:
    """The screen ranks a run stores beside ``features`` (``[s, n]``), and their description; ``None`` for none.

    Args:
        features: ``[n, D]`` features exactly as the file stores them (the fp16 or fp32 values
            the exact test reads back), so the ranks are those ``identify`` would make of the file.
        columns: ``s``.
        seed: the subset's seed.
        temperature: the softmax temperature.

    ``None`` when the run is narrower than ``2 * columns`` (tested exactly) or the features are
    not finite (no test of them can be made; the exact test names why).
    """
    if not isinstance(features, (torch.Tensor, np.ndarray)) or features.ndim != 2:
        return None
    dim = int(features.shape[1])
    if not is_screened(dim, columns):
        return None
    matrix = torch.as_tensor(features).detach()
    if matrix.dtype in (torch.float16, torch.bfloat16):
        # Exact (fp32 holds every fp16 value): the ranks are those of identify's reading of the file
        # (fp32), and torch's checks of fp16 on the CPU are 10x slower than of fp32.
        matrix = matrix.float()
    try:  # validates the features once (non-finite rows: no screen, the exact test says why)
        ranks = normalised_column_ranks(matrix, screen_columns(dim, columns, seed), temperature=temperature)
    except InputError:
        return None
    stored = StoredScreen(sha256=screen_digest(ranks), columns=int(columns), seed=int(seed),
                          temperature=float(temperature))
    return torch.from_numpy(ranks), stored


def screen_metadata(stored: StoredScreen) -> dict[str, str]:
    """The reference file's metadata entry that describes its stored screen."""
    return {SCREEN_META_KEY: json.dumps(stored.to_json(), sort_keys=True)}


def stored_screen_of_file(path: str | os.PathLike) -> StoredScreen | None:
    """The stored screen a fingerprint file's metadata describes (``None``: none, or an unreadable description)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="np") as handle:
            raw = (handle.metadata() or {}).get(SCREEN_META_KEY)
        return None if raw is None else StoredScreen.from_json(json.loads(raw))
    except Exception:  # no description, or a damaged one: the screen ranks the file itself (its sha256 checked)
        return None


def read_stored_screen(path: str | os.PathLike, stored: StoredScreen, n: int) -> np.ndarray:
    """The stored screen ranks ``[s, n]`` of ``path``, read without the rest of the file, checked against ``stored``.

    Args:
        path: the probe (or reference) file.
        stored: the description its ledger record (or the reference file) holds.
        n: the run's number of probe samples.

    Raises:
        FingerprintFileError: the tensor is missing, unreadable, of another shape or dtype, or its
            bytes do not match ``stored.sha256`` (altered or damaged): it must not be used.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(os.fspath(path), framework="np") as handle:
            ranks = handle.get_tensor(stored.tensor)
    except Exception as exc:  # safetensors raises its own error types for damaged files and missing tensors
        raise FingerprintFileError(f"the stored screen {stored.tensor!r} of {path} cannot be read ({exc})") from None
    if ranks.dtype not in (np.int16, np.int32) or list(ranks.shape) != [stored.columns, int(n)]:
        raise FingerprintFileError(f"the stored screen of {path} is {ranks.dtype} {list(ranks.shape)}, not the "
                                   f"integer [{stored.columns}, {n}] ranks its record describes")
    actual = screen_digest(ranks)
    if actual != stored.sha256:
        raise FingerprintFileError(f"the stored screen of {path} does not match its record (sha256 {actual[:12]}... "
                                   f"!= recorded {stored.sha256[:12]}...): altered or damaged")
    return ranks
