"""The module paths that 0.5 moved, kept importable until 0.9 with a ``DeprecationWarning``.

Each old path (``seedprints_lightning/probes.py`` and the like) is a two-line module that calls
:func:`reexport`: it warns, naming the new path, then takes every name of the new module, so
``from seedprints_lightning.probes import ProbeSpec`` gives the very object
``seedprints_lightning.core.probes.ProbeSpec`` is. A 0.4 name that went to another module than
the rest of its module's names is listed in :data:`ELSEWHERE`. ``tests/test_shims.py`` imports
every old path.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__all__ = ["ELSEWHERE", "MOVED", "REMOVED_IN", "reexport"]

#: The release that deletes the old paths.
REMOVED_IN = "0.9"
#: Old module (under ``seedprints_lightning``) -> its new module, as of 0.5.
MOVED = {
    "audit": "offline.audit", "callback": "faces.lightning", "chain": "core.chain", "checks": "core.checks",
    "cli": "offline.cli", "controls": "core.controls", "custody": "core.ledger", "errors": "core.errors",
    "fabric": "faces.fabric", "files": "core.files", "fingerprint": "core.fingerprint", "hf": "faces.hf",
    "integration": "core.processes", "monitor": "faces.monitor", "plotting": "offline.plotting",
    "probes": "core.probes", "schedule": "core.schedule", "sources": "offline.sources", "stats": "core.stats",
    "verdict": "core.verdict",
}
#: Old module -> {0.4 name: (new module, new name)} for the names that did not go with the rest.
ELSEWHERE = {
    # 0.8 split core.chain: verification went to core.verify, reference resolution to core.reference.
    "chain": {"ChainAudit": ("core.verify", "ChainAudit"), "ChainProblem": ("core.verify", "ChainProblem"),
              "verify_chain": ("core.verify", "verify_chain"),
              "resolve_reference": ("core.reference", "resolve_reference")},
    "integration": {"open_chain": ("core.opening", "open_chain"), "close_chain": ("core.opening", "close_chain"),
                    "ControlsSource": ("core.opening", "ControlsSource")},
    "monitor": {"MonitorSettings": ("faces.settings", "FaceSettings"), "ACTIONS": ("faces.settings", "ACTIONS"),
                "act_on_identity_lost": ("faces.base", "act_on_identity_lost")},
}
_PACKAGE = __name__.rsplit(".", 1)[0]


def reexport(old_module: str, namespace: dict[str, Any]) -> None:
    """Warn that ``old_module`` moved, then fill its ``namespace`` with the new module's names.

    Args:
        old_module: the shim's ``__name__``, e.g. ``"seedprints_lightning.probes"``.
        namespace: the shim's ``globals()``.
    """
    old = old_module.rsplit(".", 1)[1]
    new = f"{_PACKAGE}.{MOVED[old]}"
    # stacklevel 3: past this function and the shim, onto the importing line (warnings skips the
    # import machinery's frames), so Python's default filter shows it when that line is __main__'s.
    warnings.warn(f"{old_module} moved to {new} in 0.5: import from {new} instead; the old path will be "
                  f"removed in {REMOVED_IN}", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    names = {name: value for name, value in vars(module).items()
             if not (name.startswith("__") and name.endswith("__"))}
    for name, (where, new_name) in ELSEWHERE.get(old, {}).items():
        names[name] = getattr(importlib.import_module(f"{_PACKAGE}.{where}"), new_name)
    namespace.update(names)
    public = getattr(module, "__all__", None) or [name for name in names if not name.startswith("_")]
    namespace["__all__"] = [*public, *(name for name in ELSEWHERE.get(old, {}) if name not in public)]
