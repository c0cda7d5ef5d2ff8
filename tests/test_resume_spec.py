"""A resume whose face asks for another ProbeSpec than its restored chain: one rule for every face (issue 27 item 2).

The rule: the chain's spec wins (the run's reference and every recorded probe were taken with it), and the
face warns ONCE, naming both specs and the fix. Each face is run with token probes n = 100 (SPEC_A), saved the
way its README section says, and resumed constructed with n = 150 (SPEC_B): the warning names both, every later
probe record of the ledger has n = 100, and ``seedprints audit --chain`` exits 0. The Lightning face must find
its state under the other spec's state_key, unless another callback of the Trainer claims it.

Sizes: the conftest tiny LLaMA (hidden 32), L = 8, 1-2 controls, lr 3e-3. test_monitor.py measures own links
at z 60-90 for n = 200 against thresholds of 5-8; at n = 100 (z ~ sqrt(n)) they stand near 40-65, so "every
link held" has a margin of more than 25 in z.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import TOKENS, lm_step, make_tiny_lm

from seedprints_lightning import InputError, ProbeSpec, verify_chain
from seedprints_lightning.core.errors import IdentityWarning
from seedprints_lightning.core.opening import probe_spec_differs
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline.cli import EXIT_OK
from seedprints_lightning.offline.cli import main as seedprints_main

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning", "ignore::UserWarning:lightning",
                                         "ignore::UserWarning:lightning_fabric",
                                         "ignore:.*does not have many workers.*", "ignore:.*LitLogger.*")]

SPEC_A = ProbeSpec(num_samples=100, length=8)
SPEC_B = ProbeSpec(num_samples=150, length=8)
DATA = TOKENS
SPEC_WARNING = "was constructed with probe="




def _spec_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, IdentityWarning) and SPEC_WARNING in str(w.message)]


def _assert_names_both_specs(message: str, face: str) -> None:
    assert f"{face} was constructed with probe={SPEC_B!r}" in message
    assert "n=150" in message and "n=100" in message  # both specs, in words
    assert f"probe={ProbeSpec(num_samples=100, length=8, vocab_size=64)!r}" in message  # the fix: the chain's spec
    assert "new save_dir" in message  # the other fix: a new run for a new spec


def _probe_ns(run_dir: Path) -> list[tuple[int, int]]:
    """``(step, n)`` of every probe record of the run's ledger, in order."""
    return [(r["step"], r["link"]["n"]) for r in verify_chain(run_dir).records if r.get("kind") != "save"]


def _audit_ok(run_dir: Path) -> None:
    assert seedprints_main(["audit", "--chain", str(run_dir), "-q"]) == EXIT_OK


# ---------------------------------------------------------------------- the rule itself
def test_only_the_fields_the_face_sets_are_compared():
    resolved = SPEC_A.resolve(make_tiny_lm(0))
    assert not probe_spec_differs(SPEC_A, resolved)  # vocab_size left to the model: asks for nothing
    assert probe_spec_differs(SPEC_B, resolved)
    assert probe_spec_differs(ProbeSpec(num_samples=100, length=8, vocab_size=32), resolved)
    assert probe_spec_differs(None, resolved)  # None is ProbeSpec(): n = 512, L = 32
    assert not probe_spec_differs(None, ProbeSpec().resolve(make_tiny_lm(0)))


# ---------------------------------------------------------------------- SeedPrintsMonitor (own loop)
def _monitor_run(tmp_path) -> Path:
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = SeedPrintsMonitor(every_n_steps=4, probe=SPEC_A, num_controls=1, save_dir=tmp_path / "seedprints")
    monitor.start(model)
    for step in range(1, 5):
        lm_step(model, optimizer, step)
        monitor.step(model, step)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 4,
                "seedprints": monitor.state_dict(model)}, tmp_path / "last.pt")
    monitor.close()
    return tmp_path / "last.pt"


@pytest.mark.parametrize("asked", [SPEC_B, None, SPEC_A], ids=["other-spec", "probe-None", "same-spec"])
def test_monitor_resumed_with_another_spec_warns_once_and_keeps_the_chains_spec(tmp_path, asked):
    saved = torch.load(_monitor_run(tmp_path), weights_only=True)
    model = make_tiny_lm(3).train()
    model.load_state_dict(saved["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    optimizer.load_state_dict(saved["optimizer"])
    monitor = SeedPrintsMonitor(every_n_steps=4, probe=asked, num_controls=1, save_dir=tmp_path / "seedprints")
    monitor.load_state_dict(saved["seedprints"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert monitor.start(model, step=4).related is True
        for step in range(5, 9):
            lm_step(model, optimizer, step)
            monitor.step(model, step)
        monitor.end(model)
    found = _spec_warnings(caught)
    if asked is SPEC_A:
        assert found == []  # the same spec (vocab_size left to the model) asks for nothing new
    elif asked is None:
        assert len(found) == 1 and "probe=None (the default ProbeSpec(" in found[0] and "n=100" in found[0]
    else:
        assert len(found) == 1  # once, not at every probe
        _assert_names_both_specs(found[0], "SeedPrintsMonitor")
        assert "load_state_dict()" in found[0]  # where the chain came from
    ns = _probe_ns(tmp_path / "seedprints")
    assert [step for step, _ in ns][-5:] == [4, 5, 6, 7, 8] and {n for _, n in ns} == {100}  # the chain's n, all along
    assert monitor.reference.spec.num_samples == 100 and all(h["related"] is True for h in monitor.history)
    _audit_ok(tmp_path / "seedprints")


# ---------------------------------------------------------------------- SeedPrintsFabricCallback
def _fabric(root: Path, callback, seed: int = 0):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback])
    model = make_tiny_lm(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    return fabric, model, optimizer


def _fabric_steps(fabric, callback, model, optimizer, steps: int) -> None:
    for _ in range(steps):
        step = (callback.current_step or 0) + 1
        lm_step(model, optimizer, step, fabric.backward)


def test_fabric_resumed_with_another_spec_warns_once_and_keeps_the_chains_spec(tmp_path):
    from seedprints_lightning import SeedPrintsFabricCallback

    run_dir = tmp_path / "seedprints"
    first = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC_A, num_controls=1, save_dir=run_dir)
    fabric, model, optimizer = _fabric(tmp_path, first)
    _fabric_steps(fabric, first, model, optimizer, 4)
    fabric.save(tmp_path / "last.ckpt", {"model": model, "optimizer": optimizer, "seedprints": first})
    first.close()

    second = SeedPrintsFabricCallback(every_n_steps=4, probe=SPEC_B, num_controls=1, save_dir=run_dir)
    fabric, model, optimizer = _fabric(tmp_path, second, seed=3)
    fabric.load(tmp_path / "last.ckpt", {"model": model, "optimizer": optimizer, "seedprints": second})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fabric_steps(fabric, second, model, optimizer, 4)
        second.end()
    found = _spec_warnings(caught)
    assert len(found) == 1
    _assert_names_both_specs(found[0], "SeedPrintsFabricCallback")
    ns = _probe_ns(run_dir)
    assert [step for step, _ in ns][-5:] == [4, 5, 6, 7, 8] and {n for _, n in ns} == {100}
    assert all(h["related"] is True for h in second.history)
    _audit_ok(run_dir)


# ---------------------------------------------------------------------- SeedPrintsTrainerCallback (HF Trainer)
class _TokenData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(DATA)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": DATA[index], "labels": DATA[index]}


def _hf_trainer(out: Path, callback, max_steps: int, seed: int = 0):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             logging_steps=1000, report_to="none", save_strategy="steps", save_steps=4,
                             use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=make_tiny_lm(seed).train(), args=args, train_dataset=_TokenData(), callbacks=[callback])


def test_hf_trainer_resumed_with_another_spec_warns_once_and_keeps_the_chains_spec(tmp_path):
    from seedprints_lightning import SeedPrintsTrainerCallback

    _hf_trainer(tmp_path, SeedPrintsTrainerCallback(every_n_steps=4, probe=SPEC_A, num_controls=1), 4).train()
    again = SeedPrintsTrainerCallback(every_n_steps=4, probe=SPEC_B, num_controls=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _hf_trainer(tmp_path, again, 8, seed=3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    found = _spec_warnings(caught)
    assert len(found) == 1
    _assert_names_both_specs(found[0], "SeedPrintsTrainerCallback")
    ns = _probe_ns(tmp_path / "seedprints")
    assert [step for step, _ in ns][-5:] == [4, 5, 6, 7, 8] and {n for _, n in ns} == {100}
    assert all(h["related"] is True for h in again.history)
    _audit_ok(tmp_path / "seedprints")


# ---------------------------------------------------------------------- SeedPrintsCallback (Lightning)
def _lightning_module(seed: int = 0):
    import pytorch_lightning as pl

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_tiny_lm(seed).train()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    return TinyLM()


def _lightning_fit(root: Path, callbacks, max_steps: int, ckpt_path: Path | None = None):
    import pytorch_lightning as pl

    trainer = pl.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, logger=False,
                         enable_checkpointing=False, default_root_dir=str(root), callbacks=list(callbacks),
                         max_steps=max_steps)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(DATA), batch_size=4, shuffle=False)
    trainer.fit(_lightning_module(), data, ckpt_path=ckpt_path)
    return trainer


def _lightning_callback(probe, save_dir: Path, **kwargs):
    from seedprints_lightning import SeedPrintsCallback

    return SeedPrintsCallback(every_n_steps=4, probe=probe, num_controls=1, adaptive_schedule=False,
                              save_dir=save_dir, **kwargs)


@pytest.mark.slow
def test_lightning_resumed_with_another_spec_adopts_the_state_under_the_other_key(tmp_path):
    run_dir = tmp_path / "seedprints"
    first = _lightning_callback(SPEC_A, run_dir)
    _lightning_fit(tmp_path, [first], 4).save_checkpoint(tmp_path / "a.ckpt")
    again = _lightning_callback(SPEC_B, run_dir)
    assert again.state_key != first.state_key  # the key is derived from the probe: a plain lookup misses it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _lightning_fit(tmp_path, [again], 8, ckpt_path=tmp_path / "a.ckpt")
    found = _spec_warnings(caught)
    assert len(found) == 1  # one warning: the adoption, naming both keys and both specs
    _assert_names_both_specs(found[0], "SeedPrintsCallback")
    assert repr(first.state_key) in found[0] and repr(again.state_key) in found[0]
    assert again.chain.restored and torch.equal(again.reference.features, first.reference.features)
    assert [(h["step"], h["event"]) for h in again.history][-2:] == [(4, "resume"), (8, "interval")]
    ns = _probe_ns(run_dir)
    assert [step for step, _ in ns] == [4, 4, 8] and {n for _, n in ns} == {100}
    assert all(h["related"] is True for h in again.history)
    _audit_ok(run_dir)


@pytest.mark.slow
def test_two_lightning_callbacks_keep_their_own_states_and_only_an_unclaimed_one_is_adopted(tmp_path):
    embedding_spec = ProbeSpec(kind="embedding", num_samples=100, length=8)
    token, embedding = _lightning_callback(SPEC_A, tmp_path / "token"), _lightning_callback(embedding_spec,
                                                                                            tmp_path / "embedding")
    _lightning_fit(tmp_path, [token, embedding], 4).save_checkpoint(tmp_path / "both.ckpt")
    # The token callback comes back with another spec, the embedding one with its own: the token state is the only
    # one no callback claims, so the token callback adopts it and the embedding callback keeps its own.
    token_b = _lightning_callback(SPEC_B, tmp_path / "token")
    embedding_again = _lightning_callback(embedding_spec, tmp_path / "embedding")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _lightning_fit(tmp_path, [token_b, embedding_again], 8, ckpt_path=tmp_path / "both.ckpt")
    assert len(_spec_warnings(caught)) == 1
    assert torch.equal(token_b.reference.features, token.reference.features)
    assert torch.equal(embedding_again.reference.features, embedding.reference.features)
    assert token_b.reference.spec.kind == "token" and embedding_again.reference.spec.kind == "embedding"
    for run_dir in (tmp_path / "token", tmp_path / "embedding"):
        _audit_ok(run_dir)
    # Two SeedPrints callbacks without their own states and two unclaimed states: which is whose cannot be told.
    one, two = _lightning_callback(SPEC_B, tmp_path / "c1"), _lightning_callback(
        ProbeSpec(kind="embedding", num_samples=150, length=8), tmp_path / "c2")
    with pytest.raises(InputError, match=r"which state belongs to which callback cannot be told"):
        _lightning_fit(tmp_path, [one, two], 8, ckpt_path=tmp_path / "both.ckpt")
    assert one.history == [] and two.history == [] and not one.chain.restored and not two.chain.restored


def test_lightning_adoption_skips_states_another_callback_claims(tmp_path):
    """No fit: on_load_checkpoint alone, on a checkpoint dict (the claim rule, quickly)."""
    from types import SimpleNamespace

    mine = _lightning_callback(SPEC_B, tmp_path / "mine")
    other = _lightning_callback(SPEC_A, tmp_path / "other")
    trainer = SimpleNamespace(callbacks=[mine, other], ckpt_path="x.ckpt", is_global_zero=True)
    state = {"format_version": 2, "reference_features": torch.zeros(100, 32), "reference_meta": None}
    mine.on_load_checkpoint(trainer, None, {"callbacks": {other.state_key: state}})  # other's own: not adopted
    assert not mine.chain.restored
    mine.on_load_checkpoint(trainer, None, {"callbacks": {"ModelCheckpoint{}": {"best": 1}}})  # not a SeedPrints state
    assert not mine.chain.restored and mine.reference is None
