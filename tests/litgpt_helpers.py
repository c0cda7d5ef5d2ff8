"""Helpers for tests/test_litgpt.py: a LitGPT ``DataModule`` of seeded random tokens (no tokenizer, no download).

``litgpt pretrain --data litgpt_helpers.RandomTokens`` imports it when ``tests/`` is on ``PYTHONPATH``.
The train loader is stateful (``state_dict`` / ``load_state_dict``), as litdata's ``StreamingDataLoader``
that LitGPT's own data modules use, so ``fabric.save`` stores its position as plain types and the
checkpoint loads with ``torch.load(weights_only=True)`` (what ``seedprints audit`` reads).
"""

from __future__ import annotations

from typing import Any

import torch
from litgpt.data import DataModule
from torch.utils.data import DataLoader, Dataset


class _Tokens(Dataset):
    """``count`` sequences of ``length`` token ids in ``[0, vocab)``, sample ``i`` seeded by ``(seed, i)``."""

    def __init__(self, count: int, length: int, vocab: int, seed: int) -> None:
        self.count, self.length, self.vocab, self.seed = count, length, vocab, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randint(0, self.vocab, (self.length,), generator=generator)


class _StatefulLoader(DataLoader):
    """A ``DataLoader`` whose state is plain types (how many batches were served), like litdata's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.served = int(state["served"])


class RandomTokens(DataModule):
    """Seeded random token sequences of ``max_seq_length + 1`` ids (inputs and shifted targets)."""

    def __init__(self, vocab: int = 256, samples: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.vocab, self.samples, self.seed = vocab, samples, seed
        self.batch_size, self.max_seq_length = 1, 64

    def connect(self, tokenizer: Any = None, batch_size: int = 1, max_seq_length: int | None = None,
                **kwargs: Any) -> None:
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length or self.max_seq_length

    def train_dataloader(self) -> DataLoader:
        return _StatefulLoader(_Tokens(self.samples, self.max_seq_length + 1, self.vocab, self.seed),
                               batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Tokens(4, self.max_seq_length + 1, self.vocab, self.seed + 1), batch_size=self.batch_size)
