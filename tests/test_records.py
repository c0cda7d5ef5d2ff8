"""The typed ledger records: one from_json (the validation) and one to_json each, and read_ledger.

The writer builds its lines through them, byte for byte as the dict it built before; the
audit's reader (read_record) validates through them, with the same messages.
"""

from __future__ import annotations

import json

import pytest
from test_ledger_faults import make_run

from seedprints_lightning.core.ledger import _canonical
from seedprints_lightning.core.records import (
    SAVE_KIND,
    LedgerRecordError,
    ProbeRecord,
    SaveRecord,
    read_ledger,
    read_record,
    record_of,
)
from seedprints_lightning.core.verify import verify_chain

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The keys the writer's dicts held before the typed records (0.7's CustodyLedger._probe_record / record_save).
PROBE_KEYS_0_7 = ("format", "version", "index", "step", "time", "event", "features_file", "features_sha256",
                  "anchor_index", "anchor_step", "birth", "link", "related", "birth_detectable", "fail_on",
                  "identity_mode", "identity_ratio", "reference_sha256", "controls_sha256", "initial_anchor_sha256",
                  "prev_sha256")
SAVE_KEYS_0_7 = ("format", "version", "kind", "index", "step", "time", "event", "weights_sha256", "checkpoint",
                 "reference_sha256", "controls_sha256", "initial_anchor_sha256", "prev_sha256")


@pytest.fixture
def run(tmp_path):
    made = make_run(tmp_path, steps=(1, 2))
    made.chain.record_save(3, "ab" * 32, checkpoint="step3.ckpt")
    made.probe(4)
    return made


def _lines(run) -> list[bytes]:
    return (run.ledger_path).read_bytes().splitlines()


def test_a_written_line_is_the_line_the_dict_built_writer_wrote(run):
    lines = _lines(run)
    assert len(lines) == 4
    for line in lines:
        data = json.loads(line)
        keys = SAVE_KEYS_0_7 if data.get("kind") == SAVE_KIND else PROBE_KEYS_0_7
        assert set(data) == set(keys)  # no field added or lost
        assert _canonical({key: data[key] for key in keys}).encode() == line
        assert _canonical(record_of(data).to_json()).encode() == line  # and the round trip is exact
    assert verify_chain(run.dir).ok


def test_read_ledger_gives_typed_records_in_order(run):
    records = read_ledger(run.ledger_path)
    assert [type(r) for r in records] == [ProbeRecord, ProbeRecord, SaveRecord, ProbeRecord]
    assert [r.index for r in records] == [0, 1, 2, 3] and [r.step for r in records] == [1, 2, 3, 4]
    assert records[2].weights_sha256 == "ab" * 32 and records[2].checkpoint == "step3.ckpt"
    assert records[2].to_json()["kind"] == SAVE_KIND and "kind" not in records[2].extra
    assert records[1].anchor_index == 0 and records[0].birth["rule"]["alpha"] > 0


def test_read_ledger_skips_blank_lines_and_names_a_malformed_one(run):
    path = run.ledger_path
    lines = _lines(run)
    path.write_bytes(lines[0] + b"\n\n" + lines[1] + b"\n")
    assert [r.index for r in read_ledger(path)] == [0, 1]
    broken = json.loads(lines[1])
    del broken["features_sha256"]
    path.write_bytes(lines[0] + b"\n\n" + _canonical(broken).encode() + b"\n")
    with pytest.raises(LedgerRecordError, match=r"line 3 of .*custody\.jsonl is not a valid ledger record: it has no "
                                                r"'features_sha256' field"):
        read_ledger(path)
    path.write_bytes(lines[0] + b"\n" + lines[1][:20])  # a write a crash cut short
    with pytest.raises(LedgerRecordError, match=r"line 2 of .* is torn"):
        read_ledger(path)


def test_from_json_is_the_audits_validation_with_its_messages(run):
    data = json.loads(_lines(run)[0])
    assert ProbeRecord.from_json(data).to_json() == data
    bad = {**data, "step": True}
    with pytest.raises(LedgerRecordError, match=r"field 'step' must be an integer in \[0, 2\*\*63\), got a boolean"):
        ProbeRecord.from_json(bad)
    assert read_record(_canonical(bad).encode())[1] == ("is not a valid ledger record: it field 'step' must be an "
                                                        "integer in [0, 2**63), got a boolean true")
    nested = {**data, "link": {**data["link"], "rule": {"alpha": "x"}}}
    with pytest.raises(LedgerRecordError, match=r"field 'link\.rule\.alpha' must be a finite number"):
        record_of(nested)
    with pytest.raises(LedgerRecordError, match=r"its kind a string \"probe\" is none"):
        record_of({**data, "kind": "probe"})
    save = json.loads(_lines(run)[2])
    with pytest.raises(LedgerRecordError, match="has no 'weights_sha256' field"):
        SaveRecord.from_json({k: v for k, v in save.items() if k != "weights_sha256"})


def test_fields_beyond_the_schema_are_kept(run):
    data = {**json.loads(_lines(run)[0]), "signature": {"key_id": "k", "value": "v"}}
    record = ProbeRecord.from_json(data)
    assert record.extra == {"signature": {"key_id": "k", "value": "v"}}
    assert record.to_json() == data
