"""The Fabric callback factory (entry-point group ``lightning.fabric.callbacks_factory``): inert unless switched on.

Fabric calls every factory of that group each time a ``Fabric`` is built, in every program of the
environment, so this module imports nothing but ``os`` and returns ``[]`` unless the environment
variable ``SEEDPRINTS_CONFIG`` names a YAML file of SeedPrints arguments; then it returns one
:class:`~seedprints_lightning.faces.litgpt.SeedPrintsLitGPTCallback` built from it (a bad file
raises, naming the variable and the fix). ``SEEDPRINTS_CONFIG=seedprints.yaml litgpt pretrain ...``
"""

from __future__ import annotations

import os

__all__ = ["fabric_callbacks"]


def fabric_callbacks() -> list:
    """``[]`` without ``SEEDPRINTS_CONFIG`` (unset or empty); else ``[SeedPrintsLitGPTCallback(**the file)]``."""
    path = os.environ.get("SEEDPRINTS_CONFIG")
    if not path:
        return []
    # Start-up cost: Fabric calls this factory in every program where the package is installed;
    # only a run that asked for SeedPrints pays for importing the face (and LitGPT).
    from .litgpt import callback_from_config

    return [callback_from_config(path)]
