"""seedprints-lightning: a birth certificate for LLM pretraining runs.

The flow: probe inputs (:mod:`.probes`) -> features ``[n, D]`` -> lineage test
(:mod:`.stats`) -> :class:`LineageResult` -> verdict (:mod:`.verdict`) -> the custody chain
(:mod:`.chain`: anchor, schedule, ledger records in :mod:`.custody`, decision) -> a trainer's
face logs and acts (:mod:`.callback` for Lightning; :mod:`.integration` is what every face
shares). Offline, :mod:`.sources` turns paths into fingerprints and :mod:`.audit` judges them.
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
    "decide_identity",
    "extract_features",
    "fingerprint_model",
    "kendall_tau_b",
    "lineage_test",
    "verify_chain",
]


def __getattr__(name: str):
    # The callback pulls in pytorch_lightning (seconds of import time); the statistical core
    # and the `seedprints` command line should not pay for it unless it is used.
    if name == "SeedPrintsCallback":
        from .callback import SeedPrintsCallback

        return SeedPrintsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
