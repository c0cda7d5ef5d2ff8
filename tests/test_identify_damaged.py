"""identify over damaged runs (issue 27 item 3): what cannot be read is skipped, named, and never makes "none".

Runs: the conftest tiny LLaMA (hidden 32), SeedPrintsMonitor, token probes n = 200, L = 8, 2 controls, AdamW
lr 3e-3, 8 steps (probes at the dense start), init seeds 0 and 1 (``run0``, ``run1``), as in test_identify.py,
where each run's last model links to its own reference and probes at z 57-119 and to the other run at z <= 1.8,
against thresholds of 4.8-7.8: every verdict asserted here stands far from its threshold.

Each test damages a fresh copy of the runs. Every case failed on 0.7: a missing reference hid the run
("none", exit 1), a truncated reference or probe file stopped everything (exit 3), and a swapped probe file
was tested as if it were the recorded one (a faked match).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm

from seedprints_lightning import ProbeSpec, extract_features
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline.identify import ScreenOptions, UnreadableRun, identify, load_runs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=200, length=8)
STEPS = 8


def _train(model, optimizer, data, monitor) -> None:
    for step in range(1, STEPS + 1):
        batch = data[(step * 4) % 64:(step * 4) % 64 + 4]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(model, step)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """run0 and run1 under one root, their last models and a fresh init (seed 9), as save_pretrained copies."""
    root = tmp_path_factory.mktemp("recorded")
    models = tmp_path_factory.mktemp("models")
    out = {"root": root / "runs", "models": {}, "saved": {}}
    for name, seed in (("run0", 0), ("run1", 1)):
        model = make_tiny_lm(seed).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        monitor = SeedPrintsMonitor(every_n_steps=4, probe=SPEC, num_controls=2,
                                    save_dir=out["root"] / name / "seedprints")
        monitor.start(model)
        _train(model, optimizer, torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0)), monitor)
        monitor.end(model)
        out["models"][name] = model.eval()
    out["models"]["fresh"] = make_tiny_lm(9)
    for name, model in out["models"].items():
        model.save_pretrained(models / name)
        out["saved"][name] = models / name
    return out


@pytest.fixture()
def runs(recorded, tmp_path) -> Path:
    """A fresh copy of the two runs, to damage."""
    shutil.copytree(recorded["root"], tmp_path / "runs")
    return tmp_path / "runs"


def _run(root: Path, name: str) -> Path:
    return root / name / "seedprints"


def _probes(root: Path, name: str) -> list[Path]:
    return sorted((_run(root, name) / "probes").glob("*.safetensors"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _features(recorded, name: str):
    """``probe(spec) -> features``, as the CLI passes it (the runs' resolved spec)."""
    return lambda spec: extract_features(recorded["models"][name], spec)


def _cli(capsys, *argv) -> tuple[int, dict]:
    from seedprints_lightning.offline.cli import main

    code = main(["identify", *map(str, argv), "--device", "cpu", "-q", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_checkpoints_own_run_without_its_reference_is_undetermined_not_none(recorded, runs, capsys) -> None:
    (_run(runs, "run0") / "reference.safetensors").unlink()
    evidence = load_runs([runs])
    missing = [r for r in evidence if isinstance(r, UnreadableRun)]
    assert [r.path for r in missing] == [str(_run(runs, "run0"))] and missing[0].records == STEPS
    result = identify(_features(recorded, "run0"), evidence)
    assert result.status == "undetermined" and result.run is None, result.summary()
    assert result.tested["runs"] == 1 and result.runs[0].z < result.runs[0].threshold - 2  # run1 tested: no link
    assert any(path == str(_run(runs, "run0")) and "reference.safetensors is missing" in reason
               for path, reason in result.skipped)
    code, data = _cli(capsys, recorded["saved"]["run0"], runs)
    assert code == 6 and data["status"] == "undetermined" and data["run"] is None
    assert [s[0] for s in data["skipped"]] == [str(_run(runs, "run0"))] and "missing" in data["skipped"][0][1]
    # The run given directly (not found below a root) is skipped the same way.
    code, data = _cli(capsys, recorded["saved"]["run0"], _run(runs, "run0"), _run(runs, "run1"))
    assert code == 6 and data["status"] == "undetermined"


def test_a_truncated_reference_of_another_run_is_named_and_the_match_stands(recorded, runs, capsys) -> None:
    _truncate(_run(runs, "run1") / "reference.safetensors")
    result = identify(_features(recorded, "run0"), load_runs([runs]))
    assert result.status == "match" and result.run == str(_run(runs, "run0")), result.summary()
    assert result.matches[0].best_step == STEPS
    assert [(p, "cannot be read" in r) for p, r in result.skipped] == [(str(_run(runs, "run1")), True)]
    code, data = _cli(capsys, recorded["saved"]["run0"], runs)
    assert code == 0 and data["run"] == str(_run(runs, "run0")) and data["skipped"][0][0] == str(_run(runs, "run1"))
    assert data["screen"]["fallback"] is None and data["tested"]["unreadable"] == 1
    code, exhaustive = _cli(capsys, recorded["saved"]["run0"], runs, "--exhaustive")
    assert code == 0 and exhaustive["screen"] is None and exhaustive["skipped"] == data["skipped"]
    assert exhaustive["matches"][0]["best_step"] == data["matches"][0]["best_step"] == STEPS
    # The fresh init: no readable run matches and run1 was not read, so "undetermined", exit 6.
    code, data = _cli(capsys, recorded["saved"]["fresh"], runs)
    assert code == 6 and data["status"] == "undetermined"


def test_truncated_and_deleted_probe_files_are_skipped_and_named(recorded, runs, capsys) -> None:
    for path in _probes(runs, "run1"):
        _truncate(path)
    _probes(runs, "run0")[0].unlink()  # one probe of the checkpoint's own run deleted
    result = identify(_features(recorded, "run0"), load_runs([runs]))
    assert result.status == "match" and result.run == str(_run(runs, "run0")), result.summary()
    assert result.matches[0].best_step == STEPS
    named = [reason for path, reason in result.skipped if path == str(_run(runs, "run1"))]
    assert len(named) == STEPS and all("does not match its ledger record" in r for r in named), named
    assert any(path == str(_run(runs, "run0")) and "missing" in reason for path, reason in result.skipped)
    assert result.tested["unreadable"] == STEPS + 1
    # Against the fresh init nothing readable matches: undetermined (exit 6), not none, not exit 3.
    code, data = _cli(capsys, recorded["saved"]["fresh"], runs)
    assert code == 6 and data["status"] == "undetermined" and len(data["skipped"]) == STEPS + 1


def test_a_swapped_probe_file_is_skipped_and_never_fakes_a_match(recorded, runs, capsys) -> None:
    # run1's last probe file replaced by run0's: tested as run1's, it would link run0's model to run1.
    shutil.copyfile(_probes(runs, "run0")[-1], _probes(runs, "run1")[-1])
    features = _features(recorded, "run0")
    result = identify(features, load_runs([_run(runs, "run1")]))
    assert result.status == "undetermined" and result.matches == (), result.summary()
    assert len(result.skipped) == 1 and "does not match its ledger record" in result.skipped[0][1]
    assert f"record {STEPS - 1}" in result.skipped[0][1]
    code, data = _cli(capsys, recorded["saved"]["run0"], _run(runs, "run1"))
    assert code == 6 and data["run"] is None and "sha256" in data["skipped"][0][1]
    # With both runs, run0 is the match, and the swapped file is still named.
    result = identify(features, load_runs([runs]))
    assert result.run == str(_run(runs, "run0")) and [p for p, _ in result.skipped] == [str(_run(runs, "run1"))]


def test_a_probe_swapped_after_the_screen_index_was_built_is_caught(recorded, runs) -> None:
    """The screen's index is a cache: a file changed since it was built is re-read and re-checked."""
    screen = ScreenOptions(columns=8)
    features = _features(recorded, "run0")
    first = identify(features, load_runs([_run(runs, "run1")]), screen=screen)
    assert first.status == "none" and (_run(runs, "run1") / "identify-screen.safetensors").is_file()
    shutil.copyfile(_probes(runs, "run0")[-1], _probes(runs, "run1")[-1])
    again = identify(features, load_runs([_run(runs, "run1")]), screen=screen)
    assert again.status == "undetermined" and len(again.skipped) == 1 and "sha256" in again.skipped[0][1]


def test_controls_that_do_not_match_the_ledger_make_the_run_unjudgeable(recorded, runs) -> None:
    _truncate(_run(runs, "run0") / "controls.safetensors")
    result = identify(_features(recorded, "run0"), load_runs([_run(runs, "run0")]))
    assert result.status == "undetermined" and "controls" in result.skipped[0][1], result.skipped
