"""Tests of seedprints_lightning.core.probes: probe inputs, spec handling and feature extraction."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from seedprints_lightning.core.errors import InputError, ModelNotFoundError
from seedprints_lightning.core.probes import ProbeSpec, extract_features, find_causal_lm, preserve_module_modes

TOKEN = ProbeSpec(kind="token", num_samples=23, length=7, seed=5, vocab_size=64)
EMBED = ProbeSpec(kind="embedding", num_samples=23, length=7, seed=5, hidden_size=32, embed_mean=0.1, embed_std=0.02)


def _inputs(spec: ProbeSpec, batch_size: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    return torch.cat([
        b.input_ids if b.input_ids is not None else b.inputs_embeds for b in spec.batches(batch_size, start, stop)
    ])


def _rng_states() -> tuple:
    np_state = np.random.get_state()
    return torch.get_rng_state(), (np_state[0], np_state[1].copy(), *np_state[2:]), random.getstate()


def _assert_rng_states_equal(before: tuple, after: tuple) -> None:
    assert torch.equal(before[0], after[0])
    assert before[1][0] == after[1][0] and np.array_equal(before[1][1], after[1][1]) and before[1][2:] == after[1][2:]
    assert before[2] == after[2]


# --------------------------------------------------------------------------------------
# Probe inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [TOKEN, EMBED], ids=["token", "embedding"])
def test_same_spec_gives_identical_inputs(spec: ProbeSpec) -> None:
    full = _inputs(spec, batch_size=spec.num_samples)
    again = _inputs(ProbeSpec.from_dict(spec.to_dict()), batch_size=spec.num_samples)
    assert torch.equal(full, again)
    # Batch size does not matter.
    for batch_size in (1, 4, 10):
        assert torch.equal(_inputs(spec, batch_size), full)
    # Shards concatenate to the full run.
    shards = [_inputs(spec, 4, lo, hi) for lo, hi in ((0, 5), (5, 6), (6, 23))]
    assert torch.equal(torch.cat(shards), full)
    # A longer run with the same seed extends the shorter one: sample i depends on (seed, i) only.
    longer = ProbeSpec.from_dict({**spec.to_dict(), "num_samples": 40})
    assert torch.equal(_inputs(longer, 16)[: spec.num_samples], full)


def test_token_inputs_shape_range_and_spread() -> None:
    ids = _inputs(TOKEN, 8)
    assert ids.shape == (23, 7) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    assert len(torch.unique(ids)) > 40  # 161 uniform draws from 64 ids cover most of them
    small = ProbeSpec(kind="token", num_samples=50, length=10, vocab_size=3)
    assert set(_inputs(small, 50).unique().tolist()) == {0, 1, 2}


def test_embedding_inputs_follow_mean_and_std() -> None:
    spec = ProbeSpec(kind="embedding", num_samples=200, length=8, hidden_size=32, embed_mean=0.5, embed_std=2.0)
    embeds = _inputs(spec, 64)
    assert embeds.shape == (200, 8, 32) and embeds.dtype == torch.float32
    # 51200 draws: the sample mean is within 0.05 of 0.5 (4.5 standard errors of 0.0088),
    # the sample std within 2 %.
    assert float(embeds.mean()) == pytest.approx(0.5, abs=0.05)
    assert float(embeds.std()) == pytest.approx(2.0, rel=0.02)


@pytest.mark.parametrize("spec", [TOKEN, EMBED], ids=["token", "embedding"])
def test_different_seed_gives_different_inputs(spec: ProbeSpec) -> None:
    other = ProbeSpec.from_dict({**spec.to_dict(), "seed": spec.seed + 1})
    a, b = _inputs(spec, 23), _inputs(other, 23)
    assert a.shape == b.shape
    # Every sample differs (token: 7 ids from 64 all equal by chance has probability 64^-7).
    assert all(not torch.equal(a[i], b[i]) for i in range(a.shape[0]))
    # Samples within one run differ too.
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("spec", [TOKEN, EMBED], ids=["token", "embedding"])
def test_making_inputs_leaves_global_rng_untouched(spec: ProbeSpec) -> None:
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    before = _rng_states()
    _inputs(spec, 5)
    _assert_rng_states_equal(before, _rng_states())
    # And the inputs do not depend on the global seed.
    torch.manual_seed(8)
    first = _inputs(spec, 5)
    torch.manual_seed(9)
    assert torch.equal(_inputs(spec, 5), first)


def test_make_batch_errors() -> None:
    with pytest.raises(InputError, match=r"outside \[0, 23\)"):
        TOKEN.make_batch(20, 24)
    with pytest.raises(InputError, match=r"outside"):
        TOKEN.make_batch(3, 3)
    with pytest.raises(InputError, match=r"batch_size must be an integer >= 1, got"):
        list(TOKEN.batches(0))
    with pytest.raises(InputError, match=r"no vocab_size yet: call spec.resolve\(model\) first"):
        ProbeSpec(kind="token", num_samples=5).make_batch(0, 5)
    with pytest.raises(InputError, match="hidden_size, embed_mean and embed_std"):
        ProbeSpec(kind="embedding", num_samples=5, hidden_size=8).make_batch(0, 5)


# --------------------------------------------------------------------------------------
# Spec validation, resolution, serialisation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "image"}, r"kind must be 'token' or 'embedding'"),
        ({"num_samples": 2}, r"num_samples must be an integer >= 3"),
        ({"num_samples": 10.0}, r"num_samples must be an integer >= 3"),
        ({"num_samples": True}, r"num_samples must be an integer >= 3"),
        ({"length": 0}, r"length must be an integer >= 1"),
        ({"seed": -1}, r"ProbeSpec.seed must be an integer >= 0, got"),
        ({"seed": "42"}, r"ProbeSpec.seed must be an integer >= 0, got"),
        ({"vocab_size": 0}, r"ProbeSpec.vocab_size must be an integer >= 1 \(or None\), got 0"),
        ({"hidden_size": True}, r"ProbeSpec.hidden_size must be an integer >= 1 \(or None\), got True"),
        ({"embed_mean": float("nan")}, r"ProbeSpec.embed_mean must be a finite number \(or None\), got nan"),
        ({"embed_std": 0.0}, r"ProbeSpec.embed_std must be a finite number > 0 \(or None\)"),
        ({"embed_std": -1.0}, r"ProbeSpec.embed_std must be a finite number > 0 \(or None\)"),
        ({"embed_std": float("inf")}, r"ProbeSpec.embed_std must be a finite number > 0 \(or None\)"),
    ],
)
def test_spec_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        ProbeSpec(**kwargs)


@pytest.mark.parametrize("spec", [ProbeSpec(), TOKEN, EMBED], ids=["default", "token", "embedding"])
def test_spec_round_trip(spec: ProbeSpec) -> None:
    assert ProbeSpec.from_dict(spec.to_dict()) == spec
    assert ProbeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert isinstance(spec.describe(), str)


def test_spec_unknown_field() -> None:
    with pytest.raises(InputError, match=r"unknown ProbeSpec field\(s\) \['bogus'\]"):
        ProbeSpec.from_dict({**TOKEN.to_dict(), "bogus": 1})


def test_resolve_fills_fields_from_model(tiny_llama: Callable[[int], nn.Module]) -> None:
    model = tiny_llama(0)
    token = ProbeSpec(kind="token", num_samples=5).resolve(model)
    assert token.vocab_size == 64 and token.is_resolved
    assert ProbeSpec(kind="token", num_samples=5, vocab_size=10).resolve(model).vocab_size == 10  # kept
    embed = ProbeSpec(kind="embedding", num_samples=5).resolve(model)
    weight = model.get_input_embeddings().weight.detach()
    assert embed.is_resolved and embed.hidden_size == 32
    assert embed.embed_mean == pytest.approx(float(weight.mean()), rel=1e-6)
    assert embed.embed_std == pytest.approx(float(weight.std()), rel=1e-6)
    assert embed.embed_std > 0
    # Given values are kept; resolving through a wrapper finds the LM.
    fixed = ProbeSpec(kind="embedding", num_samples=5, embed_mean=0.0, embed_std=1.0).resolve(nn.Sequential(model))
    assert (fixed.embed_mean, fixed.embed_std, fixed.hidden_size) == (0.0, 1.0, 32)
    with pytest.raises(InputError, match=r"vocab_size=65 exceeds the model's vocabulary \(64\)"):
        ProbeSpec(kind="token", num_samples=5, vocab_size=65).resolve(model)
    with pytest.raises(InputError, match=r"hidden_size=16 but the model's hidden size is 32"):
        ProbeSpec(kind="embedding", num_samples=5, hidden_size=16).resolve(model)


# --------------------------------------------------------------------------------------
# find_causal_lm and mode handling
# --------------------------------------------------------------------------------------


class _Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.block = nn.ModuleDict({"lm": inner})


def test_find_causal_lm(tiny_llama: Callable[[int], nn.Module]) -> None:
    model = tiny_llama(0)
    assert find_causal_lm(model) is model
    assert find_causal_lm(_Wrapper(model)) is model
    with pytest.raises(ModelNotFoundError, match=r"no transformers PreTrainedModel found inside Sequential"):
        find_causal_lm(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(ModelNotFoundError):
        extract_features(nn.Linear(2, 2), TOKEN)


def test_preserve_module_modes_restores_on_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    with pytest.raises(RuntimeError):
        with preserve_module_modes(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert model.training and model[0].training and not model[1].training


# --------------------------------------------------------------------------------------
# extract_features
# --------------------------------------------------------------------------------------


def test_extract_features_shape_dtype_and_value(tiny_llama: Callable[[int], nn.Module]) -> None:
    model = tiny_llama(0)
    spec = ProbeSpec(kind="token", num_samples=11, length=6)
    feats = extract_features(model, spec, batch_size=4)
    assert feats.shape == (11, 32) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert not feats.requires_grad and torch.isfinite(feats).all()
    # It is the last layer's hidden state (after the final norm) at the last position.
    ids = spec.resolve(model).make_batch(0, 11).input_ids
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -1, :]
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    # A float64 model still gives float32 features.
    feats64 = extract_features(tiny_llama(0).double(), spec, batch_size=4)
    assert feats64.dtype == torch.float32
    torch.testing.assert_close(feats64, feats, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_extract_features_batch_and_shard_invariance(tiny_llama: Callable[[int], nn.Module], kind: str) -> None:
    model = tiny_llama(1)
    spec = ProbeSpec(kind=kind, num_samples=20, length=5).resolve(model)
    full = extract_features(model, spec, batch_size=20)
    for batch_size in (1, 3, 64):
        torch.testing.assert_close(extract_features(model, spec, batch_size=batch_size), full, rtol=1e-5, atol=1e-6)
    shards = [extract_features(model, spec, batch_size=4, sample_range=r) for r in ((0, 7), (7, 8), (8, 20))]
    assert [s.shape[0] for s in shards] == [7, 1, 12]
    torch.testing.assert_close(torch.cat(shards), full, rtol=1e-5, atol=1e-6)
    assert extract_features(model, spec, sample_range=(5, 5)).numel() == 0
    # Deterministic: the same call twice is bit-identical.
    assert torch.equal(extract_features(model, spec, batch_size=20), full)


def test_extract_features_leaves_rng_modes_and_grads_alone(tiny_llama: Callable[[int], nn.Module]) -> None:
    model = tiny_llama(2)
    model.train()
    frozen = model.model.layers[0]
    frozen.eval()
    seen: list[bool] = []
    model.model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    before = _rng_states()
    for kind in ("token", "embedding"):
        extract_features(model, ProbeSpec(kind=kind, num_samples=6, length=4), batch_size=4)
    _assert_rng_states_equal(before, _rng_states())
    assert seen and not any(seen)  # eval mode during the forward
    assert model.training and model.model.training and model.model.layers[1].training
    assert not frozen.training and not any(m.training for m in frozen.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_extract_features_with_wrapper_and_forward_fn(tiny_llama: Callable[[int], nn.Module]) -> None:
    model = tiny_llama(3)
    wrapper = _Wrapper(model)
    wrapper.train()
    spec = ProbeSpec(kind="token", num_samples=8, length=4)
    torch.testing.assert_close(extract_features(wrapper, spec), extract_features(model, spec))
    assert wrapper.training and wrapper.head.training and model.training

    resolved = spec.resolve(model)
    calls: list[int] = []

    def forward_fn(batch):
        calls.append(batch.size)
        return batch.input_ids.float()[:, :3]

    feats = extract_features(nn.Linear(2, 2), resolved, batch_size=5, forward_fn=forward_fn)
    assert calls == [5, 3] and feats.shape == (8, 3)
    assert torch.equal(feats, resolved.make_batch(0, 8).input_ids.float()[:, :3])
    with pytest.raises(InputError, match=r"returned shape \(5,\) for a batch of 5"):
        extract_features(model, resolved, batch_size=5, forward_fn=lambda b: torch.zeros(b.size))
    with pytest.raises(InputError, match="call spec.resolve"):
        extract_features(model, spec, forward_fn=forward_fn)


def _tiny_gpt2() -> nn.Module:
    # Another architecture (learned positions, tied embeddings) than conftest's llama/qwen2 factory.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def _tiny_qwen2() -> nn.Module:
    return make_tiny_lm(0, "qwen2")  # grouped-query attention: 2 key/value heads for 4 query heads


@pytest.mark.parametrize("factory", [_tiny_gpt2, _tiny_qwen2], ids=["gpt2", "qwen2"])
@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_other_architectures_extract_features(factory: Callable[[], nn.Module], kind: str) -> None:
    model = factory()
    spec = ProbeSpec(kind=kind, num_samples=9, length=5).resolve(model)
    assert spec.is_resolved
    feats = extract_features(model, spec, batch_size=4)
    assert feats.shape == (9, 32) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    batch = spec.make_batch(0, 9)
    with torch.no_grad():
        out = model(**batch.model_kwargs(), output_hidden_states=True)
    torch.testing.assert_close(feats, out.hidden_states[-1][:, -1, :], rtol=1e-5, atol=1e-6)
    assert feats.std(dim=0).min() > 0  # features vary across probe samples
