"""seedprints-lightning: a birth certificate for LLM pretraining runs.

The flow: probe inputs (:mod:`.probes`) -> features ``[n, D]`` -> lineage test
(:mod:`.stats`) -> :class:`LineageResult` -> verdict (:mod:`.verdict`) -> the custody chain
(:mod:`.chain`: anchor, schedule, ledger records in :mod:`.custody`, decision) -> a trainer's
face logs and acts (:mod:`.callback` for the Lightning ``Trainer``, :mod:`.hf` for the Hugging
Face ``Trainer``, :mod:`.fabric` for Lightning Fabric, :mod:`.monitor` for any loop;
:mod:`.integration` is what every face shares). Offline, :mod:`.sources` turns paths into
fingerprints and :mod:`.audit` judges them.
"""

from ._version import __version__
from .errors import (
    FingerprintFileError,
    IdentityLostError,
    IncompatibleFingerprintsError,
    InputError,
    ModelNotFoundError,
    SeedPrintsError,
)

__all__ = [
    "__version__",
    "BIRTH_RULE",
    "CUSTODY_RULE",
    "CustodyChain",
    "EmpiricalNull",
    "ProbeVerdict",
    "VerdictRule",
    "Fingerprint",
    "FingerprintFileError",
    "IdentityLostError",
    "IdentityVerdict",
    "IncompatibleFingerprintsError",
    "InputError",
    "LineageResult",
    "ModelNotFoundError",
    "ProbeSpec",
    "SeedPrintsCallback",
    "SeedPrintsError",
    "SeedPrintsFabricCallback",
    "SeedPrintsMonitor",
    "SeedPrintsTrainerCallback",
    "decide_identity",
    "extract_features",
    "fingerprint_model",
    "kendall_tau_b",
    "lineage_test",
    "verify_chain",
]


#: Every export but the version and the errors, and its module: imported on first use, so that
#: ``import seedprints_lightning`` (and the ``seedprints`` script, :mod:`._entry`) costs no torch
#: import, and each face pulls in its loop's package (seconds of import time) only when used.
_LAZY = {
    "CustodyChain": "chain", "verify_chain": "chain",
    "Fingerprint": "fingerprint", "fingerprint_model": "fingerprint",
    "ProbeSpec": "probes", "extract_features": "probes",
    "EmpiricalNull": "stats", "LineageResult": "stats", "kendall_tau_b": "stats", "lineage_test": "stats",
    "BIRTH_RULE": "verdict", "CUSTODY_RULE": "verdict", "IdentityVerdict": "verdict", "ProbeVerdict": "verdict",
    "VerdictRule": "verdict", "decide_identity": "verdict",
    "SeedPrintsCallback": "callback", "SeedPrintsTrainerCallback": "hf", "SeedPrintsFabricCallback": "fabric",
    "SeedPrintsMonitor": "monitor",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
