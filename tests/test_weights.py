"""Checkpoint binding: weights_digest, ledger save records, `seedprints audit --chain RUN CKPT` naming the save.

A hand-written loop (open_chain + CustodyChain.observe, the conftest tiny LLaMA, token probes n = 100)
records a save at step 8 (CustodyChain.record_save), then trains and probes on; the audit must accept the
save record in the chain, skip it in the replay, and match a checkpoint's exact weights to it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_lm, open_test_chain, train_and_observe

from seedprints_lightning import InputError, ProbeSpec, verify_chain
from seedprints_lightning.core.ledger import CustodyLedger, RunDirectory, _canonical, record_save
from seedprints_lightning.core.opening import close_chain
from seedprints_lightning.core.weights import weights_digest
from seedprints_lightning.offline.identify import load_runs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_weights_digest_is_exact_and_order_free() -> None:
    model = make_tiny_lm(0)
    state = model.state_dict()
    digest = weights_digest(state)
    assert len(digest) == 64 and digest == weights_digest(dict(reversed(list(state.items()))))
    assert digest == weights_digest(make_tiny_lm(0).state_dict()) != weights_digest(make_tiny_lm(1).state_dict())
    changed = {k: v.clone() for k, v in state.items()}
    name = next(iter(changed))
    changed[name].view(-1)[0] += 1e-3
    assert weights_digest(changed) != digest
    assert weights_digest({k: v.to(torch.bfloat16) for k, v in state.items()}) != digest  # dtype is identity
    renamed = dict(state)
    renamed["x." + name] = renamed.pop(name)
    assert weights_digest(renamed) != digest
    assert weights_digest({**state, "_extra_state": object()}) == digest  # not a tensor: left out
    with pytest.raises(InputError):
        weights_digest({})
    with pytest.raises(InputError):
        weights_digest([1])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bound")
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spec = ProbeSpec(num_samples=100, length=8).resolve(model)
    run = RunDirectory(root / "seedprints")
    chain = open_test_chain(model, run.path, spec)
    saves = {}

    def save(step: int) -> None:
        if step in (3, 8):  # a save between probes (3) and right after one (8)
            saves[step] = chain.record_save(step, weights_digest(model.state_dict()), checkpoint=f"s{step}")
            model.save_pretrained(root / f"ckpt-{step}")

    train_and_observe(model, optimizer, chain, spec, range(1, 13), after=save)
    close_chain(chain)
    return {"root": root, "run": run.path, "chain": chain, "saves": saves, "model": model}


def test_save_records_are_chained_skipped_in_the_replay_and_numbered_by_line(saved_run) -> None:
    audit = verify_chain(saved_run["run"])
    assert audit.ok, [p.message for p in audit.problems]
    kinds = [r.get("kind") for r in audit.records]
    assert [i for i, k in enumerate(kinds) if k == "save"] == [saved_run["saves"][3], saved_run["saves"][8]]
    assert [r["step"] for r in audit.saves] == [3, 8] and all(v is None for v, k in zip(audit.recomputed, kinds) if k)
    history = saved_run["chain"].history
    assert [h["record_index"] for h in history] == [i for i, k in enumerate(kinds) if k is None]
    assert saved_run["chain"].cursor.next_index == len(audit.records)
    # identify reads the probes only
    assert len(load_runs(saved_run["run"])[0].probes) == len(history)
    # A save record edited (another digest) breaks the chain after it.
    lines = (saved_run["run"] / "custody.jsonl").read_text().splitlines()
    index = saved_run["saves"][3]
    edited = dict(json.loads(lines[index]), weights_sha256="0" * 64)
    path = saved_run["root"] / "edited"
    import shutil

    shutil.copytree(saved_run["run"], path, ignore=shutil.ignore_patterns("custody.lock"))
    (path / "custody.jsonl").write_text("".join(x + "\n" for x in [*lines[:index], _canonical(edited),
                                                                   *lines[index + 1:]]))
    problems = verify_chain(path).problems
    assert [(p.index, p.kind) for p in problems] == [(index + 1, "tampered")]
    # A record of an unknown kind is malformed.
    (path / "custody.jsonl").write_text("".join(x + "\n" for x in [*lines[:index], _canonical(
        dict(json.loads(lines[index]), kind="upload")), *lines[index + 1:]]))
    assert "kind" in verify_chain(path).problems[0].message


def test_audit_names_the_save_holding_the_checkpoints_exact_weights(saved_run, tmp_path, capsys) -> None:
    from seedprints_lightning.offline.cli import main

    run, root = saved_run["run"], saved_run["root"]
    # Resaved with identical weights (loaded and saved again elsewhere): recognised.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(root / "ckpt-8").save_pretrained(tmp_path / "resaved")
    code = main(["audit", "--chain", str(run), str(tmp_path / "resaved"), "--device", "cpu", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (f"weights    {tmp_path / 'resaved'} holds exactly the weights saved at step 8 (record "
            f"{saved_run['saves'][8]})") in out
    assert "checkpoint saved (weights sha256" in out
    # One weight changed: not a recorded save (it still descends from the chain: exit 0).
    model = AutoModelForCausalLM.from_pretrained(root / "ckpt-8")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    model.save_pretrained(tmp_path / "changed")
    code = main(["audit", "--chain", str(run), str(tmp_path / "changed"), "--device", "cpu", "-q", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["checkpoint_weights"]["saved_at"] == []
    assert data["checkpoint_weights"]["message"].startswith("no recorded save has these weights")
    assert [s["step"] for s in data["saves"]] == [3, 8]
    code = main(["audit", "--chain", str(run), str(root / "ckpt-3"), "--device", "cpu", "-q", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["checkpoint_weights"]["saved_at"] == [{"record": saved_run["saves"][3], "step": 3}]


def test_record_save_checks_its_input(tmp_path) -> None:
    ledger = CustodyLedger(tmp_path)
    with pytest.raises(InputError, match="before rewind_to"):
        record_save(ledger, 1, "0" * 64)
    ledger.rewind_to("a" * 64, 0)
    with pytest.raises(InputError, match="sha256 hex digest"):
        record_save(ledger, 1, "nope")
    with pytest.raises(InputError, match="CustodyLedger"):
        record_save(object(), 1, "0" * 64)
    record = record_save(ledger, 5, "b" * 64, checkpoint="last.ckpt")
    assert record["kind"] == "save" and record["index"] == 0 and record["prev_sha256"] == "a" * 64
    assert ledger.next_index == 1 and ledger.last_sha256 == record["sha256"]


def test_a_training_checkpoint_is_matched_by_its_saved_weights(saved_run, tmp_path, capsys) -> None:
    """A .ckpt as CausalLMModule saves it: weights under ``model.``, the config under ``hf_config``."""
    from transformers import AutoModelForCausalLM

    from seedprints_lightning.offline.audit import checkpoint_weights_digest
    from seedprints_lightning.offline.cli import main

    model = AutoModelForCausalLM.from_pretrained(saved_run["root"] / "ckpt-8")
    ckpt = tmp_path / "step8.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 8,
                "hf_config": json.loads(model.config.to_json_string())}, ckpt)
    digest, how = checkpoint_weights_digest(ckpt)
    assert digest == weights_digest(model.state_dict()) and "as saved" in how
    code = main(["audit", "--chain", str(saved_run["run"]), str(ckpt), "--device", "cpu", "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "holds exactly the weights saved at step 8" in out, out
