"""Byte-level tokenization and nanoGPT-style flat token files.

The package's training runs use bytes as tokens. A byte tokenizer needs no training, no
vocabulary file and no download; it maps every text to the same ids on every machine and in
every library version, and it covers any input (no unknown tokens). For the small models the
tests, demo and benchmarks train, the longer sequences it produces are no cost, and exact
reproducibility of the token stream is worth more than compression: two runs fed the same
files provably see the same ids.

Flat token files follow nanoGPT's ``train.bin`` convention: the ids of the whole corpus as
one headerless little-endian array of ``uint16`` (vocabularies up to 65,536) or ``uint32``,
which :func:`numpy.memmap` maps without reading it into memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.files import atomic_write

__all__ = [
    "ByteTokenizer",
    "DOCUMENT_SEPARATOR_ID",
    "MEMMAP_DTYPES",
    "TEXT_SUFFIXES",
    "list_text_files",
    "read_memmap",
    "tokenize_directory",
    "write_memmap",
]

_log = logging.getLogger(__name__)

#: Id placed after every document when files are concatenated: the NUL byte. Text files never
#: contain it (files that do are treated as binary and skipped), so it marks document
#: boundaries unambiguously while staying inside the 256-id byte vocabulary.
DOCUMENT_SEPARATOR_ID = 0

#: File suffixes read as text by :func:`tokenize_directory` and the data module.
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".py", ".rst")

#: Element types of flat token files, by name. Little-endian explicitly, so a file written on
#: one machine reads the same on any other.
MEMMAP_DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, ``vocab_size`` 256.

    Byte-level was chosen because it needs no training, no vocabulary file and no download,
    is exactly reproducible on every machine and library version, and covers any text (there
    is no unknown token). ``decode`` replaces byte sequences that are not valid UTF-8 (a
    sampled model can produce them) with U+FFFD rather than failing.
    """

    vocab_size: int = 256
    separator_id: int = DOCUMENT_SEPARATOR_ID

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as a list of ids."""
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, got {type(text).__name__}; decode bytes first or use list(data)")
        return list(text.encode("utf-8"))

    def encode_array(self, text: str, dtype: str | np.dtype | type = np.uint16) -> np.ndarray:
        """Return the UTF-8 bytes of ``text`` as a 1-D array of ``dtype`` (uint16 or uint32)."""
        if not isinstance(text, str):
            raise InputError(f"encode_array() takes a str, got {type(text).__name__}")
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(_resolve_dtype(dtype))

    def decode(self, ids: Iterable[int] | np.ndarray | Any) -> str:
        """Turn ids (list, array or tensor) back into text; invalid UTF-8 becomes U+FFFD."""
        if hasattr(ids, "detach"):  # a torch tensor, possibly on a GPU
            ids = ids.detach().cpu().numpy()
        array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
        if array.size == 0:
            return ""
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise InputError(
                f"decode() takes a 1-D sequence of integer ids, got shape {array.shape} of {array.dtype}; "
                "decode one sequence at a time"
            )
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise InputError(f"token id {bad} is outside the byte vocabulary [0, {self.vocab_size - 1}]")
        return array.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _resolve_dtype(dtype: str | np.dtype | type) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError as err:
        raise InputError(f"unknown token dtype {dtype!r}: use 'uint16' or 'uint32'") from err
    for candidate in MEMMAP_DTYPES.values():
        if resolved.kind == candidate.kind and resolved.itemsize == candidate.itemsize:
            return candidate
    raise InputError(f"unknown token dtype {dtype!r}: use 'uint16' (vocabularies up to 65,536) or 'uint32'")


def list_text_files(path: str | os.PathLike[str]) -> list[Path]:
    """Return the text files under ``path``, recursively, in sorted order.

    A text file is a regular file with a suffix in :data:`TEXT_SUFFIXES` (case-insensitive).
    Hidden files and directories (a leading dot, such as ``.git``) are skipped. The order is
    that of the relative paths as strings, so it is the same on every file system.

    Raises:
        InputError: If ``path`` does not exist or is not a directory.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise InputError(f"text directory {root} does not exist: check the path (data_dir)")
    if not root.is_dir():
        raise InputError(
            f"{root} is a file, not a directory: put the text files in a directory and pass that directory"
        )
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            file = Path(dirpath) / name
            if not name.startswith(".") and file.suffix.lower() in TEXT_SUFFIXES and file.is_file():
                found.append((file.relative_to(root).as_posix(), file))
    found.sort(key=lambda item: item[0])
    return [file for _, file in found]


def tokenize_directory(path: str | os.PathLike[str], *, dtype: str | np.dtype | type = np.uint16) -> np.ndarray:
    """Read every text file under ``path`` (sorted) and return their bytes as one token array.

    Each file's bytes are followed by :data:`DOCUMENT_SEPARATOR_ID` (0), so a model sees where
    one document ends and the next begins. Empty files contribute nothing. Files that cannot be
    read or contain NUL bytes (binary data with a text suffix) are skipped with a logged
    warning.

    Args:
        path: Directory, searched recursively (see :func:`list_text_files`).
        dtype: ``uint16`` or ``uint32``; byte ids fit either.

    Returns:
        A 1-D array of ``dtype``.

    Raises:
        InputError: If the directory is missing, holds no readable text files, or holds only
            empty ones.
    """
    out_dtype = _resolve_dtype(dtype)
    files = list_text_files(path)
    if not files:
        raise InputError(
            f"no text files under {path}: expected files ending in {', '.join(TEXT_SUFFIXES)} "
            "(hidden files and directories are ignored)"
        )
    parts: list[np.ndarray] = []
    separator = np.array([DOCUMENT_SEPARATOR_ID], dtype=np.uint8)
    skipped: list[str] = []
    empty = 0
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as err:
            skipped.append(f"{file} ({err.strerror or err})")
            continue
        if b"\x00" in data:
            skipped.append(f"{file} (contains NUL bytes: binary data?)")
            continue
        if not data:
            empty += 1
            continue
        parts.append(np.frombuffer(data, dtype=np.uint8))
        parts.append(separator)
    if skipped:
        _log.warning("Skipped %d unreadable file(s) under %s: %s", len(skipped), path, "; ".join(skipped[:5]))
    if not parts:
        if empty and not skipped:
            raise InputError(f"all {empty} text file(s) under {path} are empty: add text to train on")
        raise InputError(
            f"no readable text files under {path}: {len(skipped)} skipped ({'; '.join(skipped[:3])}), "
            f"{empty} empty; provide UTF-8 text files"
        )
    return np.concatenate(parts).astype(out_dtype)


def write_memmap(
    tokens: Sequence[int] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    dtype: str | np.dtype | type | None = None,
) -> Path:
    """Write token ids as a nanoGPT-style flat file (headerless little-endian array).

    Args:
        tokens: 1-D non-negative integer ids.
        path: Destination, conventionally ending in ``.bin``. Parent directories are created.
            The file is written to a temporary name and renamed, so a reader never sees a
            partly written file.
        dtype: ``"uint16"`` or ``"uint32"``. ``None`` keeps the array's dtype when it is one of
            those, else picks uint16 when every id is below 65,536 and uint32 otherwise.

    Returns:
        The path written. Read it back with :func:`read_memmap` and the same dtype.

    Raises:
        InputError: For non-integer, negative, multi-dimensional or empty input, ids that do
            not fit ``dtype``, or an unknown dtype.
    """
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise InputError(f"tokens must be 1-D, got shape {array.shape}: flatten it first")
    if array.size == 0:
        raise InputError("tokens is empty: there is nothing to write")
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"tokens must be integer ids, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise InputError(f"tokens contain a negative id ({low}); ids must be >= 0")
    if dtype is None:
        same = [d for d in MEMMAP_DTYPES.values() if d.kind == array.dtype.kind and d.itemsize == array.dtype.itemsize]
        out_dtype = same[0] if same else MEMMAP_DTYPES["uint16" if high < 2**16 else "uint32"]
    else:
        out_dtype = _resolve_dtype(dtype)
    if high > np.iinfo(out_dtype).max:
        raise InputError(f"token id {high} does not fit {out_dtype.name}: use dtype='uint32'")

    return atomic_write(path, lambda tmp: tmp.write_bytes(array.astype(out_dtype, copy=False).tobytes()))


def read_memmap(path: str | os.PathLike[str], dtype: str | np.dtype | type = "uint16") -> np.memmap:
    """Map a flat token file read-only, without loading it into memory.

    Raises:
        InputError: If the file is missing, is empty, its size is not a multiple of the
            element size (wrong dtype, or a truncated file), or the dtype is unknown.
    """
    resolved = _resolve_dtype(dtype)
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise InputError(f"token file {file} {what}: check memmap_path")
    size = file.stat().st_size
    if size == 0:
        raise InputError(f"token file {file} is empty: re-create it with write_memmap()")
    if size % resolved.itemsize:
        other = "uint32" if resolved.itemsize == 2 else "uint16"
        raise InputError(
            f"token file {file} is {size} bytes, not a multiple of {resolved.itemsize} ({resolved.name}): "
            f"it is truncated or was written as {other}; set memmap_dtype to the dtype it was written with"
        )
    return np.memmap(file, dtype=resolved, mode="r")
