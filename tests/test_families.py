"""The model-family registry and the measurement plan: one place decides how a model is measured.

Each built-in family is found in a tiny model built from a config; the plan's features are, bit for
bit, those of the family's own extractor (the path every face took before the registry); a user's
registered family is measured by a face with no ``feature_fn``; the plan's line is printed once per
run; the CLI reports how each side was measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm
from torch import nn

from seedprints_lightning import InputError, ProbeSpec, SeedPrintsMonitor
from seedprints_lightning.core.errors import IdentityWarning
from seedprints_lightning.core.families import (
    BUILT_IN,
    LITGPT,
    OLMO_CORE,
    TRANSFORMERS,
    CheckpointSide,
    ModelFamily,
    family_named,
    family_of,
    family_of_checkpoint,
    plan_measurement,
    register_family,
    unregister_family,
)
from seedprints_lightning.core.probes import ProbeBatch, extract_features
from seedprints_lightning.offline.cli import EXIT_OK, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=24, length=6)


# ------------------------------------------------------------------ the built-in families


def test_a_transformers_llama_is_the_transformers_family_and_its_plan_is_the_whole_forward():
    model = make_tiny_lm(0)
    family = family_of(model)
    assert family is TRANSFORMERS
    spec = family.resolve_spec(SPEC, model)
    assert spec.vocab_size == model.config.vocab_size
    assert family.sizes(model) == (model.config.vocab_size, model.config.hidden_size)
    assert family.identity(model)["model_class"] == "LlamaForCausalLM"
    plan = plan_measurement(model)
    assert (plan.how, plan.family, plan.controls) == ("whole", "transformers", "streamed block by block")
    assert "unsharded LlamaForCausalLM" in plan.reason and "block by block" in plan.reason
    # Bit for bit the probe the faces ran before the registry, whole and for a slice of the samples.
    assert torch.equal(plan.features(model, spec, 8), extract_features(model, spec, batch_size=8))
    assert torch.equal(plan.features(model, spec, 8, (4, 12)), extract_features(model, spec, batch_size=8)[4:12])
    layer_major = plan_measurement(model, layer_major=True)
    assert layer_major.how == "layer-major"
    torch.testing.assert_close(layer_major.features(model, spec, 8), extract_features(model, spec, batch_size=8),
                               atol=1e-5, rtol=0)


def test_the_plan_names_feature_fn_control_factory_a_file_no_controls_and_the_strategy_wrapper():
    model = make_tiny_lm(0)

    def feature_fn(module: nn.Module, batch: ProbeBatch) -> torch.Tensor:
        return module(input_ids=batch.input_ids.to(module.device)).logits[:, -1, :4]

    plan = plan_measurement(model, feature_fn=feature_fn, control_factory=lambda seed: make_tiny_lm(seed))
    assert (plan.how, plan.family, plan.controls) == ("feature_fn", "transformers", "control_factory")
    assert "feature_fn was given" in plan.reason
    spec = TRANSFORMERS.resolve_spec(SPEC, model)
    assert torch.equal(plan.features(model, spec, 8), extract_features(
        model, spec, batch_size=8, forward_fn=lambda batch: feature_fn(model, batch)))
    custom = plan_measurement(nn.Linear(2, 2), feature_fn=feature_fn, num_controls=0)
    assert (custom.family, custom.controls) == ("custom", "none")
    assert plan_measurement(model, controls_file=True).controls == "file"
    wrapped = plan_measurement(model, strategy_wrapper=True)
    assert wrapped.how == "strategy-wrapper" and "root wrapper" in wrapped.reason
    assert wrapped.line().startswith("measuring: strategy-wrapper (transformers): ")


def test_a_module_no_family_knows_is_refused_naming_feature_fn():
    with pytest.raises(Exception, match="feature_fn"):
        plan_measurement(nn.Sequential(nn.Linear(2, 2)))


def test_an_olmo_core_transformer_is_the_olmo_core_family():
    pytest.importorskip("olmo_core")
    from olmo_core.nn.transformer import TransformerConfig

    from seedprints_lightning.core.olmo import build_olmo_control, extract_features_olmo

    model = build_olmo_control(TransformerConfig.olmo2_1M(vocab_size=128), 0)
    assert family_of(model) is OLMO_CORE
    assert OLMO_CORE.sizes(model) == (128, 12)
    spec = OLMO_CORE.resolve_spec(SPEC, model)
    plan = plan_measurement(model)
    assert (plan.how, plan.family, plan.controls) == ("whole", "olmo-core", "whole fresh init")
    assert torch.equal(plan.features(model, spec, 8), extract_features_olmo(model, spec, batch_size=8))
    control = OLMO_CORE.build_control(model, 5)
    assert not torch.equal(control.embeddings.weight, model.embeddings.weight)  # another init, same shapes
    assert OLMO_CORE.checkpoint.get("open") is not None  # offline/olmo.py's handle, imported on first use


def test_a_litgpt_gpt_is_the_litgpt_family_and_a_generic_face_names_the_litgpt_face(tmp_path):
    pytest.importorskip("litgpt")
    from litgpt.config import Config

    from seedprints_lightning.core.litgpt import build_litgpt_control, litgpt_config_digest, litgpt_features

    config = Config.from_name("pythia-14m", n_layer=2, vocab_size=96, padded_vocab_size=96, block_size=64)
    gpt = build_litgpt_control(config, 0)
    assert family_of(gpt) is LITGPT
    assert LITGPT.identity(gpt) == {"model_class": "GPT", "config_digest": litgpt_config_digest(config)}
    spec = LITGPT.resolve_spec(SPEC, gpt)
    plan = plan_measurement(gpt)
    assert (plan.how, plan.family) == ("whole", "litgpt")
    assert torch.equal(plan.features(gpt, spec, 8), extract_features(
        gpt, spec, batch_size=8, forward_fn=lambda batch: litgpt_features(gpt, batch)))
    # The layer-major probe gives the whole forward's features bit for bit.
    assert torch.equal(LITGPT.layer_major(gpt, spec, batch_size=8), plan.features(gpt, spec, 8))
    monitor = SeedPrintsMonitor(num_controls=0, save_dir=tmp_path / "seedprints")
    with pytest.raises(InputError, match="SeedPrintsLitGPTCallback"):
        monitor.start(gpt)


@pytest.mark.slow
def test_a_torchtitan_decoder_is_the_torchtitan_family(monkeypatch):
    pytest.importorskip("torchtitan")
    import test_titan
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from seedprints_lightning.core.titan import extract_features_titan

    monkeypatch.setattr(test_titan.titan_attention.FlexAttention, "_compiled_flex_attn", flex_attention)
    monkeypatch.setattr(test_titan.titan_attention, "_compiled_create_block_mask", create_block_mask)
    model = test_titan.tiny_titan(0)
    family = family_of(model)
    assert family is family_named("torchtitan")
    assert family.sizes(model) == (64, 32)
    spec = family.resolve_spec(SPEC, model)
    plan = plan_measurement(model)
    assert (plan.how, plan.family) == ("whole", "torchtitan")
    assert torch.equal(plan.features(model, spec, 8), extract_features_titan(model, spec, batch_size=8))
    # A digest of its config record (init functions by import path): another seed's model, the same digest.
    identity = family.identity(model)
    assert identity["config_digest"] and identity == family.identity(test_titan.tiny_titan(1))


def test_a_dtensor_model_is_measured_one_gathered_block_at_a_time(tmp_path):
    """FSDP2 over a one-process gloo group: the plan says gathered blocks (the features: tests/test_sharded.py)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = make_tiny_lm(0)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        plan = plan_measurement(model)
        assert (plan.how, plan.family) == ("gathered-blocks", "transformers")
        assert "sharded" in plan.reason and "gathered" in plan.reason
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ a user's own family


class ToyLM(nn.Module):
    """A model no built-in family knows: embedding, one mixing layer, a norm; features are the last position's."""

    def __init__(self, vocab: int = 40, width: int = 16) -> None:
        super().__init__()
        self.vocab, self.width = vocab, width
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.tanh(self.mix(self.embed(ids))).cumsum(dim=1))


def _toy_features(model: nn.Module, batch: ProbeBatch) -> torch.Tensor:
    return model(batch.input_ids)[:, -1, :]


def _toy_control(model: nn.Module, seed: int, config: object = None) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ToyLM(model.vocab, model.width).eval()


TOY = ModelFamily(
    name="toy",
    find=lambda module: next((m for m in module.modules() if isinstance(m, ToyLM)), None),
    resolve_spec=lambda spec, model: (spec or ProbeSpec()).resolved_with(
        vocab_size=model.vocab, hidden_size=model.width, init_embedding=lambda: model.embed.weight),
    whole=lambda model, spec, *, batch_size=64, sample_range=None: extract_features(
        model, spec, batch_size=batch_size, sample_range=sample_range,
        forward_fn=lambda batch: _toy_features(model, batch)),
    build_control=_toy_control,
    identity=lambda module: {"model_class": "ToyLM", "config_digest": "toy-v1"},
    sizes=lambda model: (model.vocab, model.width),
    checkpoint=CheckpointSide(is_checkpoint=lambda path: (path / "toy.pt").is_file(),
                              load_model=lambda path, *, dtype, trust_pickle: torch.load(
                                  path / "toy.pt", weights_only=False).to(dtype)),
)


@pytest.fixture()
def toy_family():
    register_family(TOY)
    try:
        yield TOY
    finally:
        unregister_family(TOY.name)


def _toy(seed: int) -> ToyLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ToyLM().eval()


def test_a_registered_family_is_measured_by_a_face_and_its_line_is_printed_once(toy_family, tmp_path, capsys):
    model = _toy(0)
    monitor = SeedPrintsMonitor(every_n_steps=1, adaptive_schedule=False, probe=ProbeSpec(num_samples=60, length=6),
                                num_controls=2, patience=1, save_dir=tmp_path / "seedprints")
    monitor.start(model)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 1e-4)
    monitor.step(model, 1)
    with torch.no_grad():
        for mine, fresh in zip(model.parameters(), _toy(9).parameters()):
            mine.copy_(fresh)
    with pytest.warns(IdentityWarning, match="lost its lineage identity at step 2"):
        monitor.step(model, 2)
    monitor.close()
    out = capsys.readouterr().out
    assert out.count("[seedprints] measuring:") == 1, out  # once per run, not once per probe
    assert "[seedprints] measuring: whole (toy): an unsharded ToyLM" in out
    assert (monitor.measurement.how, monitor.measurement.family, monitor.measurement.controls) == (
        "whole", "toy", "whole fresh init")
    assert monitor.reference.model_class == "ToyLM" and monitor.reference.config_digest == "toy-v1"
    assert [(h["step"], h["related"]) for h in monitor.history] == [(1, True), (2, False)]


def test_registering_needs_a_family_and_a_name_of_its_own():
    with pytest.raises(InputError, match="ModelFamily"):
        register_family(object())
    with pytest.raises(InputError, match="built-in"):
        register_family(ModelFamily(**{**{f: getattr(TOY, f) for f in TOY.__dataclass_fields__}, "name": "litgpt"}))
    with pytest.raises(InputError, match="sizes must be callable"):
        ModelFamily(**{**{f: getattr(TOY, f) for f in TOY.__dataclass_fields__}, "sizes": None})
    assert [family.name for family in BUILT_IN] == ["transformers", "olmo-core", "litgpt", "torchtitan"]


def test_a_registered_family_checkpoint_is_recognised_and_rebuilt_offline(toy_family, tmp_path):
    from seedprints_lightning.offline.sources import classify_source, fingerprint_source, load_model

    folder = tmp_path / "step10"
    folder.mkdir()
    torch.save(_toy(3), folder / "toy.pt")
    assert family_of_checkpoint(folder) is TOY
    assert family_of_checkpoint(tmp_path) is None
    assert classify_source(folder).kind == "checkpoint"
    model = load_model(folder)
    assert isinstance(model, ToyLM) and torch.equal(model.embed.weight, _toy(3).embed.weight)
    # Fingerprinted through the family (a FamilyCheckpointHandle: rebuilt whole, its own init for the controls).
    fp = fingerprint_source(folder, ProbeSpec(num_samples=30, length=6), num_controls=2)
    spec = TOY.resolve_spec(ProbeSpec(num_samples=30, length=6), _toy(3))
    assert fp.spec == spec and torch.equal(fp.features, TOY.whole(_toy(3), spec))
    assert (fp.model_class, fp.config_digest, len(fp.control_seeds)) == ("ToyLM", "toy-v1", 2)
    assert fp.extra["measurement"]["family"] == "toy" and fp.extra["load"]["path"] == "whole"
    assert not torch.equal(fp.controls[0], fp.controls[1])  # two seeds, two fresh inits


def test_the_old_home_of_open_model_still_answers_and_warns():
    from seedprints_lightning.offline import sources, streaming

    with pytest.warns(DeprecationWarning, match="offline.sources.open_model"):
        assert streaming.open_model is sources.open_model


# ------------------------------------------------------------------ the CLI says how each side was measured


def test_compare_json_and_text_carry_the_measurement(tmp_path, capsys):
    for seed in (0, 1):
        make_tiny_lm(seed).save_pretrained(tmp_path / f"seed{seed}")
    a, b = str(tmp_path / "seed0"), str(tmp_path / "seed1")
    probe = ["--num-samples", "60", "--length", "6", "-q", "--controls", "0"]
    capsys.readouterr()  # what saving printed (a library's start-up notice) is not the command's output
    assert main(["compare", a, b, *probe, "--json", "--load", "streamed"]) == EXIT_OK
    payload = json.loads(capsys.readouterr().out)
    for side in ("a", "b"):
        measurement = payload["measurement"][side]
        assert (measurement["how"], measurement["family"], measurement["controls"]) == (
            "layer-major", "transformers", "none")
        assert "one block at a time" in measurement["reason"] and "--load streamed" in measurement["reason"]
    assert main(["compare", a, b, *probe, "--load", "whole"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "measuring   A: whole (transformers): an unsharded LlamaForCausalLM" in out


def test_fingerprint_prints_and_stores_the_measurement(tmp_path, capsys):
    make_tiny_lm(0).save_pretrained(tmp_path / "seed0")
    out_file = tmp_path / "fp.safetensors"
    assert main(["fingerprint", str(tmp_path / "seed0"), "-o", str(out_file), "--num-samples", "40", "--length", "6",
                 "-q", "--controls", "1"]) == EXIT_OK
    assert "  measuring whole (transformers): " in capsys.readouterr().out
    from seedprints_lightning import Fingerprint

    stored = Fingerprint.load(Path(out_file)).extra["measurement"]
    assert (stored["how"], stored["controls"]) == ("whole", "streamed block by block")


def test_a_litgpt_faces_default_controls_are_streamed_and_equal_the_whole_controls():
    """The LitGPT family's controls are drawn block by block (one RNG stream, as LitGPT's pretrain init) and
    are the whole controls' features bit for bit, recorded under LitGPT's own init scheme."""
    pytest.importorskip("litgpt")
    from litgpt.config import Config

    from seedprints_lightning.core.controls import ControlSet
    from seedprints_lightning.core.litgpt import INIT_LITGPT, build_litgpt_control, litgpt_features
    from seedprints_lightning.faces.settings import FaceSettings

    config = Config.from_name("pythia-14m", n_layer=2, vocab_size=96, padded_vocab_size=96, block_size=64)
    gpt = build_litgpt_control(config, 0)
    spec = LITGPT.resolve_spec(SPEC, gpt)
    settings = FaceSettings.from_arguments(num_controls=2, probe_batch_size=8).adopt(LITGPT, spec)
    assert settings.plan(gpt).controls == "streamed block by block"
    source = settings.controls_source(gpt, device=None, is_writer=False)
    streamed = source.build((11, 12), spec)
    whole = ControlSet.build(lambda seed: build_litgpt_control(config, seed), (11, 12), spec,
                             lambda control: extract_features(control, spec, batch_size=8,
                                                              forward_fn=lambda b: litgpt_features(control, b)))
    assert torch.equal(streamed.features, whole.features)
    assert streamed.init_scheme == INIT_LITGPT == whole.init_scheme
