"""``seedprints audit --chain`` reads anything without crashing, and names what it finds.

A damaged ledger line (undecodable bytes, not JSON, not an object, a field of the wrong type,
NaN where a number belongs, a field missing) is a ``"tampered"`` problem naming the record and
line (exit 5), never an exception; a fuzz of seeded mutations checks it. A checkpoint of another
run (or of an abandoned branch of this one) audited against an intact ledger is named as such
(exit 1), not called tampering.

The runs are hand-written loops (no Lightning: fast): the conftest tiny LLaMA, token probes
n = 100, L = 6, no controls, a probe at steps 1-4 (4 records).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm

from seedprints_lightning import Fingerprint, ProbeSpec, extract_features
from seedprints_lightning.core.chain import CustodyChain
from seedprints_lightning.core.controls import ControlSet
from seedprints_lightning.core.ledger import RunDirectory, line_sha256
from seedprints_lightning.core.opening import ControlsSource, open_chain
from seedprints_lightning.core.processes import Processes
from seedprints_lightning.core.schedule import ProbeSchedule
from seedprints_lightning.core.verify import PROBLEM_KINDS, verify_chain
from seedprints_lightning.offline.cli import EXIT_EXPECT, EXIT_OK, EXIT_TAMPERED, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=100, length=6)
STEPS = 4


def _hand_run(root: Path, seed: int = 0, data_seed: int = 0) -> dict[str, Path]:
    """A run directory (steps 1..STEPS probed) and a checkpoint of its end (model, config, chain state)."""
    model = make_tiny_lm(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spec = SPEC.resolve(model)
    chain = CustodyChain(schedule=ProbeSchedule(every_n_steps=4), patience=1)
    run = RunDirectory(root / "seedprints")
    open_chain(chain, step=0, run=run, processes=Processes(),
               take_reference=lambda: Fingerprint(features=extract_features(model, spec), spec=spec, step=0),
               controls=ControlsSource(0, lambda seeds, spec: ControlSet.none()), origin="the test loop",
               warn=lambda message: None)
    data = torch.randint(0, 64, (STEPS * 8, 12), generator=torch.Generator().manual_seed(data_seed))
    for step in range(1, STEPS + 1):
        ids = data[(step - 1) * 8:step * 8]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if chain.due(step):
            chain.observe(step, extract_features(model, spec))
    ckpt = root / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": STEPS,
                "hf_config": json.loads(model.config.to_json_string()), "seedprints": chain.state_dict()}, ckpt)
    return {"run": run.path, "ckpt": ckpt}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("robust")
    return {"a": _hand_run(root / "a", seed=0), "b": _hand_run(root / "b", seed=1),
            "twin": _hand_run(root / "twin", seed=0, data_seed=5)}  # a's init, other data: a's reference


@pytest.fixture()
def run_copy(runs, tmp_path) -> Path:
    return Path(shutil.copytree(runs["a"]["run"], tmp_path / "seedprints"))


def _lines(run_dir: Path) -> list[str]:
    return (run_dir / "custody.jsonl").read_text().splitlines()


def _write(run_dir: Path, lines: list[str]) -> None:
    (run_dir / "custody.jsonl").write_text("".join(line + "\n" for line in lines))


def _canonical(record) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def test_the_hand_run_verifies(runs, capsys) -> None:
    audit = verify_chain(runs["a"]["run"])
    assert audit.ok and len(audit.records) == STEPS, [p.message for p in audit.problems]
    assert main(["audit", "--chain", str(runs["a"]["run"]), str(runs["a"]["ckpt"]), "-q"]) == EXIT_OK


# --------------------------------------------------------------------------------------
# A. Malformed lines: tampered, with the record and line named (they used to raise: exit 1)
# --------------------------------------------------------------------------------------


def _mutate_record(line: str, how: str) -> str:
    record = json.loads(line)
    if how == "list":
        return json.dumps([record])
    if how == "string step":
        record["step"] = "x"
    elif how == "missing field":
        del record["link"]
    elif how == "nan z":
        return line.replace(f'"z":{json.dumps(record["link"]["z"])}', '"z":NaN', 1)
    elif how == "huge number":
        record["birth"]["threshold"] = "@@"
        return _canonical(record).replace('"@@"', "1e400")
    elif how == "nested type":
        record["link"]["rule"] = [1, 2, 3]
    elif how == "outside path":
        record["features_file"] = "../../../etc/passwd"
    return _canonical(record)


@pytest.mark.parametrize("how", ["bytes", "list", "string step", "missing field", "nan z", "huge number",
                                 "nested type", "outside path", "not json"])
def test_a_malformed_line_is_tampering_named_by_its_line(run_copy, capsys, how) -> None:
    lines = _lines(run_copy)
    index = 1
    if how == "bytes":
        raw = [line.encode() for line in lines]
        raw[index] = bytes([0xff, 0xfe, 0x00, 0x81]) + raw[index][4:]
        (run_copy / "custody.jsonl").write_bytes(b"".join(line + b"\n" for line in raw))
    else:
        lines[index] = '{"index": 1, "step"' if how == "not json" else _mutate_record(lines[index], how)
        _write(run_copy, lines)
    audit = verify_chain(run_copy)  # never raises
    assert audit.tampered and all(PROBLEM_KINDS[p.kind] == "tampered" for p in audit.problems)
    first = audit.problems[0]
    assert first.index == index and "record 1 (line 2 of custody.jsonl)" in first.message
    assert len(audit.records) == len(lines) and len(audit.recomputed) == len(lines)  # it went on after it
    assert main(["audit", "--chain", str(run_copy)]) == EXIT_TAMPERED
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err == ""
    assert "[tampered] record 1 (line 2 of custody.jsonl)" in captured.out
    assert main(["audit", "--chain", str(run_copy), "--json"]) == EXIT_TAMPERED
    data = json.loads(capsys.readouterr().out)
    assert data["problems"][0]["record"] == index and data["problems"][0]["kind"] == "tampered"


def test_malformed_line_messages_say_what_is_wrong(run_copy) -> None:
    lines = _lines(run_copy)
    for how, expected in (("list", "is an array"), ("string step", "field 'step' must be an integer"),
                          ("missing field", "has no 'link' field"), ("nan z", "not valid JSON"),
                          ("nested type", "field 'link.rule' must be an object, got an array"),
                          ("outside path", "field 'features_file' must be a relative path inside the run")):
        _write(run_copy, [*lines[:-1], _mutate_record(lines[-1], how)])
        messages = [p.message for p in verify_chain(run_copy).problems]
        assert any(expected in m and f"record {len(lines) - 1} " in m for m in messages), (how, messages)


# --------------------------------------------------------------------------------------
# A. The fuzz: 200 seeded mutations of copies of custody.jsonl
# --------------------------------------------------------------------------------------

_SWAPS = ["x", 7, 2.5, True, None, [], {}, [1, "a"], {"k": 1}]


def _leaves(value, path=()):
    """Every path into a record (objects and their members), for deletions and swaps."""
    if path:
        yield path
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, (*path, key))


def _at(record, path):
    for key in path[:-1]:
        record = record[key]
    return record


def _mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    lines = data.decode().splitlines()
    kind = rng.choice(["bytes", "truncate", "delete", "swap", "constant"])
    if kind == "truncate":
        return kind, data[:rng.randrange(0, len(data))]
    index = rng.randrange(len(lines))
    if kind == "bytes":
        start = rng.randrange(len(lines[index]) + 1)
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        raw = [line.encode() for line in lines]
        raw[index] = raw[index][:start] + noise + raw[index][start + rng.randrange(0, 20):]
        return kind, b"".join(line + b"\n" for line in raw)
    record = json.loads(lines[index])
    path = rng.choice(list(_leaves(record)))
    holder = _at(record, path)
    if kind == "delete":
        del holder[path[-1]]
        text = _canonical(record)
    elif kind == "swap":
        old = holder[path[-1]]
        holder[path[-1]] = rng.choice([v for v in _SWAPS if type(v) is not type(old)])
        text = _canonical(record)
    else:  # a number the writer never writes (NaN, +-Infinity, beyond float's range)
        holder[path[-1]] = "@@"
        text = _canonical(record).replace('"@@"', rng.choice(["NaN", "Infinity", "-Infinity", "1e999"]))
    lines[index] = text
    return f"{kind} {'.'.join(path)} of line {index + 1}", "".join(line + "\n" for line in lines).encode()


def _same_records(original: bytes, mutated: bytes) -> bool:
    """The mutated ledger says the same as the original (e.g. only the final newline cut)."""
    try:
        return [_canonical(json.loads(line)) for line in mutated.decode().splitlines()] == \
               [_canonical(json.loads(line)) for line in original.decode().splitlines()]
    except ValueError:
        return False


def _a_clean_cut(original: bytes, mutated: bytes) -> bool:
    """Whole records cut from the end (only the checkpoint's ledger head can tell)."""
    try:
        ours, theirs = original.decode().splitlines(), mutated.decode().splitlines()
    except UnicodeDecodeError:
        return False
    return 0 < len(theirs) < len(ours) and theirs == ours[:len(theirs)]


def _a_cut_at_any_byte(original: bytes, mutated: bytes) -> bool:
    """The ledger cut at any byte after its first whole line: whole records, then maybe a torn last line.

    Without a checkpoint's ledger head that is what a crash mid-write leaves (a note, exit 0:
    ``test_ledger_faults.py``); with the head, records removed from the end (tampered).
    """
    return original.startswith(mutated) and b"\n" in mutated and len(mutated) < len(original)


def test_fuzzed_ledgers_never_crash_and_are_always_tampering(runs, tmp_path, capsys) -> None:
    source = runs["a"]["run"]
    work = Path(shutil.copytree(source, tmp_path / "seedprints"))
    original = (source / "custody.jsonl").read_bytes()
    lines = original.decode().splitlines()
    head = (len(lines), line_sha256(lines[-1]))  # what the checkpoint's callback state knows
    seen, ok_cases = set(), 0
    for seed in range(200):
        rng = random.Random(seed)
        what, mutated = _mutation(rng, original)
        seen.add(what.split()[0])
        (work / "custody.jsonl").write_bytes(mutated)
        audit = verify_chain(work, expected_head=head)  # must not raise, whatever the bytes
        if _same_records(original, mutated):
            assert audit.ok, (seed, what, [p.message for p in audit.problems])
            ok_cases += 1
            continue
        assert audit.problems and audit.tampered, (seed, what)
        assert not any(math.isnan(v.link.z) for v in audit.recomputed if v is not None)
        code = main(["audit", "--chain", str(work), "--json"])
        err = capsys.readouterr().err
        assert "Traceback" not in err and not err, (seed, what, err)
        cut = _a_clean_cut(original, mutated) or _a_cut_at_any_byte(original, mutated)
        assert code == (EXIT_OK if cut else EXIT_TAMPERED), (seed, what)
    assert seen == {"bytes", "truncate", "delete", "swap", "constant"} and ok_cases < 20


# --------------------------------------------------------------------------------------
# D. A checkpoint of another run, or of an abandoned branch: named, exit 1 (it used to be 5)
# --------------------------------------------------------------------------------------


def test_a_checkpoint_of_another_run_is_named_not_tampering(runs, capsys) -> None:
    args = ["audit", "--chain", str(runs["a"]["run"]), str(runs["b"]["ckpt"]), "-q"]
    assert main([*args, "--json"]) == EXIT_EXPECT
    data = json.loads(capsys.readouterr().out)
    kinds = [p["kind"] for p in data["problems"]]
    assert "other_run" in kinds and "tampered" not in kinds, data["problems"]
    message = next(p["message"] for p in data["problems"] if p["kind"] == "other_run")
    assert f"checkpoint {runs['b']['ckpt']} belongs to another run" in message
    assert "another birth fingerprint" in message
    assert main(args) == EXIT_EXPECT
    assert "[other_run]" in capsys.readouterr().out


def test_a_checkpoint_of_a_twin_run_with_the_same_reference_is_another_run(runs, capsys) -> None:
    # Same init and probe (the same reference), other data: the ledger head is not here and its
    # last held probe is not this ledger's.
    twin = runs["twin"]["run"]
    assert torch.equal(Fingerprint.load(twin / "reference.safetensors").features,
                       Fingerprint.load(runs["a"]["run"] / "reference.safetensors").features)
    assert main(["audit", "--chain", str(runs["a"]["run"]), str(runs["twin"]["ckpt"]), "-q", "--json"]) \
        == EXIT_EXPECT
    data = json.loads(capsys.readouterr().out)
    kinds = [p["kind"] for p in data["problems"]]
    assert "other_run" in kinds and "tampered" not in kinds, data["problems"]
    assert any("same birth fingerprint" in p["message"] for p in data["problems"])


def test_a_checkpoint_of_an_abandoned_branch_is_named(runs, run_copy, capsys) -> None:
    # What a resume from an earlier checkpoint does: the later records move to custody.abandoned-0.jsonl.
    lines = _lines(run_copy)
    _write(run_copy, lines[:2])
    (run_copy / "custody.abandoned-0.jsonl").write_text("".join(line + "\n" for line in lines[2:]))
    assert main(["audit", "--chain", str(run_copy), str(runs["a"]["ckpt"]), "-q", "--json"]) == EXIT_EXPECT
    data = json.loads(capsys.readouterr().out)
    kinds = [p["kind"] for p in data["problems"]]
    assert "abandoned_branch" in kinds and "tampered" not in kinds, data["problems"]
    assert any("abandoned branch of this run" in p["message"] and "custody.abandoned-0.jsonl" in p["message"]
               for p in data["problems"])
    # Without the abandoned file, the same cut is what it is: records removed from the end.
    (run_copy / "custody.abandoned-0.jsonl").unlink()
    assert main(["audit", "--chain", str(run_copy), str(runs["a"]["ckpt"]), "-q"]) == EXIT_TAMPERED
    assert "removed from the end" in capsys.readouterr().out
