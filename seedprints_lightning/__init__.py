"""seedprints-lightning: a birth certificate for LLM pretraining runs.

The flow: probe inputs (:mod:`.probes`) -> features ``[n, D]`` -> lineage test
(:mod:`.stats`) -> :class:`LineageResult` -> logs and decisions (:mod:`.callback`).
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
from .fingerprint import Fingerprint, fingerprint_model
from .probes import ProbeSpec, extract_features
from .stats import LineageResult, kendall_tau_b, lineage_test

__all__ = [
    "__version__",
    "Fingerprint",
    "FingerprintFileError",
    "IdentityLostError",
    "IncompatibleFingerprintsError",
    "InputError",
    "LineageResult",
    "ModelNotFoundError",
    "ProbeSpec",
    "SeedPrintsError",
    "extract_features",
    "fingerprint_model",
    "kendall_tau_b",
    "lineage_test",
]
