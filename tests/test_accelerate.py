"""accelerate loops: SeedPrintsMonitor as it is: registered for checkpointing, resumed by load_state, stopped together.

The pattern (docs: "accelerate"): ``accelerator.register_for_checkpointing(monitor)``; ``save_state`` stores
``monitor.state_dict()`` and ``load_state`` calls ``monitor.load_state_dict(...)`` (before ``monitor.start``);
``monitor.should_stop`` (already agreed by every rank) goes through ``set_trigger`` / ``check_trigger`` with the
loop's other stop reasons. Tiny LLaMA, probes of 200 samples: its own links score z far above the threshold
(test_monitor.py: margin > 10), a swapped-in fresh init falls below it.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import exit_after_report, make_tiny_lm, torchrun_reports

from seedprints_lightning import ProbeSpec, SeedPrintsMonitor
from seedprints_lightning.core.verify import verify_chain

SPEC = ProbeSpec(kind="token", vocab_size=64, num_samples=200, length=16)
DATA = torch.randint(0, 64, (64, 17), generator=torch.Generator().manual_seed(0))


def _monitor(save_dir: Path, **kwargs) -> SeedPrintsMonitor:
    return SeedPrintsMonitor(**{**dict(every_n_steps=2, probe=SPEC, num_controls=2, save_dir=save_dir,
                                       adaptive_schedule=False), **kwargs})


def _train(accelerator, model, optimizer, monitor, steps, *, swap_at: int | None = None) -> int | None:
    """Optimizer steps ``steps``; the monitor after each; a stop agreed through the accelerator's trigger."""
    for step in steps:
        if swap_at is not None and step == swap_at:  # e.g. a wrong checkpoint loaded mid-run
            accelerator.unwrap_model(model).load_state_dict(make_tiny_lm(7).state_dict())
        batch = DATA[(step * 4) % 60:(step * 4) % 60 + 4]
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(accelerator.unwrap_model(model), step)
        if monitor.should_stop:  # agreed by every rank already; the trigger joins the loop's own stop reasons
            accelerator.set_trigger()
        if accelerator.check_trigger():
            return step
    return None


def _setup(save_dir: Path, **kwargs):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = make_tiny_lm(0).train()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    monitor = _monitor(save_dir, **kwargs)
    accelerator.register_for_checkpointing(monitor)  # state_dict() / load_state_dict(state): the monitor's own
    return accelerator, model, optimizer, monitor


def test_save_state_and_load_state_carry_the_monitor_and_the_chain_continues(tmp_path, one_torch_thread):
    accelerator, model, optimizer, monitor = _setup(tmp_path / "seedprints")
    monitor.start(accelerator.unwrap_model(model), step=0)
    assert _train(accelerator, model, optimizer, monitor, range(1, 5)) is None
    accelerator.save_state(tmp_path / "ckpt")
    monitor.close()
    saved = torch.load(tmp_path / "ckpt" / "custom_checkpoint_0.pkl", weights_only=True)  # plain types
    assert saved["step"] == 4 and saved["format_version"]

    accelerator, model, optimizer, resumed = _setup(tmp_path / "seedprints")
    accelerator.load_state(tmp_path / "ckpt")  # weights, optimizer and the monitor, before start()
    assert resumed.current_step == 4 and resumed.reference is not None
    verdict = resumed.start(accelerator.unwrap_model(model), step=resumed.current_step)  # the resume link
    assert verdict is not None and verdict.related is True
    _train(accelerator, model, optimizer, resumed, range(5, 7))
    resumed.end(accelerator.unwrap_model(model))
    assert [(h["step"], h["event"], h["related"]) for h in resumed.history] == [
        (2, "interval", True), (4, "interval", True), (4, "resume", True), (6, "interval", True)]
    assert verify_chain(tmp_path / "seedprints").ok


# ---------------------------------------------------------------------- 2 processes (torchrun, gloo)
def _worker(mode: str, out: Path) -> int:
    """One rank of ``torchrun --nproc-per-node 2 tests/test_accelerate.py MODE OUT``: writes ``rank<r>.json``."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    stopping = dict(patience=1, on_identity_lost="stop")
    accelerator, model, optimizer, monitor = _setup(out / "seedprints", **stopping)
    assert accelerator.num_processes == 2, accelerator.state
    stopped_at = None
    if mode == "first":
        monitor.start(accelerator.unwrap_model(model), step=0)
        stopped_at = _train(accelerator, model, optimizer, monitor, range(1, 5))
        accelerator.save_state(out / "ckpt")
    else:  # "resume": a new launch continues from the checkpoint, and a swap at step 5 stops every rank at 6
        accelerator.load_state(out / "ckpt")
        monitor.start(accelerator.unwrap_model(model), step=monitor.current_step)
        stopped_at = _train(accelerator, model, optimizer, monitor, range(5, 9), swap_at=5)
    monitor.close()
    report = {"rank": accelerator.process_index, "stopped_at": stopped_at,
              "history": [(h["step"], h["event"], h["related"]) for h in monitor.history]}
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    return 0


@pytest.mark.slow
def test_two_processes_resume_from_save_state_and_stop_together(tmp_path):
    first = torchrun_reports(__file__, "first", tmp_path)
    for report in first:
        assert report["stopped_at"] is None
        assert report["history"] == [[2, "interval", True], [4, "interval", True]], report
    for path in tmp_path.glob("rank*.json"):
        path.unlink()
    resumed = torchrun_reports(__file__, "resume", tmp_path)
    for report in resumed:
        # The chain continued from the checkpoint (a resume link at 4), then the swap was acted on at 6, on both ranks.
        assert report["history"] == [[2, "interval", True], [4, "interval", True], [4, "resume", True],
                                     [6, "interval", False]], report
        assert report["stopped_at"] == 6
    audit = verify_chain(tmp_path / "seedprints")
    assert not audit.tampered and len(audit.broken_links) == 1


if __name__ == "__main__":
    exit_after_report(lambda: _worker(sys.argv[1], Path(sys.argv[2])))
