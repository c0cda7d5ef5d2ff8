"""The torchtitan family (:mod:`seedprints_lightning.core.titan`) on a tiny ``Llama3Model``, on the CPU.

torchtitan compiles FlexAttention and its block-mask builder when it is imported (class attributes);
on a CPU that compile costs about a minute per shape, so these tests swap in the eager functions of
the same names (``torch.nn.attention.flex_attention``), which compute the same attention. Training
steps cannot run on a CPU (FlexAttention has no CPU backward): the weights here are changed by hand.
"""

from __future__ import annotations

import warnings

import pytest
import torch

# Imported, not skipped: `make test` installs torchtitan and triton (Makefile), so a missing one fails loudly.
import torchtitan.models.common.attention as titan_attention  # noqa: E402

from seedprints_lightning import IdentityLostError, ProbeSpec, SeedPrintsMonitor  # noqa: E402
from seedprints_lightning.core.titan import (  # noqa: E402
    INIT_TITAN,
    build_titan_control,
    extract_features_titan,
    extract_features_titan_layerwise,
    find_titan_decoder,
    resolve_titan_spec,
    titan_control_factory,
    titan_feature_fn,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "eager_flex_attention")]


@pytest.fixture()
def eager_flex_attention(monkeypatch):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setattr(titan_attention.FlexAttention, "_compiled_flex_attn", flex_attention)
    monkeypatch.setattr(titan_attention, "_compiled_create_block_mask", create_block_mask)
    warnings.filterwarnings("ignore", message=".*flex_attention.*")


def tiny_titan(seed: int = 0):
    """A tiny ``Llama3Model`` (dim 32, 2 blocks, vocabulary 64, FlexAttention) built as torchtitan's trainer builds
    it: on the meta device, materialised on the CPU, then ``init_states`` under ``torch.manual_seed(seed)``."""
    from torchtitan.models.common import Embedding, Linear, RMSNorm
    from torchtitan.models.common.rope import ComplexRoPE
    from torchtitan.models.llama3 import (
        _EMBEDDING_INIT,
        _NORM_INIT,
        Llama3Model,
        _build_llama3_layers,
        _output_linear_init,
    )

    dim, heads, vocab = 32, 4, 64
    config = Llama3Model.Config(
        dim=dim, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=_output_linear_init(dim)),
        layers=_build_llama3_layers(n_layers=2, dim=dim, n_heads=heads, hidden_dim=64, attn_backend="flex",
                                    rope=ComplexRoPE.Config(dim=dim // heads, max_seq_len=64, theta=500000,
                                                            scaling="none")))
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            model = config.build()
        model.to_empty(device="cpu")
        torch.manual_seed(seed)
        model.init_states(buffer_device=torch.device("cpu"))
    return model.eval()


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_layer_major_features_equal_the_whole_forward_bit_for_bit(kind):
    model = tiny_titan(0)
    assert find_titan_decoder(torch.nn.Sequential(model)) is model
    spec = resolve_titan_spec(ProbeSpec(kind=kind, num_samples=20, length=8), model)
    whole = extract_features_titan(model, spec, batch_size=8)
    loaded: list[str] = []
    layered = extract_features_titan_layerwise(model, spec, batch_size=8,
                                               block_loader=lambda name, _module: loaded.append(name))
    assert whole.shape == (20, 32) and whole.dtype == torch.float32 and torch.isfinite(whole).all()
    assert torch.equal(whole, layered)
    # Each block once, in order; the LM head never runs; embedding probes never read the token embedding.
    assert loaded == (["tok_embeddings"] if kind == "token" else []) + ["layers.0", "layers.1", "norm"]
    # The features are norm's output at the last position of the model's own forward.
    batch = next(iter(spec.batches(8, 0, 8)))
    assert torch.equal(titan_feature_fn(model, batch), whole[:8])
    assert "_skip_lm_head" not in model.__dict__ and model.tok_embeddings.__class__.__name__ == "Embedding"
    # A slice of the samples is the same rows of the whole.
    assert torch.equal(extract_features_titan(model, spec, batch_size=8, sample_range=(4, 12)), whole[4:12])


def test_controls_are_torchtitans_own_init_and_leave_the_rngs_alone():
    model = tiny_titan(0)
    before = torch.get_rng_state()
    control = build_titan_control(model, 0)
    assert torch.equal(torch.get_rng_state(), before)
    # Seed 0 draws exactly the model the trainer's recipe drew with seed 0: the family's own init_states.
    assert all(torch.equal(a, b) for a, b in zip(control.state_dict().values(), model.state_dict().values()))
    assert control.seedprints_init_scheme == INIT_TITAN
    spec = resolve_titan_spec(ProbeSpec(num_samples=8, length=8), model)  # buffers too (the complex RoPE cache)
    assert torch.equal(extract_features_titan(control, spec), extract_features_titan(model, spec))
    other = build_titan_control(model, 1)
    assert not torch.equal(other.tok_embeddings.weight, model.tok_embeddings.weight)
    assert not control.training and not any(p.requires_grad for p in control.parameters())


def test_a_monitor_holds_through_small_updates_and_raises_on_a_fresh_init(tmp_path):
    model = tiny_titan(0)
    spec = resolve_titan_spec(ProbeSpec(num_samples=60, length=8), model)
    monitor = SeedPrintsMonitor(every_n_steps=1, adaptive_schedule=False, probe=spec, num_controls=2, patience=1,
                                on_identity_lost="raise", feature_fn=titan_feature_fn,
                                control_factory=titan_control_factory(model), save_dir=tmp_path / "seedprints")
    monitor.start(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # no CPU backward for FlexAttention: small updates stand in for training steps
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
    monitor.step(model, 1)
    with torch.no_grad():
        for mine, fresh in zip(model.parameters(), tiny_titan(7).parameters()):
            mine.copy_(fresh)
    with pytest.raises(IdentityLostError, match="at step 2"):
        monitor.step(model, 2)
    assert [(h["step"], h["related"]) for h in monitor.history] == [(1, True), (2, False)]


def test_a_model_of_another_family_is_refused_by_name(tiny_llama):
    with pytest.raises(Exception, match="no torchtitan Decoder"):
        resolve_titan_spec(None, tiny_llama(0))
