"""CustodyChain without Lightning: the probe cycle, its decision, its state, and a hand-written loop.

The hand-written loop is what a second trainer integration does (a Hugging Face ``TrainerCallback``,
a Fabric loop): ``open_chain`` at train start, ``chain.due`` / ``chain.observe`` every step, its own
acting. It must write the ledger the Lightning callback writes, and ``verify_chain`` must accept it.

Sizes: the conftest tiny LLaMA (hidden 32), token probes n = 200, L = 8, lr 3e-3. Own links of a
few steps stand at z 60-90 against thresholds of 5-8 (tests/test_callback.py measures the same
model); another seed's init scores z < 4.1 against them (30 data orders, test_callback.py).
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_tiny_lm

from seedprints_lightning import Fingerprint, InputError, LineageResult, ProbeSpec, extract_features
from seedprints_lightning.core.chain import STATE_FORMAT_VERSION, ChainRules, CustodyChain
from seedprints_lightning.core.controls import ControlSet, build_control_model
from seedprints_lightning.core.ledger import RunDirectory
from seedprints_lightning.core.opening import ControlsSource, open_chain
from seedprints_lightning.core.processes import Processes
from seedprints_lightning.core.schedule import ProbeSchedule
from seedprints_lightning.core.verdict import BIRTH_RULE, CUSTODY_RULE, ProbeVerdict, decide_identity
from seedprints_lightning.core.verify import verify_chain
from seedprints_lightning.faces.messages import note_message

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=200, length=8)


class HandLoop:
    """A training loop with no framework: a tiny LLaMA, AdamW, and the chain driven by hand."""

    def __init__(self, root, seed: int = 0, chain: CustodyChain | None = None):
        self.model = make_tiny_lm(seed).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.spec = SPEC.resolve(self.model)
        self.run = RunDirectory(root / "seedprints")
        self.chain = chain or CustodyChain(schedule=ProbeSchedule(every_n_steps=4), patience=1)
        self.data = torch.randint(0, 64, (400, 16), generator=torch.Generator().manual_seed(0))
        self.warnings: list[str] = []
        self.lost: list[str] = []

    def features(self, model=None) -> torch.Tensor:
        return extract_features(self.model if model is None else model, self.spec)

    def start(self, step: int = 0) -> bool:
        def build(seeds, spec):
            return ControlSet.build(lambda seed: build_control_model(self.model, seed), seeds, spec,
                                    lambda control: extract_features(control, spec))

        return open_chain(self.chain, step=step, run=self.run, processes=Processes(),
                          take_reference=lambda: Fingerprint(features=self.features(), spec=self.spec, step=0),
                          controls=ControlsSource(2, build), origin="the hand-written loop",
                          warn=self.warnings.append)

    def train(self, first: int, last: int) -> None:
        for step in range(first, last + 1):
            ids = self.data[(step * 8) % 392:(step * 8) % 392 + 8]
            self.model(input_ids=ids, labels=ids).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            if self.chain.due(step):
                observed = self.chain.observe(step, self.features())
                if observed.identity_lost:
                    self.lost.append(observed.reason)


def test_a_hand_written_loop_writes_the_ledger_the_audit_verifies(tmp_path):
    loop = HandLoop(tmp_path)
    assert loop.start() is True  # a new chain: nothing to link yet
    loop.train(1, 12)
    steps = [h["step"] for h in loop.chain.history]
    assert steps[:4] == [1, 2, 3, 4] and steps[-1] == 12  # the ramp, then every 4 steps
    assert all(h["related"] is True for h in loop.chain.history) and not loop.lost
    assert [h["record_index"] for h in loop.chain.history] == list(range(len(steps)))
    audit = verify_chain(loop.run.path)
    assert audit.ok, [p.message for p in audit.problems]
    assert [r["step"] for r in audit.records] == steps
    assert [v.link.z for v in audit.recomputed] == pytest.approx([h["link_z"] for h in loop.chain.history],
                                                                 rel=1e-9)


def test_a_swap_is_lost_at_the_next_probe_with_the_figures(tmp_path):
    loop = HandLoop(tmp_path)
    loop.start()
    loop.train(1, 8)
    loop.model.load_state_dict(make_tiny_lm(7).state_dict())  # another run's weights
    loop.train(9, 12)
    after = [h for h in loop.chain.history if h["step"] > 8]
    assert after and all(h["related"] is False and h["anchor_step"] == 8 for h in after)  # never the anchor
    assert len(loop.lost) == len(after) and "the lineage identity is lost at step 10" in loop.lost[0]
    assert "custody link from step 8" in loop.lost[0] and "patience 1" in loop.lost[0]
    audit = verify_chain(loop.run.path)
    assert [p.index for p in audit.broken_links] == [h["record_index"] for h in after] and not audit.tampered


def test_state_round_trip_continues_the_same_ledger(tmp_path):
    loop = HandLoop(tmp_path)
    loop.start()
    loop.train(1, 8)
    buffer = io.BytesIO()
    torch.save({"seedprints": loop.chain.state_dict(), "model": loop.model.state_dict(),
                "optimizer": loop.optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain types and CPU tensors only
    assert saved["seedprints"]["format_version"] == STATE_FORMAT_VERSION
    loop.chain.cursor.ledger.close()  # the first process ends: its run directory's lock goes with it

    resumed = HandLoop(tmp_path, chain=CustodyChain(schedule=ProbeSchedule(every_n_steps=4), patience=1))
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.chain.load_state_dict(saved["seedprints"])
    assert resumed.start(step=8) is False  # restored: the loop links the loaded weights first
    first = resumed.chain.observe(8, resumed.features(), "resume")
    assert first.verdict.link.related is True and first.verdict.anchor_step == 8
    resumed.train(9, 12)
    audit = verify_chain(resumed.run.path)
    assert audit.ok and [r["event"] for r in audit.records][-3:] == ["resume", "interval", "interval"]
    assert torch.equal(resumed.chain.reference.features, loop.chain.reference.features)


def test_a_trained_run_without_state_is_refused_with_the_fix(tmp_path):
    loop = HandLoop(tmp_path)
    with pytest.raises(InputError, match=r"no reference at global_step=5.*reference=<run>/seedprints/reference"):
        loop.start(step=5)


def _result(z: float | None) -> LineageResult:
    if z is None:
        return LineageResult(z=0.0, log10_p=0.0, p_value=1.0, tau_mean=0.0, k=0, n=100, related=None, alpha=0.01,
                             reason="constant features")
    return LineageResult(z=z, log10_p=-1.0, p_value=0.1, tau_mean=z / 100, k=32, n=100, related=z > 2.33,
                         alpha=0.01)


def _verdict(step: int, link_z: float | None, birth_z: float = 50.0) -> ProbeVerdict:
    return ProbeVerdict(step=step, birth=decide_identity(_result(birth_z), (), BIRTH_RULE),
                        link=decide_identity(_result(link_z), (), CUSTODY_RULE), anchor_step=step - 1)


def _decisions(**kwargs):
    chain = CustodyChain(Fingerprint(features=torch.randn(200, 32), spec=SPEC.resolve(make_tiny_lm(0)), step=0),
                         patience=2, **kwargs)
    return [chain.decide(_verdict(step, z)) for step, z in enumerate([1.0, None, 1.0, 50.0, 1.0, 1.0], 1)]


def test_decide_counts_failures_and_undetermined_probes_and_resets_on_a_hold():
    decisions = _decisions()
    assert [lost for lost, _, _ in decisions] == [False, True, True, False, False, True]
    assert [reason is None for _, reason, _ in decisions] == [True, False, False, True, True, False]
    assert "could not be measured at step 2: 2 consecutive failed or undetermined probes" in decisions[1][1]
    assert "is lost at step 3: 3 consecutive" in decisions[2][1]
    notes = [note for _, _, found in decisions for note in found]
    assert [(n.kind, n.verdict.step, n.counted) for n in notes] == [("undetermined", 2, True)]  # reported once
    # The faces word it, with the fix.
    assert "counts as a failed probe towards patience (2 of 2" in note_message(notes[0])


def test_decide_with_count_undetermined_false_ignores_undetermined():
    decisions = _decisions(count_undetermined=False)
    assert [lost for lost, _, _ in decisions] == [False, False, True, False, False, True]
    assert "2 consecutive failed or undetermined probes (patience 2)" in decisions[2][1]
    notes = [note for _, _, found in decisions for note in found]
    assert [(n.kind, n.counted) for n in notes] == [("undetermined", False)]
    assert "counts neither as a failure nor as a success" in note_message(notes[0])


def test_observe_refuses_features_of_another_shape_and_a_chain_without_reference():
    spec = SPEC.resolve(make_tiny_lm(0))
    chain = CustodyChain(Fingerprint(features=torch.randn(200, 32), spec=spec, step=0))
    with pytest.raises(InputError, match=r"shape \(200, 16\) but the reference has \(200, 32\)"):
        chain.observe(1, torch.randn(200, 16))
    with pytest.raises(InputError, match="no reference yet"):
        CustodyChain().observe(1, torch.randn(200, 32))
    with pytest.raises(InputError, match="features must be the live model's"):
        chain.observe(1, torch.randn(200, 32).numpy())
    with pytest.raises(InputError, match="step must be"):
        chain.observe(-1, torch.randn(200, 32))
    with pytest.raises(InputError, match="controls must be a ControlSet or None, got Tensor"):
        CustodyChain(controls=torch.randn(2, 200, 32))


def test_rules_come_back_from_a_record():
    rules = ChainRules.from_margins(alpha=0.05, birth_z_margin=3.0, link_z_margin=2.0, link_tau_margin=0.1,
                                    fail_on="either", identity_mode="base", identity_ratio=0.5)
    record = {"birth": {"rule": rules.birth_rule.to_dict()}, "link": {"rule": rules.custody_rule.to_dict()},
              "fail_on": "either", "identity_mode": "base", "identity_ratio": 0.5}
    assert ChainRules.from_record(record) == rules
    with pytest.raises(InputError, match="link_tau_margin"):
        ChainRules.from_margins(alpha=0.05, birth_z_margin=3.0, link_z_margin=2.0, link_tau_margin=-1.0)
    with pytest.raises(InputError, match="fail_on"):
        ChainRules(fail_on="loss")


@pytest.mark.parametrize("state, says", [
    (None, "got None"), ([1, 2], "got list"), ("seedprints", "got str"), ({}, "got an empty dict"),
    ({"monitor": "val_loss", "best_model_score": 0.5}, "'best_model_score', 'monitor' but without 'format_version'"),
    ({"format_version": 1, "patience": 3}, "without 'reference_features', 'reference_meta'"),
])
def test_load_state_dict_of_something_else_says_it_is_not_a_seedprints_state(state, says):
    with pytest.raises(InputError, match="this is not a SeedPrints state") as raised:
        CustodyChain().load_state_dict(state)
    assert says in str(raised.value) and "upgrade" not in str(raised.value)


def test_load_state_dict_of_a_newer_seedprints_state_asks_to_upgrade(tmp_path):
    loop = HandLoop(tmp_path)
    loop.start()
    state = loop.chain.state_dict()
    state["format_version"] = STATE_FORMAT_VERSION + 1
    with pytest.raises(InputError, match=f"format version {STATE_FORMAT_VERSION + 1}.*upgrade the package"):
        CustodyChain().load_state_dict(state)


# ------------------------------------------------------------------ the chain's counters


def test_the_chain_alone_changes_its_counters():
    import dataclasses

    from seedprints_lightning.core.counters import FailureCount, LedgerCursor

    chain = CustodyChain(patience=3, count_undetermined=False)
    for name, value in (("cursor", LedgerCursor()), ("failures", FailureCount())):
        with pytest.raises(AttributeError):
            setattr(chain, name, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        chain.cursor.next_index = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        chain.failures.consecutive = 3
    assert chain.failures == FailureCount(patience=3, count_undetermined=False, consecutive=0)
    chain.number_records_from(4)
    state = chain.state_dict()
    assert (state["ledger_next_index"], state["ledger_last_sha256"], state["consecutive_failures"]) == (4, None, 0)
    restored = CustodyChain()
    restored.load_state_dict({**state, "ledger_last_sha256": "ab" * 32, "consecutive_failures": 2})
    assert restored.cursor == LedgerCursor(4, "ab" * 32) and restored.failures.consecutive == 2

    failures, exhausted = FailureCount(patience=2), []
    for related in (False, None, True, False, False):
        failures = failures.counted(related)
        exhausted.append(failures.exhausted)
    assert exhausted == [False, True, False, False, True]
    assert FailureCount(patience=2, count_undetermined=False).counted(None).consecutive == 0
    with pytest.raises(InputError, match="patience"):
        FailureCount(patience=0)

    cursor, written = LedgerCursor(), []
    index, cursor = cursor.advanced(written.append)
    assert index == 0 and written == [] and cursor.state_dict() == {"ledger_next_index": 1, "ledger_last_sha256": None}
    assert cursor.rewound() == LedgerCursor() and cursor.at(7).next_index == 7
    silent = dataclasses.replace(cursor, numbered=False)
    assert silent.advanced(written.append) == (None, silent)
