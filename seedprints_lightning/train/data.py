"""A Lightning data module that serves fixed-length token windows from text or a flat token file.

Reproducibility is the point: a SeedPrints certificate says which initialisation a run started
from, and comparing runs is only meaningful when their data order is under control too. The
order here depends on ``seed`` and the epoch number alone, through private
:class:`torch.Generator` objects; the global RNG is never read, so seeding (or not seeding)
the rest of a program cannot change which windows a run sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.checks import check_choice, check_int, check_number
from ..core.errors import InputError
from .corpus import CORPUS_DOMAINS, build_corpus
from .tokenizer import MEMMAP_DTYPES, read_memmap, tokenize_directory

__all__ = ["TextDataModule"]

Batch = dict[str, torch.Tensor]


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash (seed, epoch) rather than adding them: with seed + epoch, the run with seed=1 would
    # replay the second epoch of the run with seed=0.
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class _TokenSpan:
    """A contiguous range of a token array, picklable without copying a memory-mapped file.

    DataLoader workers started with ``spawn``/``forkserver`` receive the dataset by pickling;
    a pickled ``np.memmap`` slice would carry its whole contents, so for files only the path
    and bounds travel and each process maps the file itself.
    """

    def __init__(self, start: int, stop: int, *, array: np.ndarray | None = None,
                 path: Path | None = None, dtype: np.dtype | None = None) -> None:
        self.start, self.stop = start, stop
        self._array, self._path, self._dtype = array, path, dtype
        self._mapped: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        if self._array is not None:
            return self._array[self.start : self.stop]
        if self._mapped is None:
            assert self._path is not None and self._dtype is not None
            self._mapped = np.memmap(self._path, dtype=self._dtype, mode="r")[self.start : self.stop]
        return self._mapped

    def __len__(self) -> int:
        return self.stop - self.start

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mapped"] = None
        return state


class _WindowDataset(Dataset[Batch]):
    """Index = start token of a window of ``seq_len + 1`` tokens (inputs and shifted labels)."""

    def __init__(self, span: _TokenSpan, seq_len: int) -> None:
        self.span, self.seq_len = span, seq_len

    def __len__(self) -> int:
        return len(self.span) - self.seq_len

    def __getitem__(self, start: int) -> Batch:
        if not 0 <= start < len(self):
            raise IndexError(f"window start {start} out of range [0, {len(self)})")
        chunk = torch.from_numpy(np.array(self.span.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class _WindowSampler(Sampler[int]):
    """Yields window starts: shuffled per epoch for training, in order for validation.

    Training windows tile the tokens with stride ``seq_len`` from a phase offset drawn each
    epoch, in a random permutation. The offset means the cut points move between epochs, so a
    model does not always see the same token at position 0; the window count is fixed (one
    fewer than the most that fit, when that buys a full range of offsets) so every epoch has
    the same length, which Lightning's progress and DDP sharding expect. Lightning calls
    :meth:`set_epoch` before each epoch (and forwards it through its distributed wrapper).
    """

    def __init__(self, num_tokens: int, seq_len: int, *, seed: int, shuffle: bool) -> None:
        self.seq_len, self.seed, self.shuffle, self.epoch = seq_len, seed, shuffle, 0
        if shuffle:
            self.num_windows = max(1, (num_tokens - seq_len) // seq_len)
            self.max_offset = min(seq_len - 1, num_tokens - 1 - self.num_windows * seq_len)
        else:
            self.num_windows = (num_tokens - 1) // seq_len
            self.max_offset = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_windows

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(0, self.num_windows * self.seq_len, self.seq_len))
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        offset = int(torch.randint(0, self.max_offset + 1, (), generator=generator))
        order = torch.randperm(self.num_windows, generator=generator)
        return iter((offset + order * self.seq_len).tolist())


class TextDataModule(pl.LightningDataModule):
    """Next-token windows from a directory of text, a flat token file, or the built-in corpus.

    Exactly one source is used: ``data_dir`` (text files read recursively, byte-tokenized with
    :class:`~seedprints_lightning.train.ByteTokenizer`), ``memmap_path`` (pre-tokenized
    nanoGPT-style ``.bin``), or ``corpus`` (the standard-library corpus of
    :func:`~seedprints_lightning.train.build_corpus`, ``"prose"`` when nothing is given). The
    last ``val_fraction`` of the token stream is held out for validation, so train and
    validation never share a window.

    Batches are ``{"input_ids": LongTensor[b, seq_len], "labels": LongTensor[b, seq_len]}``
    with ``labels`` already shifted by one: ``labels[:, t]`` is the token after
    ``input_ids[:, t]``.

    Args:
        data_dir: Directory of ``.txt``/``.md``/``.py``/``.rst`` files.
        memmap_path: Flat token file (headerless little-endian array).
        memmap_dtype: Element type of ``memmap_path``: ``"uint16"`` or ``"uint32"``.
        corpus: ``"prose"`` or ``"code"``: build (or reuse from the cache) the standard-library
            corpus. Only valid when neither path is given.
        corpus_max_bytes: Size cap of the built-in corpus (``None``: the corpus default).
        seq_len: Tokens per training sequence.
        batch_size: Sequences per batch.
        val_fraction: Fraction of tokens held out at the end of the stream, in ``[0, 1)``;
            0 disables validation.
        seed: Determines the training order (with the epoch number), nothing else.
        num_workers: DataLoader worker processes.
        vocab_size: Ids must be below this; must match the model's vocabulary.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        memmap_path: str | None = None,
        memmap_dtype: str = "uint16",
        corpus: str | None = None,
        corpus_max_bytes: int | None = None,
        seq_len: int = 64,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        vocab_size: int = 256,
    ) -> None:
        super().__init__()
        if data_dir is not None and memmap_path is not None:
            raise InputError(
                "both data_dir and memmap_path are set: give one source (data_dir for text files, "
                "memmap_path for a pre-tokenized .bin)"
            )
        if corpus is not None and (data_dir is not None or memmap_path is not None):
            raise InputError(
                f"corpus={corpus!r} is only used when neither data_dir nor memmap_path is set: drop one of them"
            )
        if data_dir is None and memmap_path is None and corpus is None:
            corpus = "prose"
        if corpus is not None:
            check_choice("corpus", corpus, CORPUS_DOMAINS)
        check_choice("memmap_dtype", memmap_dtype, MEMMAP_DTYPES)
        if corpus_max_bytes is not None:
            corpus_max_bytes = check_int("corpus_max_bytes", corpus_max_bytes, low=1, hint="or None for the default")
        seq_len = check_int("seq_len", seq_len, low=1)
        batch_size = check_int("batch_size", batch_size, low=1)
        seed = check_int("seed", seed, low=0)
        num_workers = check_int("num_workers", num_workers, low=0)
        vocab_size = check_int("vocab_size", vocab_size, low=1)
        check_number("val_fraction", val_fraction, low=0.0, high=1.0, high_open=True)

        self.data_dir, self.memmap_path, self.memmap_dtype = data_dir, memmap_path, memmap_dtype
        self.corpus, self.corpus_max_bytes = corpus, corpus_max_bytes
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, float(val_fraction)
        self.seed, self.num_workers, self.vocab_size = seed, num_workers, vocab_size
        self.save_hyperparameters()

        self._train: _TokenSpan | None = None
        self._val: _TokenSpan | None = None
        self._train_sampler: _WindowSampler | None = None

    # ------------------------------------------------------------------ loading

    def prepare_data(self) -> None:
        """Build the built-in corpus once per node (Lightning calls this on one process only)."""
        if self.corpus is not None:
            build_corpus(self.corpus, max_bytes=self.corpus_max_bytes)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokens and split them into train and validation (idempotent)."""
        if self._train is not None:
            return
        source: Path | None = None
        dtype: np.dtype | None = None
        if self.memmap_path is not None:
            source, dtype = Path(self.memmap_path).expanduser(), MEMMAP_DTYPES[self.memmap_dtype]
            tokens: np.ndarray = read_memmap(source, dtype)
            where = f"memmap_path {source}"
        else:
            directory = self.data_dir if self.data_dir is not None else build_corpus(
                self.corpus or "prose", max_bytes=self.corpus_max_bytes
            )
            tokens = tokenize_directory(directory, dtype=np.uint16)
            where = f"data_dir {directory}" if self.data_dir is not None else f"the {self.corpus} corpus"

        highest = int(tokens.max())
        if highest >= self.vocab_size:
            raise InputError(
                f"{where} contains token id {highest} (max found), but vocab_size={self.vocab_size}: "
                f"set vocab_size >= {highest + 1} (in the data module and the model), or check memmap_dtype"
            )

        total = len(tokens)
        window = self.seq_len + 1
        num_val = int(total * self.val_fraction)
        if self.val_fraction > 0 and num_val < window:
            raise InputError(
                f"the validation split of {where} is {num_val} tokens ({self.val_fraction:g} of {total}), "
                f"shorter than one window of seq_len + 1 = {window}: raise val_fraction, lower seq_len, "
                "add data, or set val_fraction=0 to skip validation"
            )
        num_train = total - num_val
        if num_train < window:
            raise InputError(
                f"{where} has {num_train} training tokens, shorter than one window of seq_len + 1 = {window}: "
                "add data or lower seq_len"
            )
        keep = {"array": tokens} if source is None else {"path": source, "dtype": dtype}
        self._train = _TokenSpan(0, num_train, **keep)
        self._val = _TokenSpan(num_train, total, **keep) if num_val else None
        self._train_sampler = _WindowSampler(num_train, self.seq_len, seed=self.seed, shuffle=True)

    # -------------------------------------------------------------- dataloaders

    def _require_setup(self) -> tuple[_TokenSpan, _WindowSampler]:
        if self._train is None or self._train_sampler is None:
            raise RuntimeError("TextDataModule.setup() must run before asking for a dataloader.")
        return self._train, self._train_sampler

    def _loader(self, span: _TokenSpan, sampler: _WindowSampler) -> DataLoader[Batch]:
        return DataLoader(
            _WindowDataset(span, self.seq_len),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Without its own generator a DataLoader draws its worker base seed from the
            # global RNG at every epoch, which would couple the caller's RNG to iteration.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader[Batch]:
        """Shuffled training windows; the order depends on ``seed`` and the epoch only."""
        span, sampler = self._require_setup()
        return self._loader(span, sampler)

    def val_dataloader(self) -> DataLoader[Batch] | list[Any]:
        """Validation windows in order (an empty list, which Lightning skips, when ``val_fraction`` is 0)."""
        self._require_setup()
        if self._val is None:
            return []
        sampler = _WindowSampler(len(self._val), self.seq_len, seed=self.seed, shuffle=False)
        return self._loader(self._val, sampler)

    def set_epoch(self, epoch: int) -> None:
        """Select the training order of ``epoch`` outside a Trainer (Lightning does this itself)."""
        _, sampler = self._require_setup()
        sampler.set_epoch(epoch)

    # ------------------------------------------------------------------- facts

    @property
    def num_train_tokens(self) -> int:
        """Tokens in the training split (after :meth:`setup`)."""
        return len(self._require_setup()[0])

    @property
    def num_val_tokens(self) -> int:
        """Tokens in the validation split (after :meth:`setup`); 0 when validation is off."""
        self._require_setup()
        return len(self._val) if self._val is not None else 0
