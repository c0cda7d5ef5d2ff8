"""What a custody chain counts: its place in the ledger, and its run of failed probes.

:class:`~seedprints_lightning.core.chain.CustodyChain` holds one of each (``chain.cursor``,
``chain.failures``). Both are frozen: the chain alone moves them on, by replacing them, and writes
their numbers into its checkpoint state (:class:`~seedprints_lightning.core.state.ChainState`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .checks import check_bool, check_int
from .errors import InputError

if TYPE_CHECKING:
    from .ledger import CustodyLedger

__all__ = ["FailureCount", "LedgerCursor"]


@dataclass(frozen=True)
class LedgerCursor:
    """Where a chain stands in its ledger: the next record's index, the last record's sha256, the ledger.

    Every process numbers the records alike (so each knows an anchor's record index); only the
    process that writes files holds the ``ledger`` and learns each record's sha256. A chain that
    keeps no records (a run that writes no file: ``numbered`` False) numbers none.
    """

    next_index: int = 0
    last_sha256: str | None = None
    ledger: CustodyLedger | None = None
    numbered: bool = True

    def attached(self, ledger: CustodyLedger) -> LedgerCursor:
        """At ``ledger``'s position, writing to it; a cursor past record 0 must find the ledger at its own."""
        if self.next_index and ledger.next_index != self.next_index:
            raise InputError(f"the ledger is at record {ledger.next_index} but the chain at {self.next_index}")
        return dataclasses.replace(self, next_index=ledger.next_index, last_sha256=ledger.last_sha256, ledger=ledger)

    def at(self, index: int) -> LedgerCursor:
        """Numbering the next record ``index``."""
        return dataclasses.replace(self, next_index=check_int("index", index, low=0))

    def rewound(self) -> LedgerCursor:
        """Before record 0 of a new ledger (nothing chained yet); the ledger held, if any, stays."""
        return dataclasses.replace(self, next_index=0, last_sha256=None)

    def advanced(self, write: Callable[[CustodyLedger], dict[str, Any]]) -> tuple[int | None, LedgerCursor]:
        """``(the next record's index, the cursor after it)``; ``(None, self)`` when not ``numbered``.

        With a ledger, ``write(ledger)`` appends the record and returns it: its ``sha256`` becomes the last one.
        """
        if not self.numbered:
            return None, self
        sha256 = write(self.ledger)["sha256"] if self.ledger is not None else self.last_sha256
        return self.next_index, dataclasses.replace(self, next_index=self.next_index + 1, last_sha256=sha256)

    def state_dict(self) -> dict[str, Any]:
        """Its two keys of the chain's checkpoint state (kept for 0.7 callers; the chain writes a ``ChainState``)."""
        return {"ledger_next_index": int(self.next_index), "ledger_last_sha256": self.last_sha256}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, numbered: bool = True) -> LedgerCursor:
        """The position a checkpoint recorded (0 and no hash in states without one); no ledger until attached.

        Kept for 0.7 callers: the chain restores its position from a checked
        :class:`~seedprints_lightning.core.state.ChainState`.
        """
        return cls(int(state.get("ledger_next_index", 0)), state.get("ledger_last_sha256"), numbered=numbered)


@dataclass(frozen=True)
class FailureCount:
    """A chain's run of consecutive failed probes (and undetermined ones, when they count) against its patience.

    ``patience``: consecutive failed probes before the identity is lost. ``count_undetermined``:
    whether a probe whose lineage could not be measured counts like a failed one, or neither
    counts nor resets the run.
    """

    patience: int = 2
    count_undetermined: bool = True
    consecutive: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "patience", check_int("patience", self.patience, low=1,
                                                       hint="consecutive failed probes before acting"))
        object.__setattr__(self, "count_undetermined", check_bool("count_undetermined", self.count_undetermined))

    def counted(self, related: bool | None) -> FailureCount:
        """The count after one probe's verdict (``None``: undetermined).

        A held probe resets the run; a failed one, or an undetermined one that counts, extends it.
        """
        if related is False or (related is None and self.count_undetermined):
            return dataclasses.replace(self, consecutive=self.consecutive + 1)
        if related is True:
            return dataclasses.replace(self, consecutive=0)
        return self

    @property
    def exhausted(self) -> bool:
        """The run has reached ``patience``: the identity is lost (a held probe always resets it first)."""
        return self.consecutive >= self.patience
