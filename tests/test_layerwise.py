"""Layer-major probing (``extract_features_layerwise``) and streamed controls (``probe_streamed_control``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, tiny_config
from torch import nn

from seedprints_lightning.core.controls import build_control_model, control_seeds
from seedprints_lightning.core.errors import InputError
from seedprints_lightning.core.layerwise import (
    _FreshInitLoader,
    build_streamed_control_model,
    empty_model,
    extract_features_layerwise,
    probe_streamed_control,
    split_blocks,
)
from seedprints_lightning.core.probes import ProbeSpec, extract_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(arch: str) -> Any:
    """Tiny configs of every supported architecture, each exercising what its forward does differently."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if arch in ("llama", "qwen2"):
        return tiny_config(arch)
    if arch == "llama-tied-eager":  # tied embeddings; eager attention gets a materialised [b, 1, L, L] mask
        return LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True, attn_implementation="eager")
    if arch == "qwen2-sliding":  # layer 0 full attention, layer 1 sliding window: one mask per layer type
        return Qwen2Config(**TINY_LLAMA, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
                           max_window_layers=1)
    if arch == "mistral":  # sliding-window mask, grouped-query attention
        return MistralConfig(**TINY_LLAMA, num_key_value_heads=2, sliding_window=3)
    if arch == "gpt2":  # wte + wpe, h[i], ln_f, tied head, depth-scaled c_proj init
        return GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
                          eos_token_id=0)
    raise ValueError(arch)


ARCHS = ["llama", "llama-tied-eager", "qwen2", "qwen2-sliding", "mistral", "gpt2"]


def _model(arch: str, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(_config(arch)).eval()


@pytest.mark.parametrize("kind", ["token", "embedding"])
@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_features_equal_the_whole_model_probe(arch, kind):
    model = _model(arch)
    spec = ProbeSpec(kind=kind, num_samples=12, length=6).resolve(model)
    expected = extract_features(model, spec, batch_size=5)
    got = extract_features_layerwise(model, spec, batch_size=5)
    assert got.shape == expected.shape == (12, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sliding_window_config_changes_the_features():
    """The qwen2-sliding / mistral cases above test the per-layer masks only if the window matters at L = 6."""
    sliding, full = _model("qwen2-sliding"), _model("qwen2")
    full.load_state_dict(sliding.state_dict())
    spec = ProbeSpec(num_samples=4, length=6).resolve(full)
    assert (extract_features(sliding, spec) - extract_features(full, spec)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sample_ranges_and_batch_sizes(arch):
    model = _model(arch)
    spec = ProbeSpec(num_samples=20, length=5).resolve(model)
    whole = extract_features(model, spec, batch_size=8)
    for sample_range, batch_size in [((0, 20), 7), ((5, 17), 4), ((19, 20), 3), ((3, 11), 64)]:
        got = extract_features_layerwise(model, spec, batch_size=batch_size, sample_range=sample_range)
        torch.testing.assert_close(got, whole[sample_range[0]:sample_range[1]], atol=1e-5, rtol=0)
    assert extract_features_layerwise(model, spec, sample_range=(4, 4)).numel() == 0


@pytest.mark.parametrize("arch", ["llama-tied-eager", "qwen2-sliding", "gpt2"])
def test_block_loader_streams_a_meta_model_from_a_state_dict(arch):
    """A meta-device model probed with a loader that copies each block in from a state dict and frees it
    after: the features of the real model, one block materialised at a time, and every block loaded once."""
    real = _model(arch)
    state = real.state_dict()
    meta = empty_model(_config(arch))
    calls: list[tuple[str, int]] = []
    live: set[str] = set()

    def loader(name: str, module: nn.Module):
        originals = {key: tensor for key, tensor in module.state_dict(keep_vars=True).items()}
        module.load_state_dict({key: state[f"{name}.{key}"] for key in originals}, assign=True)
        live.add(name)
        calls.append((name, len(live)))

        def release() -> None:
            module.load_state_dict(originals, assign=True)
            live.discard(name)

        return release

    spec = ProbeSpec(num_samples=9, length=5).resolve(real)
    got = extract_features_layerwise(meta, spec, batch_size=4, block_loader=loader)
    torch.testing.assert_close(got, extract_features(real, spec, batch_size=4), atol=1e-5, rtol=0)
    names = [name for name, _ in calls]
    split = split_blocks(meta)
    layers = [f"{split.prefix}{split.layout.layers}.{i}" for i in range(len(split.layers))]
    assert names[-len(layers) - 1:] == [*layers, f"{split.prefix}{split.layout.norm}"]
    assert len(names) == len(set(names)) and not any("lm_head" in name for name in names)
    assert max(count for name, count in calls if name in layers) == 1  # layers are materialised one at a time
    assert not live and all(t.device.type == "meta" for t in meta.parameters())


def test_unsupported_architecture_is_refused_by_name():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64))
    spec = ProbeSpec(num_samples=4, length=3).resolve(model)
    with pytest.raises(InputError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        extract_features_layerwise(model, spec)


def test_embedding_probes_of_a_meta_model_need_a_resolved_spec():
    with pytest.raises(InputError, match="resolved spec"):
        extract_features_layerwise(empty_model(_config("llama")), ProbeSpec(kind="embedding", num_samples=4))
    with pytest.raises(InputError, match="resolved spec"):
        probe_streamed_control(_config("llama"), 1, ProbeSpec(kind="embedding", num_samples=4))


# --------------------------------------------------------------------------------------
# Streamed controls
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_control_is_its_whole_model_twin_and_leaves_the_rng_alone(arch):
    config = _config(arch)
    spec = ProbeSpec(num_samples=10, length=5, vocab_size=64)
    before = torch.random.get_rng_state()
    streamed = probe_streamed_control(config, 7, spec, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.testing.assert_close(streamed, probe_streamed_control(config, 7, spec, batch_size=3), atol=1e-6, rtol=0)
    twin = build_streamed_control_model(config, 7)
    torch.testing.assert_close(streamed, extract_features(twin, spec, batch_size=4), atol=1e-5, rtol=0)
    assert (streamed - probe_streamed_control(config, 8, spec, batch_size=4)).abs().max() > 1e-3
    if config.tie_word_embeddings:
        assert twin.get_output_embeddings().weight is twin.get_input_embeddings().weight


def test_streamed_blocks_are_drawn_once_and_freed():
    """Each block is drawn exactly once (a tied embedding once, as the embedding; the head never), and every
    drawn tensor is back on the meta device after the probe."""
    model = empty_model(_config("gpt2"))
    split = split_blocks(model)
    loader = _FreshInitLoader(split.base, 3, torch.device("cpu"), torch.float32)
    extract_features_layerwise(model, ProbeSpec(num_samples=5, length=4, vocab_size=64), batch_size=2,
                               block_loader=loader)
    assert loader.drawn == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                            "transformer.h.2", "transformer.ln_f"]
    assert all(t.device.type == "meta" for t in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_init_matches_the_whole_model_init_per_tensor(arch):
    """Every tensor's mean and std match ``type(lm)(config)``'s under a seed within 5 sampling standard
    errors (relative std error ~ 1/sqrt(numel) for the difference of two draws), and constant tensors
    (norm weights, biases) are equal: GPT-2's depth-scaled ``c_proj`` std included."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    config = (LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128) if arch == "llama"
              else GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=64, bos_token_id=0,
                              eos_token_id=0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        whole = AutoModelForCausalLM.from_config(config).state_dict()
    streamed = build_streamed_control_model(config, 11).state_dict()
    assert whole.keys() == streamed.keys()
    for name, expected in whole.items():
        got = streamed[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        if not expected.is_floating_point() or float(expected.std()) == 0.0:
            assert torch.equal(got, expected), name
            continue
        std, se = float(expected.std()), expected.numel() ** -0.5
        assert abs(float(got.std()) / std - 1.0) < 5 * se, name
        assert abs(float(got.mean()) - float(expected.mean())) < 5 * std * (2 * se**2) ** 0.5, name
        assert not torch.equal(got, expected), name
    if arch == "gpt2":
        assert abs(float(streamed["transformer.h.0.attn.c_proj.weight"].std()) / (0.02 / 8**0.5) - 1) < 0.05


def test_streamed_and_whole_model_controls_give_one_null():
    """The unrelated null (z of each control against one fresh live model) of 8 streamed and 8 whole-model
    controls of the tiny LLaMA, n = 200: two-sample KS p-value > 0.01 for z and for the mean tau. With these
    fixed seeds KS D = 0.5, p = 0.28: p < 0.01 needs D >= 7/8 at 8 vs 8 (D = 3/4 still gives p = 0.019), so the
    margin is 3/8 in D; two samples of one distribution reach D >= 7/8 with probability 0.25%.
    benchmarks/streamed_controls.py runs 16+ controls on three configs."""
    from scipy.stats import ks_2samp

    from seedprints_lightning.core.verdict import safe_lineage_test

    config = _config("llama")
    live = _model("llama", seed=0)
    spec = ProbeSpec(num_samples=200, length=16).resolve(live)
    live_features = extract_features(live, spec)
    seeds = control_seeds(8)
    whole = [safe_lineage_test(extract_features(build_control_model(live, s), spec), live_features, alpha=0.01)
             for s in seeds]
    streamed = [safe_lineage_test(probe_streamed_control(config, s, spec), live_features, alpha=0.01) for s in seeds]
    assert all(r.related is not None for r in whole + streamed)
    for stat in ("z", "tau_mean"):
        result = ks_2samp([getattr(r, stat) for r in whole], [getattr(r, stat) for r in streamed])
        assert result.pvalue > 0.01, (stat, result)


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_streamed_control_in_bfloat16(kind):
    """Blocks drawn in float32 and cast, as the whole-model recipe casts; embedding inputs follow ``dtype``."""
    config = _config("llama")
    spec = ProbeSpec(kind=kind, num_samples=6, length=4, vocab_size=64)
    if kind == "embedding":
        spec = ProbeSpec(kind=kind, num_samples=6, length=4, hidden_size=32, embed_mean=0.0, embed_std=0.02)
    got = probe_streamed_control(config, 5, spec, batch_size=4, dtype=torch.bfloat16)
    twin = build_streamed_control_model(config, 5, dtype=torch.bfloat16)
    assert twin.get_input_embeddings().weight.dtype == torch.bfloat16
    torch.testing.assert_close(got, extract_features(twin, spec, batch_size=4), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, probe_streamed_control(config, 5, spec, batch_size=4), atol=0.1, rtol=0.1)
