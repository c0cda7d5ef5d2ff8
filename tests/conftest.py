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
