"""Tests of seedprints_lightning.train.models: deterministic, RNG-neutral model construction."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, PreTrainedModel, Qwen2Config

from seedprints_lightning.core.errors import InputError
from seedprints_lightning.train import ARCHITECTURES, make_causal_lm, make_config, model_from_config

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_seed_gives_identical_weights(arch: str) -> None:
    assert _same_weights(make_causal_lm(arch, seed=7, **TINY), make_causal_lm(arch, seed=7, **TINY))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_different_seed_gives_different_weights(arch: str) -> None:
    a = make_causal_lm(arch, seed=1, **TINY).state_dict()
    b = make_causal_lm(arch, seed=2, **TINY).state_dict()
    # Every random matrix must differ; norms (ones) and biases (zeros) legitimately agree.
    matrices = [k for k, v in a.items() if v.ndim == 2]
    assert matrices
    assert not any(torch.equal(a[k], b[k]) for k in matrices)


def test_global_rng_is_untouched() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    make_causal_lm("llama", seed=99, **TINY)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected)


def test_weights_do_not_depend_on_global_seed() -> None:
    torch.manual_seed(0)
    a = make_causal_lm("qwen2", seed=5, **TINY)
    torch.manual_seed(1)
    torch.rand(10)
    b = make_causal_lm("qwen2", seed=5, **TINY)
    assert _same_weights(a, b)


@pytest.mark.parametrize(
    ("arch", "config_cls"), [("llama", LlamaConfig), ("qwen2", Qwen2Config), ("gpt2", GPT2Config)]
)
def test_architectures_build_and_run(arch: str, config_cls: type) -> None:
    model = make_causal_lm(arch, seed=0, vocab_size=256, max_position_embeddings=64, **TINY)
    assert isinstance(model, PreTrainedModel)
    assert type(model.config) is config_cls
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config._attn_implementation == "eager"
    logits = model(input_ids=torch.randint(0, 256, (2, 16))).logits
    assert logits.shape == (2, 16, 256)
    assert torch.isfinite(logits).all()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch == "gpt2")


def test_sizes_are_mapped_per_architecture() -> None:
    gpt2 = make_config(
        "gpt2", hidden_size=48, num_layers=3, num_heads=6, intermediate_size=80, max_position_embeddings=99
    )
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_inner, gpt2.n_positions) == (48, 3, 6, 80, 99)
    assert gpt2.resid_pdrop == gpt2.embd_pdrop == gpt2.attn_pdrop == 0.0
    llama = make_config("llama", hidden_size=64, num_heads=4, num_kv_heads=2)
    assert (llama.num_key_value_heads, llama.intermediate_size, llama.tie_word_embeddings) == (2, 256, False)
    model = model_from_config(llama, seed=0)
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 16


def test_model_from_config_rebuilds_the_same_model() -> None:
    original = make_causal_lm("gpt2", seed=3, **TINY)
    config_before = original.config.to_dict()
    rebuilt = model_from_config(original.config, seed=3)
    assert _same_weights(original, rebuilt)
    assert original.config.to_dict() == config_before


def test_config_overrides_pass_through_and_typos_are_caught() -> None:
    assert make_config("llama", rms_norm_eps=1e-5).rms_norm_eps == 1e-5
    assert make_config("llama", rope_theta=5e5).rope_parameters["rope_theta"] == 5e5
    assert make_config("llama", attn_implementation="sdpa")._attn_implementation == "sdpa"
    with pytest.raises(InputError, match="unknown LlamaConfig field.*rms_norm_epss"):
        make_config("llama", rms_norm_epss=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "mamba"}, r"arch must be one of 'llama', 'qwen2', 'gpt2' \(case-insensitive\), got 'mamba'"),
        ({"hidden_size": 30, "num_heads": 4}, "not divisible by num_heads"),
        ({"num_kv_heads": 3}, "must divide num_heads"),
        ({"num_kv_heads": 8}, "must divide num_heads"),
        ({"arch": "gpt2", "num_kv_heads": 2}, "no grouped-query attention"),
        ({"hidden_size": 12, "num_heads": 4}, "even head size"),
        ({"num_layers": 0}, "num_layers must be an integer >= 1, got 0"),
        ({"vocab_size": 2.5}, "vocab_size must be an integer >= 1, got 2.5"),
        ({"attn_implementation": "flash_attention_2"}, "attn_implementation"),
    ],
)
def test_bad_config_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        make_config(**kwargs)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.0, True])
def test_bad_seed_raises(seed: object) -> None:
    with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\], got"):
        make_causal_lm("llama", seed=seed, **TINY)  # type: ignore[arg-type]


def test_foreign_config_is_rejected() -> None:
    from transformers import BertConfig

    with pytest.raises(InputError, match="BertConfig"):
        model_from_config(BertConfig(), seed=0)
