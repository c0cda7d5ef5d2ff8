"""A fake run's birth files for the ledger tests: a random reference and controls, no model.

Shared by tests/test_custody.py and tests/test_ledger_faults.py, which drive a ``CustodyChain`` with
synthetic features: each writes the same birth files and differs only in what it appends after them.
"""

from __future__ import annotations

import torch

from seedprints_lightning import Fingerprint, ProbeSpec
from seedprints_lightning.core.controls import ControlSet, save_controls
from seedprints_lightning.core.ledger import RunDirectory

#: The seeds recorded for the three random controls (any distinct ints; only their order is checked).
CONTROL_SEEDS = (1_000_003, 1_000_004, 1_000_005)


def write_birth_files(run_dir: RunDirectory, spec: ProbeSpec, shape: tuple[int, int], generator: torch.Generator,
                      *, controls: bool) -> tuple[Fingerprint, ControlSet]:
    """Write ``reference.safetensors`` (N(0, 1) features of ``shape``) and, with ``controls``, three random controls."""
    reference = Fingerprint(features=torch.randn(*shape, generator=generator), spec=spec, model_class="Fake", step=0)
    reference.save(run_dir.reference_path)
    if not controls:
        return reference, ControlSet.none()
    save_controls(run_dir.controls_path, torch.randn(len(CONTROL_SEEDS), *shape, generator=generator), CONTROL_SEEDS,
                  spec)
    return reference, ControlSet.load(run_dir.controls_path)
