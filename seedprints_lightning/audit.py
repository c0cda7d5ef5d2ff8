"""Deprecated: moved to :mod:`seedprints_lightning.offline.audit` in 0.5; this path will be removed in 0.9."""

from ._moved import reexport

reexport(__name__, globals())
