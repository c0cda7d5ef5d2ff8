"""Every face's own documented checkpoint save is bound: `seedprints audit --chain RUN CKPT` names it (issue 27 item 4).

Each face saves exactly as docs/loops.md (and its docstring) says, and the audit must answer "CKPT holds exactly
the weights saved at step S", never "no recorded save has these weights":

* Lightning: a ``.ckpt`` written by ``ModelCheckpoint`` (weights under ``model.``);
* HF Trainer: the ``checkpoint-N`` directory the Trainer writes;
* Fabric: ``fabric.save(path, {"model": model, "optimizer": optimizer, "seedprints": callback})``;
* own loop: ``torch.save({"model": model.state_dict(), "seedprints": monitor.state_dict()})``, with and without
  the model passed (the model IS the transformers model: its recorded weights prefix is "", which 0.7 read as
  "model." and so left ``lm_head.weight`` out of the digest);
* a ``save_pretrained`` copy of the same weights.

And a face never stops the user's save (issue 27, "misleading"): a ledger that cannot take the save record
(a read-only or full run directory) warns, lists the save in the state's ``unrecorded_saves``, and the save
goes on; HF's ``seedprints_state.pt`` is written whole or not at all.

Sizes: the conftest tiny LLaMA, token probes n = 100, L = 8, 1 control: the digests are exact (sha256), so no
statistical margin is involved; the lineage verdicts have margins of more than 25 in z (tests/test_resume_spec.py).
"""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TOKENS, lm_step, make_tiny_lm

from seedprints_lightning import ProbeSpec, verify_chain
from seedprints_lightning.core.errors import IdentityWarning
from seedprints_lightning.core.ledger import CustodyLedger
from seedprints_lightning.core.state import UNRECORDED_SAVES_KEY
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline.cli import EXIT_OK
from seedprints_lightning.offline.cli import main as seedprints_main

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning", "ignore::UserWarning:lightning",
                                         "ignore::UserWarning:lightning_fabric",
                                         "ignore:.*does not have many workers.*", "ignore:.*LitLogger.*")]

SPEC = ProbeSpec(num_samples=100, length=8)
DATA = TOKENS
UNWRITTEN = "could not be written to the custody ledger"




def _weights_audit(run_dir: Path, checkpoint: Path, capsys) -> dict:
    """``audit --chain RUN CKPT --json``: exit 0, and its ``checkpoint_weights`` part."""
    capsys.readouterr()
    code = seedprints_main(["audit", "--chain", str(run_dir), str(checkpoint), "--device", "cpu", "-q", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK, data["problems"]
    return data["checkpoint_weights"]


def _saved_steps(run_dir: Path, checkpoint: Path, capsys) -> list[int]:
    return [save["step"] for save in _weights_audit(run_dir, checkpoint, capsys)["saved_at"]]


def _unwritten(caught) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, IdentityWarning) and UNWRITTEN in str(w.message)]


# ---------------------------------------------------------------------- own loop: SeedPrintsMonitor
def _monitor_run(tmp_path: Path, steps: int = 4):
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = SeedPrintsMonitor(every_n_steps=4, probe=SPEC, num_controls=1, save_dir=tmp_path / "seedprints")
    monitor.start(model)
    for step in range(1, steps + 1):
        lm_step(model, optimizer, step)
        monitor.step(model, step)
    return model, optimizer, monitor


@pytest.mark.parametrize("pass_model", [True, False], ids=["state_dict(model)", "state_dict()"])
def test_a_monitor_checkpoint_saved_as_documented_is_the_recorded_save(tmp_path, capsys, pass_model):
    model, optimizer, monitor = _monitor_run(tmp_path)
    seedprints = monitor.state_dict(model) if pass_model else monitor.state_dict()  # docstring / docs/loops.md
    torch.save({"model": model.state_dict(), "seedprints": seedprints}, tmp_path / "last.pt")
    monitor.end(model)
    assert seedprints["model_rebuild"]["state_dict_prefix"] == ""  # the saved module is the LM itself
    run_dir = tmp_path / "seedprints"
    found = _weights_audit(run_dir, tmp_path / "last.pt", capsys)
    assert [s["step"] for s in found["saved_at"]] == [4], found["message"]
    assert "holds exactly the weights saved at step 4" in found["message"]
    # A save_pretrained copy of the same weights is the same save.
    model.save_pretrained(tmp_path / "exported")
    assert _saved_steps(run_dir, tmp_path / "exported", capsys) == [4]
    # Weights one step later are not that save (it still descends from the chain: exit 0).
    lm_step(model, optimizer, 5)
    torch.save({"model": model.state_dict(), "seedprints": seedprints}, tmp_path / "later.pt")
    assert _saved_steps(run_dir, tmp_path / "later.pt", capsys) == []


# ---------------------------------------------------------------------- Fabric: fabric.save
def test_a_fabric_save_is_the_recorded_save(tmp_path, capsys):
    from lightning.fabric import Fabric

    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC, num_controls=1, save_dir=tmp_path / "seedprints")
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    model = make_tiny_lm(0).train()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    for step in range(1, 5):
        batch = DATA[step * 4:step * 4 + 4]
        fabric.backward(model(input_ids=batch, labels=batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    fabric.save(tmp_path / "last.ckpt", {"model": model, "optimizer": optimizer, "seedprints": callback})
    callback.end()
    assert _saved_steps(tmp_path / "seedprints", tmp_path / "last.ckpt", capsys) == [4]


# ---------------------------------------------------------------------- HF Trainer: checkpoint-N
class _TokenData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(DATA)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": DATA[index], "labels": DATA[index]}


def _hf_trainer(out: Path, callback, max_steps: int = 4):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             logging_steps=1000, report_to="none", save_strategy="steps", save_steps=4,
                             use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=make_tiny_lm(0).train(), args=args, train_dataset=_TokenData(), callbacks=[callback])


def test_an_hf_trainer_checkpoint_directory_is_the_recorded_save(tmp_path, capsys):
    from seedprints_lightning import SeedPrintsTrainerCallback

    _hf_trainer(tmp_path, SeedPrintsTrainerCallback(every_n_steps=4, probe=SPEC, num_controls=1)).train()
    assert _saved_steps(tmp_path / "seedprints", tmp_path / "checkpoint-4", capsys) == [4]
    # on_save binds once: the state beside the checkpoint holds the ledger head including its own save record.
    saves = [r for r in verify_chain(tmp_path / "seedprints").records if r.get("kind") == "save"]
    assert [r["checkpoint"] for r in saves] == ["checkpoint-4"]
    state = torch.load(tmp_path / "checkpoint-4" / "seedprints_state.pt", weights_only=True)
    assert state["ledger_next_index"] == saves[-1]["index"] + 1 and state[UNRECORDED_SAVES_KEY] == []


# ---------------------------------------------------------------------- Lightning: ModelCheckpoint
def _lightning_module():
    import pytorch_lightning as pl

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_tiny_lm(0).train()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    return TinyLM()


def _lightning_fit(root: Path, callback, max_steps: int = 4):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=str(root / "ckpts"), every_n_train_steps=4, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False,
                         default_root_dir=str(root), callbacks=[callback, checkpoints], max_steps=max_steps)
    trainer.fit(_lightning_module(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(DATA), batch_size=4))
    return sorted((root / "ckpts").glob("*.ckpt"))


def test_a_lightning_model_checkpoint_file_is_the_recorded_save(tmp_path, capsys):
    from seedprints_lightning import SeedPrintsCallback

    callback = SeedPrintsCallback(every_n_steps=4, probe=SPEC, num_controls=1, save_dir=tmp_path / "seedprints")
    (ckpt,) = _lightning_fit(tmp_path, callback)
    assert _saved_steps(tmp_path / "seedprints", ckpt, capsys) == [4]


# ---------------------------------------------------------------------- a face never stops the user's save
@pytest.fixture()
def unwritable_ledger(monkeypatch):
    """Every save record's write fails as on a read-only directory (PermissionError from the ledger's append)."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(CustodyLedger, "record_save", refuse)


def test_a_monitor_save_goes_on_when_the_ledger_cannot_take_its_record(tmp_path, capsys, unwritable_ledger):
    model, optimizer, monitor = _monitor_run(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seedprints = monitor.state_dict(model)  # 0.7: PermissionError, and the user's torch.save never ran
    torch.save({"model": model.state_dict(), "seedprints": seedprints}, tmp_path / "last.pt")
    (message,) = _unwritten(caught)
    assert "step 4" in message and "PermissionError" in message and "unrecorded_saves" in message
    (unrecorded,) = seedprints[UNRECORDED_SAVES_KEY]
    assert unrecorded["step"] == 4 and unrecorded["error"].startswith("PermissionError")
    assert len(unrecorded["weights_sha256"]) == 64
    # The chain goes on and stays intact: the record was never chained, nothing is torn or renumbered.
    for step in range(5, 7):
        lm_step(model, optimizer, step)
        monitor.step(model, step)
    monitor.end(model)
    audit = verify_chain(tmp_path / "seedprints")
    assert audit.ok and audit.saves == [], audit.problems
    found = _weights_audit(tmp_path / "seedprints", tmp_path / "last.pt", capsys)
    assert found["saved_at"] == [] and "records no checkpoint save" in found["message"]
    # The list survives a resume (a later checkpoint still says which saves the ledger does not bind).
    again = SeedPrintsMonitor(every_n_steps=4, probe=SPEC, num_controls=1, save_dir=tmp_path / "seedprints")
    again.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["seedprints"])
    assert again.state_dict()[UNRECORDED_SAVES_KEY] == [unrecorded]


def test_a_monitor_save_goes_on_over_a_really_read_only_run_directory(tmp_path):
    """The run directory turned read-only mid-run: a read-only bind mount over itself (needs CAP_SYS_ADMIN, else
    skipped; the injected PermissionError above covers every machine). Files the run already holds open stay
    writable through their descriptors; every new open, the ledger's append included, gets EROFS."""
    model, _, monitor = _monitor_run(tmp_path)
    run_dir = tmp_path / "seedprints"
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(run_dir), str(run_dir)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here ({mounted.stderr.decode(errors='replace').strip()})")
    try:
        if _is_writable(run_dir):
            pytest.skip("the read-only bind mount did not take effect")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seedprints = monitor.state_dict(model)
        torch.save({"model": model.state_dict(), "seedprints": seedprints}, tmp_path / "last.pt")
        (message,) = _unwritten(caught)
        assert "Read-only file system" in message
        assert seedprints[UNRECORDED_SAVES_KEY][0]["step"] == 4
    finally:
        monitor.close()
        if subprocess.run(["umount", str(run_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(run_dir)], capture_output=True)  # never leave the mount behind
    assert (tmp_path / "last.pt").is_file() and verify_chain(run_dir).ok  # the ledger as it was: intact


def _is_writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_a_fabric_save_goes_on_when_the_ledger_cannot_take_its_record(tmp_path, unwritable_ledger):
    from lightning.fabric import Fabric

    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC, num_controls=1, save_dir=tmp_path / "seedprints")
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    model = make_tiny_lm(0).train()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    batch = DATA[:4]
    fabric.backward(model(input_ids=batch, labels=batch).loss)
    optimizer.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fabric.save(tmp_path / "last.ckpt", {"model": model, "optimizer": optimizer, "seedprints": callback})
    callback.end()
    assert len(_unwritten(caught)) == 1
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert [s["step"] for s in saved["seedprints"][UNRECORDED_SAVES_KEY]] == [1] and "model" in saved


def test_an_hf_trainer_save_goes_on_when_the_ledger_or_the_state_file_cannot_be_written(tmp_path, monkeypatch,
                                                                                         unwritable_ledger):
    from seedprints_lightning import SeedPrintsTrainerCallback

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = SeedPrintsTrainerCallback(every_n_steps=4, probe=SPEC, num_controls=1)
        _hf_trainer(tmp_path / "ledger", callback).train()
    assert len(_unwritten(caught)) == 1
    state = torch.load(tmp_path / "ledger" / "checkpoint-4" / "seedprints_state.pt", weights_only=True)
    assert [s["checkpoint"] for s in state[UNRECORDED_SAVES_KEY]] == ["checkpoint-4"]
    # The disk fills while seedprints_state.pt is written: a warning, no partial file, the Trainer's save stands.
    import seedprints_lightning.faces.hf as hf_face  # the face writes its state through its own atomic_write

    real_atomic_write = hf_face.atomic_write

    def full_disk(path, write):
        if Path(path).name != "seedprints_state.pt":  # the run's own files (reference, controls) are written
            return real_atomic_write(path, write)

        def cut_short(tmp: Path) -> None:
            tmp.write_bytes(b"PK partial")  # what a write the disk cut short leaves
            raise OSError(28, "No space left on device")

        return real_atomic_write(path, cut_short)

    monkeypatch.setattr(hf_face, "atomic_write", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = SeedPrintsTrainerCallback(every_n_steps=4, probe=SPEC, num_controls=1)
        _hf_trainer(tmp_path / "full", callback).train()
    monkeypatch.undo()
    messages = [str(w.message) for w in caught if "could not write" in str(w.message)]
    assert len(messages) == 1 and "No space left on device" in messages[0]
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "seedprints_state.pt").exists()
    assert [p.name for p in checkpoint.iterdir() if p.name.startswith(".seedprints_state")] == []


@pytest.mark.slow
def test_a_lightning_save_goes_on_when_the_ledger_cannot_take_its_record(tmp_path, unwritable_ledger):
    from seedprints_lightning import SeedPrintsCallback

    callback = SeedPrintsCallback(every_n_steps=4, probe=SPEC, num_controls=1, save_dir=tmp_path / "seedprints")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (ckpt,) = _lightning_fit(tmp_path, callback)
    assert len(_unwritten(caught)) == 1
    state = torch.load(ckpt, weights_only=True)["callbacks"][callback.state_key]
    assert [s["step"] for s in state[UNRECORDED_SAVES_KEY]] == [4]
    assert verify_chain(tmp_path / "seedprints").ok
