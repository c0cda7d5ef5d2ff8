"""LitGPT: the GPT family (features, controls, offline rebuild), SeedPrintsLitGPTCallback in a Fabric loop, the
SEEDPRINTS_CONFIG factory, and the real ``litgpt pretrain`` CLI with no code change.

Tiny models: pythia-14m's architecture with 2 layers and a 96/256-token vocabulary. Probes of 128 samples of
length 16: a run's own links score z of 150-190 against a threshold near 8 and controls below 1.5
(measured here), so the margins below are wide; a swapped-in fresh init is the case the chain must act on.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from litgpt.config import Config
from litgpt.model import GPT

from seedprints_lightning import IdentityLostError, InputError, ProbeSpec
from seedprints_lightning.core.litgpt import (
    INIT_LITGPT,
    build_litgpt_control,
    litgpt_features,
    resolve_litgpt_spec,
)
from seedprints_lightning.core.probes import extract_features
from seedprints_lightning.faces.fabric import SeedPrintsFabricCallback
from seedprints_lightning.faces.fabric_factory import fabric_callbacks
from seedprints_lightning.faces.litgpt import (
    ENV_CONFIG,
    STATE_KEY,
    SeedPrintsLitGPTCallback,
    callback_from_config,
)
from seedprints_lightning.offline.litgpt import load_litgpt_checkpoint

TESTS = Path(__file__).resolve().parent
SPEC = ProbeSpec(num_samples=128, length=16)


def tiny_config(vocab: int = 96) -> Config:
    return Config.from_name("pythia-14m", n_layer=2, vocab_size=vocab, padded_vocab_size=vocab, block_size=64)


def pretrain_init(config: Config, seed: int) -> GPT:
    """A GPT drawn exactly as ``litgpt pretrain`` draws it: Fabric's empty init, then its initialize_weights."""
    from litgpt.pretrain import initialize_weights

    fabric = L.Fabric(accelerator="cpu", devices=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with fabric.init_module(empty_init=True):
            model = GPT(config)
        initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


# --------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_features_equal_a_whole_forwards_final_norm_bit_for_bit(kind):
    model = pretrain_init(tiny_config(), seed=3)
    spec = resolve_litgpt_spec(dataclasses.replace(SPEC, kind=kind, num_samples=24), model)
    ours = extract_features(model, spec, batch_size=10, forward_fn=lambda batch: litgpt_features(model, batch))
    # The whole forward, LM head included, with its own hooks: ln_f's output at the last position.
    captured = []
    handles = [model.transformer.ln_f.register_forward_hook(lambda _m, _a, out: captured.append(out[:, -1]))]
    batches = list(spec.batches(10))
    if kind == "embedding":
        embeds = iter([batch.inputs_embeds for batch in batches])
        handles.append(model.transformer.wte.register_forward_hook(lambda _m, _a, _o: next(embeds)))
    with torch.no_grad():
        for batch in batches:
            ids = batch.input_ids if kind == "token" else torch.zeros(batch.size, spec.length, dtype=torch.long)
            logits = model(ids)
            assert logits.shape[-1] == 96  # the whole forward ran to the LM head
    for handle in handles:
        handle.remove()
    assert torch.equal(ours, torch.cat(captured).float())


def test_spec_is_resolved_from_the_gpt_and_misfits_are_refused():
    model = pretrain_init(tiny_config(), seed=0)
    assert resolve_litgpt_spec(ProbeSpec(), model).vocab_size == 96
    embedding = resolve_litgpt_spec(ProbeSpec(kind="embedding"), model)
    assert embedding.hidden_size == 128
    assert embedding.embed_std == pytest.approx(float(model.transformer.wte.weight.detach().std()))
    with pytest.raises(InputError, match="exceeds the GPT's vocabulary"):
        resolve_litgpt_spec(ProbeSpec(vocab_size=97), model)
    model.max_seq_length = 8
    with pytest.raises(InputError, match="max_seq_length"):
        resolve_litgpt_spec(ProbeSpec(length=16), model)


def test_a_control_is_exactly_what_litgpt_pretrain_draws_for_its_seed():
    config = tiny_config()
    rng_before = torch.random.get_rng_state()
    control = build_litgpt_control(config, 1_000_003)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    expected = pretrain_init(config, 1_000_003).state_dict()
    got = control.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert torch.equal(control.cos, pretrain_init(config, 0).cos)  # the rope cache is built, not left empty
    assert control.seedprints_init_scheme == INIT_LITGPT
    other = build_litgpt_control(config, 1_000_004).state_dict()
    assert not torch.equal(other["transformer.wte.weight"], got["transformer.wte.weight"])
    # LitGPT's scaled init: the output projections are drawn with std 1/sqrt(d)/n_layer, the rest sqrt(2/5/d).
    assert float(got["transformer.h.0.attn.proj.weight"].std()) == pytest.approx(1 / 128 ** 0.5 / 2, rel=0.05)
    assert float(got["transformer.wte.weight"].std()) == pytest.approx((2 / 5 / 128) ** 0.5, rel=0.05)


def test_a_plain_fabric_face_refuses_a_gpt_instead_of_skipping_it(tmp_path):
    face = SeedPrintsFabricCallback(save_dir=tmp_path / "sp", num_controls=0)
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[face])
    with pytest.raises(InputError, match="SeedPrintsLitGPTCallback"):
        fabric.setup(GPT(tiny_config()))


# --------------------------------------------------------------------------------------
# The face in a Fabric loop: bind, carry the state through fabric.save/load, resume, stop
# --------------------------------------------------------------------------------------

_DATA = torch.randint(0, 96, (64, 17), generator=torch.Generator().manual_seed(0))


def _loop(save_dir: Path, steps: int, *, resume: Path | None = None, swap_at: int | None = None,
          **face_args) -> SeedPrintsLitGPTCallback:
    """A LitGPT-style Fabric loop (state dict without the face, as pretrain.py's), saving every 4 steps."""
    args = dict(save_dir=save_dir / "seedprints", every_n_steps=2, num_controls=2, patience=1, probe=SPEC,
                adaptive_schedule=False)
    face = SeedPrintsLitGPTCallback(**{**args, **face_args})
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[face])
    model = pretrain_init(tiny_config(), seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)
    state = {"model": model, "optimizer": optimizer, "iter_num": 0}
    if resume is not None:
        fabric.load(resume, state)  # after setup, as litgpt pretrain --resume does
    try:
        for step in range(state["iter_num"], steps):
            if swap_at is not None and step == swap_at:
                model.load_state_dict(pretrain_init(tiny_config(), seed=999).state_dict())
            batch = _DATA[(step * 4) % 60:(step * 4) % 60 + 4]
            logits = model(batch[:, :-1])
            fabric.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
            optimizer.step()
            optimizer.zero_grad()
            state["iter_num"] = step + 1
            if (step + 1) % 4 == 0:
                fabric.save(save_dir / f"step-{step + 1}.pth", state)
    finally:
        face.close()
    return face


@pytest.fixture(scope="module")
def resumed_loop(tmp_path_factory):
    out = tmp_path_factory.mktemp("litgpt-loop")
    first = _loop(out, 4)
    resumed = _loop(out, 8, resume=out / "step-4.pth")
    return out, first, resumed


def test_saves_carry_the_state_and_a_resume_continues_the_chain(resumed_loop):
    out, first, resumed = resumed_loop
    checkpoint = torch.load(out / "step-4.pth", weights_only=True)  # plain types: what the audit reads
    assert set(checkpoint) == {"model", "optimizer", "iter_num", STATE_KEY}
    rebuild = checkpoint[STATE_KEY]["model_rebuild"]
    assert rebuild["state_dict_prefix"] == "" and rebuild["litgpt_config"]["n_layer"] == 2
    assert [(h["step"], h["event"]) for h in first.history] == [(2, "interval"), (4, "interval")]
    # The resumed face was restored by fabric.load AFTER setup, and opened at the first step: a resume link.
    assert resumed.reference_source == "checkpoint"
    events = [(h["step"], h["event"], h["related"]) for h in resumed.history]
    assert events[-3:] == [(4, "resume", True), (6, "interval", True), (8, "interval", True)]
    saves = [json.loads(line) for line in (out / "seedprints" / "custody.jsonl").read_text().splitlines()]
    saves = [r for r in saves if r.get("kind") == "save"]
    assert [(r["step"], Path(r["checkpoint"]).name) for r in saves] == [(4, "step-4.pth"), (8, "step-8.pth")]


def test_the_audit_rebuilds_the_checkpoint_and_names_its_save(resumed_loop, capsys):
    from seedprints_lightning.offline.cli import EXIT_OK, main

    out, _, _ = resumed_loop
    assert main(["audit", "--chain", str(out / "seedprints"), str(out / "step-8.pth"), "-q"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "holds exactly the weights saved at step 8" in printed and "descends (" in printed
    model = load_litgpt_checkpoint(out / "step-8.pth")
    assert type(model).__name__ == "GPT" and model.config.n_layer == 2


def test_the_offline_rebuild_probes_exactly_what_the_run_probed(resumed_loop, tmp_path, capsys):
    from seedprints_lightning import Fingerprint
    from seedprints_lightning.core.controls import ControlSet
    from seedprints_lightning.core.ledger import load_probe_features, storage_features
    from seedprints_lightning.offline.cli import EXIT_OK, main

    out, _, _ = resumed_loop
    assert main(["fingerprint", str(out / "step-8.pth"), "-o", str(tmp_path / "fp.safetensors"), "--num-samples",
                 "128", "--length", "16", "--controls", "2", "-q"]) == EXIT_OK
    fp = Fingerprint.load(tmp_path / "fp.safetensors")
    assert (fp.model_class, fp.step, fp.controls_init_scheme) == ("GPT", 8, INIT_LITGPT)
    # The in-run probe of step 8 (CPU, float32, the same weights) and the rebuild's features: bit for bit (as the
    # ledger stores a probe: rounded to fp16).
    [probe_file] = (out / "seedprints" / "probes").glob("*-step00000008-*.safetensors")
    assert torch.equal(storage_features(fp.features), load_probe_features(probe_file))
    # The offline controls are the in-run ones (the same seeds, LitGPT's init, the same probe).
    in_run = Fingerprint.load(out / "seedprints" / "reference.safetensors")
    assert fp.config_digest == in_run.config_digest and fp.spec == in_run.spec
    controls = ControlSet.load(out / "seedprints" / "controls.safetensors")
    assert controls.seeds == fp.control_seeds and torch.equal(controls.features, fp.controls)
    # Two models on one command line go through the transformers-only path: it says what to do instead.
    capsys.readouterr()
    assert main(["compare", str(out / "step-4.pth"), str(out / "step-8.pth"), "-q"]) != EXIT_OK
    assert "is a LitGPT checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["raw", "fabric"])
def test_a_litgpt_checkpoint_without_seedprints_is_rebuilt_from_its_model_config_yaml(tmp_path, layout):
    from litgpt.utils import save_config

    from seedprints_lightning.offline.sources import ProbeRuntime, fingerprint_source

    model = pretrain_init(tiny_config(), seed=11)
    weights = model.state_dict()  # as `litgpt download`/`convert` write it, or as pretrain's fabric.save does
    torch.save(weights if layout == "raw" else {"model": weights, "iter_num": 6, "step_count": 3},
               tmp_path / "lit_model.pth")
    spec = resolve_litgpt_spec(SPEC, model)
    with pytest.raises(Exception, match="neither a Lightning checkpoint"):  # no model_config.yaml: not LitGPT's
        fingerprint_source(tmp_path / "lit_model.pth", spec, runtime=ProbeRuntime())
    save_config(model.config, tmp_path)  # what LitGPT writes beside every lit_model.pth
    fp = fingerprint_source(tmp_path / "lit_model.pth", spec, runtime=ProbeRuntime())
    expected = extract_features(model, spec, forward_fn=lambda batch: litgpt_features(model, batch))
    assert fp.model_class == "GPT" and torch.equal(fp.features, expected)
    assert fp.step == (None if layout == "raw" else 3)  # LitGPT's own step_count


def test_a_checkpoint_with_other_weights_does_not_descend(resumed_loop, tmp_path, capsys):
    from seedprints_lightning.offline.cli import EXIT_EXPECT, main

    out, _, _ = resumed_loop
    raw = torch.load(out / "step-8.pth", weights_only=True)
    raw["model"] = pretrain_init(tiny_config(), seed=7).state_dict()
    torch.save(raw, tmp_path / "other.pth")
    assert main(["audit", "--chain", str(out / "seedprints"), str(tmp_path / "other.pth"), "-q"]) == EXIT_EXPECT
    printed = capsys.readouterr().out
    assert "DOES NOT DESCEND" in printed and "no recorded save has these weights" in printed


def test_a_swap_to_a_fresh_init_raises_with_stop(tmp_path):
    with pytest.raises(IdentityLostError, match="raises under LitGPT"):
        _loop(tmp_path, 8, swap_at=3, on_identity_lost="stop")


def test_a_resume_from_a_checkpoint_without_seedprints_state_is_refused(tmp_path):
    model = pretrain_init(tiny_config(), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": 4},
               tmp_path / "plain.pth")
    with pytest.raises(InputError, match="holds no SeedPrints state"):
        _loop(tmp_path, 8, resume=tmp_path / "plain.pth")


def test_a_save_that_filters_the_models_weights_is_not_bound_but_carries_the_state(tmp_path):
    face = SeedPrintsLitGPTCallback(save_dir=tmp_path / "sp", num_controls=0, probe=SPEC, every_n_steps=100)
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[face])
    model = fabric.setup(GPT(tiny_config()))
    fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.0)).step()  # the chain opens
    assert face.started
    fabric.save(tmp_path / "filtered.pth", {"model": model}, filter={"model": lambda name, _: "wte" not in name})
    fabric.save(tmp_path / "whole.pth", {"model": model})
    face.close()
    records = [json.loads(line) for line in (tmp_path / "sp" / "custody.jsonl").read_text().splitlines()]
    assert [Path(r["checkpoint"]).name for r in records if r.get("kind") == "save"] == ["whole.pth"]
    assert STATE_KEY in torch.load(tmp_path / "filtered.pth", weights_only=True)


def test_setup_module_lora_style_warns_that_nothing_is_probed(tmp_path):
    face = SeedPrintsLitGPTCallback(save_dir=tmp_path / "sp", num_controls=0)
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[face])
    model = fabric.setup_module(GPT(tiny_config()))  # LitGPT's LoRA/adapter scripts: no on_after_setup
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    model(_DATA[:2, :-1]).sum().backward()
    with pytest.warns(UserWarning, match="NOTHING is probed"):
        optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()  # once
    assert not face.started and not (tmp_path / "sp").exists()


def test_fabric_save_and_load_keep_the_signatures_wrapped_here():
    """bind_fabric_checkpoints wraps Fabric.save(path, state, filter) and Fabric.load(path, state, strict, ...)."""
    save = list(inspect.signature(L.Fabric.save).parameters)
    load = inspect.signature(L.Fabric.load).parameters
    assert save == ["self", "path", "state", "filter"], f"Fabric.save changed: {save}; update bind_fabric_checkpoints"
    assert list(load)[:4] == ["self", "path", "state", "strict"], f"Fabric.load changed: {list(load)}"
    assert all(p.kind is p.KEYWORD_ONLY for p in list(load.values())[4:]), "Fabric.load gained a positional parameter"
    # The hooks the face relies on: on_after_setup from setup() only, never from setup_module().
    assert 'self.call("on_after_setup"' in inspect.getsource(L.Fabric.setup)
    assert "on_after_setup" not in inspect.getsource(L.Fabric.setup_module)


# --------------------------------------------------------------------------------------
# SEEDPRINTS_CONFIG: the entry-point factory
# --------------------------------------------------------------------------------------


def _ours(fabric: L.Fabric) -> list:
    return [cb for cb in fabric._callbacks if isinstance(cb, SeedPrintsLitGPTCallback)]


def test_the_factory_is_inert_without_the_variable(monkeypatch):
    from importlib.metadata import entry_points

    assert [ep.value for ep in entry_points(group="lightning.fabric.callbacks_factory") if ep.name == "seedprints"] \
        == ["seedprints_lightning.faces.fabric_factory:fabric_callbacks"]  # registered by pip install -e .
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    assert fabric_callbacks() == []
    assert _ours(L.Fabric(accelerator="cpu", devices=1)) == []  # a user's other Fabric program gets nothing
    monkeypatch.setenv(ENV_CONFIG, "")
    assert _ours(L.Fabric(accelerator="cpu", devices=1)) == []


def test_the_factory_attaches_a_configured_face_when_switched_on(monkeypatch, tmp_path):
    config = tmp_path / "seedprints.yaml"
    config.write_text("save_dir: run/seedprints\nevery_n_steps: 250\non_identity_lost: raise\n"
                      "probe: {num_samples: 500, length: 16}\n")
    monkeypatch.setenv(ENV_CONFIG, str(config))
    [face] = _ours(L.Fabric(accelerator="cpu", devices=1))
    assert face.settings.every_n_steps == 250 and face.settings.on_identity_lost == "raise"
    assert face.settings.probe == ProbeSpec(num_samples=500, length=16) and face.save_dir == Path("run/seedprints")


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("save_dir: [unclosed", "not readable YAML"),
    ("- save_dir\n", "must be a YAML mapping"),
    ("save_dir: x\nevery_n_step: 5\n", r"unknown argument\(s\) \['every_n_step'\]"),
    ("save_dir: x\nfeature_fn: f\n", "functions cannot be given in YAML"),
    ("every_n_steps: 5\n", "'save_dir' is required"),
    ("save_dir: x\nevery_n_steps: 0\n", "every_n_steps"),
    ("save_dir: x\nprobe: {kind: tokens}\n", "probe: "),
])
def test_a_bad_config_file_is_an_error_naming_the_variable(tmp_path, monkeypatch, content, match):
    config = tmp_path / "seedprints.yaml"
    if content is not None:
        config.write_text(content)
    monkeypatch.setenv(ENV_CONFIG, str(config))
    with pytest.raises(InputError, match=match) as raised:
        L.Fabric(accelerator="cpu", devices=1)
    assert ENV_CONFIG in str(raised.value)
    with pytest.raises(InputError, match=match):
        callback_from_config(config)


# --------------------------------------------------------------------------------------
# The real CLI, no code change: 4 steps, a save, --resume to 8, the audit
# --------------------------------------------------------------------------------------


def _pretrain(workdir: Path, max_tokens: int, resume: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, SEEDPRINTS_CONFIG="seedprints.yaml", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "litgpt", "pretrain", "pythia-14m", "--model_config", "model.yaml",
               "--data", "litgpt_helpers.RandomTokens", "--precision", "32-true", "--devices", "1",
               "--train.max_tokens", str(max_tokens), "--train.global_batch_size", "2",
               "--train.micro_batch_size", "2", "--train.max_seq_length", "64", "--train.save_interval", "4",
               "--eval.initial_validation", "false", "--eval.final_validation", "false", "--logger_name", "csv",
               "--out_dir", "out"] + (["--resume", "auto"] if resume else [])
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_litgpt_pretrain_cli_with_no_code_change(tmp_path, capsys):
    import yaml

    from seedprints_lightning.offline.cli import EXIT_OK, main

    (tmp_path / "model.yaml").write_text(yaml.safe_dump(dataclasses.asdict(tiny_config(vocab=256))))
    (tmp_path / "seedprints.yaml").write_text(
        "save_dir: out/seedprints\nevery_n_steps: 4\nadaptive_schedule: false\nnum_controls: 2\n"
        "probe: {num_samples: 128, length: 16}\non_identity_lost: raise\n")
    first = _pretrain(tmp_path, 512, resume=False)  # 4 optimizer steps: a probe and a save at step 4
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    resumed = _pretrain(tmp_path, 1024, resume=True)  # --resume loads step-4 after on_after_setup; on to 8
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming training from" in resumed.stdout
    records = [json.loads(line) for line in (tmp_path / "out/seedprints/custody.jsonl").read_text().splitlines()]
    probes = [(r["step"], r["event"]) for r in records if r.get("kind") != "save"]
    assert probes == [(4, "interval"), (4, "resume"), (8, "interval")], probes
    saves = [(r["step"], r["checkpoint"]) for r in records if r.get("kind") == "save"]
    assert saves == [(4, "out/step-00000004/lit_model.pth"), (8, "out/step-00000008/lit_model.pth"),
                     (8, "out/final/lit_model.pth")], saves
    # The first run's final save came after the step-4 checkpoint the resume loaded: set aside, not lost.
    [abandoned] = (tmp_path / "out/seedprints").glob("custody.abandoned-*.jsonl")
    set_aside = [json.loads(line) for line in abandoned.read_text().splitlines()]
    assert (set_aside[-1]["step"], set_aside[-1]["checkpoint"]) == (4, "out/final/lit_model.pth")
    metrics = (next((tmp_path / "out/logs/csv").glob("version_*")) / "metrics.csv").read_text()
    assert "seedprints/link_z" in metrics.splitlines()[0]  # through LitGPT's own logger
    run, checkpoint = tmp_path / "out/seedprints", tmp_path / "out/step-00000008/lit_model.pth"
    assert main(["audit", "--chain", str(run), str(checkpoint), "-q"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "holds exactly the weights saved at step 8" in printed and "chain      intact" in printed
