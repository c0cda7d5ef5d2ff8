"""Tests of the ``seedprints`` command line (in-process through ``main``, and one subprocess)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm
from transformers import LlamaForCausalLM

from seedprints_lightning import Fingerprint
from seedprints_lightning.core.controls import control_seeds
from seedprints_lightning.core.stats import log10_normal_sf
from seedprints_lightning.core.verdict import BIRTH_RULE, CUSTODY_RULE
from seedprints_lightning.offline.cli import EXIT_EXPECT, EXIT_FILE, EXIT_INCOMPATIBLE, EXIT_OK, EXIT_USAGE, main

PROBE = ["--num-samples", "200", "--length", "8", "-q"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = make_tiny_lm(0)
    base.save_pretrained(root / "seed0")
    noisy = make_tiny_lm(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noisy.parameters():  # noise of std 1e-3 relative to each tensor's spread
            scale = p.std() if p.numel() > 1 else p.abs().mean()
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3 * scale)
    noisy.save_pretrained(root / "seed0_noisy")
    # seed0 as an init: a Hugging Face Trainer's trainer_state.json records global_step 0.
    shutil.copytree(root / "seed0", root / "seed0_step0")
    (root / "seed0_step0" / "trainer_state.json").write_text(json.dumps({"global_step": 0}))
    make_tiny_lm(1).save_pretrained(root / "seed1")
    make_tiny_lm(1, vocab_size=48).save_pretrained(root / "seed1_v48")
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
    assert (fp.spec.kind, fp.spec.num_samples, fp.spec.length, fp.spec.seed, fp.spec.vocab_size) == (
        "token",
        50,
        5,
        7,
        40,
    )
    assert tuple(fp.features.shape) == (50, 32)
    assert fp.model_class == "LlamaForCausalLM"
    # --controls defaults to 4: fresh inits of the model's config on the same probe, stored with it.
    assert fp.controls is not None and tuple(fp.controls.shape) == (4, 50, 32)
    assert fp.control_seeds == control_seeds(4)
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "n=50, L=5, seed=7, V=40" in stdout and "[50, 32]" in stdout
    assert "controls  4 fresh inits" in stdout


def test_fingerprint_controls_option(models, tmp_path, capsys) -> None:
    none = tmp_path / "none.safetensors"
    assert main(["fingerprint", str(models["seed0"]), "-o", str(none), *PROBE, "--controls", "0"]) == EXIT_OK
    fp = Fingerprint.load(none)
    assert fp.controls is None and fp.control_seeds == () and fp.step is None
    assert "controls  0 fresh inits" in capsys.readouterr().out
    two = tmp_path / "two.safetensors"
    assert main(["fingerprint", str(models["seed0_step0"]), "-o", str(two), *PROBE, "--controls", "2"]) == EXIT_OK
    fp = Fingerprint.load(two)
    assert fp.control_seeds == control_seeds(2) and tuple(fp.controls.shape) == (2, 200, 32)
    assert fp.step == 0  # from trainer_state.json
    assert ", step 0" in capsys.readouterr().out
    assert main(["fingerprint", str(models["seed0"]), "-o", str(none), "--controls", "-1"]) == EXIT_USAGE
    assert "--controls" in _one_line_error(capsys)


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
    assert "verdict: RELATED (same lineage)" in out and "one-sided" in out and "expected related: yes" in out
    # Two models: the controls are fresh inits of A's config (the callback's control seeds).
    seeds = control_seeds(4)
    assert f"evidence    4 fresh inits of {models['seed0']}'s config (seeds {seeds[0]}..{seeds[-1]})" in out
    assert "custody rule" in out  # A's step is unknown: the stricter rule


def test_compare_fresh_inits_are_not_shown_related(models, capsys) -> None:
    a, b = str(models["seed0"]), str(models["seed1"])
    assert main(["compare", a, b, *PROBE, "--expect", "unrelated"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "verdict: NOT SHOWN RELATED" in out and "expected unrelated: yes" in out
    assert "  why " in out  # the reason is printed
    assert main(["compare", a, b, *PROBE, "--expect", "related"]) == EXIT_EXPECT
    assert "expected related: NO" in capsys.readouterr().out
    # The same verdict under either rule, and with a step-0 base.
    assert main(["compare", str(models["seed0_step0"]), b, *PROBE, "--expect", "unrelated"]) == EXIT_OK
    assert main(["compare", a, b, *PROBE, "--rule", "birth", "--expect", "unrelated"]) == EXIT_OK


def test_compare_json(models, capsys) -> None:
    code = main(["compare", str(models["seed0"]), str(models["seed0_noisy"]), *PROBE, "--json", "--identity-k", "16"])
    assert code == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["related"] is True and data["verdict"] == "related"
    assert data["z"] > 10 and data["log10_p"] < -10 and data["k"] <= 16
    assert data["p_sided"] == "one-sided"
    assert data["a"] == {"path": str(models["seed0"]), "kind": "model_dir"}
    assert data["spec"]["num_samples"] == 200 and data["spec"]["vocab_size"] == 64
    # The verdict's figures: threshold, controls, rule and where the controls came from.
    assert data["threshold_z"] == data["threshold"] and data["z"] > data["threshold_z"]
    assert len(data["control_z"]) == 4 and data["threshold_z"] >= max(data["control_z"]) + CUSTODY_RULE.z_margin
    assert data["rule_name"] == "custody" and data["rule"] == CUSTODY_RULE.to_dict()
    assert "4 fresh inits" in data["evidence"] and str(models["seed0"]) in data["evidence"]
    assert data["reason"] is None and data["expect"] is None and data["expect_met"] is None


def test_compare_unrelated_json(models, capsys) -> None:
    code = main(["compare", str(models["seed0"]), str(models["seed1"]), *PROBE, "--json", "--expect", "unrelated"])
    assert code == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["related"] is False and data["verdict"] == "not shown related" and data["reason"]
    assert data["z"] < data["threshold_z"] and data["expect_met"] is True


def test_compare_rule_auto_picks_birth_for_a_step0_base(models, capsys) -> None:
    a, b = str(models["seed0_step0"]), str(models["seed0_noisy"])
    assert main(["compare", a, b, *PROBE, "--json"]) == EXIT_OK
    birth = json.loads(capsys.readouterr().out)
    assert birth["rule_name"] == "birth" and birth["rule"] == BIRTH_RULE.to_dict() and birth["related"] is True
    # Birth rule: no effect-size margin, so the threshold is the controls' largest z plus the margin.
    assert birth["threshold_z"] == pytest.approx(max(2.3263, max(birth["control_z"]) + BIRTH_RULE.z_margin), abs=1e-3)
    assert main(["compare", a, b, *PROBE, "--json", "--rule", "custody"]) == EXIT_OK
    custody = json.loads(capsys.readouterr().out)
    assert custody["rule_name"] == "custody" and custody["rule"] == CUSTODY_RULE.to_dict()
    assert custody["threshold_z"] > birth["threshold_z"]  # the tau margin adds to the threshold
    assert custody["z"] == pytest.approx(birth["z"]) and custody["related"] is True
    assert main(["compare", a, b, *PROBE]) == EXIT_OK
    assert "birth rule" in capsys.readouterr().out
    assert main(["compare", a, b, *PROBE, "--rule", "nope"]) == EXIT_USAGE
    assert "--rule" in _one_line_error(capsys)


def test_compare_without_controls(models, capsys) -> None:
    a, b = str(models["seed0_step0"]), str(models["seed0_noisy"])
    assert main(["compare", a, b, *PROBE, "--controls", "0"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "evidence    no controls (--controls 0)" in out and "controls z  none" in out
    assert main(["compare", a, b, *PROBE, "--controls", "0", "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["evidence"].startswith("no controls") and data["control_z"] == []
    assert data["threshold_z"] == pytest.approx(2.3263, abs=1e-3)  # birth rule without controls: analytic only
    assert data["related"] is True


def test_compare_models_use_smaller_vocabulary(models, capsys) -> None:
    assert main(["compare", str(models["seed0"]), str(models["seed1_v48"]), *PROBE, "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["spec"]["vocab_size"] == 48


def test_compare_fingerprint_with_model_either_order(models, fp0, capsys) -> None:
    assert main(["compare", str(fp0), str(models["seed0_noisy"]), "-q", "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["related"] is True and data["a"]["kind"] == "fingerprint" and data["b"]["kind"] == "model_dir"
    assert data["spec"] == Fingerprint.load(fp0).spec.to_dict()
    assert data["evidence"] == f"4 fresh-init controls stored in {fp0}"
    assert main(["compare", str(models["seed1"]), str(fp0), "-q", "--expect", "unrelated"]) == EXIT_OK


def test_compare_two_fingerprints(models, fp0, tmp_path, capsys) -> None:
    other = tmp_path / "noisy.safetensors"
    assert main(["fingerprint", str(models["seed0_noisy"]), "-o", str(other), "--spec-from", str(fp0), "-q"]) == 0
    capsys.readouterr()
    assert main(["compare", str(fp0), str(other), "--expect", "related"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "verdict: RELATED" in out
    # The controls stored in A are used: nothing is re-probed, and the evidence says so.
    stored = Fingerprint.load(fp0)
    assert f"evidence    4 fresh-init controls stored in {fp0}" in out
    assert main(["compare", str(fp0), str(other), "--json", "--controls", "2"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["evidence"] == f"2 fresh-init controls stored in {fp0}" and len(data["control_z"]) == 2
    from seedprints_lightning.core.stats import lineage_test

    expected = [lineage_test(c, Fingerprint.load(other).features).z for c in stored.controls[:2]]
    assert data["control_z"] == pytest.approx(expected)


def test_compare_fingerprints_without_controls(models, fp0, tmp_path, capsys) -> None:
    """Files made with --controls 0: the verdict says it had no controls; a model in the pair supplies them."""
    bare_a, bare_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for model, out in ((models["seed0"], bare_a), (models["seed1"], bare_b)):
        assert main(["fingerprint", str(model), "-o", str(out), "--spec-from", str(fp0), "--controls", "0",
                     "-q"]) == EXIT_OK
    capsys.readouterr()
    assert main(["compare", str(bare_a), str(bare_b), "--json", "--expect", "unrelated"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["evidence"].startswith("no controls available") and data["control_z"] == []
    assert main(["compare", str(bare_a), str(models["seed1"]), "--json", "-q"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert "fresh inits of" in data["evidence"] and str(models["seed1"]) in data["evidence"]
    assert len(data["control_z"]) == 4 and data["related"] is False


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
    code = main(
        [
            "compare",
            str(models["seed1"]),
            str(models["seed0"]),
            "--kind",
            "embedding",
            "--num-samples",
            "50",
            "--length",
            "4",
            "-q",
            "--json",
        ]
    )
    assert code == EXIT_OK
    spec = json.loads(capsys.readouterr().out)["spec"]
    weight = LlamaForCausalLM.from_pretrained(models["seed1"]).get_input_embeddings().weight.detach()
    assert spec["kind"] == "embedding" and spec["hidden_size"] == 32
    assert spec["embed_mean"] == pytest.approx(float(weight.mean())) and spec["embed_std"] == pytest.approx(
        float(weight.std())
    )


def test_compare_agg_threshold_and_bad_device(models, capsys) -> None:
    a, b = str(models["seed0_step0"]), str(models["seed1"])
    code = main(["compare", a, b, *PROBE, "--agg", "--json", "--controls", "0"])
    assert code == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    # Two signals, Bonferroni x2: z is the quantile of the corrected p, so the analytic
    # threshold stays z(alpha) and z agrees with the reported p.
    assert data["z_agg"] is not None and data["threshold_z"] == pytest.approx(2.3263, abs=1e-3)
    if data["log10_p"] < math.log10(0.5):
        assert log10_normal_sf(data["z"]) == pytest.approx(data["log10_p"], rel=1e-9, abs=1e-12)
    assert main(["compare", a, b, *PROBE, "--agg", "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["threshold_z"] == pytest.approx(max(2.3263, max(data["control_z"]) + BIRTH_RULE.z_margin), abs=1e-3)
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


def test_fingerprint_of_a_nan_model_writes_nothing_and_says_why(tmp_path, capsys) -> None:
    diverged = make_tiny_lm(0)
    with torch.no_grad():
        diverged.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    diverged.save_pretrained(tmp_path / "diverged")
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "fp.safetensors"
    assert main(["fingerprint", str(tmp_path / "diverged"), "-o", str(out), *PROBE]) == EXIT_USAGE
    line = _one_line_error(capsys)
    assert str(tmp_path / "diverged") in line and "of 6400 features values are not finite" in line
    assert "diverged or has NaN/Inf weights" in line and "not written" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["diverged"]


def test_an_unexpected_error_is_one_line_unless_debugging(monkeypatch, tmp_path, capsys) -> None:
    import seedprints_lightning.offline.cli as cli

    def broken(args):
        return {}["no such key"]

    monkeypatch.setattr(cli, "_cmd_plot", broken)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(["plot", str(tmp_path)]) == cli.EXIT_INTERNAL
    line = _one_line_error(capsys)
    assert "unexpected KeyError at test_cli.py:" in line and "'no such key'" in line
    assert "SEEDPRINTS_DEBUG=1 shows the traceback" in line
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(KeyError, match="no such key"):
        main(["plot", str(tmp_path)])


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


def _console(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    """The console script (installed, else `python -m seedprints_lightning`), its environment, a missing path."""
    script = Path(sys.executable).with_name("seedprints")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "seedprints_lightning"]
    return cmd, {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}, tmp_path / "missing.safetensors"


@pytest.mark.slow
def test_console_entry_point_runs_without_traceback(tmp_path) -> None:
    cmd, env, missing = _console(tmp_path)
    done = subprocess.run([*cmd, "compare", str(missing), str(missing)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == EXIT_FILE, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"seedprints: error: {missing} does not exist"]


@pytest.mark.slow
def test_ctrl_c_at_start_up_exits_130_without_a_traceback(tmp_path) -> None:
    # The console script's first import is seedprints_lightning._entry, whose handler exists before
    # torch is imported: a SIGINT during the imports is exit 130 and one line, not -2 or a traceback.
    # (The interpreter's own first ~20 ms, site and the editable-install finder, run before any code
    # of the package: no handler can exist then. The wait on /proc makes sure the start-up is past them.)
    import signal
    import time

    cmd, env, missing = _console(tmp_path)

    def importing_torch(pid: int) -> bool:
        try:
            return "torch" in Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return not Path("/proc/self/maps").exists()  # no /proc: the delay alone

    tried = []
    for delay in (0.2, 0.5, 1.0):
        proc = subprocess.Popen([*cmd, "compare", str(missing), str(missing)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        deadline = time.monotonic() + 30
        while proc.poll() is None and not importing_torch(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:  # still starting up (importing torch): interrupt it
            proc.send_signal(signal.SIGINT)
            tried.append(delay)
        out, err = proc.communicate(timeout=120)
        if delay in tried:
            assert proc.returncode == 130, (delay, proc.returncode, err)
            assert "Traceback" not in err and err.strip().splitlines() == ["seedprints: error: interrupted"], err
    assert tried[:1] == [0.2], tried  # importing torch alone takes longer than that


def test_commands_restore_transformers_logging(tmp_path) -> None:
    # main() may run inside a user's program: the quiet spell ends with the command.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        code = main(["controls", str(tmp_path / "missing-model"), "-o", str(tmp_path / "c.safetensors")])
        assert code != EXIT_OK  # the source does not exist; the logging state must still come back
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_an_interrupt_a_library_swallows_still_exits_130(monkeypatch, capsys) -> None:
    """A Ctrl-C caught by some library's ``except BaseException`` during start-up is still exit 130."""
    import signal

    from seedprints_lightning import _entry
    from seedprints_lightning.offline import cli

    def swallowing(argv):
        try:
            signal.raise_signal(signal.SIGINT)
        except BaseException:  # what a careless import-time guard does
            pass
        return 3

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "main", swallowing)
    assert _entry.main([]) == 130
    assert capsys.readouterr().err.strip() == "seedprints: error: interrupted"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    monkeypatch.setattr(cli, "main", lambda argv: 3)
    assert _entry.main([]) == 3  # no interrupt: the command's own code
