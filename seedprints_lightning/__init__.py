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
from .chain import CustodyChain, verify_chain
from .errors import (
    FingerprintFileError,
    IdentityLostError,
    IncompatibleFingerprintsError,
    InputError,
    ModelNotFoundError,
    SeedPrintsError,
)
from .fingerprint import Fingerprint, fingerprint_model
from .probes import ProbeSpec, extract_features
from .stats import EmpiricalNull, LineageResult, kendall_tau_b, lineage_test
from .verdict import BIRTH_RULE, CUSTODY_RULE, IdentityVerdict, ProbeVerdict, VerdictRule, decide_identity

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


#: The faces, one per training loop, imported on first use: each pulls in its loop's package
#: (seconds of import time) that the statistical core and the `seedprints` command line do not need.
_FACES = {"SeedPrintsCallback": "callback", "SeedPrintsTrainerCallback": "hf", "SeedPrintsFabricCallback": "fabric",
          "SeedPrintsMonitor": "monitor"}


def __getattr__(name: str):
    if name in _FACES:
        import importlib

        return getattr(importlib.import_module(f".{_FACES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
