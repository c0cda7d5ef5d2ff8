"""The custody ledger and its offline re-verification on a fake run directory: no model, no Lightning.

The records are written by the same :class:`~seedprints_lightning.core.chain.CustodyChain` that the
callback drives (features rounded by ``storage_features`` before the test, the anchor = the last
held probe's stored features or the reference), so ``verify_chain``, which replays them through
that class, must recompute every recorded figure.

Sizes: n = 120 samples, D = 24. A probe is the previous one plus N(0, 0.3^2) noise: consecutive
links have tau_mean about 0.8, z about 60, against a custody threshold of about 11
((control tau ~0.05 + 0.1) * sqrt(24) / sigma_120); an independent matrix has z ~ N(0, 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fake_runs import write_birth_files
from safetensors.torch import save_file

from seedprints_lightning import Fingerprint, FingerprintFileError, InputError, ProbeSpec
from seedprints_lightning.core.chain import Anchor, CustodyChain
from seedprints_lightning.core.controls import save_controls
from seedprints_lightning.core.files import file_sha256
from seedprints_lightning.core.ledger import (
    CONTROLS_FILE,
    CUSTODY_FILE,
    REFERENCE_FILE,
    CustodyLedger,
    RunDirectory,
    decode_probe_features,
    encode_probe_features,
    load_probe_features,
    storage_features,
)
from seedprints_lightning.core.verify import verify_chain
from seedprints_lightning.offline.cli import format_chain_table

N, D = 120, 24
NOISE = 0.3
SPEC = ProbeSpec(kind="token", num_samples=N, length=8, vocab_size=64, seed=7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny models, one thread


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeRun:
    """A run directory and the custody chain that writes its ledger, fed with made-up features."""

    dir: Path
    chain: CustodyChain
    generator: torch.Generator
    last: torch.Tensor | None = None  # the last probed (raw) features
    raws: list = field(default_factory=list)  # every probe's raw features
    verdicts: list = field(default_factory=list)
    records: list = field(default_factory=list)

    @property
    def ledger(self) -> CustodyLedger:
        return self.chain.cursor.ledger

    @property
    def ledger_path(self) -> Path:
        return self.dir / CUSTODY_FILE

    def lines(self) -> list[str]:
        return self.ledger_path.read_text(encoding="utf-8").splitlines()

    def write_lines(self, lines: list[str]) -> None:
        self.ledger_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def random(self) -> torch.Tensor:
        return torch.randn(N, D, generator=self.generator)

    def drift(self, base: torch.Tensor | None = None) -> torch.Tensor:
        base = self.last if base is None else base
        return base + NOISE * self.random()

    def probe(self, step: int, features: torch.Tensor, event: str = "interval"):
        observed = self.chain.observe(step, features, event)
        record = dict(json.loads(self.lines()[observed.record_index]), sha256=self.chain.cursor.last_sha256)
        self.last = features
        self.raws.append(features)
        self.verdicts.append(observed.verdict)
        self.records.append(record)
        return observed.verdict, record


def open_ledger(run_dir: RunDirectory, next_index: int = 0, last_sha256: str | None = None) -> CustodyLedger:
    controls_sha = file_sha256(run_dir.controls_path) if run_dir.controls_path.exists() else None
    ledger, _ = run_dir.open_ledger(next_index, last_sha256, reference_sha256=file_sha256(run_dir.reference_path),
                                    controls_sha256=controls_sha)
    return ledger


def make_run(root: Path, *, seed: int = 0, controls: bool = True, steps=(1, 3, 7, 15, 31)) -> FakeRun:
    g = torch.Generator().manual_seed(seed)
    run_dir = RunDirectory(root / "seedprints")
    reference, control_set = write_birth_files(run_dir, SPEC, (N, D), g, controls=controls)
    chain = CustodyChain(reference, controls=control_set, reference_source="step0")
    chain.attach_ledger(open_ledger(run_dir))
    run = FakeRun(dir=run_dir.path, chain=chain, generator=g)
    run.last = reference.features
    for step in steps:
        run.probe(step, run.drift())
    return run


def kinds_at(audit, index):
    return {p.kind for p in audit.problems if p.index == index}


@pytest.fixture()
def run(tmp_path) -> FakeRun:
    return make_run(tmp_path)


# ------------------------------------------------------------------ the intact chain


def test_intact_chain_verifies_and_recomputes_the_recorded_figures(run):
    assert all(v.link.related is True for v in run.verdicts)
    audit = verify_chain(run.dir)
    assert audit.ok, [p.message for p in audit.problems]
    assert audit.problems == [] and audit.tampered == [] and audit.broken_links == []
    assert len(audit.records) == len(audit.recomputed) == 5
    for record, recomputed, written in zip(audit.records, audit.recomputed, run.verdicts):
        assert recomputed.link.z == pytest.approx(record["link"]["z"], rel=1e-12, abs=1e-12)
        assert recomputed.birth.z == pytest.approx(record["birth"]["z"], rel=1e-12, abs=1e-12)
        assert recomputed.link.threshold == pytest.approx(record["link"]["threshold"], rel=1e-12)
        assert recomputed.link.z == pytest.approx(written.link.z, rel=1e-12, abs=1e-12)
        assert recomputed.anchor_step == record["anchor_step"]
    assert [r["anchor_index"] for r in audit.records] == [None, 0, 1, 2, 3]
    assert [r["anchor_step"] for r in audit.records] == [0, 1, 3, 7, 15]
    assert "3 fresh-init controls" in audit.evidence
    table = format_chain_table(audit)
    assert table.count("link held") == 5 and "LINK BROKEN" not in table
    # The parent run dir (holding seedprints/) is accepted too.
    assert verify_chain(run.dir.parent).ok


def test_hash_chain_is_rooted_in_the_reference_file(run):
    lines = run.lines()
    records = [json.loads(line) for line in lines]
    assert records[0]["prev_sha256"] == sha256_bytes((run.dir / REFERENCE_FILE).read_bytes())
    for prev, record in zip(lines, records[1:]):
        assert record["prev_sha256"] == sha256_bytes(prev.encode("utf-8"))
    assert run.ledger.last_sha256 == sha256_bytes(lines[-1].encode("utf-8"))
    assert run.ledger.next_index == 5 == run.records[-1]["index"] + 1
    assert run.records[-1]["sha256"] == run.ledger.last_sha256
    for record in records:
        path = run.dir / record["features_file"]
        assert record["features_sha256"] == sha256_bytes(path.read_bytes())
        assert record["controls_sha256"] == sha256_bytes((run.dir / CONTROLS_FILE).read_bytes())
        assert record["event"] == "interval" and record["related"] is True


def test_probe_files_hold_fp16_features_exactly_as_tested(run):
    from safetensors import safe_open

    record = json.loads(run.lines()[2])
    # index, step, then the writing branch's token (no branch of the run overwrites another's files)
    assert re.fullmatch(r"probes/000002-step00000007-[0-9a-f]{8}\.safetensors", record["features_file"])
    path = run.dir / record["features_file"]
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["seedprints"]) == {"index": 2, "step": 7}
        # packed: the low bytes as they are, the high bytes deflated (smaller than the plain n * D * 2)
        assert sorted(handle.keys()) == ["features_high_bytes_deflated", "features_low_bytes"]
        assert handle.get_tensor("features_high_bytes_deflated").numel() < N * D
    features = load_probe_features(path)
    assert features.dtype == torch.float16 and features.shape == (N, D)
    assert torch.equal(features, storage_features(run.raws[2]))
    assert torch.equal(features, run.raws[2].to(torch.float16))



def test_a_run_directory_of_plain_probe_files_still_verifies(run):
    """Probe files written before the packed encoding (one plain fp16 ``features`` tensor) verify as before."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    lines = run.lines()
    for i, line in enumerate(lines):
        record = json.loads(line)
        path = run.dir / record["features_file"]
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        save_file({"features": load_probe_features(path)}, str(path), metadata=meta)
        record["features_sha256"] = file_sha256(path)
        record["prev_sha256"] = sha256_bytes(lines[i - 1].encode("utf-8")) if i else record["prev_sha256"]
        record.pop("sha256", None)
        lines[i] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    run.write_lines(lines)
    audit = verify_chain(run.dir)
    assert audit.ok, [p.message for p in audit.problems]
    assert [r["link"]["z"] for r in audit.records] == [v.link.z for v in run.verdicts]


def test_packed_probe_features_round_trip_every_bit_and_fp32_stays_plain(tmp_path):
    g = torch.Generator().manual_seed(3)
    features = (torch.randn(50, 40, generator=g) * 30).half()
    features[0, :4] = torch.tensor([0.0, -0.0, 65504.0, 6e-8]).half()  # zero signs, the largest, a subnormal
    packed = encode_probe_features(features)
    back = decode_probe_features(packed, tmp_path / "p.safetensors")
    assert back.dtype == torch.float16 and torch.equal(back.view(torch.int16), features.view(torch.int16))
    wide = torch.randn(5, 4, generator=g) * 1e6
    assert set(encode_probe_features(wide)) == {"features"}
    assert torch.equal(decode_probe_features(encode_probe_features(wide), tmp_path / "q"), wide)


def test_a_damaged_packed_probe_file_is_named(tmp_path):
    packed = encode_probe_features(torch.randn(20, 8).half())
    cut = dict(packed, features_high_bytes_deflated=packed["features_high_bytes_deflated"][:-5])
    with pytest.raises(FingerprintFileError, match=r"p\.safetensors is damaged.*do not inflate"):
        decode_probe_features(cut, tmp_path / "p.safetensors")
    short = dict(packed, features_low_bytes=packed["features_low_bytes"][:-1])
    with pytest.raises(FingerprintFileError, match="160 high bytes for 152 low bytes"):
        decode_probe_features(short, tmp_path / "p.safetensors")
    with pytest.raises(FingerprintFileError, match="not a probe's features.*newer version"):
        decode_probe_features({"weights": torch.zeros(2)}, tmp_path / "p.safetensors")

def test_chain_without_controls_verifies(tmp_path):
    run = make_run(tmp_path, controls=False, steps=(2, 4, 8))
    audit = verify_chain(run.dir)
    assert audit.ok, [p.message for p in audit.problems]
    assert all(r["controls_sha256"] is None for r in audit.records)
    assert "no controls file" in audit.evidence


# ------------------------------------------------------------------ tampering


def test_edited_z_is_tampered_and_names_the_record(run):
    lines = run.lines()
    record = json.loads(lines[2])
    record["link"]["z"] = record["link"]["z"] + 5.0
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    run.write_lines(lines)
    audit = verify_chain(run.dir)
    assert not audit.ok
    assert kinds_at(audit, 2) == {"tampered"}
    assert any(p.index == 2 and "recorded link test" in p.message for p in audit.problems)
    # Record 3 chained to the original line 2.
    assert any(p.index == 3 and "prev_sha256" in p.message for p in audit.problems)
    assert audit.broken_links == []


def test_edited_claim_with_consistent_hashes_is_still_caught(run):
    """Rewriting a record AND re-chaining every later one: the recomputed verdict still differs."""
    lines = run.lines()
    record = json.loads(lines[1])
    record["link"]["z"] = 999.0
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    for i in range(2, len(lines)):
        later = json.loads(lines[i])
        later["prev_sha256"] = sha256_bytes(lines[i - 1].encode("utf-8"))
        lines[i] = json.dumps(later, sort_keys=True, separators=(",", ":"))
    run.write_lines(lines)
    audit = verify_chain(run.dir)
    assert [(p.index, p.kind) for p in audit.problems] == [(1, "tampered")]
    assert "z=999.0" in audit.problems[0].message


def test_deleted_middle_line_is_tampered(run):
    lines = run.lines()
    del lines[2]
    run.write_lines(lines)
    audit = verify_chain(run.dir)
    assert not audit.ok and audit.tampered
    messages = [p.message for p in audit.problems if p.index == 2 and p.kind == "tampered"]
    assert any("has index 3" in m for m in messages)
    assert any("prev_sha256" in m for m in messages)


def test_swapped_lines_are_tampered(run):
    lines = run.lines()
    lines[1], lines[3] = lines[3], lines[1]
    run.write_lines(lines)
    audit = verify_chain(run.dir)
    assert not audit.ok
    assert "tampered" in kinds_at(audit, 1) and "tampered" in kinds_at(audit, 3)
    assert any("reordered" in p.message for p in audit.problems)


def test_overwritten_features_file_is_tampered_naming_the_record(run):
    record = json.loads(run.lines()[3])
    path = run.dir / record["features_file"]
    other = storage_features(run.random())
    save_file({"features": other}, str(path), metadata={"seedprints": json.dumps({"index": 3, "step": 15})})
    audit = verify_chain(run.dir)
    assert not audit.ok
    assert any(p.index == 3 and p.kind == "tampered" and "was altered" in p.message for p in audit.problems)


def test_deleted_features_file_is_missing(run):
    record = json.loads(run.lines()[1])
    (run.dir / record["features_file"]).unlink()
    audit = verify_chain(run.dir)
    assert not audit.ok
    assert "missing" in kinds_at(audit, 1)
    assert audit.recomputed[1] is None
    assert all(p.kind != "broken_link" for p in audit.problems)


def test_replaced_reference_file_is_tampered(run):
    other = Fingerprint(features=run.random(), spec=SPEC, model_class="Fake", step=0)
    other.save(run.dir / REFERENCE_FILE)
    audit = verify_chain(run.dir)
    assert not audit.ok and audit.tampered
    assert any(p.index == 0 and "prev_sha256" in p.message for p in audit.problems)
    for i in range(5):
        assert any(p.index == i and f"another {REFERENCE_FILE}" in p.message for p in audit.problems)


def test_replaced_controls_file_is_tampered(run):
    save_controls(run.dir / CONTROLS_FILE, torch.randn(3, N, D, generator=run.generator),
                  (1_000_003, 1_000_004, 1_000_005), SPEC)
    audit = verify_chain(run.dir)
    assert not audit.ok
    assert all(any(p.index == i and "other controls" in p.message for p in audit.problems) for i in range(5))


def test_empty_or_absent_ledger(tmp_path, run):
    run.ledger_path.write_text("", encoding="utf-8")
    audit = verify_chain(run.dir)
    assert not audit.ok and [p.kind for p in audit.problems] == ["missing"]
    from seedprints_lightning import FingerprintFileError

    with pytest.raises(FingerprintFileError, match="custody.jsonl"):
        verify_chain(tmp_path / "nowhere")


def test_garbage_line_is_tampered(run):
    lines = run.lines()
    lines[2] = lines[2][:-5]
    run.write_lines(lines)
    audit = verify_chain(run.dir)
    # The damaged record is named first; the audit reads on, and the next record no longer chains to it.
    assert audit.problems[0].index == 2 and "not valid JSON" in audit.problems[0].message
    assert {p.kind for p in audit.problems} == {"tampered"}
    assert audit.problems[1].index == 3 and "prev_sha256" in audit.problems[1].message


# ------------------------------------------------------------------ broken links


def test_unrelated_probe_breaks_the_link_and_never_becomes_the_anchor(tmp_path):
    run = make_run(tmp_path, steps=(1, 3, 7))
    good = run.last
    bad_verdict, bad_record = run.probe(15, run.random())  # a swapped-in model
    assert bad_verdict.link.related is False and bad_record["related"] is False
    assert bad_record["anchor_index"] == 2 and bad_record["anchor_step"] == 7
    # The next probe continues from the good lineage: it links to record 2, not to the swap.
    verdict, record = run.probe(31, run.drift(good))
    assert verdict.link.related is True
    assert record["anchor_index"] == 2 and record["anchor_step"] == 7
    # And a second swapped-in probe keeps failing against the last good one.
    swap2 = run.random()
    v3, r3 = run.probe(63, swap2)
    v4, r4 = run.probe(127, run.drift(swap2))
    assert v3.link.related is False and v4.link.related is False  # a swap cannot "link to itself"
    assert r3["anchor_index"] == 4 and r4["anchor_index"] == 4

    audit = verify_chain(run.dir)
    assert not audit.ok
    assert audit.tampered == []
    assert [(p.index, p.kind) for p in audit.problems] == [(3, "broken_link"), (5, "broken_link"),
                                                         (6, "broken_link")]
    assert "custody link from step 7 is broken" in audit.problems[0].message
    assert format_chain_table(audit).count("LINK BROKEN") == 3


def test_checkpoint_links_to_the_chain(run):
    near = run.drift()  # a checkpoint slightly after the last probe
    audit = verify_chain(run.dir, near, checkpoint_step=40, checkpoint_name="last.ckpt")
    assert audit.ok, [p.message for p in audit.problems]
    assert audit.checkpoint is not None and audit.checkpoint.link.related is True
    assert audit.checkpoint.anchor_step == 31 and audit.checkpoint.step == 40
    assert "descends (last.ckpt)" in format_chain_table(audit)


def test_unrelated_checkpoint_is_a_broken_link(run):
    audit = verify_chain(run.dir, run.random(), checkpoint_step=40, checkpoint_name="other.ckpt")
    assert not audit.ok
    assert [(p.index, p.kind) for p in audit.problems] == [(None, "broken_link")]
    assert "other.ckpt" in audit.problems[0].message
    assert "DOES NOT DESCEND" in format_chain_table(audit)


def test_checkpoint_step_picks_the_anchor_at_or_before_it(run):
    # A checkpoint saved at step 7 is linked to the record of step 7, not the last one.
    early = run.records[2]
    assert early["step"] == 7
    at_7 = run_features(run, 2).float()
    audit = verify_chain(run.dir, at_7 + 0.05 * run.random(), checkpoint_step=7, checkpoint_name="step7.ckpt")
    assert audit.ok and audit.checkpoint.anchor_step == 7
    # Without a step, the last held record is the anchor.
    audit = verify_chain(run.dir, run.drift(), checkpoint_name="x")
    assert audit.checkpoint.anchor_step == 31 and audit.checkpoint.step == 31


# ------------------------------------------------------------------ storage_features


def test_storage_features_keeps_fp16_for_normal_values():
    x = torch.tensor([[1.0, -2.5, 65504.0], [0.1, 1e-3, -65504.0]], dtype=torch.float64)
    out = storage_features(x)
    assert out.dtype == torch.float16 and out.is_contiguous() and out.device.type == "cpu"
    assert torch.equal(out, x.to(torch.float16))
    # Idempotent: rounding the rounded features changes nothing.
    assert torch.equal(storage_features(out.float()), out)


@pytest.mark.parametrize("value", [65520.0, 1e6, -7e4, float("inf"), float("nan"), float("-inf")])
def test_storage_features_keeps_fp32_beyond_fp16(value):
    x = torch.ones(4, 3)
    x[1, 2] = value
    out = storage_features(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, x) or (math.isnan(value) and torch.isnan(out[1, 2]))


def test_storage_features_detaches():
    x = torch.ones(3, 3, requires_grad=True) * 2
    out = storage_features(x)
    assert not out.requires_grad and out.dtype == torch.float16


# ------------------------------------------------------------------ rewind_to


def test_rewind_moves_later_records_aside_and_continues_the_chain(run):
    lines = run.lines()
    k = 3
    ledger = CustodyLedger(run.dir, reference_sha256=file_sha256(run.dir / REFERENCE_FILE),
                           controls_sha256=file_sha256(run.dir / CONTROLS_FILE))
    moved = ledger.rewind_to(sha256_bytes(lines[k - 1].encode("utf-8")), k)
    assert moved == run.dir / "custody.abandoned-0.jsonl"
    # The whole abandoned branch: the records it shares with the ledger, then its own; it verifies on its own.
    assert moved.read_text(encoding="utf-8").splitlines() == lines
    assert run.lines() == lines[:k]
    assert verify_chain(run.dir, ledger=moved.name).ok
    assert (ledger.next_index, ledger.last_sha256) == (k, sha256_bytes(lines[k - 1].encode("utf-8")))

    # The resumed run continues: its next records chain to record k - 1 and the chain verifies.
    # The checkpoint's callback state: the anchor is record 2's stored features.
    run.chain.anchor = Anchor(run_features(run, 2), 7, 2)
    run.chain.number_records_from(k)
    run.chain.attach_ledger(ledger)
    run.last = run.raws[2]
    run.probe(7, run.drift(), event="resume")
    run.probe(12, run.drift())
    assert verify_chain(run.dir).ok

    # A second rewind goes to the next free name.
    new_lines = run.lines()
    moved = CustodyLedger(run.dir).rewind_to(sha256_bytes(new_lines[3].encode("utf-8")), 4)
    assert moved == run.dir / "custody.abandoned-1.jsonl"
    assert moved.read_text(encoding="utf-8").splitlines() == new_lines
    assert (run.dir / "custody.abandoned-0.jsonl").read_text(encoding="utf-8").splitlines() == lines
    assert verify_chain(run.dir, ledger="custody.abandoned-0.jsonl").ok  # still: no file of it was overwritten
    assert verify_chain(run.dir, ledger="custody.abandoned-1.jsonl").ok


def run_features(run: FakeRun, index: int) -> torch.Tensor:
    record = json.loads(run.lines()[index])
    return load_probe_features(run.dir / record["features_file"])


def test_rewind_to_the_end_or_beyond_moves_nothing(run):
    lines = run.lines()
    ledger = CustodyLedger(run.dir)
    assert ledger.rewind_to(sha256_bytes(lines[-1].encode("utf-8")), len(lines)) is None
    assert run.lines() == lines
    assert not list(run.dir.glob("custody.abandoned-*"))


def test_rewind_to_zero_starts_a_new_chain(run):
    lines = run.lines()
    ref_sha = file_sha256(run.dir / REFERENCE_FILE)
    moved = CustodyLedger(run.dir).rewind_to(ref_sha, 0)
    assert moved.read_text(encoding="utf-8").splitlines() == lines
    assert run.ledger_path.read_text(encoding="utf-8") == ""


def test_rewind_with_a_foreign_hash_raises_and_leaves_the_ledger(run):
    lines = run.lines()
    with pytest.raises(InputError, match="record 2 is not the one this checkpoint chained to"):
        CustodyLedger(run.dir).rewind_to(sha256_bytes(lines[1].encode("utf-8")), 3)
    with pytest.raises(InputError, match="hash mismatch"):
        CustodyLedger(run.dir).rewind_to("0" * 64, 2)
    assert run.lines() == lines
    assert not list(run.dir.glob("custody.abandoned-*"))


def test_rewind_without_a_ledger_file(tmp_path):
    ledger = CustodyLedger(tmp_path)
    assert ledger.rewind_to("ab" * 32, 4) is None
    assert (ledger.next_index, ledger.last_sha256) == (4, "ab" * 32)


def test_append_before_the_chain_has_a_root_raises(run):
    with pytest.raises(InputError, match=r"before rewind_to\(\): the chain has no root"):
        CustodyLedger(run.dir).append(run.verdicts[0], storage_features(run.last), event="x", anchor_index=None,
                                      identity_mode="coset", identity_ratio=None)


def test_expected_head_catches_records_cut_from_the_end(run):
    ledger = run.dir / "custody.jsonl"
    lines = ledger.read_text().splitlines()
    head = (len(lines), sha256_bytes(lines[-1].encode()))
    assert verify_chain(run.dir, expected_head=head).ok
    ledger.write_text("".join(line + "\n" for line in lines[:-1]))
    cut = verify_chain(run.dir, expected_head=head)
    assert not verify_chain(run.dir).problems  # the hash chain alone cannot see a cut at the end
    assert [p.kind for p in cut.problems] == ["tampered"] and "removed from the end" in cut.problems[0].message
    ledger.write_text("".join(line + "\n" for line in lines))
    other = (len(lines), "0" * 64)
    assert [p.index for p in verify_chain(run.dir, expected_head=other).problems] == [len(lines) - 1]
