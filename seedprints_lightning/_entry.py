"""The ``seedprints`` console script: Ctrl-C at any moment exits 130, without a traceback.

The script's wrapper imports this module first, and :mod:`seedprints_lightning`'s ``__init__``
imports nothing heavy (its exports are lazy), so the handler below is in place within
milliseconds of start-up; the command line itself (:mod:`.cli`, and torch with it) is imported
inside it. ``python -m seedprints_lightning`` runs the same.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

#: What :data:`seedprints_lightning.offline.cli.EXIT_INTERRUPTED` is (repeated so no import is needed).
EXIT_INTERRUPTED = 130


def _interrupted() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the message
    try:
        print("seedprints: error: interrupted", file=sys.stderr, flush=True)
    except Exception:  # a closed stderr: the exit code still says it
        pass
    return EXIT_INTERRUPTED


class _Interrupts:
    """SIGINT as Python's default handler (raise KeyboardInterrupt), remembering that it came.

    A library that catches ``BaseException`` while it is imported (seen once in CI: a Ctrl-C during
    start-up ended in the command's own exit code) swallows the KeyboardInterrupt; the flag still
    says the user interrupted, so the exit code does too.
    """

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`seedprints_lightning.offline.cli.main`; a Ctrl-C anywhere (imports included) returns 130."""
    interrupts = _Interrupts()
    try:
        previous = signal.signal(signal.SIGINT, interrupts)
    except ValueError:  # not the main thread (an embedding caller): Python's own handling stays
        previous = None
    try:
        try:
            # Imported under the SIGINT handler: a Ctrl-C during the (torch) imports still exits 130.
            from .offline.cli import main as cli_main

            code = cli_main(argv)
        except KeyboardInterrupt:
            return _interrupted()
        return _interrupted() if interrupts.seen and code != EXIT_INTERRUPTED else code
    finally:  # the message is out: an in-process caller gets its own handler back
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
