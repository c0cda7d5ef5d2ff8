"""Fit a tiny LLaMA with SeedPrintsCallback and save a checkpoint: a ledger and state for compatibility checks.

Whichever ``seedprints_lightning`` is importable writes them (``PYTHONPATH`` chooses an older
checkout), so one version's ledger and checkpoint can be verified and resumed by another
(docs/benchmarks.md, "Custody core"). Usage::

    python benchmarks/compat_fit.py OUT STEPS [RESUME_CKPT]
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

import seedprints_lightning
from seedprints_lightning import ProbeSpec, SeedPrintsCallback
from seedprints_lightning.train import CausalLMModule


def main() -> None:
    warnings.filterwarnings("ignore")
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    print("package", seedprints_lightning.__file__, seedprints_lightning.__version__)
    module = CausalLMModule(arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, init_seed=0,
                            lr=3e-3)
    ids = torch.randint(0, 64, (400, 17), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=8)
    cb = SeedPrintsCallback(every_n_steps=10, probe=ProbeSpec(num_samples=200, length=8), num_controls=2,
                            save_dir=out / "seedprints")
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
                         callbacks=[cb])
    trainer.fit(module, data, ckpt_path=resume)
    trainer.save_checkpoint(out / f"step{steps}.ckpt")
    print("history", [(h["step"], h["event"], h["related"]) for h in cb.history])


if __name__ == "__main__":
    main()
