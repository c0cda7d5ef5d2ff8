"""identify's screen (issue 30 item 1): a subset of columns first, exact tests after, the same answer.

Runs: the conftest tiny LLaMA widened to hidden 256 (intermediate 512), SeedPrintsMonitor, token probes
n = 1000, L = 8, 2 controls, AdamW lr 3e-3, 16 steps, init seeds 0 and 1 (``run0``, ``run1``), fixed data.
The screen uses 64 of the 256 columns (``ScreenOptions(columns=64)``, the default count): at n = 1000 a subset
mean's standard error is 0.0023 or more, so its 6-standard-error bound (0.014 or more) can sit below the custody
rule's tau margin of 0.04 and the screen can rule candidates out, as 64 of 4096 columns do at real width.

Measured (the margin test prints it): over every candidate of both runs and their controls, against each
run's last model and a fresh init (90 fingerprints), the full mean tau stood at most 2.96 standard errors
from the screen's subset mean, as a normal law predicts for 90 draws, against the 6 the bound allows: a
margin of 3.0 standard errors (the test allows up to 4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm

from seedprints_lightning import ProbeSpec, extract_features
from seedprints_lightning.core.stats import (
    PreparedTarget,
    lineage_test,
    normalised_column_ranks,
    subset_tau_bounds,
)
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline import identify as identify_module
from seedprints_lightning.offline.identify import INDEX_FILE, RunEvidence, ScreenOptions, identify, load_runs

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

SPEC = ProbeSpec(num_samples=1000, length=8)
STEPS = 16
SCREEN = ScreenOptions(columns=64)
WIDE = {"hidden_size": 256, "intermediate_size": 512}


@pytest.fixture(scope="module")
def wide_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wide")
    out = {"root": root, "models": {}}
    data = torch.randint(0, 64, (96, 16), generator=torch.Generator().manual_seed(0))
    for name, seed in (("run0", 0), ("run1", 1)):
        model = make_tiny_lm(seed, **WIDE).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        monitor = SeedPrintsMonitor(every_n_steps=4, probe=SPEC, num_controls=2, save_dir=root / name / "seedprints")
        monitor.start(model)
        for step in range(1, STEPS + 1):
            batch = data[(step * 4) % 96:(step * 4) % 96 + 4]
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(model, step)
        monitor.end(model)
        out["models"][name] = model.eval()
    out["models"]["fresh"] = make_tiny_lm(9, **WIDE)
    return out


def _prober(model):
    return lambda spec: extract_features(model, spec)


def _same_answer(screened, exhaustive) -> None:
    assert screened.status == exhaustive.status and screened.run == exhaustive.run
    assert screened.tested["tests"] == exhaustive.tested["tests"]
    for a, b in zip(screened.matches, exhaustive.matches):
        assert a.best_step == b.best_step and a.steps == b.steps and a.runs == b.runs
        assert a.z == b.z and a.log10_p_corrected == b.log10_p_corrected and a.best.threshold == b.best.threshold


def test_screened_identify_gives_exhaustives_match_and_best_step_on_trained_runs(wide_runs) -> None:
    runs = load_runs([wide_runs["root"]])
    assert all(len(r.probes) >= 6 for r in runs)
    for name in ("run0", "run1", "fresh"):
        prober = _prober(wide_runs["models"][name])
        screened = identify(prober, runs, screen=SCREEN)
        exhaustive = identify(prober, runs, exhaustive=True)
        _same_answer(screened, exhaustive)
        assert screened.screen is not None and screened.screen["fallback"] is None, screened.screen
        assert exhaustive.screen is None and exhaustive.tested["exact_tests"] == exhaustive.tested["tests"]
        # The screen did work: candidates ruled out, fewer exact tests, each named in the JSON with its screen z.
        assert 0 < screened.tested["exact_tests"] < screened.tested["tests"], screened.tested
        print(f"{name}: {screened.tested['screened_out']} of {screened.tested['tests']} screened out, "
              f"{screened.tested['exact_tests']} exact tests")
        out = [c for r in screened.to_json()["runs"] for c in r["screened_out"]]
        assert len(out) == screened.tested["screened_out"] > 0
        assert set(out[0]) == {"step", "index", "screen_z"} and math.isfinite(out[0]["screen_z"])
        if name == "fresh":
            assert screened.status == "none"
        else:
            assert screened.run.endswith(f"{name}/seedprints") and screened.matches[0].best_step == STEPS


def test_the_screens_bound_holds_with_margin_on_trained_runs(wide_runs) -> None:
    """Full mean tau against the screen's subset mean, in the subset's standard errors, for every fingerprint."""
    runs = load_runs([wide_runs["root"]])
    columns = SCREEN.subset(256)
    worst = 0.0
    for name in ("run0", "run1", "fresh"):
        target = PreparedTarget(extract_features(wide_runs["models"][name], runs[0].spec))
        for run in runs:
            bases = [c.load() for c in run.candidates] + run.load_controls()  # own probes, other seed's, controls
            full = torch.stack(target.column_taus(bases)).numpy()
            ranks = np.stack([normalised_column_ranks(b, columns) for b in bases])
            taus = target.screen_taus(ranks, columns)
            # The screen's taus are the exact test's on its columns (but where float64 rounding splits a tie).
            assert np.abs(taus - full[:, columns]).max() < 1e-4
            for row, bounds in zip(full, subset_tau_bounds(taus, 256, 1000, margin=1.0)):
                worst = max(worst, abs(row.mean() - bounds.mean) / (bounds.high - bounds.mean))
    print(f"largest |full mean tau - subset mean| = {worst:.2f} standard errors (bound: {SCREEN.margin})")
    assert worst < SCREEN.margin - 2


def test_a_screen_forced_too_strict_still_finds_the_match(wide_runs) -> None:
    runs = load_runs([wide_runs["root"]])
    prober = _prober(wide_runs["models"]["run0"])
    strict = identify(prober, runs, screen=ScreenOptions(columns=64, margin=-50.0))  # rules everything out
    assert strict.screen["fallback"] and "outside the screen's bounds" in strict.screen["fallback"]
    _same_answer(strict, identify(prober, runs, exhaustive=True))
    assert strict.status == "match" and strict.matches[0].best_step == STEPS


def test_a_match_only_the_full_test_sees_is_found_or_undetermined_never_none() -> None:
    """The checkpoint is related to the candidate only outside the screen's columns; the screen forced strict."""
    n, dim = 1000, 512
    spec = ProbeSpec(num_samples=n, length=8, vocab_size=64)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, dim, generator=g)
    checkpoint = base + 1.5 * torch.randn(n, dim, generator=g)
    columns = torch.from_numpy(SCREEN.subset(dim))
    checkpoint[:, columns] = torch.randn(n, len(columns), generator=g)  # no signal where the screen looks
    runs = [RunEvidence.from_features("a", spec, torch.randn(n, dim, generator=g), [(10, base)]),
            RunEvidence.from_features("b", spec, torch.randn(n, dim, generator=g),
                                      [(10, torch.randn(n, dim, generator=g))])]
    full = lineage_test(base, checkpoint)
    assert full.tau_mean > 0.06  # the full test sees it ...
    for strict in (ScreenOptions(columns=64, margin=-50.0, audit=0), ScreenOptions(columns=64, margin=0.0, audit=0)):
        result = identify({spec: checkpoint}, runs, screen=strict)
        assert result.status in ("match", "undetermined"), result.summary()
        if result.status == "match":
            assert result.run == "a" and result.matches[0].best_step == 10


def test_the_index_is_built_once_and_screened_out_probes_are_not_read_again(wide_runs, monkeypatch,
                                                                              tmp_path) -> None:
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(wide_runs["root"], root, ignore=shutil.ignore_patterns(INDEX_FILE))
    prober = _prober(wide_runs["models"]["run0"])
    reads: list[str] = []
    original = identify_module._read_probe
    monkeypatch.setattr(identify_module, "_read_probe", lambda p, s: reads.append(str(p)) or original(p, s))
    first = identify(prober, load_runs([root]), screen=SCREEN)
    probes = sum(len(r.probes) for r in load_runs([root]))
    assert len(reads) >= probes  # building the index read every probe once
    assert all((root / name / "seedprints" / INDEX_FILE).is_file() for name in ("run0", "run1"))
    reads.clear()
    again = identify(prober, load_runs([root]), screen=SCREEN)
    _same_answer(again, first)
    assert 0 < len(reads) <= again.tested["exact_tests"] < probes  # only the exact tests read probe files
    # index=False: nothing written, the screen built in memory, the same answer.
    (root / "run1" / "seedprints" / INDEX_FILE).unlink()
    nowrite = identify(prober, load_runs([root]), screen=SCREEN, index=False)
    _same_answer(nowrite, first)
    assert not (root / "run1" / "seedprints" / INDEX_FILE).exists()
