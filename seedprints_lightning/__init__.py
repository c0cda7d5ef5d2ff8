"""seedprints-lightning: a birth certificate for LLM pretraining runs.

Data flows one way, and each layer is a folder:

- :mod:`.core` (no trainer, no CLI): probe inputs and features (``probes``, ``layerwise``) ->
  the lineage test (``stats``) -> verdicts against fresh-init controls (``verdict``,
  ``controls``) -> the custody chain (``chain``: anchor, schedule, decision) and its ledger
  (``ledger``), the fingerprint file (``fingerprint``), how processes agree (``processes``).
- :mod:`.faces`: one face per training loop over one base (``base``): ``lightning``
  (``SeedPrintsCallback``), ``hf`` (``SeedPrintsTrainerCallback``), ``fabric``
  (``SeedPrintsFabricCallback``) and ``monitor`` (``SeedPrintsMonitor``, any loop).
- :mod:`.offline`: reading checkpoints (``sources``), audits (``audit``, ``identify``), plots
  (``plotting``) and the ``seedprints`` command line (``cli``).
- :mod:`.train`: the demo's model, data and LightningCLI.

The method is in ``docs/method.md``.
"""

from ._version import __version__
from .core.errors import (
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
    "LedgerRepairWarning",
    "LineageResult",
    "ModelNotFoundError",
    "ProbeSpec",
    "SeedPrintsCallback",
    "SeedPrintsError",
    "SeedPrintsFabricCallback",
    "SeedPrintsLitGPTCallback",
    "SeedPrintsMonitor",
    "SeedPrintsOLMoCallback",
    "SeedPrintsTitanTrainer",
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
    "CustodyChain": "core.chain", "verify_chain": "core.verify",
    "LedgerRepairWarning": "core.ledger",
    "Fingerprint": "core.fingerprint", "fingerprint_model": "core.fingerprint",
    "ProbeSpec": "core.probes", "extract_features": "core.probes",
    "EmpiricalNull": "core.stats", "LineageResult": "core.stats", "kendall_tau_b": "core.stats",
    "lineage_test": "core.stats",
    "BIRTH_RULE": "core.verdict", "CUSTODY_RULE": "core.verdict", "IdentityVerdict": "core.verdict",
    "ProbeVerdict": "core.verdict", "VerdictRule": "core.verdict", "decide_identity": "core.verdict",
    "SeedPrintsCallback": "faces.lightning", "SeedPrintsTrainerCallback": "faces.hf",
    "SeedPrintsFabricCallback": "faces.fabric", "SeedPrintsMonitor": "faces.monitor",
    "SeedPrintsLitGPTCallback": "faces.litgpt",
    "SeedPrintsOLMoCallback": "faces.olmo",
    "SeedPrintsTitanTrainer": "faces.torchtitan",
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
