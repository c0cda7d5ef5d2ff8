"""Tests of seedprints_lightning.audit and ``seedprints audit``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from transformers import LlamaConfig, LlamaForCausalLM

from seedprints_lightning import Fingerprint, ProbeSpec, fingerprint_model
from seedprints_lightning.audit import (
    AuditRow,
    SourceError,
    audit_checkpoints,
    classify_source,
    compare_sources,
    expand_checkpoints,
    format_audit_table,
)
from seedprints_lightning.cli import EXIT_EXPECT, EXIT_FILE, EXIT_OK, EXIT_USAGE, main
from seedprints_lightning.errors import IncompatibleFingerprintsError

SPEC = ProbeSpec(num_samples=200, length=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A reference fingerprint of seed 0, a related and an unrelated model dir, and a .ckpt folder."""
    from seedprints_lightning.train import CausalLMModule

    root = tmp_path_factory.mktemp("run")
    reference = fingerprint_model(_tiny(0), SPEC)
    reference.save(root / "ref.safetensors")
    related = _tiny(0)
    with torch.no_grad():
        for p in related.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 1e-3 * p.abs().mean())
    related.save_pretrained(root / "related")
    _tiny(1).save_pretrained(root / "unrelated")

    ckpts = root / "checkpoints"
    ckpts.mkdir()
    tiny = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4)
    module0 = CausalLMModule(**tiny, init_seed=0)
    module0.model.save_pretrained(root / "module_seed0")
    # Written out of step order on purpose; names sort differently from steps too.
    for name, step, seed in (("b.ckpt", 300, 5), ("c.ckpt", 100, 0), ("a.ckpt", 200, 0)):
        module = module0 if seed == 0 else CausalLMModule(**tiny, init_seed=seed)
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                    "global_step": step}, ckpts / name)
    return {p.name: p for p in root.iterdir()}


def test_audit_rows_related_and_unrelated(run) -> None:
    reference = Fingerprint.load(run["ref.safetensors"])
    rows = audit_checkpoints(reference, [run["related"], run["unrelated"]])
    assert [type(r) for r in rows] == [AuditRow, AuditRow]
    assert [r.name for r in rows] == [str(run["related"]), str(run["unrelated"])]
    assert [r.related for r in rows] == [True, False]
    assert rows[0].z > 20 and rows[1].z < 2.33
    assert rows[0].k == 32 and rows[0].step is None and rows[0].result.n == 200
    table = format_audit_table(rows).splitlines()
    assert len(table) == 3 and table[1].rstrip().endswith(" related") and table[2].rstrip().endswith("unrelated")


def test_checkpoint_directory_expands_sorted_by_global_step(run) -> None:
    expanded = expand_checkpoints([run["checkpoints"]])
    assert [(s.path.name, step) for s, step in expanded] == [("c.ckpt", 100), ("a.ckpt", 200), ("b.ckpt", 300)]
    # _tiny(0) is not CausalLMModule(init_seed=0): no checkpoint descends from it.
    rows = audit_checkpoints(fingerprint_model(_tiny(0), SPEC), [run["checkpoints"]])
    assert [(r.step, r.related) for r in rows] == [(100, False), (200, False), (300, False)]


def test_cli_audit_table_json_png_and_expect(run, tmp_path, capsys) -> None:
    png = tmp_path / "audit.png"
    args = ["audit", str(run["ref.safetensors"]), str(run["related"]), str(run["unrelated"]), "-q"]
    assert main([*args, "-o", str(png)]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    line_related = next(line for line in out if line.startswith(str(run["related"])))
    line_unrelated = next(line for line in out if line.startswith(str(run["unrelated"])))
    assert line_related.split()[-1] == "related" and line_unrelated.split()[-1] == "unrelated"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(str(png)).shape[0] > 200

    assert main([*args, "--json", "--expect", "related"]) == EXIT_EXPECT
    data = json.loads(capsys.readouterr().out)
    assert [row["related"] for row in data["rows"]] == [True, False]
    assert data["expect_met"] is False and data["spec"] == SPEC.resolve(_tiny(0)).to_dict()
    assert main(["audit", str(run["ref.safetensors"]), str(run["related"]), "-q", "--expect", "related"]) == EXIT_OK


def test_cli_audit_model_reference_and_checkpoint_dir(run, capsys) -> None:
    code = main(["audit", str(run["module_seed0"]), str(run["checkpoints"]), "--num-samples", "200", "--length", "8",
                 "-q", "--json"])
    assert code == EXIT_OK
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(Path(r["name"]).name, r["step"], r["related"]) for r in rows] == [
        ("c.ckpt", 100, True), ("a.ckpt", 200, True), ("b.ckpt", 300, False)]


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
    with pytest.raises(IncompatibleFingerprintsError):
        compare_sources(run["related"], run["unrelated"], kind="token", vocab_size=65, num_samples=20, length=4)
