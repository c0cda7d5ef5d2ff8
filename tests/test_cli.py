"""Tests of the ``seedprints`` command line (in-process through ``main``, and one subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seedprints_lightning import Fingerprint
from seedprints_lightning.cli import EXIT_EXPECT, EXIT_FILE, EXIT_INCOMPATIBLE, EXIT_OK, EXIT_USAGE, main

PROBE = ["--num-samples", "200", "--length", "8", "-q"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(seed: int, vocab: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = _tiny(0)
    base.save_pretrained(root / "seed0")
    noisy = _tiny(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():  # noise of std 1e-3 relative to each tensor's spread
            scale = p.std() if p.numel() > 1 else p.abs().mean()
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3 * scale)
    noisy.save_pretrained(root / "seed0_noisy")
    _tiny(1).save_pretrained(root / "seed1")
    _tiny(1, vocab=48).save_pretrained(root / "seed1_v48")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def fp0(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp") / "seed0.safetensors"
    assert main(["fingerprint", str(models["seed0"]), "-o", str(out), *PROBE]) == EXIT_OK
    return out


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("seedprints: error: ")
    assert "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_writes_loadable_file_with_requested_spec(models, tmp_path, capsys) -> None:
    out = tmp_path / "fp.safetensors"
    code = main(["fingerprint", str(models["seed1_v48"]), "-o", str(out), "--num-samples", "50", "--length", "5",
                 "--seed", "7", "--vocab-size", "40", "-q"])
    assert code == EXIT_OK
    fp = Fingerprint.load(out)
    assert (fp.spec.kind, fp.spec.num_samples, fp.spec.length, fp.spec.seed, fp.spec.vocab_size) == ("token", 50, 5, 7, 40)
    assert tuple(fp.features.shape) == (50, 32)
    assert fp.model_class == "LlamaForCausalLM"
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "n=50, L=5, seed=7, V=40" in stdout and "[50, 32]" in stdout


def test_fingerprint_embedding_and_spec_from(models, fp0, tmp_path) -> None:
    emb = tmp_path / "emb.safetensors"
    assert main(["fingerprint", str(models["seed0"]), "-o", str(emb), "--kind", "embedding", "--num-samples", "20",
                 "--length", "4", "-q"]) == EXIT_OK
    spec = Fingerprint.load(emb).spec
    assert spec.kind == "embedding" and spec.hidden_size == 32 and spec.embed_std > 0

    copied = tmp_path / "copied.safetensors"
    assert main(["fingerprint", str(models["seed1"]), "-o", str(copied), "--spec-from", str(fp0), "-q"]) == EXIT_OK
    assert Fingerprint.load(copied).spec == Fingerprint.load(fp0).spec


def test_fingerprint_spec_from_conflicts_with_probe_options(models, fp0, tmp_path, capsys) -> None:
    code = main(["fingerprint", str(models["seed1"]), "-o", str(tmp_path / "x.safetensors"), "--spec-from", str(fp0),
                 "--seed", "3"])
    assert code == EXIT_USAGE
    assert "--seed" in _one_line_error(capsys)
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- compare


def test_compare_noisy_copy_is_related(models, capsys) -> None:
    code = main(["compare", str(models["seed0"]), str(models["seed0_noisy"]), *PROBE, "--expect", "related"])
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "RELATED" in out and "one-sided" in out and "expected related: yes" in out


def test_compare_fresh_inits_are_unrelated(models, capsys) -> None:
    a, b = str(models["seed0"]), str(models["seed1"])
    assert main(["compare", a, b, *PROBE, "--expect", "unrelated"]) == EXIT_OK
    assert "verdict: unrelated" in capsys.readouterr().out
    assert main(["compare", a, b, *PROBE, "--expect", "related"]) == EXIT_EXPECT
    assert "expected related: NO" in capsys.readouterr().out


def test_compare_json(models, capsys) -> None:
    code = main(["compare", str(models["seed0"]), str(models["seed0_noisy"]), *PROBE, "--json", "--identity-k", "16"])
    assert code == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["related"] is True and data["verdict"] == "related"
    assert data["z"] > 10 and data["log10_p"] < -10 and data["k"] <= 16
    assert data["p_sided"] == "one-sided"
    assert data["a"] == {"path": str(models["seed0"]), "kind": "model_dir"}
    assert data["spec"]["num_samples"] == 200 and data["spec"]["vocab_size"] == 64


def test_compare_models_use_smaller_vocabulary(models, capsys) -> None:
    assert main(["compare", str(models["seed0"]), str(models["seed1_v48"]), *PROBE, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["spec"]["vocab_size"] == 48


def test_compare_fingerprint_with_model_either_order(models, fp0, capsys) -> None:
    assert main(["compare", str(fp0), str(models["seed0_noisy"]), "-q", "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["related"] is True and data["a"]["kind"] == "fingerprint" and data["b"]["kind"] == "model_dir"
    assert data["spec"] == Fingerprint.load(fp0).spec.to_dict()
    assert main(["compare", str(models["seed1"]), str(fp0), "-q", "--expect", "unrelated"]) == EXIT_OK


def test_compare_two_fingerprints(models, fp0, tmp_path, capsys) -> None:
    other = tmp_path / "noisy.safetensors"
    assert main(["fingerprint", str(models["seed0_noisy"]), "-o", str(other), "--spec-from", str(fp0), "-q"]) == 0
    capsys.readouterr()
    assert main(["compare", str(fp0), str(other), "--expect", "related"]) == EXIT_OK
    assert "RELATED" in capsys.readouterr().out


def test_compare_incompatible_fingerprints(models, fp0, tmp_path, capsys) -> None:
    other = tmp_path / "seed9.safetensors"
    assert main(["fingerprint", str(models["seed0"]), "-o", str(other), "--num-samples", "200", "--length", "8",
                 "--seed", "9", "-q"]) == EXIT_OK
    capsys.readouterr()
    assert main(["compare", str(fp0), str(other)]) == EXIT_INCOMPATIBLE
    line = _one_line_error(capsys)
    assert "different probes" in line and "seed: 42 vs 9" in line


def test_compare_fingerprint_vocabulary_misfit(models, fp0, capsys) -> None:
    # fp0 draws token ids up to 64; the 48-token model cannot take them.
    assert main(["compare", str(models["seed1_v48"]), str(fp0), "-q"]) == EXIT_INCOMPATIBLE
    assert "seed1_v48" in _one_line_error(capsys)


def test_compare_probe_options_with_fingerprint_are_refused(models, fp0, capsys) -> None:
    assert main(["compare", str(fp0), str(models["seed1"]), "--num-samples", "10"]) == EXIT_USAGE
    assert "--num-samples" in _one_line_error(capsys)


def test_compare_embedding_probes_take_mean_std_from_a(models, capsys) -> None:
    code = main(["compare", str(models["seed1"]), str(models["seed0"]), "--kind", "embedding", "--num-samples", "50",
                 "--length", "4", "-q", "--json"])
    assert code == EXIT_OK
    spec = json.loads(capsys.readouterr().out)["spec"]
    weight = LlamaForCausalLM.from_pretrained(models["seed1"]).get_input_embeddings().weight.detach()
    assert spec["kind"] == "embedding" and spec["hidden_size"] == 32
    assert spec["embed_mean"] == pytest.approx(float(weight.mean())) and spec["embed_std"] == pytest.approx(float(weight.std()))


def test_compare_agg_threshold_and_bad_device(models, capsys) -> None:
    code = main(["compare", str(models["seed0"]), str(models["seed1"]), *PROBE, "--agg", "--json"])
    assert code == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["z_agg"] is not None and data["threshold_z"] == pytest.approx(2.5758, abs=1e-3)  # alpha / 2
    assert main(["compare", str(models["seed0"]), str(models["seed1"]), "--device", "nonsense"]) == EXIT_USAGE
    assert "--device" in _one_line_error(capsys)


@pytest.mark.parametrize("which", ["missing", "not_a_model", "truncated"])
def test_file_errors_name_the_file(models, fp0, tmp_path, capsys, which) -> None:
    if which == "missing":
        bad = tmp_path / "nope"
    elif which == "not_a_model":
        bad = models["not_a_model"]
    else:
        bad = tmp_path / "truncated.safetensors"
        data = fp0.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    assert main(["compare", str(models["seed0"]), str(bad), *PROBE]) == EXIT_FILE
    line = _one_line_error(capsys)
    assert str(bad) in line


def test_usage_errors_are_one_line(capsys) -> None:
    assert main(["compare", "only-one"]) == EXIT_USAGE
    assert "required" in _one_line_error(capsys)
    assert main(["compare", "a", "b", "--alpha", "1.5"]) == EXIT_USAGE
    assert "--alpha" in _one_line_error(capsys)
    assert main(["frobnicate"]) == EXIT_USAGE
    _one_line_error(capsys)


def test_help_lists_exit_codes(capsys) -> None:
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "exit codes:" in out and "fingerprint" in out and "audit" in out


# ----------------------------------------------------------------------------- subprocess


def test_console_entry_point_runs_without_traceback(tmp_path) -> None:
    # The installed console script when present (pip install -e .), else the module entry point.
    script = Path(sys.executable).with_name("seedprints")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "seedprints_lightning.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "missing.safetensors"
    done = subprocess.run([*cmd, "compare", str(missing), str(missing)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == EXIT_FILE, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"seedprints: error: {missing} does not exist"]
