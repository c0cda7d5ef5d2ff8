"""The batched audit (``verify_chain``'s default) recomputes exactly the plain replay's figures, and the recorded ones.

``verify_chain(batched=True)`` prepares every matrix once (the reference, each control, each probe,
which is then the next record's anchor) instead of sorting both sides of every test again; the
figures must not move by one bit. Checked on fake runs (test_ledger_faults.make_run: n = 64,
D = 16, drifting features) that take every path of the verdict's composition: controls or none, a
link from the reference or from an anchor, a child run's first anchor, a broken link, an
undetermined (NaN) probe, save records between probes, the birth test in "base" identity mode,
and a run judged on half the dimensions (the plain replay then judges it, as the batched one
cannot share preparations across its per-pair dimensions).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_ledger_faults import D, N, make_run

from seedprints_lightning.core.chain import ChainRules
from seedprints_lightning.core.stats import PreparedTarget, lineage_test, prepared_pair_taus
from seedprints_lightning.core.verify import verify_chain
from seedprints_lightning.offline.cli import EXIT_EXPECT, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scenario(root, name: str):
    child = name == "child"
    run = make_run(root, controls=name != "no controls", child=child, steps=())
    if name == "base mode":
        run.chain.judge_by(ChainRules(identity_mode="base"))
    if name == "half the dimensions":
        run.chain.judge_by(ChainRules(identity_ratio=0.5))
    first = 501 if child else 1
    for step in range(first, first + 3):
        run.probe(step)
    run.save(first + 3)
    if name == "broken link":
        run.probe(first + 4, torch.randn(N, D, generator=run.generator))  # another model: the link breaks
        run.last = run.chain.anchor.features.float()  # the run's own model again: it links to the last held probe
        run.probe(first + 5)
    if name == "undetermined":
        nan = run.last.clone()
        nan[0, 0] = float("nan")  # a diverged model: its lineage cannot be measured
        run.probe(first + 4, nan)
        run.last = run.chain.anchor.features.float()
        run.probe(first + 5)
    run.probe(first + 6)
    return run


SCENARIOS = ["controls", "no controls", "child", "broken link", "undetermined", "base mode",
             "half the dimensions"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_batched_audit_recomputes_exactly_the_plain_replays_and_the_recorded_figures(tmp_path, name) -> None:
    run = _scenario(tmp_path, name)
    plain = verify_chain(run.dir, batched=False)
    batched = verify_chain(run.dir)
    # Every figure, bit for bit (repr of a float is exact), and the same findings.
    assert repr(batched.recomputed) == repr(plain.recomputed)
    assert [(p.index, p.kind, p.message) for p in batched.problems] == \
           [(p.index, p.kind, p.message) for p in plain.problems]
    assert [(a.index, a.step) for a in batched.anchors] == [(a.index, a.step) for a in plain.anchors]
    assert batched.notes == plain.notes
    # ... and exactly the figures the run recorded (what the writer judged), every field of both tests.
    records = [json.loads(line) for line in run.ledger_path.read_text().splitlines()]
    probes = 0
    for record, verdict in zip(records, batched.recomputed):
        if record.get("kind") == "save":
            assert verdict is None
            continue
        probes += 1
        for test in ("birth", "link"):
            assert json.loads(json.dumps(getattr(verdict, test).to_dict())) == record[test], (record["index"], test)
    assert probes == len(records) - 1
    expected = {"broken link": [(4, "broken_link")], "undetermined": []}.get(name, [])
    assert [(p.index, p.kind) for p in batched.problems] == expected


def test_the_command_line_audits_batched(tmp_path, capsys) -> None:
    run = _scenario(tmp_path, "broken link")
    assert main(["audit", "--chain", str(run.dir), "--json"]) == EXIT_EXPECT
    data = json.loads(capsys.readouterr().out)
    plain = verify_chain(run.dir, batched=False)
    assert [link and link["z"] for link in data["links"]] == [v and v.link.z for v in plain.recomputed]


def test_prepared_pair_taus_equal_the_lineage_tests(tmp_path) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(N, D, generator=g)
    for target in (base + 0.5 * torch.randn(N, D, generator=g), torch.randn(N, D, generator=g),
                   torch.ones(N, D)):  # related, unrelated, and constant (no tau at all: undetermined)
        taus = prepared_pair_taus(PreparedTarget(base), PreparedTarget(target))
        assert repr(PreparedTarget(target).result_of_taus(taus)) == repr(lineage_test(base, target))
    with pytest.raises(ValueError, match="samples"):
        prepared_pair_taus(PreparedTarget(base), PreparedTarget(target[:10]))


@pytest.mark.parametrize(("name", "plain_records"), [("controls", 0), ("child", 0), ("base mode", 0),
                                                     ("undetermined", 1), ("half the dimensions", 4)])
def test_only_what_cannot_share_a_preparation_is_replayed_plainly(tmp_path, monkeypatch, name, plain_records) -> None:
    from seedprints_lightning.core.chain import CustodyChain

    run = _scenario(tmp_path, name)
    calls = []
    observe = CustodyChain.observe
    monkeypatch.setattr(CustodyChain, "observe", lambda self, *a, **k: calls.append(a[0]) or observe(self, *a, **k))
    audit = verify_chain(run.dir)
    assert audit.ok, [p.message for p in audit.problems]  # (the undetermined probe is bridged: a note)
    assert len(calls) == plain_records, calls
