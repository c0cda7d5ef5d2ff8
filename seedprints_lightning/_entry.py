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


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`seedprints_lightning.offline.cli.main`; a Ctrl-C anywhere (imports included) returns 130."""
    try:
        from .offline.cli import main as cli_main

        code = cli_main(argv)
    except KeyboardInterrupt:
        return _interrupted()
    return code


if __name__ == "__main__":
    sys.exit(main())
