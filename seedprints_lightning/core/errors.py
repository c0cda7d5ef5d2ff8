"""Exception types shared by every stage.

Every error this package raises on bad input derives from :class:`SeedPrintsError`, so the
command line can turn it into a one-line message and a distinct exit code, and callers can
catch one type. Each also derives from the builtin a user would expect (``ValueError`` for a
bad argument), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class SeedPrintsError(Exception):
    """Base class of the package's own errors."""


class InputError(SeedPrintsError, ValueError):
    """An argument or a feature matrix is unusable; the message names the fix."""


class FingerprintFileError(SeedPrintsError, ValueError):
    """A fingerprint file is missing, truncated, of an unknown version, or inconsistent."""


class SourceError(SeedPrintsError, ValueError):
    """A path is missing, or is not a fingerprint file, model directory or checkpoint."""


class IncompatibleFingerprintsError(SeedPrintsError, ValueError):
    """Two fingerprints were made with different probes and cannot be compared."""


class ModelNotFoundError(SeedPrintsError, ValueError):
    """No probe-able model could be found (no ``PreTrainedModel`` and no ``feature_fn``)."""


class IdentityLostError(SeedPrintsError, RuntimeError):
    """Raised by ``SeedPrintsCallback(on_identity_lost="raise")`` when the run lost its lineage."""


class IdentityWarning(UserWarning):
    """Warned (rank 0) when the run's identity is lost with ``on_identity_lost="warn"``, when the
    birth test stops being detectable, or when a probe is undetermined."""
