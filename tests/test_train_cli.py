"""seedprints-train (LightningCLI): every config parses, tiny fits run, callback args arrive."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from seedprints_lightning import ProbeSpec, SeedPrintsCallback
from seedprints_lightning.train.cli import main, make_cli

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
# The LightningCLI section and its configs table (moved from the README in 0.8).
README = (Path(__file__).resolve().parents[1] / "docs" / "loops.md").read_text(encoding="utf-8")


def _readme_row(config_name: str) -> str:
    """docs/loops.md's LightningCLI table row that names ``configs/<config_name>``."""
    rows = [line for line in README.splitlines() if line.startswith("|") and f"`configs/{config_name}`" in line]
    assert len(rows) == 1, rows
    return rows[0]

# Shrink any config to seconds on a CPU: tiny model and probe, 3 steps, no validation.
TINY = [
    "--trainer.max_steps=3",
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.hidden_size=32",
    "--model.num_layers=1",
    "--model.num_heads=4",
    "--model.intermediate_size=64",
    "--model.max_position_embeddings=64",
    "--data.seq_len=16",
    "--data.batch_size=2",
    "--data.num_workers=0",
    # The LAST callback of each config is SeedPrintsCallback: these set its arguments.
    "--trainer.callbacks.every_n_steps=1",
]
# A small probe (not for a child with reference=: the reference's probe is used there).
TINY_PROBE = ["--trainer.callbacks.probe.num_samples=64", "--trainer.callbacks.probe.length=8"]


def _seedprints(trainer) -> SeedPrintsCallback:
    found = [cb for cb in trainer.callbacks if isinstance(cb, SeedPrintsCallback)]
    assert len(found) == 1, trainer.callbacks
    return found[0]


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_configs_directory_has_the_documented_configs():
    # Every config docs/loops.md names is there, and every config there is described in docs/loops.md.
    documented = set(re.findall(r"`configs/([\w.-]+\.yaml)`", README))
    assert documented and documented == {p.name for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_round_trips(config, capsys, tmp_path):
    source = yaml.safe_load(config.read_text())
    printed = _print_config(["fit", "--config", str(config)], capsys)
    callbacks = printed["trainer"]["callbacks"]
    assert callbacks[-1]["class_path"] == "seedprints_lightning.SeedPrintsCallback"
    wanted = source["trainer"]["callbacks"][-1]["init_args"]
    got = callbacks[-1]["init_args"]
    assert got["every_n_steps"] == wanted["every_n_steps"]
    assert got["reference"] == wanted.get("reference")
    assert printed["model"]["vocab_size"] == source["model"]["vocab_size"]
    assert "vocab_size" not in printed["data"]  # linked from model.vocab_size, not settable twice
    # The printed config is itself a valid config that prints the same.
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(printed))
    assert _print_config(["fit", "--config", str(saved)], capsys) == printed


@pytest.mark.parametrize("name, model_class", [("llama-160m.yaml", "LlamaForCausalLM"),
                                               ("qwen-160m.yaml", "Qwen2ForCausalLM")])
def test_paper_configs_build_the_documented_160m_models(name, model_class, capsys):
    from seedprints_lightning.train import CausalLMModule

    printed = _print_config(["fit", "--config", str(CONFIG_DIR / name)], capsys)
    with torch.device("meta"):  # the module the config makes, without allocating 160M parameters
        model = CausalLMModule(**printed["model"]).model
    assert type(model).__name__ == model_class
    # docs/loops.md: "the paper's toy models (hidden 768, 12 layers, 12 heads), bf16, data from your `.bin` memmap".
    row = _readme_row(name)
    hidden, layers, heads = (int(x) for x in re.search(r"hidden (\d+), (\d+) layers, (\d+) heads", row).groups())
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (hidden, layers, heads)
    assert "bf16" in row and printed["trainer"]["precision"].startswith("bf16")
    assert "`.bin` memmap" in row and printed["data"]["memmap_path"].endswith(".bin")
    # The config's own header: "~160M parameters with a 32k vocabulary".
    header = (CONFIG_DIR / name).read_text().splitlines()[0]
    assert "~160M parameters with a 32k vocabulary" in header
    assert 150e6 < sum(p.numel() for p in model.parameters()) < 170e6
    assert 32_000 <= config.vocab_size <= 32 * 1024  # "32k"


def test_command_line_arguments_reach_the_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(
        ["--config", str(CONFIG_DIR / "demo.yaml"),
         "--trainer.callbacks.alpha=0.05", "--trainer.callbacks.patience=4",
         "--trainer.callbacks.on_identity_lost=stop", "--trainer.callbacks.num_controls=2",
         "--trainer.callbacks.probe.kind=embedding", "--trainer.callbacks.probe.num_samples=300",
         "--trainer.callbacks.identity_ratio=0.5", "--trainer.callbacks.save_dir=elsewhere"],
        run=False,
    )
    cb = _seedprints(cli.trainer)
    settings = cb.settings
    assert (settings.every_n_steps, settings.rules.birth_rule.alpha, settings.patience, settings.on_identity_lost,
            settings.num_controls) == (25, 0.05, 4, "stop", 2)
    assert settings.probe == ProbeSpec(kind="embedding", num_samples=300, length=32, seed=42)
    assert settings.rules.identity_ratio == 0.5
    assert cli.datamodule.vocab_size == cli.model.hparams.vocab_size == 256


def test_callback_appended_from_the_command_line_without_a_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(
        ["--trainer.logger=false",
         "--trainer.callbacks+=seedprints_lightning.SeedPrintsCallback",
         "--trainer.callbacks.every_n_steps=50",
         '--trainer.callbacks.probe={"kind": "token", "num_samples": 100, "length": 8}',
         "--model.vocab_size=300"],
        run=False,
    )
    cb = _seedprints(cli.trainer)
    assert cb.settings.every_n_steps == 50
    assert cb.settings.probe == ProbeSpec(num_samples=100, length=8)
    assert cli.datamodule.vocab_size == 300  # the link


def test_probe_in_class_path_form_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"logger": False, "callbacks": [{
            "class_path": "seedprints_lightning.SeedPrintsCallback",
            "init_args": {"every_n_steps": 7, "probe": {"class_path": "seedprints_lightning.ProbeSpec",
                                                        "init_args": {"kind": "embedding", "length": 16}}},
        }]},
    }))
    cb = _seedprints(make_cli(["--config", str(config)], run=False).trainer)
    assert cb.settings.every_n_steps == 7 and cb.settings.probe == ProbeSpec(kind="embedding", length=16)


def test_missing_reference_file_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/demo/... does not exist here
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG_DIR / "continue-from-parent.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "reference='runs/demo/seedprints' does not exist" in err


@pytest.mark.slow
def test_demo_config_fits_then_a_child_continues_from_it(tmp_path, monkeypatch):
    from seedprints_lightning.offline.plotting import read_drift_curves

    monkeypatch.chdir(tmp_path)
    parent = make_cli(["fit", "--config", str(CONFIG_DIR / "demo.yaml"), *TINY, *TINY_PROBE])
    assert parent.trainer.global_step == 3
    run = tmp_path / "runs" / "demo"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "seedprints" / "reference.safetensors").is_file()
    cb = _seedprints(parent.trainer)
    assert [e["step"] for e in cb.history] == [1, 2, 3]
    assert all(e["related"] is True for e in cb.history)
    curves = read_drift_curves(run)
    assert [list(c.z.steps) for c in curves.values()] == [[1, 2, 3]]

    # The child: another init seed, so only --init_from can make it related at step 0.
    child = make_cli(["fit", "--config", str(CONFIG_DIR / "continue-from-parent.yaml"), *TINY,
                      "--model.init_seed=7"])
    cb = _seedprints(child.trainer)
    assert cb.reference_source == "explicit"
    assert cb.history[0]["step"] == 0 and cb.history[0]["event"] == "train_start"
    assert all(e["related"] is True for e in cb.history), cb.history
    # The child continues the parent's chain: its first link is to the parent's last probe (step 3).
    assert cb.history[0]["anchor_step"] == 3
    child_dir = tmp_path / "runs" / "continue" / "seedprints"
    assert (child_dir / "reference.safetensors").is_file() and (child_dir / "parent_anchor.safetensors").is_file()
    from seedprints_lightning.core.verify import verify_chain

    audit = verify_chain(child_dir)
    assert audit.ok, audit.problems


def test_init_from_with_other_sizes_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_cli(["fit", "--config", str(CONFIG_DIR / "demo.yaml"), *TINY, *TINY_PROBE, "--trainer.max_steps=1",
              "--trainer.callbacks.every_n_steps=5"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG_DIR / "continue-from-parent.yaml"), *TINY, "--model.num_layers=2"])
    assert exit_info.value.code == 2
    assert "does not fit this run's model" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama-160m.yaml", "qwen-160m.yaml"])
def test_paper_configs_fit_when_shrunk(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = make_cli(["fit", "--config", str(CONFIG_DIR / name), *TINY, *TINY_PROBE,
                    "--data.memmap_path=null", "--data.corpus=prose", "--model.vocab_size=256"])
    cb = _seedprints(cli.trainer)
    assert cli.trainer.global_step == 3
    assert [e["step"] for e in cb.history] == [1, 2, 3] and all(e["related"] is True for e in cb.history)
    stem = name.removesuffix(".yaml")
    assert (tmp_path / "runs" / stem / "seedprints" / "reference.safetensors").is_file()
    assert list((tmp_path / "runs" / stem).glob("version_0/events.out.tfevents.*"))
