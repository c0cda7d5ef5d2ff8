"""What each training loop's face costs: one model, one data order, every loop, with and without SeedPrints.

    python benchmarks/faces.py [--steps 40] [--rounds 2] [--threads 2]

The demo model (LLaMA, hidden 128, 4 layers, byte vocabulary), AdamW at lr 3e-3, batches of
16 x 64 random tokens from one seed, trained for ``--steps`` optimizer steps in four loops: the
Lightning ``Trainer`` (``SeedPrintsCallback``), the Hugging Face ``Trainer``
(``SeedPrintsTrainerCallback``), Lightning Fabric (``SeedPrintsFabricCallback``) and a plain loop
(``SeedPrintsMonitor``), and OLMo-core's own ``Trainer`` and ``Transformer`` of the same sizes
(``SeedPrintsOLMoCallback``), and a plain loop on a DeepSpeed ZeRO-3 engine (``SeedPrintsMonitor``,
one process: its ``torch.distributed`` group stays up for the loops after it; ``--loops`` picks
loops), each face at its defaults (token probes
n = 1000, 4 controls, the dense start of the schedule and a last probe: 16 probes in 40 steps).
Every loop runs once without and once with its face per round, in one process; the rounds
alternate the order of the loops (this machine slows down over a run) and each figure is the best
over the rounds.

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


def _olmo(steps: int, root: Path, face: bool) -> list[dict]:
    """OLMo-core's own Trainer and Transformer (the demo's sizes: d_model 128, 4 blocks, 4 heads, FFN 512, V 256)."""
    import numpy as np
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import AdamWConfig
    from olmo_core.train import Duration, TrainerConfig
    from olmo_core.train.train_module import TransformerTrainModuleConfig

    from seedprints_lightning import SeedPrintsOLMoCallback

    root.mkdir(parents=True, exist_ok=True)
    _tokens(steps).numpy().astype(np.uint16).tofile(root / "tokens.npy")  # the same tokens, in order
    config = TransformerConfig.llama_like(d_model=128, n_layers=4, n_heads=4, vocab_size=256)
    train_module = TransformerTrainModuleConfig(rank_microbatch_size=BATCH * LENGTH, max_sequence_length=LENGTH,
                                                optim=AdamWConfig(lr=LR, weight_decay=0.0)).build(
        config.build(init_device="cpu"))
    dataset = NumpyFSLDatasetConfig(paths=[str(root / "tokens.npy")], sequence_length=LENGTH,
                                    tokenizer=TokenizerConfig(vocab_size=256, eos_token_id=255, pad_token_id=255),
                                    work_dir=str(root / "work")).build()
    loader = NumpyDataLoaderConfig(global_batch_size=BATCH * LENGTH, seed=0, num_workers=0).build(dataset)
    trainer_config = TrainerConfig(save_folder=str(root / "run"), max_duration=Duration.steps(steps),
                                   no_checkpoints=True)
    if face:
        trainer_config = trainer_config.with_callback("seedprints", SeedPrintsOLMoCallback(model_config=config))
    trainer = trainer_config.build(train_module, loader)
    trainer.fit()
    return trainer.callbacks["seedprints"].history if face else []


def _deepspeed(steps: int, root: Path, face: bool) -> list[dict]:
    """A plain loop on a DeepSpeed ZeRO-3 engine (``DS_ACCELERATOR=cpu``, gloo, one process): every weight
    partitioned, probed one block at a time through ``GatheredParameters`` (a one-rank gather here)."""
    import importlib
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    from seedprints_lightning import SeedPrintsMonitor

    # The CPU communication backend JIT-builds an op that only DeepSpeed-Inference uses (tests/test_deepspeed.py).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    model, tokens = _lm(), _tokens(steps)
    config = {"train_micro_batch_size_per_gpu": BATCH, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                      config=config)
    monitor = SeedPrintsMonitor(save_dir=root / "seedprints") if face else None
    if monitor is not None:
        monitor.start(engine.module)
    for step in range(1, steps + 1):
        batch = tokens[(step - 1) * BATCH:step * BATCH]
        engine.backward(engine(input_ids=batch, labels=batch).loss)
        engine.step()
        if monitor is not None:
            monitor.step(engine.module, step)
    if monitor is not None:
        monitor.end(engine.module)
    return monitor.history if monitor is not None else []


LOOPS = {"Lightning Trainer": _lightning, "HF Trainer": _hf, "Fabric": _fabric, "plain loop": _plain,
         "OLMo-core Trainer": _olmo, "DeepSpeed ZeRO-3": _deepspeed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loops", nargs="+", choices=list(LOOPS), default=list(LOOPS),
                        help="which loops to run (the Lightning Trainer always: the reference column)")
    args = parser.parse_args()
    loops = {name: LOOPS[name] for name in LOOPS if name in args.loops or name == "Lightning Trainer"}
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    best: dict[str, tuple[int, float, float, float, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            names = list(loops) if round_index % 2 == 0 else list(reversed(loops))
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
    for name in loops:
        count, mean, probes, without, with_face = best[name]
        print(f"{name:<18} {count:>6} {mean:>12.3f} {mean / reference:>11.2f} {without:>13.1f} {with_face:>10.1f} "
              f"{probes:>11.1f}")


if __name__ == "__main__":
    main()
