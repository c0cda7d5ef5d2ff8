"""Tests of seedprints_lightning.offline.audit and ``seedprints audit``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm
from matplotlib.image import imread

from seedprints_lightning import Fingerprint, ProbeSpec, fingerprint_model
from seedprints_lightning.core.controls import ControlSet, control_seeds, probe_controls, save_controls
from seedprints_lightning.core.errors import IncompatibleFingerprintsError, InputError, SourceError
from seedprints_lightning.core.stats import lineage_test
from seedprints_lightning.core.verdict import BIRTH_RULE, CUSTODY_RULE, IdentityVerdict, VerdictRule
from seedprints_lightning.offline.audit import (
    AuditRow,
    audit_checkpoints,
    compare_sources,
    find_controls,
    rule_for_base,
)
from seedprints_lightning.offline.cli import (
    EXIT_EXPECT,
    EXIT_FILE,
    EXIT_OK,
    EXIT_TAMPERED,
    EXIT_USAGE,
    format_audit_table,
    main,
)
from seedprints_lightning.offline.sources import classify_source, expand_checkpoints

SPEC = ProbeSpec(num_samples=200, length=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A reference fingerprint of seed 0, a related and an unrelated model dir, and a .ckpt folder."""
    from seedprints_lightning.train import CausalLMModule

    root = tmp_path_factory.mktemp("run")
    reference = fingerprint_model(make_tiny_lm(0), SPEC)
    reference.save(root / "ref.safetensors")
    # The same init as a birth certificate: step 0, with 4 fresh-init controls stored.
    fingerprint_model(make_tiny_lm(0), SPEC, step=0, num_controls=4).save(root / "ref_init.safetensors")
    related = make_tiny_lm(0)
    with torch.no_grad():
        for p in related.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 1e-3 * p.abs().mean())
    related.save_pretrained(root / "related")
    make_tiny_lm(1).save_pretrained(root / "unrelated")

    ckpts = root / "checkpoints"
    ckpts.mkdir()
    tiny = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4)
    module0 = CausalLMModule(**tiny, init_seed=0)
    module0.model.save_pretrained(root / "module_seed0")
    # Written out of step order on purpose; names sort differently from steps too.
    for name, step, seed in (("b.ckpt", 300, 5), ("c.ckpt", 100, 0), ("a.ckpt", 200, 0)):
        module = module0 if seed == 0 else CausalLMModule(**tiny, init_seed=seed)
        checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": step}
        module.on_save_checkpoint(checkpoint)  # what Trainer.save_checkpoint calls: adds the model's config
        torch.save(checkpoint, ckpts / name)
    return {p.name: p for p in root.iterdir()}


def test_audit_rows_related_and_unrelated(run) -> None:
    reference = Fingerprint.load(run["ref.safetensors"])
    rows = audit_checkpoints(reference, [run["related"], run["unrelated"]])
    assert [type(r) for r in rows] == [AuditRow, AuditRow]
    assert [r.name for r in rows] == [str(run["related"]), str(run["unrelated"])]
    assert [r.related for r in rows] == [True, False]
    assert rows[0].z > rows[0].threshold and rows[1].z < rows[1].threshold
    assert rows[0].k == 32 and rows[0].step is None and rows[0].result.n == 200
    # No controls in the reference and its step unknown: the custody rule on the analytic null alone.
    for row in rows:
        assert isinstance(row.verdict, IdentityVerdict) and row.verdict.controls == ()
        assert row.verdict.rule == CUSTODY_RULE and row.threshold == row.verdict.threshold
        assert row.related is row.verdict.related and row.to_dict()["threshold"] == row.threshold
    assert rows[1].to_dict()["verdict"] == "not shown related" and rows[1].to_dict()["reason"]
    table = format_audit_table(rows).splitlines()
    assert table[0].split() == ["checkpoint", "step", "z", "threshold", "log10", "p", "tau_mean", "k", "verdict"]
    assert len(table) == 3 and table[1].rstrip().endswith(" related")
    assert table[2].rstrip().endswith("not shown related")
    assert f"{rows[0].threshold:.2f}" in table[1]


def test_audit_with_stored_controls_uses_the_birth_rule(run) -> None:
    reference = Fingerprint.load(run["ref_init.safetensors"])
    assert reference.step == 0 and reference.controls.shape == (4, 200, 32)
    rows = audit_checkpoints(reference, [run["related"], run["unrelated"]])
    assert [r.related for r in rows] == [True, False]
    for row in rows:
        assert row.verdict.rule == BIRTH_RULE and len(row.verdict.controls) == 4
        # Each control tested against this checkpoint; the threshold stands clear of the largest.
        assert row.threshold == pytest.approx(max(2.3263, row.verdict.control_z_max + BIRTH_RULE.z_margin), abs=1e-3)
        assert row.to_dict()["control_z"] == list(row.verdict.control_z)
    # An explicit rule and evidence win over the defaults.
    rows = audit_checkpoints(reference, [run["unrelated"]], rule=CUSTODY_RULE,
                             evidence=ControlSet.none("none on purpose"))
    assert rows[0].verdict.rule == CUSTODY_RULE and rows[0].verdict.controls == ()


def test_checkpoint_directory_expands_sorted_by_global_step(run) -> None:
    expanded = expand_checkpoints([run["checkpoints"]])
    assert [(s.path.name, step) for s, step in expanded] == [("c.ckpt", 100), ("a.ckpt", 200), ("b.ckpt", 300)]
    # make_tiny_lm(0) is not CausalLMModule(init_seed=0): no checkpoint descends from it.
    rows = audit_checkpoints(fingerprint_model(make_tiny_lm(0), SPEC), [run["checkpoints"]])
    assert [(r.step, r.related) for r in rows] == [(100, False), (200, False), (300, False)]


def test_cli_audit_table_json_png_and_expect(run, tmp_path, capsys, drawn_figures) -> None:
    png = tmp_path / "audit.png"
    args = ["audit", str(run["ref.safetensors"]), str(run["related"]), str(run["unrelated"]), "-q"]
    assert main([*args, "-o", str(png)]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    line_related = next(line for line in out if line.startswith(str(run["related"])))
    line_unrelated = next(line for line in out if line.startswith(str(run["unrelated"])))
    assert line_related.endswith(" related") and line_unrelated.endswith(" not shown related")
    assert not line_related.endswith("not shown related")
    assert any(line.startswith("rule       custody") for line in out)
    assert any(line.startswith("evidence   no controls") for line in out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(str(png)).shape[0] > 200

    assert main([*args, "--json", "--expect", "related"]) == EXIT_EXPECT
    data = json.loads(capsys.readouterr().out)
    assert [row["related"] for row in data["rows"]] == [True, False]
    assert [row["verdict"] for row in data["rows"]] == ["related", "not shown related"]
    assert all(row["threshold"] > 2.32 for row in data["rows"])
    assert data["expect_met"] is False and data["spec"] == SPEC.resolve(make_tiny_lm(0)).to_dict()
    assert data["rule_name"] == "custody" and data["rule"] == CUSTODY_RULE.to_dict()
    assert data["evidence"].startswith("no controls")
    # The PNG's figure: z per checkpoint in the order given (no steps known), a cross at the unrelated one.
    ((name, fig), *_) = drawn_figures
    lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}
    assert name == "draw_audit" and lines["z"].get_xdata().tolist() == [0, 1]
    assert lines["z"].get_ydata().tolist() == pytest.approx([row["z"] for row in data["rows"]])
    assert lines["threshold"].get_ydata().tolist() == pytest.approx([row["threshold"] for row in data["rows"]])
    assert lines["unrelated"].get_xdata().tolist() == [1]
    assert main(["audit", str(run["ref.safetensors"]), str(run["related"]), "-q", "--expect", "related"]) == EXIT_OK


def test_cli_audit_birth_reference_with_controls(run, capsys) -> None:
    ref = str(run["ref_init.safetensors"])
    assert main(["audit", ref, str(run["related"]), str(run["unrelated"]), "-q", "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["rule_name"] == "birth" and data["rule"] == BIRTH_RULE.to_dict()
    assert data["evidence"] == f"4 fresh-init controls stored in {ref}"
    assert [len(row["control_z"]) for row in data["rows"]] == [4, 4]
    assert [row["related"] for row in data["rows"]] == [True, False]
    assert main(["audit", ref, str(run["unrelated"]), "-q", "--json", "--controls", "0", "--rule", "custody"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rule_name"] == "custody" and data["evidence"].startswith("no controls (--controls 0)")
    assert data["rows"][0]["control_z"] == []


def test_cli_audit_model_reference_and_checkpoint_dir(run, capsys) -> None:
    code = main(["audit", str(run["module_seed0"]), str(run["checkpoints"]), "--num-samples", "200", "--length", "8",
                 "-q", "--json"])
    assert code == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    assert [(Path(r["name"]).name, r["step"], r["related"]) for r in rows] == [
        ("c.ckpt", 100, True), ("a.ckpt", 200, True), ("b.ckpt", 300, False)]
    # A model reference: its controls are fresh inits of its config, probed on the reference's spec.
    assert data["evidence"].startswith("4 fresh-init controls") and str(run["module_seed0"]) in data["evidence"]
    assert all(len(r["control_z"]) == 4 for r in rows)


def test_cli_audit_errors(run, tmp_path, capsys) -> None:
    assert main(["audit", str(run["ref.safetensors"]), str(tmp_path)]) == EXIT_FILE
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["audit", str(run["ref.safetensors"]), str(run["related"]), "--kind", "embedding"]) == EXIT_USAGE
    assert "--kind" in capsys.readouterr().err


def test_sources_and_compare_library(run) -> None:
    assert classify_source(run["related"]).kind == "model_dir"
    assert classify_source(run["checkpoints"] / "a.ckpt").kind == "checkpoint"
    assert classify_source(run["ref.safetensors"]).kind == "fingerprint"
    with pytest.raises(SourceError, match="no config.json"):
        classify_source(run["checkpoints"])
    comparison = compare_sources(run["checkpoints"] / "a.ckpt", run["checkpoints"] / "c.ckpt", num_samples=50, length=4)
    assert comparison.result.related is True and comparison.spec.num_samples == 50
    assert comparison.related is True and comparison.verdict.related is True
    assert comparison.rule_name == "custody"  # global_step 200: a trained base
    assert len(comparison.evidence) == 4 and comparison.to_dict()["rule_name"] == "custody"
    with pytest.raises(IncompatibleFingerprintsError):
        compare_sources(run["related"], run["unrelated"], kind="token", vocab_size=65, num_samples=20, length=4)


# --------------------------------------------------------------------------------------
# The verdict of compare_sources: controls, rule, evidence
# --------------------------------------------------------------------------------------


def test_compare_sources_judges_with_the_callbacks_verdict(run) -> None:
    ref = run["ref_init.safetensors"]
    related = compare_sources(ref, run["related"])
    assert related.related is True and related.rule_name == "birth" and related.verdict.rule == BIRTH_RULE
    assert related.evidence.description == f"4 fresh-init controls stored in {ref}"
    unrelated = compare_sources(ref, run["unrelated"])
    assert unrelated.related is False and unrelated.verdict.reason
    # The controls are the stored ones, each tested against the target.
    stored = Fingerprint.load(ref)
    target = fingerprint_model(make_tiny_lm(1), SPEC)
    assert list(unrelated.verdict.control_z) == pytest.approx([lineage_test(c, target.features).z
                                                               for c in stored.controls])
    data = unrelated.to_dict()
    assert data["verdict"] == "not shown related" and data["rule_name"] == "birth"
    assert data["evidence"] == unrelated.evidence.description and data["threshold"] == unrelated.verdict.threshold
    forced = compare_sources(ref, run["unrelated"], rule="custody", num_controls=0)
    assert forced.rule_name == "custody" and forced.verdict.rule == CUSTODY_RULE
    assert forced.evidence.features is None and "no controls" in forced.evidence.description
    with pytest.raises(InputError, match="rule must be"):
        compare_sources(ref, run["unrelated"], rule="strict")


def test_compare_model_dirs_related_and_not(run) -> None:
    # module_seed0 is CausalLMModule(init_seed=0), not make_tiny_lm(0): unrelated to the perturbed make_tiny_lm(0).
    different = compare_sources(run["module_seed0"], run["related"], num_samples=200, length=8)
    assert different.related is False and different.rule_name == "custody"
    unrelated = compare_sources(run["related"], run["unrelated"], num_samples=200, length=8, rule="birth")
    assert unrelated.related is False and unrelated.rule_name == "birth"
    itself = compare_sources(run["related"], run["related"], num_samples=200, length=8)
    assert itself.related is True and itself.verdict.z > itself.verdict.threshold
    seeds = control_seeds(4)
    assert itself.evidence.description == f"4 fresh inits of {run['related']}'s config (seeds {seeds[0]}..{seeds[-1]})"


def test_find_controls_sources_in_order(run, tmp_path) -> None:
    from seedprints_lightning.offline.sources import Source

    with_controls = Fingerprint.load(run["ref_init.safetensors"])
    bare = Fingerprint.load(run["ref.safetensors"])
    spec = bare.spec

    def src(path, kind="fingerprint"):
        return Source(Path(path), kind)

    # 1. stored in a fingerprint (any of them), at most num_controls
    ev = find_controls(spec, [(src("bare"), bare), (src("ctl"), with_controls)], num_controls=2)
    assert len(ev) == 2 and torch.equal(ev.features, with_controls.controls[:2])
    assert ev.description == "2 fresh-init controls stored in ctl"
    # 2. fresh inits of a model's config
    model = make_tiny_lm(0)
    ev = find_controls(spec, [(src("bare"), bare)], [(src("m", "model_dir"), model)], num_controls=3)
    assert torch.equal(ev.features, probe_controls(model, spec, control_seeds(3)))
    assert ev.description.startswith("3 fresh inits of m's config")
    # 3. the callback's controls.safetensors beside a fingerprint file, when made on the same spec
    save_controls(tmp_path / "controls.safetensors", with_controls.controls, with_controls.control_seeds, spec)
    ev = find_controls(spec, [(src(tmp_path / "reference.safetensors"), bare)])
    assert len(ev) == 4 and torch.equal(ev.features, with_controls.controls)
    assert str(tmp_path / "controls.safetensors") in ev.description
    other_spec = ProbeSpec(num_samples=200, length=8, seed=7).resolve(model)
    ev = find_controls(other_spec, [(src(tmp_path / "reference.safetensors"), bare)])
    assert ev.features is None and ev.description.startswith("no controls available")
    # none asked for
    ev = find_controls(spec, [(src("ctl"), with_controls)], num_controls=0)
    assert ev.features is None and "--controls 0" in ev.description and len(ev) == 0


@pytest.mark.parametrize("step, rule, expected", [
    (0, "auto", BIRTH_RULE), (5, "auto", CUSTODY_RULE), (None, "auto", CUSTODY_RULE),
    (0, "custody", CUSTODY_RULE), (1000, "birth", BIRTH_RULE),
])
def test_rule_for_base(step, rule, expected) -> None:
    assert rule_for_base(step, rule) == expected
    assert rule_for_base(step, rule, alpha=0.001) == VerdictRule(0.001, expected.z_margin, expected.tau_margin)


def test_rule_for_base_rejects_unknown_rule() -> None:
    with pytest.raises(InputError, match="'auto', 'birth' or 'custody'"):
        rule_for_base(0, "strict")


# --------------------------------------------------------------------------------------
# seedprints audit --chain: a run directory written by the real callback
# --------------------------------------------------------------------------------------

CHAIN_VOCAB = 64


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> dict[str, Path]:
    """A 60-step tiny Lightning fit with SeedPrintsCallback, its final model, and an unrelated init."""
    import warnings

    import pytorch_lightning as pl

    from seedprints_lightning import SeedPrintsCallback

    class TinyLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_tiny_lm(0, vocab_size=CHAIN_VOCAB).train()  # Lightning keeps a submodule's mode

        def training_step(self, batch, batch_idx):
            ids = batch[0]
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

        def on_save_checkpoint(self, checkpoint):  # lets the library rebuild the model from the .ckpt
            checkpoint["hf_config"] = json.loads(self.model.config.to_json_string())

    root = tmp_path_factory.mktemp("chain")
    data = torch.randint(0, CHAIN_VOCAB, (600, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    cb = SeedPrintsCallback(every_n_steps=20, probe=ProbeSpec(kind="token", num_samples=200, length=8),
                            save_dir=root / "logs" / "seedprints")
    trainer = pl.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[cb],
                         default_root_dir=str(root))
    module = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    assert trainer.global_step == 60
    trainer.save_checkpoint(root / "final.ckpt")
    module.model.save_pretrained(root / "final")
    (root / "final" / "trainer_state.json").write_text(json.dumps({"global_step": 60}))
    make_tiny_lm(7, vocab_size=CHAIN_VOCAB).save_pretrained(root / "stranger")
    return {"run": root / "logs" / "seedprints", "logs": root / "logs", "final": root / "final",
            "stranger": root / "stranger", "ckpt": root / "final.ckpt"}


@pytest.fixture()
def run_copy(chain_run, tmp_path) -> Path:
    """A private copy of the run directory, safe to tamper with."""
    return Path(shutil.copytree(chain_run["run"], tmp_path / "seedprints"))


def _ledger_lines(run_dir: Path) -> list[str]:
    return (run_dir / "custody.jsonl").read_text().splitlines()


def _write_ledger(run_dir: Path, lines: list[str]) -> None:
    (run_dir / "custody.jsonl").write_text("".join(line + "\n" for line in lines))


def _problems(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("PROBLEM")]


def test_chain_run_layout(chain_run) -> None:
    run = chain_run["run"]
    assert {p.name for p in run.iterdir()} >= {"reference.safetensors", "controls.safetensors", "custody.jsonl",
                                                "probes"}
    records = [json.loads(line) for line in _ledger_lines(run)]
    assert len(records) >= 3 and records[-1]["step"] == 60
    assert [r["index"] for r in records] == list(range(len(records)))
    assert len(list((run / "probes").glob("*.safetensors"))) == len(records)


def test_chain_intact(chain_run, capsys) -> None:
    n = len(_ledger_lines(chain_run["run"]))
    assert main(["audit", "--chain", str(chain_run["run"])]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"chain      intact: {n} records, every link held" in out
    assert "the last probe (step 60) descends from the birth fingerprint" in out
    assert not _problems(out) and out.count("link held") == n + 1  # every record row, plus the summary
    assert "fresh-init controls from controls.safetensors" in out
    # The log directory holding seedprints/ works too.
    assert main(["audit", "--chain", str(chain_run["logs"])]) == EXIT_OK
    assert "intact" in capsys.readouterr().out


def test_chain_json(chain_run, run_copy, capsys) -> None:
    assert main(["audit", "--chain", str(chain_run["run"]), "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    n = len(_ledger_lines(chain_run["run"]))
    assert data["ok"] is True and data["problems"] == [] and data["records"] == n
    assert len(data["links"]) == n and all(link["related"] is True for link in data["links"])
    assert all(link["z"] > link["threshold"] for link in data["links"]) and data["checkpoint"] is None

    tampered = json.loads(_ledger_lines(run_copy)[1])
    tampered["birth"]["z"] = 1e3
    lines = _ledger_lines(run_copy)
    lines[1] = json.dumps(tampered, sort_keys=True, separators=(",", ":"))
    _write_ledger(run_copy, lines)
    assert main(["audit", "--chain", str(run_copy), "--json"]) == EXIT_TAMPERED
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["records"] == n
    assert {(p["record"], p["kind"]) for p in data["problems"]} == {(1, "tampered"), (2, "tampered")}
    assert any("recorded birth test" in p["message"] for p in data["problems"] if p["record"] == 1)


def test_chain_missing_features_file(run_copy, capsys) -> None:
    (run_copy / "probes" / json.loads(_ledger_lines(run_copy)[1])["features_file"].split("/")[-1]).unlink()
    assert main(["audit", "--chain", str(run_copy), "--json"]) == EXIT_TAMPERED
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["links"][1] is None
    assert (data["problems"][0]["record"], data["problems"][0]["kind"]) == (1, "missing")
    assert "is missing" in data["problems"][0]["message"]
    # Record 2 was linked to record 1, which can no longer be re-tested: its claims fail too.
    assert all(p["record"] == 2 for p in data["problems"][1:]) and len(data["problems"]) > 1
    # The text report shows the record it could not re-test (it used to raise AttributeError).
    assert main(["audit", "--chain", str(run_copy)]) == EXIT_TAMPERED
    captured = capsys.readouterr()
    assert "not re-tested" in captured.out and "Traceback" not in captured.err
    assert any("[missing] record 1 " in p for p in _problems(captured.out))


@pytest.mark.parametrize("index", [1, -1])
def test_chain_edited_link_z_is_tampering(run_copy, capsys, index) -> None:
    lines = _ledger_lines(run_copy)
    index = index % len(lines)
    record = json.loads(lines[index])
    record["link"]["z"] += 25.0  # a stronger link than the features show
    lines[index] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    _write_ledger(run_copy, lines)
    assert main(["audit", "--chain", str(run_copy)]) == EXIT_TAMPERED
    out = capsys.readouterr().out
    problems = _problems(out)
    assert any(f"record {index} (line {index + 1} of custody.jsonl): the recorded link test" in p for p in problems)
    if index + 1 < len(lines):  # the next record no longer chains to it
        assert any(f"record {index + 1} " in p and "prev_sha256" in p for p in problems)
    assert "intact" not in out


def test_chain_flipped_verdict_is_tampering(run_copy, capsys) -> None:
    """A record that claims its link was broken (or held) against its features is caught by the recomputation."""
    lines = _ledger_lines(run_copy)
    record = json.loads(lines[-1])
    record["link"]["related"] = False
    lines[-1] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    _write_ledger(run_copy, lines)
    assert main(["audit", "--chain", str(run_copy), "--json"]) == EXIT_TAMPERED
    data = json.loads(capsys.readouterr().out)
    assert {(p["record"], p["kind"]) for p in data["problems"]} == {(len(lines) - 1, "tampered")}


def test_chain_deleted_line_is_tampering(run_copy, capsys) -> None:
    lines = _ledger_lines(run_copy)
    del lines[2]
    _write_ledger(run_copy, lines)
    assert main(["audit", "--chain", str(run_copy)]) == EXIT_TAMPERED
    problems = _problems(capsys.readouterr().out)
    assert any("record 2 " in p and "has index 3" in p and "missing" in p for p in problems)
    assert any("record 2 " in p and "prev_sha256" in p for p in problems)


def test_chain_reordered_lines_are_tampering(run_copy, capsys) -> None:
    lines = _ledger_lines(run_copy)
    lines[1], lines[2] = lines[2], lines[1]
    _write_ledger(run_copy, lines)
    assert main(["audit", "--chain", str(run_copy)]) == EXIT_TAMPERED
    problems = _problems(capsys.readouterr().out)
    assert any("reordered" in p for p in problems)


def test_chain_altered_features_file_is_tampering(run_copy, capsys) -> None:
    lines = _ledger_lines(run_copy)
    record = json.loads(lines[1])
    path = run_copy / record["features_file"]
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40  # one fp16 value in the last row changes
    path.write_bytes(bytes(data))
    assert main(["audit", "--chain", str(run_copy)]) == EXIT_TAMPERED
    problems = _problems(capsys.readouterr().out)
    assert any("record 1 " in p and f"{path.name} was altered (sha256 mismatch)" in p for p in problems)


def test_chain_replaced_reference_or_controls_is_tampering(run_copy, capsys) -> None:
    loaded = ControlSet.load(run_copy / "controls.safetensors")
    features, seeds, spec = loaded.features, loaded.seeds, loaded.spec
    save_controls(run_copy / "controls.safetensors", features[:2], seeds[:2], spec)  # drop two controls
    assert main(["audit", "--chain", str(run_copy), "--json"]) == EXIT_TAMPERED
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and any("other controls" in p["message"] for p in data["problems"])


def test_chain_missing_or_not_a_run_dir(chain_run, tmp_path, capsys) -> None:
    missing = tmp_path / "nope"
    assert main(["audit", "--chain", str(missing)]) == EXIT_FILE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seedprints: error: ") and str(missing) in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["audit", "--chain", str(tmp_path / "empty")]) == EXIT_FILE
    assert "not a run directory written by SeedPrintsCallback" in capsys.readouterr().err
    assert main(["audit", "--chain", str(chain_run["run"]), str(chain_run["final"]), str(chain_run["stranger"])]) \
        == EXIT_USAGE
    assert "at most one checkpoint" in capsys.readouterr().err


def test_chain_checkpoint_descends(chain_run, capsys) -> None:
    args = ["audit", "--chain", str(chain_run["run"]), str(chain_run["final"]), "-q"]
    assert main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert f"descends ({chain_run['final']})" in out
    assert f"checkpoint {chain_run['final']} descends from the birth fingerprint" in out
    assert main([*args, "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["checkpoint"]["name"] == str(chain_run["final"])
    assert data["checkpoint"]["step"] == 60 and data["checkpoint"]["related"] is True


def test_chain_unrelated_checkpoint_does_not_descend(chain_run, capsys) -> None:
    args = ["audit", "--chain", str(chain_run["run"]), str(chain_run["stranger"]), "-q"]
    assert main(args) == EXIT_EXPECT  # a broken link, not tampering: the ledger itself is intact
    out = capsys.readouterr().out
    assert "DOES NOT DESCEND" in out and "intact" not in out
    assert any("[broken_link]" in p and f"checkpoint {chain_run['stranger']}: does not link" in p
               for p in _problems(out))
    assert main([*args, "--json"]) == EXIT_EXPECT
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and [p["kind"] for p in data["problems"]] == ["broken_link"]
    assert data["checkpoint"]["related"] is False


def test_chain_truncated_ledger_is_detected_with_the_checkpoint(run_copy, chain_run, capsys) -> None:
    # The hash chain protects what precedes a record, not the end of the ledger: a cut there is
    # caught against the ledger head that the checkpoint's callback state carries.
    assert main(["audit", "--chain", str(run_copy), str(chain_run["ckpt"]), "-q"]) == 0
    _write_ledger(run_copy, _ledger_lines(run_copy)[:-1])
    capsys.readouterr()
    assert main(["audit", "--chain", str(run_copy), str(chain_run["ckpt"]), "-q"]) == EXIT_TAMPERED
    assert "removed from the end" in capsys.readouterr().out


def test_checkpoint_without_a_config_is_refused_with_the_fix(run, tmp_path) -> None:
    from seedprints_lightning.offline.sources import load_model

    raw = torch.load(run["checkpoints"] / "a.ckpt", weights_only=True)
    del raw["hf_config"]
    bare = tmp_path / "bare.ckpt"
    torch.save(raw, bare)
    with pytest.raises(SourceError, match="no 'hf_config' entry.*save_pretrained"):
        load_model(bare)
    model = load_model(run["checkpoints"] / "a.ckpt")  # rebuilt from the checkpoint alone
    reference = load_model(run["module_seed0"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_compare_sources_refuses_probe_options_with_a_fingerprint(run) -> None:
    # The fingerprint fixes the probe: options that would change it are an error, named as
    # the Python caller spelled them.
    with pytest.raises(InputError, match=r"probe options \(num_samples, length\) cannot be used"):
        compare_sources(run["ref_init.safetensors"], run["related"], num_samples=50, length=4)


def test_probe_runtime_checks_its_fields() -> None:
    from seedprints_lightning.offline.sources import ProbeRuntime

    with pytest.raises(InputError, match="batch_size must be an integer >= 1, got 0"):
        ProbeRuntime(batch_size=0)
    with pytest.raises(InputError, match="dtype must be a floating torch.dtype"):
        ProbeRuntime(dtype=torch.int64)


def test_a_diverged_model_is_undetermined_offline_as_in_the_callback(run, tmp_path, capsys) -> None:
    # NaN weights in one layer: the features are NaN, so no test can be made. The callback calls that
    # probe undetermined (tests/test_callback.py); compare and audit now say the same instead of raising.
    diverged = make_tiny_lm(0)
    with torch.no_grad():
        diverged.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    diverged.save_pretrained(tmp_path / "diverged")
    comparison = compare_sources(run["ref_init.safetensors"], tmp_path / "diverged")
    assert comparison.related is None and "NaN" in comparison.verdict.reason
    rows = audit_checkpoints(Fingerprint.load(run["ref_init.safetensors"]), [tmp_path / "diverged", run["related"]])
    assert [row.related for row in rows] == [None, True]
    assert main(["compare", str(run["ref_init.safetensors"]), str(tmp_path / "diverged"), "-q"]) == EXIT_OK
    assert "verdict: UNDETERMINED" in capsys.readouterr().out
    # A mistyped option is still an error, not an undetermined verdict.
    with pytest.raises(InputError, match="identity_k=99 is larger than the feature dimension D=32"):
        compare_sources(run["ref_init.safetensors"], run["related"], identity_k=99)
