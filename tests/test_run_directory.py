"""A run directory belongs to one run: no second run, no second writer, no lost evidence, no late failure.

Each test drives :class:`~seedprints_lightning.faces.monitor.SeedPrintsMonitor` (the fastest face; every
face opens its run directory through the same ``open_chain``) on the conftest tiny LLaMA with the
sizes of test_monitor.py (token probes n = 200, L = 8, 2 controls, lr 3e-3: own links of a few
steps at z 60-90 against thresholds of 5-8).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_lm

from seedprints_lightning import InputError, ProbeSpec, verify_chain
from seedprints_lightning.core.errors import IdentityWarning
from seedprints_lightning.core.files import file_sha256
from seedprints_lightning.core.ledger import LOCK_FILE, check_save_dir
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline.cli import EXIT_OK, EXIT_TAMPERED
from seedprints_lightning.offline.cli import main as seedprints_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=200, length=8)
DATA = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))


def _monitor(run_dir: Path, **kwargs) -> SeedPrintsMonitor:
    return SeedPrintsMonitor(**{**dict(every_n_steps=4, probe=SPEC, num_controls=2, save_dir=run_dir), **kwargs})


class Run:
    """A model, its optimizer and a monitor writing ``run_dir``; ``shift`` changes the batches (another branch)."""

    def __init__(self, run_dir: Path, seed: int = 0, state: dict | None = None, shift: int = 0):
        self.model = make_tiny_lm(seed).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.monitor = _monitor(run_dir)
        self.shift, self.step = shift, 0
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.monitor.load_state_dict(state["seedprints"])
            self.step = int(state["seedprints"]["step"])

    def start(self):
        return self.monitor.start(self.model, self.step)

    def train(self, last: int) -> None:
        for step in range(self.step + 1, last + 1):
            start = (step * 4 + self.shift) % 60
            batch = DATA[start:start + 4]
            self.model(input_ids=batch, labels=batch).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.monitor.step(self.model, step)
            self.step = step

    def save(self, path: Path) -> dict:
        state = {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "seedprints": self.monitor.state_dict()}
        torch.save(state, path)
        return torch.load(path, weights_only=True)


def _finished_run(run_dir: Path, steps: int, seed: int = 0) -> Run:
    run = Run(run_dir, seed)
    run.start()
    run.train(steps)
    run.monitor.end(run.model)
    return run


def _ledger(run_dir: Path, name: str = "custody.jsonl") -> list[dict]:
    """The probe records of a ledger file (``Run.save`` also binds each save: those records are left out)."""
    records = [json.loads(line) for line in (run_dir / name).read_text(encoding="utf-8").splitlines()]
    return [record for record in records if record.get("kind") is None]


# ---------------------------------------------------------------------- 1. one run per directory
def test_a_new_run_refuses_a_directory_that_holds_another_runs_ledger_or_reference(tmp_path):
    run_dir = tmp_path / "seedprints"
    _finished_run(run_dir, 4)
    before = {p.relative_to(run_dir): file_sha256(p) for p in run_dir.rglob("*") if p.is_file()}
    other = Run(run_dir, seed=5)  # another run, from its own step 0, into the same save_dir
    with pytest.raises(InputError, match=rf"{run_dir}.*another run's custody ledger.*4 records.*save_dir=.*"
                                         r"remove or move"):
        other.start()
    after = {p.relative_to(run_dir): file_sha256(p) for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # nothing of run A was touched: its reference, its ledger, its probes
    assert verify_chain(run_dir).ok
    # A directory holding only another run's reference (it never probed) is refused too.
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "reference.safetensors", lone / "reference.safetensors")
    with pytest.raises(InputError, match=r"another run's reference reference\.safetensors.*save_dir="):
        Run(lone, seed=5).start()
    assert file_sha256(lone / "reference.safetensors") == before[Path("reference.safetensors")]


# ---------------------------------------------------------------------- 2. one writer per ledger
_HOLDER = """
import os, signal, sys
from seedprints_lightning.core.ledger import RunDirectory
lock = RunDirectory(sys.argv[1]).lock()
print("locked", flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)  # a crash: no clean-up at all
"""


def _saved_at(run_dir: Path, steps: int, path: Path):
    """A run started in ``run_dir``, trained ``steps`` steps, and its checkpoint saved at ``path``: ``(run, state)``."""
    run = Run(run_dir)
    run.start()
    run.train(steps)
    return run, run.save(path)


def test_two_writers_never_share_a_ledger(tmp_path):
    run_dir = tmp_path / "seedprints"
    first, state = _saved_at(run_dir, 4, tmp_path / "step4.pt")
    # The same run resumed by a second face object while the first still writes: refused, nothing appended.
    with pytest.raises(InputError, match=rf"{run_dir}: another process is writing this run .*{LOCK_FILE}"):
        Run(run_dir, state=state).start()
    first.train(6)  # the first writer goes on undisturbed
    assert [r["step"] for r in _ledger(run_dir)] == [1, 2, 3, 4, 5, 6]
    first.monitor.end(first.model)  # releases the lock
    resumed = Run(run_dir, state=state)  # resumed from step 4: steps 5-6 become an abandoned branch
    with pytest.warns(IdentityWarning, match="abandoned branch"):
        resumed.start()
    resumed.monitor.end(resumed.model)
    # A face object dropped without end() (a crash simulated in this process) frees the lock once collected.
    dropped = Run(run_dir, state=resumed.save(tmp_path / "resumed.pt"))
    dropped.start()
    dropped.cycle = dropped  # only the garbage collector can free it
    del dropped
    again = Run(run_dir, state=torch.load(tmp_path / "resumed.pt", weights_only=True))
    again.start()
    again.monitor.end(again.model)

    # Another process holds the lock: refused; once it dies (SIGKILL) the OS has released it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match="another process is writing this run"):
            Run(run_dir, state=torch.load(tmp_path / "resumed.pt", weights_only=True)).start()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == -9
    finally:
        holder.kill()
    last = Run(run_dir, state=torch.load(tmp_path / "resumed.pt", weights_only=True))
    last.start()
    last.train(6)
    last.monitor.end(last.model)
    assert verify_chain(run_dir).ok


# ---------------------------------------------------------------------- 3. abandoned branches stay whole
def test_an_abandoned_branch_keeps_every_file_and_verifies_on_its_own(tmp_path, capsys):
    run_dir = tmp_path / "seedprints"
    first, state = _saved_at(run_dir, 4, tmp_path / "step4.pt")
    first.train(8)
    first.monitor.end(first.model)
    branch = _ledger(run_dir)
    assert [r["step"] for r in branch] == [1, 2, 3, 4, 5, 6, 7, 8]
    branch_files = {r["features_file"]: r["features_sha256"] for r in branch}

    resumed = Run(run_dir, state=state, shift=2)  # resumed from step 4, on other batches: other weights
    with pytest.warns(IdentityWarning, match=r"custody\.abandoned-0\.jsonl.*--ledger custody\.abandoned-0\.jsonl"):
        resumed.start()
    resumed.train(8)
    resumed.monitor.end(resumed.model)
    current = _ledger(run_dir)
    assert [(r["step"], r["event"]) for r in current][3:6] == [(4, "interval"), (4, "resume"), (5, "interval")]
    # The abandoned file is the whole branch: the 4 records it shares with the ledger, then its own 4.
    assert _ledger(run_dir, "custody.abandoned-0.jsonl") == branch
    assert current[:4] == branch[:4]
    # No file of the branch was overwritten by the resumed run's probes at the same index and step.
    assert {r["features_file"] for r in current[4:]}.isdisjoint(branch_files)
    assert all(file_sha256(run_dir / name) == sha for name, sha in branch_files.items())
    assert verify_chain(run_dir).ok
    abandoned = verify_chain(run_dir, ledger="custody.abandoned-0.jsonl")
    # 9 records: the branch's 8 probes and the save record of step4.pt.
    assert abandoned.ok and len(abandoned.records) == 9, abandoned.problems
    assert seedprints_main(["audit", "--chain", str(run_dir), "--ledger", "custody.abandoned-0.jsonl", "-q"]) == EXIT_OK
    assert "9 records, every link held" in capsys.readouterr().out


# ---------------------------------------------------------------------- 4. a resume that lost its evidence
def test_a_resume_whose_ledger_was_deleted_warns_and_continues_in_a_ledger_that_names_the_loss(tmp_path, capsys):
    run_dir = tmp_path / "seedprints"
    first, state = _saved_at(run_dir, 6, tmp_path / "step6.pt")
    first.monitor.end(first.model)
    lost_head = state["seedprints"]["ledger_last_sha256"]
    assert state["seedprints"]["ledger_next_index"] == 7  # 6 probes and the save record of step6.pt
    shutil.rmtree(run_dir)  # the seedprints directory is deleted before the resume

    resumed = Run(run_dir, state=state)
    with pytest.warns(IdentityWarning) as caught:
        verdict = resumed.start()
    lost = [str(w.message) for w in caught if "holds no custody ledger" in str(w.message)]
    assert len(lost) == 1 and str(run_dir) in lost[0] and "had 7 records" in lost[0] and lost_head in lost[0]
    assert verdict is not None and verdict.related is True  # the loaded weights still link to the chain's anchor
    resumed.train(10)
    after = resumed.save(tmp_path / "step10.pt")
    resumed.monitor.end(resumed.model)
    records = _ledger(run_dir)
    assert [r["index"] for r in records] == list(range(len(records)))  # numbered from 0: verifies on its own
    assert records[0]["event"] == "resume" and records[0]["anchor_step"] == 6
    audit = verify_chain(run_dir)
    assert audit.ok, audit.problems
    assert "CONTINUES A LOST CHAIN" in audit.evidence and "7 records" in audit.evidence and lost_head in audit.evidence
    assert audit.continues_lost_chain == {"records": 7, "head_sha256": lost_head, "resumed_at_step": 6}
    # A checkpoint from before the loss: the audit says what happened, not "removed from the end".
    code = seedprints_main(["audit", "--chain", str(run_dir), str(tmp_path / "step6.pt"), "-q"])
    out = capsys.readouterr().out
    assert code == EXIT_TAMPERED
    assert ("the checkpoint chained to record 6 of a ledger this directory no longer holds (lost before the resume "
            "at step 6") in out
    assert "removed from the end" not in out
    # A checkpoint from after the resume belongs to the new ledger.
    assert seedprints_main(["audit", "--chain", str(run_dir), str(tmp_path / "step10.pt"), "-q"]) == EXIT_OK
    # And that ledger resumes like any other: no second loss is reported.
    again = Run(run_dir, state=after)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdentityWarning)
        again.start()
    again.train(12)
    again.monitor.end(again.model)
    assert verify_chain(run_dir).ok


def test_a_resume_whose_ledger_lacks_the_checkpoints_head_is_refused(tmp_path):
    run_dir = tmp_path / "seedprints"
    first, state = _saved_at(run_dir, 6, tmp_path / "step6.pt")
    first.monitor.end(first.model)
    lines = (run_dir / "custody.jsonl").read_text(encoding="utf-8").splitlines()
    (run_dir / "custody.jsonl").write_text("".join(line + "\n" for line in lines[:3]), encoding="utf-8")
    with pytest.raises(InputError, match=r"holds 3 records but this run's checkpoint chained to record 6.*move "
                                         rf"{run_dir} away"):
        Run(run_dir, state=state).start()
    assert (run_dir / "custody.jsonl").read_text(encoding="utf-8").splitlines() == lines[:3]  # left as it was
    assert not list(run_dir.glob("custody.abandoned-*"))


# ---------------------------------------------------------------------- 5. save_dir checked at construction
def test_save_dir_is_checked_at_construction(tmp_path, monkeypatch):
    from seedprints_lightning import SeedPrintsCallback

    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    for face in (SeedPrintsMonitor, SeedPrintsCallback):
        with pytest.raises(InputError, match=rf"save_dir='{a_file}' exists and is not a directory.*Pass another path"):
            face(save_dir=a_file)
        with pytest.raises(InputError, match=rf"cannot be created: {a_file} is a file, not a directory"):
            face(save_dir=a_file / "seedprints")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    with pytest.raises(InputError, match=rf"save_dir='{tmp_path / 'new' / 'seedprints'}' is not writable: its "
                                         rf"nearest existing parent {tmp_path} .*fix its permissions"):
        SeedPrintsMonitor(save_dir=tmp_path / "new" / "seedprints")
    with pytest.raises(InputError, match="is not writable: it does not let this process create files"):
        check_save_dir(tmp_path)
    monkeypatch.undo()
    assert check_save_dir(tmp_path / "new" / "seedprints") == tmp_path / "new" / "seedprints"  # creatable: fine
