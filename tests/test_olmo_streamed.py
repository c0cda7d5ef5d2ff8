"""OLMo-core controls drawn block by block (``OLMoStreamedInit``), bit for bit ``build_olmo_control``'s.

``Transformer.init_weights`` draws the embeddings, each block in order, then the LM head's output matrix
from ONE generator (and every ``reset_parameters`` from the global one, in ``modules()`` order), so the
layer-major probe can draw each block just before it runs. A tiny ``TransformerConfig.olmo2_1M`` (d_model
12, 4 blocks, vocabulary 128) on the CPU, float32 unless said; equality is exact (``torch.equal``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from olmo_core.nn.layer_norm import LayerNormConfig, LayerNormType
from olmo_core.nn.transformer import InitMethod, TransformerConfig

from seedprints_lightning import InputError, ProbeSpec
from seedprints_lightning.core.families import OLMO_CORE, plan_measurement
from seedprints_lightning.core.olmo import (
    INIT_OLMO,
    OLMoStreamedInit,
    build_olmo_control,
    extract_features_olmo,
    extract_features_olmo_layerwise,
    olmo_meta_model,
    olmo_streams_controls,
    probe_olmo_streamed_control,
    register_olmo_config,
    resolve_olmo_spec,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 128
BATCH = 16


def config(**changes) -> TransformerConfig:
    return dataclasses.replace(TransformerConfig.olmo2_1M(vocab_size=VOCAB), **changes)


def spec_for(model, kind: str) -> ProbeSpec:
    """The run's resolved spec (embedding probes take their statistics from ``model``'s init embedding)."""
    return resolve_olmo_spec(ProbeSpec(num_samples=40, length=16, kind=kind), model)


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_a_streamed_control_is_bit_for_bit_the_whole_control(kind):
    cfg = config()
    control = build_olmo_control(cfg, 1_000_003)
    spec = spec_for(control, kind)
    rng = torch.random.get_rng_state()
    streamed = probe_olmo_streamed_control(cfg, 1_000_003, spec, batch_size=BATCH)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is left as it was
    assert streamed.shape == (40, 12) and streamed.dtype == torch.float32
    assert torch.equal(streamed, extract_features_olmo(control, spec, batch_size=BATCH))  # the whole forward's
    other = probe_olmo_streamed_control(cfg, 1_000_004, spec, batch_size=BATCH)
    assert not torch.allclose(other, streamed, atol=1e-3)  # another seed, other weights


@pytest.mark.parametrize("changes", [
    dict(init_method=InitMethod.llama_depth),  # per-block output std: the block index must be the stream's
    dict(init_method=InitMethod.fan_in, embedding_norm=LayerNormConfig(name=LayerNormType.rms)),
    dict(tie_word_embeddings=True),
], ids=["llama_depth", "fan_in+embedding_norm", "tied"])
def test_other_init_methods_and_layouts_stream_bit_for_bit(changes):
    cfg = config(**changes)
    assert olmo_streams_controls(cfg)
    control = build_olmo_control(cfg, 5)
    for kind in ("token", "embedding"):
        spec = spec_for(control, kind)
        streamed = probe_olmo_streamed_control(cfg, 5, spec, batch_size=BATCH)
        assert torch.equal(streamed, extract_features_olmo(control, spec, batch_size=BATCH)), kind


def test_a_streamed_bfloat16_control_equals_the_whole_bfloat16_control_probed_layer_major():
    cfg = config()
    control = build_olmo_control(cfg, 9, dtype=torch.bfloat16)
    spec = spec_for(build_olmo_control(cfg, 9), "token")
    streamed = probe_olmo_streamed_control(cfg, 9, spec, batch_size=BATCH, dtype=torch.bfloat16)
    assert torch.equal(streamed, extract_features_olmo_layerwise(control, spec, batch_size=BATCH))


def test_the_stream_draws_every_unit_in_order_each_block_alone():
    skeleton = olmo_meta_model(config())
    stream = OLMoStreamedInit(skeleton, 2)
    live = []  # the units holding real tensors at each block's turn: one at a time

    def unit(key):
        parts = key.split(".")
        return ".".join(parts[:2]) if parts[0] in ("blocks", "lm_head") else parts[0]

    def loader(name, module):
        release = stream(name, module)
        live.append(sorted({unit(key) for key, t in skeleton.state_dict().items() if t.device.type != "meta"}))
        return release

    spec = spec_for(build_olmo_control(config(), 2), "embedding")
    extract_features_olmo_layerwise(skeleton, spec, batch_size=BATCH, block_loader=loader, device="cpu",
                                    dtype=torch.float32)
    # The embeddings are drawn (the stream passes through them) though an embedding probe never runs them.
    assert stream.drawn == ["embeddings", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "lm_head.norm"]
    assert live == [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3"], ["lm_head.norm"]]
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())  # every block freed after
    assert "lm_head.w_out" not in stream.drawn  # last in the stream: never drawn
    with pytest.raises(InputError, match="after OLMo-core's init stream passed it"):
        stream("blocks.0", skeleton.blocks["0"])


def test_models_whose_init_is_not_replayed_keep_whole_controls():
    ngpt = TransformerConfig.ngpt_like(d_model=16, vocab_size=VOCAB, n_layers=2, n_heads=2)
    with pytest.raises(InputError, match="NormalizedTransformer"):
        OLMoStreamedInit(olmo_meta_model(ngpt), 0)
    assert not olmo_streams_controls(ngpt)  # nGPT renormalises after its draw: whole controls
    moe = TransformerConfig.smallmoe(vocab_size=VOCAB, n_layers=2)
    with pytest.raises(InputError, match="MoETransformer"):  # routers and experts: not replayed here
        OLMoStreamedInit(olmo_meta_model(moe), 0)
    assert not olmo_streams_controls(None)
    extra = olmo_meta_model(config())
    extra.adapter = torch.nn.Linear(12, 12, device="meta")  # its reset_parameters would draw outside the stream
    with pytest.raises(InputError, match="modules outside its embeddings, blocks and LM head"):
        OLMoStreamedInit(extra, 0)
    with pytest.raises(InputError, match="seed"):
        OLMoStreamedInit(olmo_meta_model(config()), -1)


def test_the_family_streams_the_controls_of_a_model_with_a_registered_config():
    cfg = config()
    model = cfg.build(init_device="cpu")
    plan = plan_measurement(model, family=OLMO_CORE)
    assert plan.controls == "whole fresh init"  # no config known: a whole fresh init of a copy
    register_olmo_config(model, cfg)
    plan = plan_measurement(model, family=OLMO_CORE)
    assert plan.controls == "streamed block by block"
    assert "controls drawn and probed block by block" in plan.reason
    assert OLMO_CORE.streamed_init_scheme == INIT_OLMO  # the same weights as the whole init: the same scheme
    spec = spec_for(model, "token")
    streamed = OLMO_CORE.streamed_control(OLMO_CORE.control_config(model), 3, spec, batch_size=BATCH,
                                          device=torch.device("cpu"), dtype=torch.float32)
    whole = OLMO_CORE.build_control(model, 3)
    assert torch.equal(streamed, extract_features_olmo(whole, spec, batch_size=BATCH))
