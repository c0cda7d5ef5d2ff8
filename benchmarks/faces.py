"""What each training loop's face costs: one model width, one data order, every loop, with and without SeedPrints.

    python benchmarks/faces.py [--steps 20] [--every 2] [--rounds 3] [--threads 2] [--loops ...]
    python benchmarks/faces.py --quick        # a smoke run (6 steps, 1 round, small probes): not the faces' cost
    python benchmarks/faces.py --adaptive --steps 40 --loops "HF Trainer" Fabric "plain loop"   # 0.5's comparison

The demo model's sizes (LLaMA-style, hidden 128, 4 layers, 4 heads, FFN 512, byte vocabulary), AdamW
at lr 3e-3, batches of 16 x 64 random tokens from one seed, trained for ``--steps`` optimizer steps
in each loop: the Lightning ``Trainer`` (``SeedPrintsCallback``, the reference), OLMo-core's own
``Trainer`` and ``Transformer`` (``SeedPrintsOLMoCallback``), a LitGPT ``GPT`` in a Fabric loop as
``litgpt pretrain``'s (``SeedPrintsLitGPTCallback``), an ``accelerate`` loop with the documented
pattern (``SeedPrintsMonitor`` registered for checkpointing, its stop through ``set_trigger``), and
a plain loop on a DeepSpeed ZeRO-3 engine (``SeedPrintsMonitor``, one process: every weight
partitioned, probed one gathered block at a time; skipped with the reason printed where DeepSpeed
does not run here); ``--loops`` adds the Hugging Face ``Trainer`` (``SeedPrintsTrainerCallback``),
Fabric (``SeedPrintsFabricCallback``) and a plain loop (``SeedPrintsMonitor``). Each face at its
defaults (token probes n = 1000, 4 controls) but one: a fixed schedule, a probe every ``--every``
steps (``adaptive_schedule=False``; 10 probes in 20 steps), so that every face probes at the same
steps as often. The adaptive schedule follows each run's own link strength: at lr 3e-3 on random
tokens OLMo-core's model lost its custody links from step 18 on, and probed 34 times in 40 steps to
the others' 16. The table counts each face's probes that were not related.

One process. First every loop runs once untimed (2 steps, a tiny face): lazy imports, thread pools and
DeepSpeed's one-process gloo group (which then stays up for every loop, in every round) are paid
there. Then each round runs every loop without and then with its face (the other order in odd
rounds), the loops interleaved, each round starting one loop later, so a change of the shared
machine's load falls on every loop alike. Per probe = (run with the face - run without) / probes:
all the face adds, its step-0 set-up (reference and controls) included; in wall seconds and in
this process's CPU seconds (less moved by other jobs). Each loop's ratio to the Lightning
Trainer is taken within a round, and the table prints the median over rounds. The face's own
timer (``probe_seconds``: forwards, tests, ledger record) is printed beside it: the faces share
the probe, so what differs is each stack's own hooks and its model's forward.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from seedprints_lightning.train.demo import DEMO_MODEL
from seedprints_lightning.train.module import CausalLMModule

BATCH, LENGTH, LR = 16, 64, 3e-3


def _lm(seed: int = 42) -> torch.nn.Module:
    return CausalLMModule(**DEMO_MODEL, init_seed=seed).model.train()


def _tokens(steps: int) -> torch.Tensor:
    return torch.randint(0, 256, (steps * BATCH, LENGTH), generator=torch.Generator().manual_seed(0))


def _plain(steps: int, root: Path, face: bool, face_args: dict) -> list[dict]:
    from seedprints_lightning import SeedPrintsMonitor

    model, tokens = _lm(), _tokens(steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    monitor = SeedPrintsMonitor(save_dir=root / "seedprints", **face_args) if face else None
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


def _lightning(steps: int, root: Path, face: bool, face_args: dict) -> list[dict]:
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

    callbacks = [SeedPrintsCallback(save_dir=root / "seedprints", **face_args)] if face else []
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_tokens(steps)), batch_size=BATCH)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(root))
    trainer.fit(Module(), loader)
    return callbacks[0].history if face else []


def _hf(steps: int, root: Path, face: bool, face_args: dict) -> list[dict]:
    from transformers import Trainer, TrainingArguments

    from seedprints_lightning import SeedPrintsTrainerCallback

    tokens = _tokens(steps)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(tokens)

        def __getitem__(self, i):
            return {"input_ids": tokens[i], "labels": tokens[i]}

    callbacks = [SeedPrintsTrainerCallback(**face_args)] if face else []
    args = TrainingArguments(output_dir=str(root), max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=10_000, seed=0,
                             dataloader_num_workers=0)
    Trainer(model=_lm(), args=args, train_dataset=Tokens(), callbacks=callbacks).train()
    return callbacks[0].history if face else []


def _fabric(steps: int, root: Path, face: bool, face_args: dict) -> list[dict]:
    from lightning.fabric import Fabric

    from seedprints_lightning import SeedPrintsFabricCallback

    callback = SeedPrintsFabricCallback(save_dir=root / "seedprints", **face_args) if face else None
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


def _olmo(steps: int, root: Path, face: bool, face_args: dict) -> list[dict]:
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
        trainer_config = trainer_config.with_callback("seedprints",
                                                      SeedPrintsOLMoCallback(model_config=config, **face_args))
    trainer = trainer_config.build(train_module, loader)
    trainer.fit()
    return trainer.callbacks["seedprints"].history if face else []


def _deepspeed(steps: int, root: Path, face: bool, face_args: dict) -> list[dict]:
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
    monitor = SeedPrintsMonitor(save_dir=root / "seedprints", **face_args) if face else None
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


def _litgpt(steps: int, root: Path, face: bool, face_args: dict) -> list[dict]:
    """A LitGPT ``GPT`` of the demo's sizes (LLaMA-style: RMSNorm, SwiGLU, rotary; 128 wide, 4 layers, 4 heads, FFN
    512, V 256) drawn as ``litgpt pretrain`` draws it, in a Fabric loop as ``litgpt pretrain``'s
    (``SeedPrintsLitGPTCallback``, the face the ``SEEDPRINTS_CONFIG`` factory adds)."""
    import lightning as L
    from litgpt.model import GPT
    from litgpt.pretrain import initialize_weights

    from seedprints_lightning import SeedPrintsLitGPTCallback

    config = _litgpt_config()
    callback = SeedPrintsLitGPTCallback(save_dir=root / "seedprints", **face_args) if face else None
    fabric = L.Fabric(accelerator="cpu", devices=1, callbacks=[callback] if face else [])
    torch.manual_seed(42)
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    initialize_weights(fabric, model, n_layer=config.n_layer, n_embd=config.n_embd)
    model.train()
    model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=LR))
    tokens = _tokens(steps)
    for step in range(1, steps + 1):
        batch = tokens[(step - 1) * BATCH:step * BATCH]
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    if callback is not None:
        callback.end()
    return callback.history if face else []


def _litgpt_config():
    from litgpt.config import Config

    return Config(name="seedprints-bench", block_size=LENGTH, vocab_size=256, padded_vocab_size=256, n_layer=4,
                  n_head=4, n_query_groups=4, n_embd=128, intermediate_size=512, rotary_percentage=1.0,
                  parallel_residual=False, bias=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP")


def _accelerate(steps: int, root: Path, face: bool, face_args: dict) -> list[dict]:
    """An ``accelerate`` loop with the documented pattern: ``SeedPrintsMonitor`` registered for checkpointing, its
    stop joined to the loop's through ``set_trigger`` / ``check_trigger`` (tests/test_accelerate.py)."""
    from accelerate import Accelerator

    from seedprints_lightning import SeedPrintsMonitor

    accelerator = Accelerator(cpu=True)
    model = _lm()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR))
    monitor = SeedPrintsMonitor(save_dir=root / "seedprints", **face_args) if face else None
    if monitor is not None:
        accelerator.register_for_checkpointing(monitor)
        monitor.start(accelerator.unwrap_model(model))
    tokens = _tokens(steps)
    for step in range(1, steps + 1):
        batch = tokens[(step - 1) * BATCH:step * BATCH]
        accelerator.backward(model(input_ids=batch, labels=batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            monitor.step(accelerator.unwrap_model(model), step)
            if monitor.should_stop:
                accelerator.set_trigger()
        if accelerator.check_trigger():
            break
    if monitor is not None:
        monitor.end(accelerator.unwrap_model(model))
    return monitor.history if monitor is not None else []


def _deepspeed_ready() -> str | None:
    """Why the DeepSpeed loop cannot run in this process (``None``: it can): import and a one-process gloo group."""
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # an ImportError, or DeepSpeed's accelerator probing failing at import
        return f"deepspeed does not import here ({type(exc).__name__}: {exc})"
    return None


LOOPS = {"Lightning Trainer": _lightning, "HF Trainer": _hf, "Fabric": _fabric, "plain loop": _plain,
         "OLMo-core Trainer": _olmo, "LitGPT (Fabric)": _litgpt, "accelerate loop": _accelerate,
         "DeepSpeed ZeRO-3": _deepspeed}
#: What one invocation runs unless --loops says otherwise: the Lightning face and the stacks of issue 29.
DEFAULT_LOOPS = ["Lightning Trainer", "OLMo-core Trainer", "LitGPT (Fabric)", "accelerate loop", "DeepSpeed ZeRO-3"]
#: The modules each loop imports, loaded before any timing so that no run pays an import.
IMPORTS = {"Lightning Trainer": ["pytorch_lightning"], "HF Trainer": ["transformers"], "Fabric": ["lightning.fabric"],
           "plain loop": [], "OLMo-core Trainer": ["olmo_core.train", "olmo_core.data", "olmo_core.nn.transformer"],
           "LitGPT (Fabric)": ["lightning", "litgpt.model", "litgpt.pretrain"], "accelerate loop": ["accelerate"],
           "DeepSpeed ZeRO-3": []}


@dataclass
class Run:
    """One loop in one round, without and with its face: wall and CPU seconds, its probes and their own timer."""

    without_s: float
    with_s: float
    without_cpu_s: float
    with_cpu_s: float
    probes: int
    probe_s: float  # the sum of the face's own probe_seconds (forwards, tests, ledger record)
    failed: int  # probes whose verdict was not related (a healthy run should have none)

    @property
    def per_probe_s(self) -> float:
        """(with - without) / probes, wall clock: everything the face added to the run, the step-0 set-up included."""
        return (self.with_s - self.without_s) / self.probes

    @property
    def per_probe_cpu_s(self) -> float:
        """The same in this process's CPU time (all its threads): less moved by other jobs on shared cores."""
        return (self.with_cpu_s - self.without_cpu_s) / self.probes


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _measure(name: str, steps: int, root: Path, face_args: dict, face_first: bool, threads: int) -> Run:
    wall: dict[bool, float] = {}
    cpu: dict[bool, float] = {}
    history: list[dict] = []
    for face in ((True, False) if face_first else (False, True)):
        torch.set_num_threads(threads)  # as given, whatever a loop before set
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        got = LOOPS[name](steps, root / f"{name.replace(' ', '-')}-{face}", face, face_args)
        wall[face], cpu[face] = time.perf_counter() - start, time.process_time() - start_cpu
        if face:
            history = got
    if not history:
        raise RuntimeError(f"{name}: the face made no probe in {steps} steps")
    return Run(wall[False], wall[True], cpu[False], cpu[True], len(history), sum(h["probe_seconds"] for h in history),
               sum(h["related"] is False for h in history))


def _warm_up(names: list[str], root: Path, threads: int, skipped: dict[str, str]) -> list[str]:
    """Each loop once, untimed, without and with a tiny face: first-call costs (lazy imports, thread pools,
    DeepSpeed's process group) land here, not in round 1. A loop that fails here is skipped with its reason."""
    from seedprints_lightning import ProbeSpec

    tiny = {"probe": ProbeSpec(num_samples=16), "num_controls": 1, "adaptive_schedule": False, "every_n_steps": 1}
    kept = []
    for name in names:
        try:
            _measure(name, 2, root, tiny, face_first=False, threads=threads)
        except Exception as exc:
            if name == "Lightning Trainer":
                raise
            skipped[name] = f"failed to run here ({type(exc).__name__}: {str(exc)[:200]})"
            continue
        kept.append(name)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 20; --quick 6)")
    parser.add_argument("--every", type=int, default=2, help="probe every N steps, a fixed schedule (default 2)")
    parser.add_argument("--adaptive", action="store_true",
                        help="each face's own adaptive schedule instead (every_n_steps 1000: dense start, 16 probes in "
                             "40 steps while the links hold; the faces may then probe different numbers of times)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="repeats, each running every loop (default 3; "
                        "--quick 1)")
    parser.add_argument("--loops", nargs="+", choices=list(LOOPS), default=DEFAULT_LOOPS,
                        help="which loops to run (the Lightning Trainer always: the reference)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 6 steps, 1 round, probes of 200 samples and 1 control (not the defaults: "
                             "its figures are not the faces' cost)")
    args = parser.parse_args(argv)
    for flag in ("steps", "every", "rounds", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    steps = args.steps if args.steps is not None else (6 if args.quick else 20)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    # One fixed schedule for every face: the adaptive one follows each run's link strength, so faces would probe
    # at different steps and different counts (OLMo-core's model at this lr made 34 probes in 40 steps, the others 16).
    face_args: dict = {} if args.adaptive else {"adaptive_schedule": False, "every_n_steps": args.every}
    if args.quick:
        from seedprints_lightning import ProbeSpec

        face_args.update(probe=ProbeSpec(num_samples=200), num_controls=1)
    names = [name for name in LOOPS if name in args.loops or name == "Lightning Trainer"]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # OLMo-core's and DeepSpeed's per-run INFO lines
    skipped: dict[str, str] = {}
    for name in names:
        try:
            for module in IMPORTS[name]:
                importlib.import_module(module)
        except Exception as exc:
            skipped[name] = f"{module} does not import ({type(exc).__name__}: {exc})"
    if "DeepSpeed ZeRO-3" in names and "DeepSpeed ZeRO-3" not in skipped:
        reason = _deepspeed_ready()
        if reason is not None:
            skipped["DeepSpeed ZeRO-3"] = reason
    if "Lightning Trainer" in skipped:
        raise SystemExit(f"the reference loop cannot run: {skipped['Lightning Trainer']}")
    names = [name for name in names if name not in skipped]
    with tempfile.TemporaryDirectory() as scratch:
        names = _warm_up(names, Path(scratch), args.threads, skipped)
    command = "python benchmarks/faces.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"[faces] {command.strip()}: {steps} steps, {rounds} round(s), torch threads {args.threads}, "
          f"load average at start {' / '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for name, reason in skipped.items():
        print(f"[faces] skipped {name}: {reason}", flush=True)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(rounds):
            shift = round_index % len(names)  # each round starts one loop later: no loop always first or last
            for name in names[shift:] + names[:shift]:
                try:
                    run = _measure(name, steps, Path(scratch) / str(round_index), face_args,
                                   face_first=round_index % 2 == 1, threads=args.threads)
                except Exception as exc:
                    if name == "Lightning Trainer":
                        raise
                    skipped[name] = f"failed in round {round_index + 1}: {type(exc).__name__}: {exc}"
                    print(f"[faces] {name}: {skipped[name]} (dropped from the table)", flush=True)
                    runs.pop(name, None)
                    names = [n for n in names if n != name]
                    continue
                runs[name].append(run)
                print(f"[faces] round {round_index + 1} {name:<18} without {run.without_s:6.1f} s  with "
                      f"{run.with_s:6.1f} s  {run.probes} probes ({run.failed} not related)  "
                      f"{run.per_probe_s:.3f} s/probe  "
                      f"(CPU {run.per_probe_cpu_s:.3f} s/probe)", flush=True)
    _table(runs, rounds, command)
    return 0


def _table(runs: dict[str, list[Run]], rounds: int, command: str) -> None:
    reference = runs["Lightning Trainer"]

    def ratio(mine: list[Run], of) -> float:  # within each round against the Lightning Trainer, then the median
        return _median([of(m) / of(r) for m, r in zip(mine, reference)])

    print()
    print(f"Medians over {rounds} round(s). Per probe = (run with the face - run without) / probes, in wall "
          "seconds and in this process's CPU seconds; own timer = the face's probe_seconds; set-up = the rest of the "
          "wall difference (step-0 reference and controls). x L = the ratio to the Lightning Trainer in the same "
          "round, median over rounds.")
    print(f"Command: {command.strip()}   load average at the end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    counts = {mine[0].probes for mine in runs.values()}
    if len(counts) > 1:
        print(f"WARNING: the faces probed different numbers of times ({sorted(counts)}): compare per probe only")
    print("| loop | probes | not related | run s without | run s with | per probe s | x L | per probe CPU s | x L | "
          "own timer s/probe | x L | set-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, mine in runs.items():
        print(f"| {name} | {mine[0].probes} | {max(m.failed for m in mine)} | "
              f"{_median([m.without_s for m in mine]):.1f} | "
              f"{_median([m.with_s for m in mine]):.1f} | {_median([m.per_probe_s for m in mine]):.3f} | "
              f"{ratio(mine, lambda r: r.per_probe_s):.2f} | {_median([m.per_probe_cpu_s for m in mine]):.3f} | "
              f"{ratio(mine, lambda r: r.per_probe_cpu_s):.2f} | {_median([m.probe_s / m.probes for m in mine]):.3f} | "
              f"{ratio(mine, lambda r: r.probe_s / r.probes):.2f} | "
              f"{_median([m.with_s - m.without_s - m.probe_s for m in mine]):.1f} |")


if __name__ == "__main__":
    sys.exit(main())
