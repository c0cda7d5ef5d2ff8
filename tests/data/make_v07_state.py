"""Write tests/data/v07/: a run of seedprints-lightning 0.7.0 (its ledger, reference, probes and a checkpoint).

Made once with the 0.7.0 code, so that tests/test_state_compat.py can check that later versions load
what 0.7 wrote and go on with it::

    git worktree add /tmp/v07 v0.7.0-commit
    PYTHONPATH=/tmp/v07 .venv/bin/python tests/data/make_v07_state.py tests/data/v07
    git worktree remove /tmp/v07

Kept small (a few KB a file): a 1-layer LLaMA of width 8 over a vocabulary of 32, token probes of
n = 32 and L = 4, 2 controls. ``step4.pt`` is a ``torch.save`` checkpoint ``{"model", "optimizer"
(absent: not needed), "seedprints", "step"}`` taken after optimizer step 4, bound to the ledger by a
save record; ``run/`` is the run directory as 0.7 left it after ``monitor.end``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import seedprints_lightning
from seedprints_lightning import ProbeSpec
from seedprints_lightning.faces.monitor import SeedPrintsMonitor

CONFIG = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=16)
SPEC = ProbeSpec(num_samples=32, length=4)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = tiny_model(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    monitor = SeedPrintsMonitor(every_n_steps=2, probe=SPEC, num_controls=2, save_dir=out / "run")
    monitor.start(model)
    for step in range(1, 5):
        batch = data[step % 16:step % 16 + 2]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(model, step)
    torch.save({"model": model.state_dict(), "seedprints": monitor.state_dict(model), "step": 4}, out / "step4.pt")
    monitor.end(model)
    (out / "made_by.json").write_text(json.dumps({
        "seedprints_lightning": seedprints_lightning.__version__, "torch": torch.__version__,
        "history_steps": [h["step"] for h in monitor.history], "config": CONFIG, "probe": SPEC.to_dict()}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
