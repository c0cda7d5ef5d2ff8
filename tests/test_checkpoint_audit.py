"""Any user's LightningModule leaves checkpoints that ``seedprints audit --chain RUN CKPT`` can read.

A plain module (its LLaMA under ``self.net``, no ``hf_config`` of its own) is trained with the
callback and ``ModelCheckpoint``, killed with SIGKILL mid-run (a preemption: no clean-up at all),
resumed from ``last.ckpt`` and audited with the checkpoint: the callback's state records the
model's config and where its weights sit in the state dict, so the audit rebuilds the model.
The fits run this file as a script in a subprocess (the kill must not take pytest with it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seedprints_lightning.offline.sources import seedprints_state

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
SPEC = dict(num_samples=200, length=8)

pytestmark = pytest.mark.slow  # two fits in subprocesses


def _user_module(seed: int):
    import pytorch_lightning as pl
    from conftest import make_tiny_lm

    class UserLM(pl.LightningModule):
        """What a user writes: their own names, no seedprints code, no on_save_checkpoint."""

        def __init__(self):
            super().__init__()
            self.net = make_tiny_lm(seed).train()

        def training_step(self, batch, batch_idx):
            return self.net(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    return UserLM()


def _fit(mode: str, out: Path) -> None:
    """``first``: train until SIGKILL at step 25; ``resume``: continue from last.ckpt to step 40."""
    import warnings

    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from seedprints_lightning import ProbeSpec, SeedPrintsCallback

    class Preempt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 25:
                os.kill(os.getpid(), signal.SIGKILL)

    data = torch.randint(0, 64, (640, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)
    callbacks = [SeedPrintsCallback(every_n_steps=10, probe=ProbeSpec(**SPEC), num_controls=2,
                                    save_dir=out / "seedprints"),
                 ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=10, save_top_k=-1, save_last=True)]
    if mode == "first":
        callbacks.append(Preempt())
    trainer = pl.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out), callbacks=callbacks)
    trainer.fit(_user_module(0), loader, ckpt_path=str(out / "ckpt" / "last.ckpt") if mode == "resume" else None)


def _run(mode: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(HERE), mode, str(out)], cwd=str(REPO), env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("user-run")
    first = _run("first", out)
    assert first.returncode == -signal.SIGKILL, first.stdout[-3000:] + first.stderr[-3000:]
    resumed = _run("resume", out)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return out


def test_a_user_modules_checkpoint_is_audited_after_sigkill_and_resume(preempted_run, capsys):
    from seedprints_lightning.offline.cli import EXIT_OK, main

    out = preempted_run
    checkpoint = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    rebuild = seedprints_state(checkpoint)["model_rebuild"]
    assert rebuild["state_dict_prefix"] == "net." and rebuild["hf_config"]["model_type"] == "llama"
    assert "hf_config" not in checkpoint  # the module stored nothing itself
    assert main(["audit", "--chain", str(out / "seedprints"), str(out / "ckpt" / "last.ckpt"), "-q"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "descends (" in printed and "chain      intact" in printed
    # The probes the killed process made after its last checkpoint (steps 21-25) were moved aside.
    assert list((out / "seedprints").glob("custody.abandoned-*.jsonl"))


def test_a_checkpoint_with_another_runs_weights_does_not_descend(preempted_run, tmp_path, capsys):
    from seedprints_lightning.offline.cli import EXIT_EXPECT, main

    raw = torch.load(preempted_run / "ckpt" / "last.ckpt", weights_only=True)
    raw["state_dict"] = _user_module(7).state_dict()  # the same run's checkpoint, another init's weights
    torch.save(raw, tmp_path / "wrong.ckpt")
    assert main(["audit", "--chain", str(preempted_run / "seedprints"), str(tmp_path / "wrong.ckpt"), "-q"]) \
        == EXIT_EXPECT
    assert "DOES NOT DESCEND" in capsys.readouterr().out


def test_a_feature_fn_models_checkpoint_says_what_to_pass_instead(tmp_path, capsys):
    from torch import nn

    from seedprints_lightning.offline.cli import EXIT_FILE, main
    from seedprints_lightning.offline.sources import model_rebuild_info

    info = model_rebuild_info(nn.Linear(4, 4), None, feature_fn=True)
    assert "feature_fn model" in info["why_not"] and "fingerprint file" in info["why_not"]
    torch.save({"state_dict": {}, "callbacks": {"SeedPrintsCallback": {"model_rebuild": info}}}, tmp_path / "f.ckpt")
    assert main(["compare", str(tmp_path / "f.ckpt"), str(tmp_path / "f.ckpt"), "-q"]) == EXIT_FILE
    assert "cannot be rebuilt into a model: the run probed a feature_fn model" in capsys.readouterr().err


if __name__ == "__main__":
    _fit(sys.argv[1], Path(sys.argv[2]))
