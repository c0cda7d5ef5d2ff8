"""Checkpoint states and run directories written by 0.7 still load, resume and audit.

tests/data/v07/ was written by the 0.7.0 code (tests/data/make_v07_state.py says how): a run
directory (ledger, reference, controls, probe files) and a ``torch.save`` checkpoint taken after
optimizer step 4 whose ``"seedprints"`` entry is the 0.7 ``SeedPrintsMonitor`` state. Its links
stand at z 22 against thresholds of 5.4-5.8 (made_by.json and the ledger), so the resume link
below has a margin of about 16 in z; another init scores z < 4 against such a reference.

The state is read through :class:`~seedprints_lightning.core.state.ChainState` /
:class:`~seedprints_lightning.core.state.FaceState`, whose dicts keep 0.7's keys, so a state
written now is also one 0.7 reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from seedprints_lightning import InputError, ProbeSpec, verify_chain
from seedprints_lightning.core.chain import CustodyChain
from seedprints_lightning.core.state import STATE_FORMAT_VERSION, ChainState, FaceState
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline.cli import EXIT_OK
from seedprints_lightning.offline.cli import main as seedprints_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V07 = Path(__file__).resolve().parent / "data" / "v07"
MADE_BY = json.loads((V07 / "made_by.json").read_text())
#: The keys 0.7 wrote for the chain, in its order (CustodyChain.state_dict), and the face's beside them.
CHAIN_KEYS_07 = ["format_version", "reference_features", "reference_meta", "reference_source", "control_features",
                 "control_seeds", "control_spec", "anchor_features", "anchor_step", "anchor_index", "next_probe_step",
                 "interval", "ledger_next_index", "ledger_last_sha256", "last_probed_step", "consecutive_failures",
                 "warned_undetermined", "warned_birth", "history"]
FACE_KEYS_07 = ["step", "model_rebuild"]


def _state_07() -> dict:
    return torch.load(V07 / "step4.pt", weights_only=True)["seedprints"]  # plain types: weights_only loads it


def _run_07(tmp_path: Path) -> Path:
    """A copy of the 0.7 run directory (the tests never write into tests/data)."""
    return Path(shutil.copytree(V07 / "run", tmp_path / "run"))


def _model_07() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**MADE_BY["config"]))
    model.load_state_dict(torch.load(V07 / "step4.pt", weights_only=True)["model"])
    return model.train()


def test_the_data_was_written_by_0_7():
    assert MADE_BY["seedprints_lightning"] == "0.7.0" and MADE_BY["history_steps"] == [1, 2, 3, 4]
    assert list(_state_07()) == CHAIN_KEYS_07 + FACE_KEYS_07


def test_a_0_7_state_reads_as_a_chain_state_and_writes_back_the_same_keys_and_values():
    state = _state_07()
    chain = ChainState.from_dict(state)
    assert (chain.format_version, chain.last_probed_step, chain.anchor_step, chain.anchor_index) == (2, 4, 4, 3)
    assert (chain.ledger_next_index, len(chain.history), chain.control_seeds) == (5, 4, (1000003, 1000004))
    written = chain.to_dict()
    assert list(written) == CHAIN_KEYS_07
    for key in CHAIN_KEYS_07:
        if isinstance(state[key], torch.Tensor):
            assert torch.equal(written[key], state[key]), key
        else:
            assert written[key] == state[key], key
    face = FaceState.from_dict(state)
    assert face.step == 4 and face.model_rebuild == state["model_rebuild"] and face.unrecorded_saves == []
    # What is written now holds every 0.7 key (0.7 reads them with .get and ignores the one it does not know).
    assert list(face.to_dict())[:len(CHAIN_KEYS_07) + 2] == CHAIN_KEYS_07 + FACE_KEYS_07


def test_a_state_written_now_loads_with_weights_only_and_round_trips(tmp_path):
    chain = CustodyChain()
    chain.load_state_dict(_state_07())
    torch.save(chain.state_dict(), tmp_path / "state.pt")
    again = ChainState.from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert again.to_dict().keys() == chain.state().to_dict().keys()
    assert torch.equal(again.reference_features, chain.reference.features)
    assert again.history == chain.history and again.ledger_last_sha256 == chain.cursor.last_sha256


def test_a_0_7_checkpoint_resumes_with_this_version_and_its_chain_goes_on(tmp_path):
    run = _run_07(tmp_path)
    model = _model_07()
    monitor = SeedPrintsMonitor(every_n_steps=2, probe=ProbeSpec(**MADE_BY["probe"]), num_controls=2, save_dir=run)
    monitor.load_state_dict(_state_07())
    assert monitor.current_step == 4 and monitor.chain.cursor.next_index == 5
    resumed = monitor.start(model, step=4)
    assert resumed is not None and resumed.related is True and resumed.anchor_step == 4
    assert resumed.link.z - resumed.link.threshold > 10  # z 22 against 5.4 when written
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    for step in (5, 6):
        model(input_ids=data[:2], labels=data[:2]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(model, step)
    monitor.end(model)
    assert [h["event"] for h in monitor.history][4:] == ["resume", "interval", "interval"]
    assert all(h["related"] is True for h in monitor.history)
    audit = verify_chain(run)
    assert audit.ok and len(audit.records) == 8, audit.problems  # 0.7's 5 records, the resume link, steps 5 and 6


def test_seedprints_audit_chain_passes_the_0_7_run_directory_and_checkpoint(tmp_path):
    run = _run_07(tmp_path)
    assert seedprints_main(["audit", "--chain", str(run), "-q"]) == EXIT_OK
    assert seedprints_main(["audit", "--chain", str(run), str(V07 / "step4.pt"), "-q"]) == EXIT_OK


@pytest.mark.parametrize("change, says", [
    ({"ledger_next_index": "5"}, "'ledger_next_index' must be an int >= 0, got '5'"),
    ({"history": {"step": 1}}, "'history' must be a list of dicts"),
    ({"reference_features": [[0.0]]}, "'reference_features' must be a torch.Tensor [n, D] or None"),
    ({"anchor_step": None}, "anchor_features without an anchor_step"),
    ({"warned_birth": 1}, "'warned_birth' must be True or False, got 1"),
    ({"step": -2}, "'step' must be an int >= 0 or None, got -2"),
    ({"format_version": STATE_FORMAT_VERSION + 1}, "upgrade the package"),
])
def test_a_damaged_state_is_refused_naming_the_key(change, says):
    with pytest.raises(InputError) as raised:
        FaceState.from_dict({**_state_07(), **change})
    assert says in str(raised.value)


def test_a_format_1_state_still_loads_and_restarts_its_schedule_at_the_reference():
    state = {key: value for key, value in _state_07().items()
             if key not in ("anchor_features", "anchor_step", "anchor_index", "next_probe_step", "interval",
                            "ledger_next_index", "ledger_last_sha256", "warned_birth")}
    state["format_version"] = 1
    chain = ChainState.from_dict(state)
    assert chain.anchor_features is None and chain.next_probe_step is None and chain.ledger_next_index == 0
    assert "next_probe_step" not in chain.to_dict()  # a format-1 reader looks for the key, not for a value
    restored = CustodyChain()
    restored.load_state_dict(state)
    assert restored.anchor is None and restored.next_probe_step == 4 + restored.schedule.every_n_steps
