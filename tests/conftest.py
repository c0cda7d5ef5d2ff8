"""Shared, generic test fixtures (keep this file minimal: several test modules use it).

``pytest -m "not slow"`` gives the fast subset (no subprocesses, no multi-fit tests); ``make test`` runs all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

#: The one tiny causal LM of the suite (llama sizes); :func:`make_tiny_lm` starts from it.
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

#: What each architecture changes on top of :data:`TINY_LLAMA` (qwen2: grouped-query attention, 2 kv heads).
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {"llama": {}, "qwen2": {"num_key_value_heads": 2}}


def tiny_config(arch: str = "llama", **overrides: Any):
    """The config of the tiny ``arch`` model: :data:`TINY_LLAMA`, then the arch's defaults, then ``overrides``."""
    from transformers import LlamaConfig, Qwen2Config

    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"arch must be one of {sorted(_ARCH_DEFAULTS)}, got {arch!r}")
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return config_cls(**{**TINY_LLAMA, **_ARCH_DEFAULTS[arch], **overrides})


def make_tiny_lm(seed: int = 0, arch: str = "llama", **overrides: Any) -> torch.nn.Module:
    """A tiny causal LM in eval mode whose weights depend only on ``seed`` and the config.

    ``arch`` is ``"llama"`` or ``"qwen2"``; ``overrides`` are config fields (e.g. ``vocab_size=48``,
    ``attention_dropout=0.3``). The global torch RNG is restored afterwards. Call ``.train()`` on
    it for a Lightning fit: Lightning leaves submodules in the mode they were given.
    """
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    config = tiny_config(arch, **overrides)
    model_cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def make_tiny_llama(seed: int) -> torch.nn.Module:
    """``make_tiny_lm(seed)``: the tiny LlamaForCausalLM."""
    return make_tiny_lm(seed)


@pytest.fixture()
def tiny_llama() -> Callable[[int], torch.nn.Module]:
    """Factory: ``tiny_llama(seed)`` -> a fresh tiny Llama causal LM in eval mode."""
    return make_tiny_llama


@pytest.fixture()
def tiny_lm() -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_lm(seed, arch="llama", **config_overrides)`` -> :func:`make_tiny_lm`."""
    return make_tiny_lm


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one intra-op thread, restoring the count after.

    Tiny matrices gain nothing from a second thread, and on a shared 2-core machine
    oversubscribed threads were measured 10-40x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def drawn_figures(monkeypatch) -> list[tuple[str, Any]]:
    """Every figure ``plot_drift`` / ``plot_audit`` draw during the test, as ``(function name, Figure)``.

    The drawing functions are wrapped, not replaced: the PNG is still written from the same figure.
    """
    from seedprints_lightning import plotting

    drawn: list[tuple[str, Any]] = []
    for name in ("draw_drift", "draw_audit"):
        original = getattr(plotting, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            fig = _original(*args, **kwargs)
            drawn.append((_name, fig))
            return fig

        monkeypatch.setattr(plotting, name, recording)
    return drawn
