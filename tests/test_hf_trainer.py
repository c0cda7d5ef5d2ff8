"""SeedPrintsTrainerCallback in a Hugging Face ``transformers.Trainer`` run, on CPU.

A healthy run keeps every link and its ledger verifies; a swap is caught at the next probe
(``raise`` and ``stop``); ``trainer.train(resume_from_checkpoint=...)`` continues the chain from
the state the callback wrote beside ``checkpoint-N/`` and the checkpoint is auditable; the
weights end bit-identical with and without the callback. Under ``torchrun`` with 2 CPU processes
(gloo) each rank probes half the samples, both ranks see the same figures, and a swap raises on
every rank.

Sizes: the conftest tiny LLaMA (hidden 32), token probes n = 200, L = 8, 2 controls, lr 3e-3,
batch 4: the figures of test_monitor.py (own links z 60-90 against thresholds 5-8, another
init's weights z < 4.1), so each outcome has a margin of more than 10 in z.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import count_probed_samples, exit_after_report, make_tiny_lm, torchrun_reports

from seedprints_lightning import IdentityLostError, ProbeSpec, verify_chain
from seedprints_lightning.core.errors import IdentityWarning
from seedprints_lightning.offline.cli import EXIT_OK
from seedprints_lightning.offline.cli import main as seedprints_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=200, length=8)
HERE = Path(__file__).resolve()


class TokenData(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _trainer(out, callbacks, max_steps: int, seed: int = 0, **arguments):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             **{"logging_steps": 1000, "report_to": "none", **arguments}, save_strategy="steps",
                             save_steps=6, use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    return Trainer(model=make_tiny_lm(seed).train(), args=args, train_dataset=TokenData(), callbacks=callbacks)


def _callback(**kwargs):
    from seedprints_lightning import SeedPrintsTrainerCallback

    return SeedPrintsTrainerCallback(**{**dict(every_n_steps=4, probe=SPEC, num_controls=2), **kwargs})


class Swap:
    """A TrainerCallback that loads another init's weights after optimizer step ``at``."""

    def __new__(cls, at: int):
        from transformers import TrainerCallback

        class _Swap(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == at:
                    model.load_state_dict(make_tiny_lm(7).state_dict())

        return _Swap()


class Recorder:
    """A TrainerCallback placed BEFORE the face: every ``logs`` its ``on_log`` receives, with the step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            seen: list = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.seen.append((state.global_step, dict(logs or {})))

        return _Recorder()


def test_a_healthy_trainer_run_keeps_every_link_logs_through_report_to_and_verifies(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    recorder, callback = Recorder(), _callback()
    trainer = _trainer(tmp_path, [recorder, callback], max_steps=10, report_to=["tensorboard"])
    trainer.train()
    probed = [1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert [h["step"] for h in callback.history] == probed  # step N = after N optimizer steps
    assert all(h["related"] is True for h in callback.history)
    assert min(h["link_z"] - h["link_threshold"] for h in callback.history) > 10
    audit = verify_chain(tmp_path / "seedprints")  # <output_dir>/seedprints, the same files as every face
    assert audit.ok, audit.problems
    assert len([r for r in audit.records if r.get("kind") != "save"]) == 9
    assert [r["step"] for r in audit.records if r.get("kind") == "save"] == [6, 10]  # each checkpoint-N bound
    assert (tmp_path / "checkpoint-6" / "seedprints_state.pt").is_file()
    # Every callback's on_log (any report_to integration, and one placed before the face) sees the metrics.
    logged = {step: logs["seedprints/link_z"] for step, logs in recorder.seen if "seedprints/link_z" in logs}
    assert sorted(logged) == probed
    assert logged[10] == pytest.approx(callback.history[-1]["link_z"])
    assert [e["step"] for e in trainer.state.log_history if "seedprints/link_z" in e] == probed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()  # the Trainer's writer
    tags = events.Tags()["scalars"]
    link_tag = next(tag for tag in tags if tag.endswith("seedprints/link_z"))
    assert [e.step for e in events.Scalars(link_tag)] == probed
    assert not (tmp_path / "runs" / "seedprints").exists()  # no second writer of our own unless log_dir= is given


def test_a_swap_raises_or_stops_the_trainer(tmp_path):
    # The user's swap callback runs after ours in on_step_end: step 5's probe sees the old weights.
    with pytest.raises(IdentityLostError, match="at step 6 .*custody link from step 5"):
        _trainer(tmp_path / "raise", [_callback(patience=1, on_identity_lost="raise"), Swap(at=5)], 20).train()
    callback = _callback(patience=1, on_identity_lost="stop")
    trainer = _trainer(tmp_path / "stop", [callback, Swap(at=5)], 20)
    with pytest.warns(IdentityWarning, match="Stopping the run"):
        trainer.train()
    assert trainer.state.global_step == 6 and callback.history[-1]["related"] is False


def test_resume_from_checkpoint_continues_the_chain_and_the_checkpoint_is_auditable(tmp_path, capsys):
    first = _callback()
    _trainer(tmp_path, [first], max_steps=8).train()  # checkpoints at steps 6 and 8
    again = _callback()
    trainer = _trainer(tmp_path, [again], max_steps=12, seed=3)  # another init until the checkpoint loads
    with pytest.warns(IdentityWarning, match="abandoned branch"):  # the first run's probes 7 and 8
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert [(h["step"], h["event"]) for h in again.history][5:] == [(6, "interval"), (6, "resume"), (7, "interval"),
                                                                     (8, "interval"), (10, "interval"),
                                                                     (12, "interval")]
    assert all(h["related"] is True for h in again.history)
    audit = verify_chain(tmp_path / "seedprints")
    assert audit.ok and [r["event"] for r in audit.records].count("resume") == 1, audit.problems
    # They were moved aside, not mixed in.
    assert list((tmp_path / "seedprints").glob("custody.abandoned-*.jsonl"))
    assert seedprints_main(["audit", "--chain", str(tmp_path / "seedprints"), str(tmp_path / "checkpoint-12"),
                            "-q"]) == EXIT_OK
    assert "descends (" in capsys.readouterr().out


def test_resuming_a_checkpoint_without_the_callback_state_names_the_file(tmp_path):
    from seedprints_lightning import InputError

    _trainer(tmp_path, [], max_steps=6).train()
    with pytest.raises(InputError, match="seedprints_state.pt"):
        _trainer(tmp_path, [_callback()], max_steps=8).train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_the_trainer_callback_leaves_training_bit_identical(tmp_path):
    finals = []
    for name, callbacks in (("without", []), ("with", [_callback()])):
        trainer = _trainer(tmp_path / name, callbacks, max_steps=8)
        trainer.model.config.attention_dropout = 0.3  # a probe that moved the RNG would change every step
        for layer in trainer.model.model.layers:
            layer.self_attn.attention_dropout = 0.3
        trainer.train()
        finals.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


# ---------------------------------------------------------------------- 2 processes (torchrun, gloo)
def _worker(mode: str, out: Path) -> int:
    """One rank of ``torchrun --nproc-per-node 2 tests/test_hf_trainer.py MODE OUT``: writes ``rank<r>.json``."""
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    probed: list[int] = []
    count_probed_samples(probed)
    raising = mode == "raise"
    callback = _callback(patience=1, on_identity_lost="raise") if raising else _callback()
    trainer = _trainer(out, [callback, Swap(at=5)] if raising else [callback], max_steps=20 if raising else 8)
    error = None
    try:
        trainer.train()
    except IdentityLostError as exc:
        error = str(exc)
    rank = dist.get_rank()
    report = {"rank": rank, "world_size": dist.get_world_size(), "probed": probed, "error": error,
              "history": [{k: v for k, v in h.items() if k != "probe_seconds"} for h in callback.history]}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


@pytest.mark.slow
def test_two_processes_under_torchrun_probe_half_each_and_agree(tmp_path):
    rank0, rank1 = torchrun_reports(str(HERE), "healthy", tmp_path)
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    for report in (rank0, rank1):
        # The reference and 8 probes of 200 samples, 100 per rank; the controls (200 each) whole on every rank.
        assert [p for p in report["probed"] if p != 200] == [100] * 9, report["probed"]
        assert all(h["related"] is True for h in report["history"])
    assert rank0["history"] == rank1["history"]  # the same figures and decisions on both ranks
    assert verify_chain(tmp_path / "seedprints").ok  # rank 0 wrote one ledger


@pytest.mark.slow
def test_two_processes_under_torchrun_raise_on_every_rank(tmp_path):
    for report in torchrun_reports(str(HERE), "raise", tmp_path):
        assert report["error"] is not None and "at step 6" in report["error"], report
        assert [(h["step"], h["related"]) for h in report["history"]][-2:] == [(5, True), (6, False)]


if __name__ == "__main__":
    import sys

    exit_after_report(lambda: _worker(sys.argv[1], Path(sys.argv[2])))


def test_hooks_called_without_a_trainer_say_where_the_metrics_go(tmp_path):
    from types import SimpleNamespace

    callback = _callback(num_controls=0, save_dir=tmp_path / "seedprints")
    args = SimpleNamespace(output_dir=str(tmp_path))
    with pytest.warns(IdentityWarning, match="could not find the transformers Trainer.*log_dir"):
        callback.on_train_begin(args, SimpleNamespace(global_step=0), SimpleNamespace(should_training_stop=False),
                                model=make_tiny_lm(0))
    callback.on_train_end(args, SimpleNamespace(global_step=0), SimpleNamespace(should_training_stop=False),
                          model=make_tiny_lm(0))
