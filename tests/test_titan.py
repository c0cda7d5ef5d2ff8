"""The torchtitan family (:mod:`seedprints_lightning.core.titan`), its face and its offline reader, on the CPU.

Model side: a tiny ``Llama3Model``. torchtitan compiles FlexAttention and its block-mask builder when
it is imported (class attributes); on a CPU that compile costs about a minute per shape, so these
tests swap in the eager functions of the same names (``torch.nn.attention.flex_attention``), which
compute the same attention; FlexAttention has no CPU backward, so there the weights are changed by hand.

Trainer side: torchtitan's real ``Trainer`` (the face's subclass, from this package's config entry for
``llama3_debugmodel``) trains for real on one gloo rank, FSDP2-sharded, with torchtitan's causal SDPA
swapped in through its own ``--override.imports`` mechanism and the device and data shims of
``tests/titan_cpu.py`` (torchtitan has no CPU switch). The GPU check (``tests/test_gpu.py``) runs the same
face with FlexAttention on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

# Imported, not skipped: `make test` installs torchtitan and triton (Makefile), so a missing one fails loudly.
import torchtitan.models.common.attention as titan_attention  # noqa: E402

from seedprints_lightning import IdentityLostError, InputError, ProbeSpec, SeedPrintsMonitor  # noqa: E402
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


# --------------------------------------------------------------------------------------
# The config record: the model rebuilt offline from plain JSON types
# --------------------------------------------------------------------------------------


def _drawn(config, seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            model = config.build()
        model.to_empty(device="cpu")
        torch.manual_seed(seed)
        model.init_states(buffer_device=torch.device("cpu"))
    return model.state_dict()


def test_a_config_record_rebuilds_the_debug_model_and_its_own_init():
    from torchtitan.models.llama3 import model_registry

    from seedprints_lightning.core.titan import (
        fill_inits_from_registry,
        titan_config_from_record,
        titan_config_record,
    )

    config = model_registry("debugmodel").model
    record = json.loads(json.dumps(titan_config_record(config)))  # plain JSON types only
    rebuilt, missing = titan_config_from_record(record)
    # The fused QKV init is a closure, which a record cannot name: one weight and one bias per block.
    assert len(missing) == 2 * len(config.layers)
    assert missing[0] == "layers.0.attention.qkv_linear.wqkv.param_init[weight]"
    assert fill_inits_from_registry(rebuilt, list(missing), "llama3", "debugmodel") == []
    expected, drawn = _drawn(config), _drawn(rebuilt)
    assert list(expected) == list(drawn) and all(torch.equal(expected[k], drawn[k]) for k in expected)
    # Without the registry (another model name) the closures stay missing, and controls of such a model are refused.
    _, still_missing = titan_config_from_record(record)
    assert fill_inits_from_registry(rebuilt, still_missing, "no_such_model", "debugmodel") == still_missing


def test_a_config_record_imports_nothing_outside_torchtitan():
    from seedprints_lightning.core.titan import titan_config_from_record

    hostile = {"__config__": "os:system", "fields": {}}
    with pytest.raises(InputError, match="outside the modules it may name"):
        titan_config_from_record(hostile)
    evil_init = {"__dict__": {"weight": {"__callable__": "builtins:eval"}}}
    init = {"__config__": "torchtitan.models.common.nn_modules:RMSNorm.Config",
            "fields": {"normalized_shape": 8, "param_init": evil_init}}
    with pytest.raises(InputError, match="builtins:eval"):
        titan_config_from_record(init)


# --------------------------------------------------------------------------------------
# The face: torchtitan's real Trainer on one gloo rank
# --------------------------------------------------------------------------------------


@pytest.fixture()
def titan_cpu(monkeypatch, tmp_path):
    """One gloo rank for torchtitan's trainer, its device globals pointed at the CPU; all undone after."""
    import titan_cpu as harness
    import torch.distributed as dist

    harness.cpu_device(monkeypatch)
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg-store'}", rank=0, world_size=1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield harness
    finally:
        dist.destroy_process_group()


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "custody.jsonl").read_text().splitlines() if line.strip()]


def _probe_spec(num_samples: int = 32):
    return ProbeSpec(num_samples=num_samples, length=16)


def test_the_config_entry_is_what_torchtitans_command_line_builds():
    from torchtitan.config import ConfigManager

    from seedprints_lightning.faces.torchtitan import SeedPrintsTitanTrainer, with_seedprints

    config = ConfigManager().parse_args([
        "--module", "seedprints_lightning.faces.torchtitan", "--config", "llama3_debugmodel",
        "--seedprints.every_n_steps", "7", "--seedprints.on_identity_lost", "raise",
        "--seedprints.probe.num_samples", "16", "--training.steps", "3"])
    assert type(config) is SeedPrintsTitanTrainer.Config and type(config)._owner is SeedPrintsTitanTrainer
    assert (config.seedprints.every_n_steps, config.seedprints.on_identity_lost) == (7, "raise")
    assert config.seedprints.probe.num_samples == 16 and config.training.steps == 3
    assert (config.model_spec.name, config.model_spec.flavor) == ("llama3", "debugmodel")
    with pytest.raises(ValueError, match="no_such_config"):
        ConfigManager().parse_args(["--module", "seedprints_lightning.faces.torchtitan", "--config", "no_such_config"])
    with pytest.raises(InputError, match="unknown arguments"):
        with_seedprints(config, every_n_step=3)
    # The face's arguments are checked before the model is built: in milliseconds, naming the argument.
    config.seedprints.every_n_steps = 0
    with pytest.raises(InputError, match="every_n_steps"):
        SeedPrintsTitanTrainer(config)


def test_the_face_takes_every_faces_arguments_but_the_custom_family():
    import dataclasses

    from seedprints_lightning.faces.settings import FaceArguments
    from seedprints_lightning.faces.torchtitan import SeedPrintsTitanArguments

    face = {f.name for f in dataclasses.fields(FaceArguments)} - {"feature_fn", "control_factory"}
    assert {f.name for f in dataclasses.fields(SeedPrintsTitanArguments)} == face | {"enable"}
    defaults = SeedPrintsTitanArguments().face_arguments()
    assert all(defaults[name] == getattr(FaceArguments(), name) for name in face), "a default differs from every face's"


def test_a_healthy_run_keeps_every_link_and_binds_each_save(titan_cpu, tmp_path):
    from seedprints_lightning.core.titan import extract_features_titan
    from seedprints_lightning.core.verify import verify_chain
    from seedprints_lightning.core.weights import weights_digest
    from seedprints_lightning.offline.titan import is_titan_checkpoint, load_titan_model, read_titan_state

    config = titan_cpu.debug_config(str(tmp_path / "out"), steps=4, interval=2, every_n_steps=2,
                                    adaptive_schedule=False, num_controls=2, on_identity_lost="raise",
                                    probe=_probe_spec())
    config.checkpoint.last_save_model_only = True  # torchtitan's default: the final save holds the weights only
    trainer = config.build()
    model = trainer.model_parts[0]
    assert any(hasattr(p, "device_mesh") for p in model.parameters()), "the trainer shards with FSDP2 (DTensors)"
    trainer.train()
    trainer.close()
    face, run, folder = trainer.seedprints, tmp_path / "out" / "seedprints", tmp_path / "out" / "checkpoint"
    assert [(h["step"], h["event"], h["related"]) for h in face.history] == [(2, "interval", True),
                                                                             (4, "interval", True)]
    records = _records(run)
    saves = [(r["step"], r["checkpoint"]) for r in records if r.get("kind") == "save"]
    assert saves == [(2, str(folder / "step-2")), (4, str(folder / "step-4"))]
    assert verify_chain(run).ok
    # The full save holds the face's state with its own save record at the head; the model-only one holds none.
    state = read_titan_state(folder / "step-2")
    assert state["global_step"] == 2 and state["seedprints"]["step"] == 2
    assert read_titan_state(folder / "step-4").get("seedprints") is None
    # Offline, each checkpoint's model is rebuilt (step-4 from step-2's record): the weights of its save record,
    # and features equal to the live sharded model's (probed one gathered block at a time) bit for bit.
    assert is_titan_checkpoint(folder / "step-4") and not is_titan_checkpoint(run)
    offline = load_titan_model(folder / "step-4")
    assert weights_digest(offline.state_dict()) == records[-1]["weights_sha256"]
    spec = face.reference.spec
    assert torch.equal(extract_features_titan(offline, spec), extract_features_titan(model, spec))
    # The offline CLI audits the checkpoint against the chain (no code of the user's).
    audit = subprocess.run([sys.executable, "-m", "seedprints_lightning", "audit", "--chain", str(run),
                            str(folder / "step-4")], capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "holds exactly the weights saved at step 4" in audit.stdout


def test_a_resume_continues_the_chain_from_torchtitans_checkpoint(titan_cpu, tmp_path):
    from seedprints_lightning.core.verify import verify_chain

    out = str(tmp_path / "out")
    arguments = dict(interval=2, every_n_steps=2, adaptive_schedule=False, num_controls=2, on_identity_lost="raise",
                     probe=_probe_spec())
    first = titan_cpu.debug_config(out, steps=2, **arguments).build()
    first.train()
    first.close()
    reference = first.seedprints.reference.features.clone()
    second = titan_cpu.debug_config(out, steps=4, **arguments).build()
    second.train()  # torchtitan loads step-2 (the face's state with it); the chain opens there with a link
    second.close()
    face = second.seedprints
    assert face.reference_source == "checkpoint" and torch.equal(face.reference.features, reference)
    # The history came back with the state; the resumed run linked the loaded weights at once, then probed on.
    assert [(h["step"], h["event"], h["related"]) for h in face.history] == [
        (2, "interval", True), (2, "resume", True), (4, "interval", True)]
    records = _records(tmp_path / "out" / "seedprints")
    assert [(r.get("kind", "probe"), r["step"]) for r in records] == [
        ("probe", 2), ("save", 2), ("probe", 2), ("probe", 4), ("save", 4)]
    assert verify_chain(tmp_path / "out" / "seedprints").ok  # one chain: the resume continued from its head


@pytest.mark.parametrize("action", ["raise", "stop"])
def test_weights_swapped_for_a_fresh_init_are_acted_on_at_the_next_probe(titan_cpu, tmp_path, action):
    trainer = titan_cpu.debug_config(str(tmp_path / "out"), steps=4, interval=10, every_n_steps=1,
                                     adaptive_schedule=False, num_controls=2, patience=1, on_identity_lost=action,
                                     probe=_probe_spec()).build()
    face, model = trainer.seedprints, trainer.model_parts[0]
    after_step = face.after_step

    def swap_at_step_2(step, *, last):
        if step == 2:  # torchtitan's own init of the sharded model, under another seed: a different model
            with torch.no_grad():
                torch.manual_seed(7)
                model.init_states(buffer_device=None)
        after_step(step, last=last)

    face.after_step = swap_at_step_2
    if action == "raise":
        with pytest.raises(IdentityLostError, match="at step 2"):
            trainer.train()
    else:
        with pytest.warns(Warning, match="Stopping the run"):
            trainer.train()  # should_continue_training() ends the loop after step 2
        assert trainer.step == 2 and face.should_stop
    trainer.close()
    assert [(h["step"], h["related"]) for h in face.history] == [(1, True), (2, False)]
    assert not face.started  # the run directory's lock was released on the way out


def test_a_checkpoint_without_the_faces_state_is_refused_with_the_fix(tmp_path):
    import torch.distributed.checkpoint as dcp

    from seedprints_lightning.core.errors import SourceError
    from seedprints_lightning.offline.titan import is_titan_checkpoint, load_titan_model

    folder = tmp_path / "checkpoint" / "step-3"
    dcp.save({k: v.clone() for k, v in tiny_titan(0).state_dict().items()}, checkpoint_id=str(folder), no_dist=True)
    assert is_titan_checkpoint(folder)
    with pytest.raises(SourceError, match="--module seedprints_lightning.faces.torchtitan"):
        load_titan_model(folder)


def _torchrun(tmp_path: Path, *args: str) -> list[dict]:
    """``tests/titan_cpu.py`` on 2 gloo ranks under torchrun; each rank's result."""
    script = Path(__file__).with_name("titan_cpu.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_fsdp2_on_two_ranks_probes_gathered_blocks_like_the_unsharded_model(tmp_path):
    from seedprints_lightning.core.titan import extract_features_titan
    from seedprints_lightning.core.verify import verify_chain
    from seedprints_lightning.core.weights import weights_digest
    from seedprints_lightning.offline.titan import load_titan_model

    ranks = _torchrun(tmp_path)
    assert all(rank["shards"] > 0 for rank in ranks), "the weights are DTensors sharded over the two ranks"
    assert ranks[0]["history"] == ranks[1]["history"] == [[2, "interval", True], [4, "interval", True]]
    assert ranks[0]["reference"] == ranks[1]["reference"] and ranks[0]["final"] == ranks[1]["final"]
    run, folder = tmp_path / "run" / "seedprints", tmp_path / "run" / "checkpoint"
    assert verify_chain(run).ok
    saves = [r for r in _records(run) if r.get("kind") == "save"]
    assert [r["step"] for r in saves] == [2, 4]  # hashed one gathered tensor at a time by both ranks
    # The final checkpoint, rebuilt unsharded in this process, holds the bound weights; its whole forwards give
    # the features the two ranks took from their shards, one gathered block at a time (each rank a slice of the
    # samples: a row's arithmetic may follow its batch's size, so within float32 rounding).
    offline = load_titan_model(folder / "step-4")
    assert weights_digest(offline.state_dict()) == saves[-1]["weights_sha256"]
    spec = ProbeSpec(**ranks[0]["spec"])
    whole = extract_features_titan(offline, spec)
    final = torch.tensor(ranks[0]["final"])
    assert final.shape == whole.shape == (30, 256)
    assert torch.allclose(final, whole, rtol=1e-5, atol=1e-5), (final - whole).abs().max()


def test_fsdp2_on_two_ranks_a_swap_raises_on_both(tmp_path):
    ranks = _torchrun(tmp_path, "2")
    assert all(rank["raised"] and "at step 2" in rank["raised"] for rank in ranks), [r["raised"] for r in ranks]
    assert ranks[0]["history"] == ranks[1]["history"] == [[2, "interval", False]]
