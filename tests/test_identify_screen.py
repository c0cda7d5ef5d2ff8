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

Stored screens (0.9): the face writes each fingerprint's screen ranks into its file as it probes
(core/screen.py), so these runs are screened with no index; ``_as_written_before_0_9`` makes a copy
in 0.8's format (no stored screen in any file or record, the chain made again) for the index path.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm
from safetensors import safe_open
from safetensors.torch import save_file

from seedprints_lightning import ProbeSpec, extract_features
from seedprints_lightning.core.files import file_sha256
from seedprints_lightning.core.fingerprint import Fingerprint
from seedprints_lightning.core.ledger import CUSTODY_FILE, REFERENCE_FILE, line_sha256, load_probe_features
from seedprints_lightning.core.records import canonical_json
from seedprints_lightning.core.screen import SCREEN_FIELD, SCREEN_META_KEY, SCREEN_TENSOR, read_stored_screen
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


def _as_written_before_0_9(source: Path, target: Path) -> Path:
    """A copy of the runs under ``source`` as 0.8 wrote them: no stored screen in a file or record, the chain remade."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(INDEX_FILE))
    for ledger in sorted(target.rglob(CUSTODY_FILE)):
        run = ledger.parent
        Fingerprint.load(run / REFERENCE_FILE).save(run / REFERENCE_FILE)  # saved without its screen
        prev = reference_sha = file_sha256(run / REFERENCE_FILE)
        lines = []
        for line in ledger.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            record.pop(SCREEN_FIELD, None)
            if "features_file" in record:
                path = run / record["features_file"]
                with safe_open(str(path), framework="pt") as handle:
                    tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != SCREEN_TENSOR}
                    meta = handle.metadata()
                save_file(tensors, str(path), metadata=meta)
                record["features_sha256"] = file_sha256(path)
            record["reference_sha256"], record["prev_sha256"] = reference_sha, prev
            lines.append(canonical_json(record))
            prev = line_sha256(lines[-1])
        ledger.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return target


def _counting_probe_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    original = identify_module._read_probe
    monkeypatch.setattr(identify_module, "_read_probe", lambda p, s: reads.append(str(p)) or original(p, s))
    return reads


def test_a_run_written_by_a_face_is_screened_from_its_stored_ranks_with_no_index(wide_runs, monkeypatch,
                                                                                 tmp_path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(wide_runs["root"], root, ignore=shutil.ignore_patterns(INDEX_FILE))
    runs = load_runs([root])
    columns = SCREEN.subset(256)
    for run in runs:  # every fingerprint (the reference too) carries its screen, equal to ranking its file
        for cand in run.candidates:
            assert cand.screen is not None and cand.screen.matches(64, 0, 10.0), cand.describe()
            stored = read_stored_screen(cand.source, cand.screen, 1000)
            assert np.array_equal(stored, normalised_column_ranks(cand.load(), columns))
        with safe_open(run.reference.source, framework="np") as handle:
            assert SCREEN_META_KEY in handle.metadata()
    # The features the audit and the exact test read are untouched by the screen tensor beside them.
    probe = runs[0].probes[-1]
    assert load_probe_features(Path(probe.source)).shape == (1000, 256)
    reads = _counting_probe_reads(monkeypatch)
    for name in ("run0", "fresh"):
        prober = _prober(wide_runs["models"][name])
        reads.clear()
        screened = identify(prober, load_runs([root]), screen=SCREEN)
        assert len(reads) <= screened.tested["exact_tests"] < screened.tested["tests"]  # only exact tests read
        assert not screened.notes, screened.notes
        assert screened.screen["stored_screens"] == screened.tested["tests"] and screened.screen["ranked_screens"] == 0
        _same_answer(screened, identify(prober, load_runs([root]), exhaustive=True))
    assert not list(root.rglob(INDEX_FILE))  # nothing built, nothing written
    # Options other than the stored ones: the index path, the same answer.
    other = identify(_prober(wide_runs["models"]["run0"]), load_runs([root]), screen=ScreenOptions(columns=64, seed=1))
    _same_answer(other, identify(_prober(wide_runs["models"]["run0"]), load_runs([root]), exhaustive=True))
    assert len(list(root.rglob(INDEX_FILE))) == 2


def test_a_tampered_stored_screen_is_never_trusted_and_never_gives_none(wide_runs, tmp_path) -> None:
    prober = _prober(wide_runs["models"]["run0"])
    exhaustive = identify(prober, load_runs([wide_runs["root"]]), exhaustive=True)
    assert exhaustive.status == "match"
    rng = np.random.default_rng(0)
    # 1. The ranks in run0's probe files replaced by random ones (no signal: trusted, they would rule every
    #    probe of run0 out). Each file no longer matches its ledger sha256: skipped, never screened out.
    root = tmp_path / "altered"
    shutil.copytree(wide_runs["root"], root, ignore=shutil.ignore_patterns(INDEX_FILE))
    for path in sorted((root / "run0" / "seedprints" / "probes").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors, meta = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
        ranks = tensors[SCREEN_TENSOR]
        tensors[SCREEN_TENSOR] = torch.from_numpy(rng.permuted(ranks.numpy(), axis=1).copy())
        save_file(tensors, str(path), metadata=meta)
    result = identify(prober, load_runs([root]), screen=SCREEN)
    assert result.status != "none", result.summary()
    assert result.status == "undetermined" or result.run.endswith("run0/seedprints")
    altered = [reason for run, reason in result.skipped if run.endswith("run0/seedprints")]
    assert len(altered) >= 6 and all("does not match its ledger record" in r for r in altered), result.skipped
    assert any("stored screen(s) could not be used" in note for note in result.notes), result.notes
    # 2. The ledger's record of the screens edited (the files intact): the stored ranks no longer match their
    #    record, so each file is read whole (its sha256 holds) and ranked: the exhaustive answer.
    root = tmp_path / "record"
    shutil.copytree(wide_runs["root"], root, ignore=shutil.ignore_patterns(INDEX_FILE))
    ledger = root / "run0" / "seedprints" / CUSTODY_FILE
    records = [json.loads(line) for line in ledger.read_text(encoding="utf-8").splitlines()]
    screened_records = [r for r in records if SCREEN_FIELD in r]
    assert len(screened_records) >= 6
    for record in screened_records:
        record[SCREEN_FIELD]["sha256"] = "0" * 64
    ledger.write_text("".join(canonical_json(r) + "\n" for r in records), encoding="utf-8")
    result = identify(prober, load_runs([root]), screen=SCREEN)
    exhaustive = identify(prober, load_runs([root]), exhaustive=True)  # the runs as named here
    _same_answer(result, exhaustive)
    unused = f"{len(screened_records)} stored screen(s) could not be used"
    assert any(unused in note for note in result.notes), result.notes
    assert result.screen["fallback"] is None
    # 3. A malformed record of a screen: said, and the file ranked instead.
    screened_records[0][SCREEN_FIELD] = {"sha256": "x"}
    ledger.write_text("".join(canonical_json(r) + "\n" for r in records), encoding="utf-8")
    runs = load_runs([root])
    assert runs[0].probes[0].screen is None and any("malformed" in note for note in runs[0].notes)
    _same_answer(identify(prober, runs, screen=SCREEN), exhaustive)


def test_an_old_run_directory_builds_the_index_once_and_screened_out_probes_are_not_read_again(
        wide_runs, monkeypatch, tmp_path) -> None:
    root = _as_written_before_0_9(wide_runs["root"], tmp_path / "runs")
    assert all(c.screen is None for r in load_runs([root]) for c in r.candidates)
    prober = _prober(wide_runs["models"]["run0"])
    reads = _counting_probe_reads(monkeypatch)
    first = identify(prober, load_runs([root]), screen=SCREEN)
    _same_answer(first, identify(prober, load_runs([root]), exhaustive=True))
    probes = sum(len(r.probes) for r in load_runs([root]))
    assert len(reads) >= probes  # building the index read every probe once
    assert first.screen["ranked_screens"] == first.tested["tests"] and first.screen["stored_screens"] == 0
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


def test_the_07_run_directory_is_screened_through_the_index(tmp_path) -> None:
    """tests/data/v07 (D = 8, written by 0.7: no stored screen), screened on 2 columns: the index path."""
    run = tmp_path / "v07"
    shutil.copytree(Path(__file__).resolve().parent / "data" / "v07" / "run", run)
    runs = load_runs([run])
    assert all(c.screen is None for c in runs[0].candidates)
    checkpoint = load_probe_features(Path(runs[0].probes[-1].source)).float()
    screened = identify({runs[0].spec: checkpoint}, runs, screen=ScreenOptions(columns=2))
    assert (run / INDEX_FILE).is_file() and screened.screen["runs_screened"] == 1
    _same_answer(screened, identify({runs[0].spec: checkpoint}, load_runs([run]), exhaustive=True))
    assert screened.status == "match" and screened.matches[0].best_step == runs[0].probes[-1].step
