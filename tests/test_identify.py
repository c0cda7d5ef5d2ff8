"""seedprints_lightning.offline.identify: which recorded run a checkpoint came from, and at about which step.

Runs: the conftest tiny LLaMA (hidden 32), SeedPrintsMonitor, token probes n = 200, L = 8, 2
controls, AdamW lr 3e-3, 8 steps probed at 1-8 (the dense start), fixed seeds: init seeds 0, 1, 2
(``run0``-``run2``), and ``run0b`` from init 0 on other data. Measured margins (Bonferroni over
the 27-36 tests, each run's custody rule against its controls: thresholds 4.8-7.8):

* each run's last checkpoint links to its own reference and all 8 probes at z 57-119 (best: step 8,
  z 118.9, tau = 1), while the other runs' best z is <= 1.8;
* a fresh init (seed 9) scores at most z 2.3 against every candidate (threshold 6.6): "none";
* run 2 resumed and trained 4 more steps on other data links to run 2 at z up to 90 (best step 8),
  the other runs at z <= -0.2;
* run0 and run0b (one init) both link (run0b through the shared reference, z 58.8): one match
  listing both runs.

So every outcome stands at least 2.9 z from its threshold (run 2 vs run 1's checkpoint), most by more than 50.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm

from seedprints_lightning import ProbeSpec, extract_features
from seedprints_lightning.core.errors import FingerprintFileError, IncompatibleFingerprintsError
from seedprints_lightning.core.stats import lineage_test
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline.identify import (
    Identification,
    RunEvidence,
    batched_lineage_tests,
    identify,
    load_runs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=200, length=8)
STEPS = 8


def _data(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(seed))


def _train(model, optimizer, data, first: int, last: int, monitor: SeedPrintsMonitor | None = None) -> None:
    for step in range(first, last + 1):
        batch = data[(step * 4) % 64:(step * 4) % 64 + 4]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            monitor.step(model, step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Four recorded runs under one root, each run's last model and optimizer."""
    root = tmp_path_factory.mktemp("runs")
    out = {"root": root, "models": {}, "optimizers": {}}
    for name, seed, data_seed in (("run0", 0, 0), ("run1", 1, 0), ("run2", 2, 0), ("run0b", 0, 5)):
        model = make_tiny_lm(seed).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        monitor = SeedPrintsMonitor(every_n_steps=4, probe=SPEC, num_controls=2, save_dir=root / name / "seedprints")
        monitor.start(model)
        _train(model, optimizer, _data(data_seed), 1, STEPS, monitor)
        monitor.end(model)
        out["models"][name], out["optimizers"][name] = model, optimizer
    return out


def _prober(model):
    """``probe(spec) -> features``: what the CLI passes (the runs' resolved spec, probed once)."""
    model.eval()
    return lambda spec: extract_features(model, spec)


def _three(runs) -> list[RunEvidence]:
    root = runs["root"]
    return load_runs([root / "run0", root / "run1", root / "run2"])


def test_each_runs_last_checkpoint_is_named_with_its_step_range(runs) -> None:
    evidence = _three(runs)
    assert [r.path for r in evidence] == [str(runs["root"] / n) for n in ("run0", "run1", "run2")]
    assert [len(r.probes) for r in evidence] == [STEPS] * 3
    for name in ("run0", "run1", "run2"):
        result = identify(_prober(runs["models"][name]), evidence)
        assert isinstance(result, Identification)
        assert result.status == "match" and len(result.matches) == 1, result.summary()
        match = result.matches[0]
        assert result.run == str(runs["root"] / name) and match.runs == (str(runs["root"] / name),)
        assert match.steps == (0, STEPS) and match.best_step == STEPS
        assert match.z > match.best.threshold + 10
        assert result.tested["tests"] == 3 * (STEPS + 1) and result.tested["specs"] == 1
        # Bonferroni: log10 p corrected by log10(m)
        assert match.log10_p_corrected == pytest.approx(min(0.0, match.log10_p + math.log10(3 * (STEPS + 1))))
        others = [r for r in result.runs if r.run != str(runs["root"] / name)]
        assert all(not r.linked_steps and r.z < r.threshold - 2 for r in others)
        data = json.loads(json.dumps(result.to_json()))
        assert data["run"] == str(runs["root"] / name) and data["status"] == "match"
        assert data["matches"][0]["steps"] == [0, STEPS] and data["correction"] == "bonferroni"


def test_a_fresh_init_is_none(runs) -> None:
    result = identify(_prober(make_tiny_lm(9)), _three(runs))
    assert result.status == "none" and result.run is None and result.matches == ()
    assert max(r.z - r.threshold for r in result.runs) < -2
    assert result.to_json()["run"] is None


def test_a_model_resumed_from_run2_and_trained_further_is_run2(runs) -> None:
    model = make_tiny_lm(2)
    model.load_state_dict(runs["models"]["run2"].state_dict())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    optimizer.load_state_dict(runs["optimizers"]["run2"].state_dict())
    _train(model, optimizer, _data(11), STEPS + 1, STEPS + 4)
    result = identify(_prober(model), _three(runs))
    assert result.run == str(runs["root"] / "run2"), result.summary()
    assert result.matches[0].best_step == STEPS and result.matches[0].z > result.matches[0].best.threshold + 10


def test_runs_of_one_init_are_one_lineage_and_a_root_directory_finds_every_run(runs) -> None:
    root = runs["root"]
    evidence = load_runs([root])  # the directory that holds all four runs
    assert sorted(r.path for r in evidence) == sorted(str(root / n / "seedprints") for n in
                                                      ("run0", "run0b", "run1", "run2"))
    result = identify(_prober(runs["models"]["run0"]), evidence)
    assert len(result.matches) == 1, result.summary()
    match = result.matches[0]
    assert set(match.runs) == {str(root / "run0" / "seedprints"), str(root / "run0b" / "seedprints")}
    assert match.best.run == str(root / "run0" / "seedprints")  # its own run links best
    assert {link.run for link in match.links} == set(match.runs)
    assert isinstance(result.run, list) and set(result.run) == set(match.runs)
    assert result.to_json()["matches"][0]["shared_init"] is True
    assert result.tested["lineages"] == 3 and result.tested["tests"] == 4 * (STEPS + 1)


def test_batched_tests_equal_lineage_test() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(300, 24, generator=g).half().float()  # fp16-rounded: ties occur
    bases = [torch.randn(300, 24, generator=g).half().float() for _ in range(20)]
    bases.append(target + 0.2 * torch.randn(300, 24, generator=g))
    for chunk in (1, 7, 64):
        batched = batched_lineage_tests(bases, target, alpha=1e-3, chunk=chunk)
        for base, result in zip(bases, batched):
            assert result.to_dict() == lineage_test(base, target, alpha=1e-3).to_dict()
    nan = torch.full((300, 24), float("nan"))
    assert batched_lineage_tests([nan], target)[0].related is None
    assert all(r.related is None for r in batched_lineage_tests(bases[:2], nan))


def test_in_memory_evidence_shared_init_and_errors(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(200, 16, generator=g)
    spec = ProbeSpec(num_samples=200, length=8, vocab_size=64)
    probe = ref + 0.3 * torch.randn(200, 16, generator=g)
    runs = [RunEvidence.from_features("a", spec, ref, [(10, probe)]),
            RunEvidence.from_features("b", spec, ref.clone(), [(10, lambda: torch.randn(200, 16))]),
            RunEvidence.from_features("c", spec, torch.randn(200, 16, generator=g), [(10, torch.randn(200, 16))])]
    assert runs[0].lineage == runs[1].lineage != runs[2].lineage
    result = identify({spec: probe + 0.05 * torch.randn(200, 16, generator=g)}, runs)
    assert [m.runs for m in result.matches] == [("a", "b")]
    wide = [RunEvidence.from_features("w", spec, torch.randn(200, 8), [])]
    with pytest.raises(IncompatibleFingerprintsError):
        identify({spec: probe}, wide)
    mixed = identify({spec: probe}, runs + wide)
    assert mixed.skipped and mixed.skipped[0][0] == "w"
    nan = identify({spec: torch.full((200, 16), float("nan"))}, runs)
    assert nan.status == "undetermined" and nan.run is None
    with pytest.raises(FingerprintFileError):
        load_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FingerprintFileError, match="no seedprints run directory"):
        load_runs([Path(tmp_path / "empty")])


# --------------------------------------------------------------------------------------
# The command line: seedprints identify CKPT RUN_DIR [RUN_DIR ...] [--json]
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(runs, tmp_path_factory) -> dict:
    """run1's last model and a fresh init (seed 9), as save_pretrained directories."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, model in (("run1", runs["models"]["run1"]), ("fresh", make_tiny_lm(9))):
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from seedprints_lightning.offline.cli import main

    code = main(["identify", *map(str, argv), "--device", "cpu", "-q"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_names_the_run_and_json_gives_it_as_given(runs, saved, capsys, monkeypatch) -> None:
    root = runs["root"]
    monkeypatch.chdir(root)  # relative paths, as typed: reported back verbatim
    code, out, err = _cli(capsys, saved["run1"], "run0", "run1", "run2")
    assert code == 0, err
    assert "match      run1\n" in out and "best step 8" in out and "corrected log10 p" in out, out
    assert "links to steps 0-8 of run1" in out and "Bonferroni over 27" in out
    code, out, err = _cli(capsys, saved["run1"], "run0", "run1", "run2", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["run"] == "run1" and data["status"] == "match"
    assert data["matches"][0]["best_step"] == STEPS and data["matches"][0]["steps"] == [0, STEPS]
    assert data["checkpoint"]["kind"] == "model_dir" and len(data["probed"]) == 1
    # A directory holding every run: each found below it, named given/relative.
    code, out, _ = _cli(capsys, saved["run1"], ".", "--json")
    assert code == 0 and json.loads(out)["run"] == str(Path(".") / "run1" / "seedprints")


def test_cli_none_is_exit_1_and_errors_follow_the_conventions(runs, saved, capsys, tmp_path) -> None:
    root = runs["root"]
    code, out, _ = _cli(capsys, saved["fresh"], root / "run0", root / "run1", root / "run2", "--json")
    assert code == 1 and json.loads(out)["run"] is None and json.loads(out)["status"] == "none"
    code, out, _ = _cli(capsys, saved["fresh"], root / "run0", root / "run1")
    assert code == 1 and "match      none" in out
    code, _, err = _cli(capsys, saved["fresh"], tmp_path / "missing")
    assert code == 3 and err.startswith("seedprints: error:") and "does not exist" in err
    code, _, err = _cli(capsys, tmp_path / "nothing.ckpt", root / "run0")
    assert code == 3 and "does not exist" in err
    code, _, err = _cli(capsys, saved["fresh"])
    assert code == 2
    wide = tmp_path / "wide"
    make_tiny_lm(0, hidden_size=48, intermediate_size=96).save_pretrained(wide)
    code, _, err = _cli(capsys, wide, root / "run0")
    assert code == 4 and "could be tested" in err, err
