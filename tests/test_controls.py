"""Negative controls: fresh-init control models, their features and files (no Lightning).

The identity verdict that uses them is tested in tests/test_verdict.py.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm, tiny_config
from torch import nn
from transformers import LlamaForCausalLM

from seedprints_lightning import InputError, ProbeSpec
from seedprints_lightning.core.controls import (
    ControlSet,
    build_control_model,
    control_seeds,
    probe_control_models,
    probe_controls,
    save_controls,
)
from seedprints_lightning.core.errors import FingerprintFileError
from seedprints_lightning.core.probes import extract_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny models, one thread


SPEC = ProbeSpec(kind="token", num_samples=40, length=8, vocab_size=64)


# ------------------------------------------------------------------ controls


def test_control_seeds_are_fixed_distinct_and_never_a_typed_seed():
    # Fixed: every call (every run, every rank) gives the same seeds, and fewer controls are the first
    # of more (a file storing 4 controls serves a verdict that uses 2).
    assert control_seeds(4) == control_seeds(4)
    assert control_seeds(2) == control_seeds(4)[:2] and control_seeds(0) == ()
    seeds = control_seeds(64)  # the most the callback takes
    assert len(set(seeds)) == 64 and all(type(s) is int for s in seeds)
    # Far from the seeds people type (0, 1, 42, 1234, 2024, ...): a control is never the run's own init.
    assert not set(seeds) & set(range(100_000))
    assert control_seeds(3, base=7) == (7, 8, 9)
    with pytest.raises(InputError, match="num_controls"):
        control_seeds(-1)


def test_build_control_model_is_deterministic_and_leaves_rng_alone():
    live = make_tiny_lm(0)
    live.train()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state().clone())
    a = build_control_model(live, 1_000_003)
    b = build_control_model(live, 1_000_003)
    c = build_control_model(live, 1_000_004)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.random.get_rng_state(), before[2])
    assert type(a) is type(live) and not a.training and live.training
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, live.model.embed_tokens.weight)


def test_build_control_follows_live_dtype():
    live = make_tiny_lm(0).to(torch.bfloat16)
    control = build_control_model(live, 7)
    assert next(control.parameters()).dtype == torch.bfloat16


def test_probe_controls_same_seed_same_features_rng_untouched(tmp_path):
    live = make_tiny_lm(0)
    torch.manual_seed(123)
    state = torch.random.get_rng_state().clone()
    first = probe_controls(live, SPEC, control_seeds(2), batch_size=16)
    second = probe_controls(live, SPEC, control_seeds(2), batch_size=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.shape == (2, 40, 32) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert not torch.equal(first[0], first[1])
    path = save_controls(tmp_path / "controls.safetensors", first, control_seeds(2), SPEC)
    loaded = ControlSet.load(path)
    features, seeds, spec = loaded.features, loaded.seeds, loaded.spec
    assert torch.equal(features, first) and seeds == control_seeds(2) and spec == SPEC


def test_probe_controls_needs_resolved_spec():
    with pytest.raises(InputError, match="resolved"):
        probe_controls(make_tiny_lm(0), ProbeSpec(num_samples=10, length=4), [1])


def test_save_controls_validates_and_load_rejects_other_files(tmp_path):
    features = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(InputError, match=r"control features must be \[len\(seeds\)=3, n, D\]"):
        save_controls(tmp_path / "c.safetensors", features, (1, 2, 3), SPEC)
    with pytest.raises(InputError, match="control features must be"):
        save_controls(tmp_path / "c.safetensors", features[0], (1,), SPEC)
    path = save_controls(tmp_path / "c.safetensors", features.double(), (5, 6), SPEC, extra={"model_class": "X"})
    controls = ControlSet.load(path)
    loaded, seeds, spec = controls.features, controls.seeds, controls.spec
    assert loaded.dtype == torch.float32 and torch.equal(loaded, features) and seeds == (5, 6) and spec == SPEC
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file
    with pytest.raises(FingerprintFileError, match="does not exist"):
        ControlSet.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FingerprintFileError, match="not a readable seedprints controls file"):
        ControlSet.load(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------ probe_control_models (any model, via a factory)


def _features_of(model: nn.Module) -> torch.Tensor:
    return extract_features(model, SPEC, batch_size=20)


def _just_construct(seed: int) -> nn.Module:
    # Ignores its seed on purpose: probe_control_models seeds the global RNG before calling it.
    return LlamaForCausalLM(tiny_config())  # the config of conftest's make_tiny_lm


def test_probe_control_models_seeds_a_plain_factory_and_leaves_rng_alone():
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state().clone())
    lines: list[str] = []
    first = probe_control_models(_just_construct, [7, 8], _features_of, log=lines.append)
    again = probe_control_models(_just_construct, [8, 7], _features_of)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.random.get_rng_state(), before[2])
    assert first.shape == (2, 40, 32) and first.dtype == torch.float32
    assert torch.equal(first[0], again[1]) and torch.equal(first[1], again[0])  # same seed, same features
    assert not torch.equal(first[0], first[1])  # other seed, other features
    assert len(lines) == 2 and lines[0].startswith("control 1/2 (init seed 7)")
    # The whole-model init of that seed (the factory runs under torch.manual_seed(seed)). This compared with
    # build_control_model before, which now draws supported architectures block by block (streamed-v1, other
    # weights of the same distribution): the plain whole-model recipe is the reference here instead.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        whole = LlamaForCausalLM(tiny_config()).eval()
    assert torch.equal(first[0], extract_features(whole, SPEC, batch_size=20))


def test_probe_control_models_puts_controls_in_eval_mode_without_grad():
    seen = []

    def features_of(model: nn.Module) -> torch.Tensor:
        seen.append((model.training, any(p.requires_grad for p in model.parameters())))
        return _features_of(model)

    def factory(seed: int) -> nn.Module:
        return _just_construct(seed).train()

    probe_control_models(factory, [3], features_of, device="cpu")
    assert seen == [(False, False)]


def test_probe_control_models_rejects_a_non_module_and_restores_rng():
    torch.manual_seed(5)
    state = torch.random.get_rng_state().clone()
    with pytest.raises(InputError, match=r"control_factory\(4\) returned dict, not a torch.nn.Module"):
        probe_control_models(lambda seed: {"seed": seed}, [4], _features_of)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(InputError, match="seed must be an integer >= 0"):
        probe_control_models(_just_construct, [-1], _features_of)
