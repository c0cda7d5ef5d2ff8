"""The exit codes of the ``seedprints`` command line: the one definition.

``seedprints --help`` (and every subcommand's ``--help``) prints :func:`epilog`, and the table in
``docs/cli.md`` is :func:`markdown_table` (``tests/test_docs.py`` checks that it is up to date;
``python -m seedprints_lightning.offline.exit_codes`` prints it). A script that gates on the
command's outcome can compare with the members: ``ExitCode.TAMPERED == 5``.

To add a code: add a member with its number and meaning below. A code's number never changes
once released, since scripts and CI pipelines test for it.

Imports nothing but the standard library: the console script (:mod:`seedprints_lightning._entry`)
may read it before torch is imported.
"""

from __future__ import annotations

import textwrap
from enum import IntEnum

__all__ = ["ExitCode", "epilog", "markdown_table"]


class ExitCode(IntEnum):
    """An exit status of ``seedprints`` and what it means (``code.meaning``).

    Args:
        value: the number the process exits with.
        meaning: one sentence for ``--help`` and ``docs/cli.md``.
    """

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = (0, "success; `compare --expect`: the verdict matched; `audit`: every checkpoint descends, or the "
             "chain is intact (a stretch of undetermined records that a later held link bridges, a torn last line "
             "left by a crash mid-write, and blank lines are notes); "
             "`identify`: a run matches")
    EXPECT = (1, "the verdict is not the one wanted: `compare --expect` differs (an undetermined verdict counts "
                 "as differing); `audit`: a checkpoint does not descend; `audit --chain`: a broken custody link, "
                 "or a checkpoint of another run or of an abandoned branch of this one; `identify`: no run matches")
    USAGE = (2, "usage or input error: bad arguments or option values, no seedprints data to plot, a model "
                "whose features are NaN or Inf (`fingerprint` then writes nothing), a `--public-key` that is "
                "not a PEM Ed25519 public key")
    FILE = (3, "file error: a path is missing or is not a model directory, checkpoint or fingerprint; a "
               "fingerprint file is truncated or corrupt; a file cannot be read or written")
    INCOMPATIBLE = (4, "incompatible inputs: fingerprints made with different probes, models whose vocabularies "
                       "or widths the probe does not fit")
    TAMPERED = (5, "`audit --chain`: the ledger was tampered with (a record edited, malformed, missing or "
                   "reordered, a features file altered or missing; with `--public-key`, a record not signed by "
                   "that key); the record and line are named")
    UNDETERMINED = (6, "`audit --chain`: intact, but the chain's end (or the checkpoint's link) is undetermined "
                       "(NaN or degenerate hidden states): it vouches only up to its last held link; `identify`: "
                       "no run matched, but some test could not be made (a match may have been missed)")
    INTERNAL = (70, "internal error: an unexpected exception, a bug (one line; `SEEDPRINTS_DEBUG=1` shows its "
                    "traceback)")
    INTERRUPTED = (130, "interrupted: Ctrl-C, at any moment (imports included)")


def epilog(width: int = 78) -> str:
    """The ``exit codes:`` section of ``--help``: one wrapped entry per :class:`ExitCode`.

    Args:
        width: the longest line, in characters.
    """
    lines = ["exit codes:"]
    for code in ExitCode:
        text = code.meaning.replace("`", "")  # plain text in a terminal
        lines += textwrap.wrap(text, width, initial_indent=f"  {code.value:<5}", subsequent_indent=" " * 7)
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The table of ``docs/cli.md``: code, name, meaning, one row per :class:`ExitCode`."""
    rows = ["| code | `ExitCode` | meaning |", "|---|---|---|"]
    rows += [f"| {code.value} | `{code.name}` | {code.meaning} |" for code in ExitCode]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
