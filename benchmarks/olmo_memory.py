"""Step-0 host memory of ``SeedPrintsOLMoCallback`` in an OLMo-core FSDP2 run on 2 gloo ranks, against no callback.

    python benchmarks/olmo_memory.py [--d-model 1024] [--layers 4] [--vocab 32000]
    python benchmarks/olmo_memory.py --mmap-threshold 131072      # RSS follows the live tensors (see below)

OLMo-core's own ``Trainer`` and a ``TransformerConfig.llama_like`` model built on the meta device and
sharded by OLMo-core's FSDP2 (``TransformerDataParallelConfig(name="fsdp")``: DTensor weights, each
rank holding half of every weight), 2 CPU processes under ``torchrun`` (gloo, one torch thread each),
AdamW, 2 optimizer steps on random tokens. Two launches, the same in every way but the callback:
without it, and with ``SeedPrintsOLMoCallback`` (4 controls built in the run, probes of
``--num-samples`` x ``--length`` tokens in batches of ``--probe-batch``, the reference and controls
probed one gathered block at a time).

Per rank, around the callback's ``pre_train`` (step 0: the birth fingerprint and the controls): a
callback of higher priority trims the heap (``malloc_trim``), reads the RSS and resets the RSS
high-water mark (``/proc/self/clear_refs``); one right after the callback reads the high-water
mark and the RSS again. In the run without the callback the same two read the same point, so
"step-0 peak" (the high-water mark at that point) and the whole run's peak (``ru_maxrss``) compare
like for like. "added" is the step-0 peak minus the RSS before it; "held" the RSS after it minus
before.

``--mmap-threshold`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` for the ranks: every larger block is
mapped and handed back when freed, so RSS follows the live tensors. Without it glibc raises its
threshold to 32 MB after the first large free and its heap keeps freed blocks under that size, so
RSS reads tens to hundreds of MB over what is alive (docs/benchmarks.md, step-0 memory under FSDP2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# The RSS readers of the FSDP2 step-0 benchmark (this folder is on sys.path when a script here runs).
from step0_memory import _status_mb, _trim

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
MODES = (("none", "no callback"), ("callback", "SeedPrintsOLMoCallback, 4 controls built in the run"))
SEQ, STEPS, TIMEOUT_S = 64, 2, 540


def _worker(mode: str, args: argparse.Namespace, out: Path) -> int:
    """One rank of the FSDP2 run (launched by torchrun); writes ``<mode>-rank<r>.json``."""
    import warnings
    from dataclasses import dataclass
    from typing import ClassVar

    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    import torch.distributed as dist
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import AdamWConfig
    from olmo_core.train import Duration, TrainerConfig, prepare_training_environment
    from olmo_core.train.callbacks import Callback
    from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModuleConfig

    from seedprints_lightning import ProbeSpec, SeedPrintsOLMoCallback
    from seedprints_lightning.core.sharded import holds_dtensors

    prepare_training_environment(backend="gloo", seed=0)
    torch.set_num_threads(1)
    rank = dist.get_rank()
    stats: dict[str, float] = {}

    @dataclass
    class Before(Callback):  # priority 10: before SeedPrintsOLMoCallback's pre_train (priority 2)
        priority: ClassVar[int] = 10

        def pre_train(self) -> None:
            _trim()
            stats["peak_before_mb"] = _status_mb("VmHWM")  # the run's peak so far (model build, sharding)
            stats["before_mb"] = _status_mb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux >= 4.0)

    @dataclass
    class After(Callback):  # priority 2, registered after the face: runs right after its pre_train
        priority: ClassVar[int] = 2

        def pre_train(self) -> None:
            stats["step0_peak_mb"] = _status_mb("VmHWM")
            stats["after_mb"] = _status_mb("VmRSS")

    config = TransformerConfig.llama_like(d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64,
                                          vocab_size=args.vocab)
    model = config.build(init_device="meta")
    train_module = TransformerTrainModuleConfig(
        rank_microbatch_size=2 * SEQ, max_sequence_length=SEQ, optim=AdamWConfig(lr=1e-3),
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp)).build(model)
    tokens = out / "tokens.npy"
    if rank == 0 and not tokens.exists():
        np.random.default_rng(0).integers(0, args.vocab, size=4 * SEQ * (STEPS + 2), dtype=np.uint16).tofile(tokens)
    dist.barrier()
    dataset = NumpyFSLDatasetConfig(paths=[str(tokens)], sequence_length=SEQ,
                                    tokenizer=TokenizerConfig(vocab_size=args.vocab, eos_token_id=args.vocab - 1,
                                                              pad_token_id=args.vocab - 1),
                                    work_dir=str(out / f"work-{mode}")).build()
    loader = NumpyDataLoaderConfig(global_batch_size=4 * SEQ, seed=0, num_workers=0).build(dataset)
    trainer_config = TrainerConfig(save_folder=str(out / f"run-{mode}"), max_duration=Duration.steps(STEPS),
                                   no_checkpoints=True).with_callback("before", Before())
    if mode == "callback":
        face = SeedPrintsOLMoCallback(model_config=config, save_dir=out / "seedprints",
                                      probe=ProbeSpec(num_samples=args.num_samples, length=args.length),
                                      probe_batch_size=args.probe_batch)
        trainer_config = trainer_config.with_callback("seedprints", face)
    trainer = trainer_config.with_callback("after", After()).build(train_module, loader)
    stats["dtensors"] = bool(holds_dtensors(trainer.train_module.model))
    stats["params"] = sum(p.numel() for p in trainer.train_module.model.parameters())  # global (DTensor) sizes
    trainer.fit()
    # The whole run's peak: the larger of before the reset and since it.
    stats["peak_mb"] = max(stats["peak_before_mb"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if mode == "callback":
        stats["probes"] = len(trainer.callbacks["seedprints"].history)
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps({"rank": rank, **stats}))
    return 0


def _launch(mode: str, args: argparse.Namespace, out: Path, env: dict[str, str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HERE),
           "--d-model", str(args.d_model), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--num-samples", str(args.num_samples), "--length", str(args.length), "--probe-batch",
           str(args.probe_batch), "--worker", mode, str(out)]
    log = out / f"{mode}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its process group: torchrun and both ranks
            proc.wait()
    reports = [out / f"{mode}-rank{r}.json" for r in (0, 1)]
    if proc.returncode != 0 or not all(p.exists() for p in reports):
        raise SystemExit(f"the OLMo-core FSDP2 run ({mode}) failed (exit {proc.returncode}):\n"
                         f"{log.read_text()[-4000:]}")
    return [json.loads(p.read_text()) for p in reports]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--num-samples", type=int, default=200, help="probe samples (default 200)")
    parser.add_argument("--length", type=int, default=16, help="probe length in tokens (default 16)")
    parser.add_argument("--probe-batch", type=int, default=50, help="probe_batch_size (default 50)")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the ranks with glibc's MALLOC_MMAP_THRESHOLD_=BYTES (RSS = live tensors)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.d_model % 64:
        parser.error(f"--d-model {args.d_model} must be a multiple of 64 (heads of 64)")
    if args.worker:
        _exit_after(lambda: _worker(args.worker[0], args, Path(args.worker[1])))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no network needed: keep gloo on the loopback
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: _launch(mode, args, Path(tmp), env) for mode, _ in MODES}
    _report(args, results)
    return 0


def _report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    params = results["none"][0]["params"]
    model_mb = params * 4 / 2**20
    block_mb = max(args.vocab * args.d_model, 12 * args.d_model**2) * 4 / 2**20  # embedding, or a layer (~12 d^2)
    malloc = (f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold} (RSS = live tensors)" if args.mmap_threshold is not None
              else "glibc as it is")
    print(f"[olmo memory] OLMo-core FSDP2, 2 gloo ranks, 1 thread each; llama_like d_model {args.d_model}, "
          f"{args.layers} layers, vocab {args.vocab}: {params / 1e6:.1f}M parameters ({model_mb:.0f} MB fp32 whole, "
          f"{model_mb / 2:.0f} MB a rank's shard); {STEPS} steps; probes n = {args.num_samples}, L = {args.length}, "
          f"batch {args.probe_batch}, 4 controls; {malloc}")
    print(f"  sharded (DTensor weights): {[r['dtensors'] for r in results['callback']]}; probes made by the face: "
          f"{[r.get('probes') for r in results['callback']]}; for scale, the largest block {block_mb:.0f} MB")
    print(f"  {'':52s} {'rank':>4s} | {'before':>7s} {'step-0 peak':>11s} {'added':>7s} {'held':>7s} | "
          f"{'run peak':>8s}")
    for mode, label in MODES:
        for rank, rep in enumerate(results[mode]):
            added, held = rep["step0_peak_mb"] - rep["before_mb"], rep["after_mb"] - rep["before_mb"]
            print(f"  {label if rank == 0 else '':52s} {rank:4d} | {rep['before_mb']:5.0f}MB "
                  f"{rep['step0_peak_mb']:9.0f}MB "
                  f"{added:+5.0f}MB {held:+5.0f}MB | {rep['peak_mb']:6.0f}MB")
    for rank in (0, 1):
        none, face = results["none"][rank], results["callback"][rank]
        print(f"  rank {rank}: step-0 peak {face['step0_peak_mb']:.0f} / {none['step0_peak_mb']:.0f} MB = "
              f"{face['step0_peak_mb'] / none['step0_peak_mb']:.2f} x the no-callback run "
              f"({face['step0_peak_mb'] - none['step0_peak_mb']:+.0f} MB); whole-run peak "
              f"{face['peak_mb'] / none['peak_mb']:.2f} x ({face['peak_mb'] - none['peak_mb']:+.0f} MB)")


def _exit_after(worker) -> None:
    """A rank's end: run ``worker``, wait for the other rank, flush, ``os._exit`` (no gloo teardown at exit,
    whose threads can abort the process at interpreter shutdown; tests/conftest.py's exit_after_report)."""
    import datetime
    import traceback

    import torch.distributed as dist

    code = 1
    try:
        code = worker()
        if dist.is_initialized():
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))  # both reports written
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
