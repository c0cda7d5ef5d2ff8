"""A trainer integration's ``reference=`` argument, resolved to the chain's reference and first anchor.

Its one caller is :mod:`seedprints_lightning.faces.settings`, while a face is being built. A parent
run's directory is re-verified offline (:func:`~seedprints_lightning.core.verify.verify_chain`)
before a child run continues its chain, which is why this sits above both the live chain and
its audit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .chain import Anchor
from .errors import InputError
from .fingerprint import Fingerprint
from .ledger import REFERENCE_FILE
from .probes import ProbeSpec
from .verify import verify_chain

__all__ = ["resolve_reference"]


def resolve_reference(reference: Any, probe: ProbeSpec | None = None,
                      ) -> tuple[Fingerprint | None, Anchor | None, str]:
    """``(reference, first anchor, where it came from)`` of a trainer integration's ``reference=`` argument.

    ``reference`` is ``None`` (the run's own step 0), a :class:`~seedprints_lightning.Fingerprint`,
    its file, or a parent run's ``seedprints`` directory: then the parent's ledger is re-verified
    and the child's chain starts at the parent's last held probe. ``probe``, when given, must be
    the reference's spec.
    """
    if reference is None:
        return None, None, ""
    anchor = None
    if isinstance(reference, Fingerprint):
        explicit, origin = reference, "the Fingerprint passed as reference="
    elif isinstance(reference, (str, os.PathLike)) and Path(reference).is_dir():
        audit = verify_chain(reference)
        if not audit.ok:
            first = audit.problems[0].message if audit.problems else "no record"
            raise InputError(
                f"reference={os.fspath(reference)!r}: the parent run's custody chain does not verify ({first}); a "
                "child run can only continue an intact chain. Pass the parent's fingerprint file instead to start a "
                "new chain from it"
            )
        last = audit.last_held_probe()
        explicit, anchor = Fingerprint.load(audit.run_dir / REFERENCE_FILE), Anchor(last.features, last.step)
        origin = f"reference={os.fspath(reference)!r} (the parent run's birth fingerprint)"
    elif isinstance(reference, (str, os.PathLike)):
        explicit = Fingerprint.load(reference)  # raises FingerprintFileError with the path
        origin = f"reference={os.fspath(reference)!r}"
    else:
        raise InputError(f"reference must be a Fingerprint, a path to a fingerprint file, or None, got "
                         f"{type(reference).__name__}")
    if probe is not None and probe != explicit.spec:
        raise InputError(
            f"probe={probe} differs from the reference's spec ({explicit.spec.describe()}); the reference's "
            "inputs must be used, so leave probe=None when you pass reference="
        )
    return explicit, anchor, origin
