"""What each training loop's face costs: one model, one data order, every loop, with and without SeedPrints.

    python benchmarks/faces.py [--steps 40] [--rounds 2] [--threads 2]

The demo model (LLaMA, hidden 128, 4 layers, byte vocabulary), AdamW at lr 3e-3, batches of
16 x 64 random tokens from one seed, trained for ``--steps`` optimizer steps in four loops: the
Lightning ``Trainer`` (``SeedPrintsCallback``), the Hugging Face ``Trainer``
(``SeedPrintsTrainerCallback``), Lightning Fabric (``SeedPrintsFabricCallback``) and a plain loop
(``SeedPrintsMonitor``), each face at its defaults (token probes n = 1000, 4 controls, the dense
start of the schedule and a last probe: 16 probes in 40 steps). Every loop runs once without and
once with its face per round, in one process; the rounds alternate the order of the loops (this
machine slows down over a run) and each figure is the best over the rounds.

Prints per loop: the mean probe time (forwards, test, ledger record), the run's wall time without
and with the face, and the time in probes (the rest of the difference is the step-0 set-up:
reference and controls). The faces share the probe, so the
mean probe times should agree across loops; what differs is each loop's own step time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from seedprints_lightning.train.demo import DEMO_MODEL
from seedprints_lightning.train.module import CausalLMModule

BATCH, LENGTH, LR = 16, 64, 3e-3


def _lm(seed: int = 42) -> torch.nn.Module:
    return CausalLMModule(**DEMO_MODEL, init_seed=seed).model.train()


def _tokens(steps: int) -> torch.Tensor:
    return torch.randint(0, 256, (steps * BATCH, LENGTH), generator=torch.Generator().manual_seed(0))


def _plain(steps: int, root: Path, face: bool) -> list[dict]:
    from seedprints_lightning import SeedPrintsMonitor

    model, tokens = _lm(), _tokens(steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    monitor = SeedPrintsMonitor(save_dir=root / "seedprints") if face else None
    if monitor is not None:
        monitor.start(model)
    for step in range(1, steps + 1):
        batch = tokens[(step - 1) * BATCH:step * BATCH]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            monitor.step(model, step)
    if monitor is not None:
        monitor.end(model)  # the last probe, as the Trainers' on_train_end makes
    return monitor.history if monitor is not None else []


def _lightning(steps: int, root: Path, face: bool) -> list[dict]:
    import pytorch_lightning as pl

    from seedprints_lightning import SeedPrintsCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _lm()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    callbacks = [SeedPrintsCallback(save_dir=root / "seedprints")] if face else []
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_tokens(steps)), batch_size=BATCH)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root))
    trainer.fit(Module(), loader)
    return callbacks[0].history if face else []


def _hf(steps: int, root: Path, face: bool) -> list[dict]:
    from transformers import Trainer, TrainingArguments

    from seedprints_lightning import SeedPrintsTrainerCallback

    tokens = _tokens(steps)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(tokens)

        def __getitem__(self, i):
            return {"input_ids": tokens[i], "labels": tokens[i]}

    callbacks = [SeedPrintsTrainerCallback()] if face else []
    args = TrainingArguments(output_dir=str(root), max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=10_000, seed=0,
                             dataloader_num_workers=0)
    Trainer(model=_lm(), args=args, train_dataset=Tokens(), callbacks=callbacks).train()
    return callbacks[0].history if face else []


def _fabric(steps: int, root: Path, face: bool) -> list[dict]:
    from lightning.fabric import Fabric

    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(save_dir=root / "seedprints") if face else None
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[callback] if face else [])
    model = _lm()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=LR))
    tokens = _tokens(steps)
    for step in range(1, steps + 1):
        batch = tokens[(step - 1) * BATCH:step * BATCH]
        fabric.backward(model(input_ids=batch, labels=batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    if callback is not None:
        callback.end()
    return callback.history if face else []


LOOPS = {"Lightning Trainer": _lightning, "HF Trainer": _hf, "Fabric": _fabric, "plain loop": _plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    best: dict[str, tuple[int, float, float, float, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            names = list(LOOPS) if round_index % 2 == 0 else list(reversed(LOOPS))
            for name in names:
                walls = {}
                for face in (False, True):
                    root = Path(scratch) / f"{round_index}-{name.replace(' ', '-')}-{face}"
                    start = time.perf_counter()
                    history = LOOPS[name](args.steps, root, face)
                    walls[face] = time.perf_counter() - start
                probe = [h["probe_seconds"] for h in history]
                row = (len(probe), sum(probe) / len(probe), sum(probe), walls[False], walls[True])
                previous = best.get(name)
                best[name] = row if previous is None else tuple(min(a, b) for a, b in zip(previous, row))
    reference = best["Lightning Trainer"][1]
    print(f"{'loop':<18} {'probes':>6} {'mean probe s':>12} {'x Lightning':>11} {'run s without':>13} "
          f"{'run s with':>10} {'in probes s':>11}   (best of {args.rounds} rounds, each column alone)")
    for name in LOOPS:
        count, mean, probes, without, with_face = best[name]
        print(f"{name:<18} {count:>6} {mean:>12.3f} {mean / reference:>11.2f} {without:>13.1f} {with_face:>10.1f} "
              f"{probes:>11.1f}")


if __name__ == "__main__":
    main()
