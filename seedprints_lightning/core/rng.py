"""RNG hygiene: code that draws (controls, probes) leaves every global generator as it found it.

Its own module, below :mod:`.controls`, :mod:`.layerwise` and :mod:`.sharded`, which all use it: the
controls build on the layer-major probe, so the probe cannot import the controls.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["preserve_rng_state"]


@contextlib.contextmanager
def preserve_rng_state() -> Iterator[None]:
    """Save Python ``random``, NumPy, torch CPU and every initialised CUDA RNG; restore after.

    CUDA states are captured only if CUDA is already initialised (capturing would otherwise
    create a context); ``torch.cuda.get_rng_state_all`` reads generator state without
    launching work, as Lightning's own checkpoint RNG capture does.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    cpu_state = torch.random.get_rng_state()
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
