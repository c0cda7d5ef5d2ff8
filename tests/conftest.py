"""Shared, generic test fixtures (keep this file minimal: several test modules use it)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

TINY_LLAMA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def make_tiny_llama(seed: int) -> torch.nn.Module:
    """A tiny LlamaForCausalLM whose weights depend only on ``seed`` (global RNG restored after)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    return model.eval()


@pytest.fixture()
def tiny_llama() -> Callable[[int], torch.nn.Module]:
    """Factory: ``tiny_llama(seed)`` -> a fresh tiny Llama causal LM in eval mode."""
    return make_tiny_llama


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
