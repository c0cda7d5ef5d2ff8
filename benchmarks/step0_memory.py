"""Peak host memory of the callback's step-0 work: built controls vs a controls file.

    python benchmarks/step0_memory.py [--hidden 1024] [--layers 8]
    python benchmarks/step0_memory.py --strategy fsdp2 [--hidden 1024] [--layers 8] [--vocab 32000]
    python benchmarks/step0_memory.py --strategy fsdp2 --mmap-threshold 131072

``--mmap-threshold`` runs the fits with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed, so every block
over it is mapped and handed back when freed: RSS then follows the live tensors. By default glibc
raises the threshold to 32 MB after the first large free, and the heap keeps what later blocks
under that size freed, so RSS reads tens to hundreds of MB over what is alive.

Three fresh processes fit the same model for 2 CPU steps and report their peak resident set
size (``ru_maxrss``): without the callback, with the callback building its 4 controls in the
run (one unsharded copy of the model alive at a time), and with ``controls=FILE`` precomputed by
``seedprints controls`` beforehand (the step-0 work is then the reference probe alone). The
differences to the first run are what the callback adds to the training footprint.

``--strategy fsdp2`` runs each of the three as a 2-process CPU fit (gloo; Lightning's
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, every decoder layer and
then the root causal LM ``fully_shard``-ed in ``configure_model``) and reports, per rank, the
whole-run peak and the step-0 work alone: around the callback's ``on_train_start`` the heap is
trimmed, the RSS read and the high-water mark reset (``/proc/self/clear_refs``), so "added" is
the peak during the step-0 work minus the RSS just before it, whatever the rest of the run peaks
at. The target it is held to: one block (the largest of a decoder layer and the embedding, fp32)
plus one probe batch (``probe_batch_size x length x hidden`` activations, plus the
``n x length x hidden`` hidden states a layer-major probe keeps).
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

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
# The probe every mode runs (and the controls file is made for).
NUM_SAMPLES, LENGTH, PROBE_BATCH, NUM_CONTROLS = 200, 16, 50, 4
FSDP2_TIMEOUT_S = 480  # per configuration (2 processes)
MODES = (("none", "no callback"), ("built", "callback, 4 controls built in the run"),
         ("file", "callback, controls=FILE"))


def _default_vocab(strategy: str) -> int:
    # A real vocabulary under FSDP2, so the embedding is a block worth measuring against.
    return 32000 if strategy == "fsdp2" else 256


def _worker(mode: str, hidden: int, layers: int, out: Path, vocab: int = 256) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from seedprints_lightning import ProbeSpec, SeedPrintsCallback
    from seedprints_lightning.train.module import CausalLMModule

    module = CausalLMModule(arch="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                            num_heads=max(2, hidden // 64), max_position_embeddings=64, init_seed=0)
    callbacks = []
    if mode != "none":
        kwargs = {"controls": str(out / "controls.safetensors")} if mode == "file" else {}
        callbacks.append(SeedPrintsCallback(probe=ProbeSpec(num_samples=NUM_SAMPLES, length=LENGTH),
                                            probe_batch_size=PROBE_BATCH, save_dir=out / f"seedprints-{mode}",
                                            **kwargs))  # one run per directory
    data = torch.randint(0, vocab, (32, 33), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in data], batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)
    params = sum(p.numel() for p in module.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    (out / f"{mode}.json").write_text(json.dumps({"peak_mb": peak_mb, "params": params}))


# --------------------------------------------------------------------------------------
# FSDP2: 2 CPU processes
# --------------------------------------------------------------------------------------


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status``, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so an RSS read is not padded by earlier frees."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    """Reset this process's RSS high-water mark (VmHWM, which ``ru_maxrss`` reads): Linux >= 4.0."""
    Path("/proc/self/clear_refs").write_text("5")


def _fsdp2_worker(mode: str, hidden: int, layers: int, out: Path, vocab: int) -> None:
    """One rank of a 2-process FSDP2 fit; writes ``<mode>-rank<r>.json``. Lightning re-runs this script for rank 1."""
    import warnings

    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from pytorch_lightning.strategies import ModelParallelStrategy

    from seedprints_lightning import ProbeSpec, SeedPrintsCallback
    from seedprints_lightning.train.module import CausalLMModule

    class ShardedLM(CausalLMModule):
        """FSDP2: every decoder layer, then the root causal LM, fully_shard-ed over the data-parallel mesh."""

        def configure_model(self) -> None:
            if getattr(self, "_sharded", False):
                return
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            self._sharded = True

    stats: dict[str, float] = {}

    class Before(pl.Callback):  # runs before SeedPrintsCallback's on_train_start (callbacks run in list order)
        def on_train_start(self, trainer, pl_module):
            _trim()
            stats["peak_before_mb"] = _status_mb("VmHWM")  # the run's peak so far (model build, sharding)
            stats["before_mb"] = _status_mb("VmRSS")
            _reset_peak()

    class After(pl.Callback):  # runs after it: the peak since the reset is the step-0 work's
        def on_train_start(self, trainer, pl_module):
            stats["step0_peak_mb"] = _status_mb("VmHWM")
            stats["after_mb"] = _status_mb("VmRSS")

    module = ShardedLM(arch="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                       num_heads=max(2, hidden // 64), max_position_embeddings=64, init_seed=0)
    callbacks: list[pl.Callback] = [Before()]
    if mode != "none":
        kwargs = {"controls": str(out / "controls.safetensors")} if mode == "file" else {}
        callbacks.append(SeedPrintsCallback(probe=ProbeSpec(num_samples=NUM_SAMPLES, length=LENGTH),
                                            probe_batch_size=PROBE_BATCH, save_dir=out / f"seedprints-{mode}",
                                            **kwargs))
    callbacks.append(After())
    data = torch.randint(0, vocab, (32, 33), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in data], batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=2,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=str(out))
    code = 0
    try:
        trainer.fit(module, loader)
        rank = trainer.global_rank
        # The whole run's peak: the larger of before the reset and since it.
        stats["peak_mb"] = max(stats["peak_before_mb"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        (out / f"{mode}-rank{rank}.json").write_text(json.dumps({"rank": rank, **stats}))
        import datetime

        import torch.distributed as dist

        dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))  # both reports written
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no gloo teardown at exit (its threads can abort the process at interpreter shutdown)


def _sizes(hidden: int, layers: int, vocab: int) -> dict[str, int]:
    """Parameter bytes (fp32) of the model's blocks, from a meta-device build (no weights drawn)."""
    import torch

    from seedprints_lightning.train.models import make_config

    config = make_config("llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         num_heads=max(2, hidden // 64), max_position_embeddings=64)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)

    def nbytes(module: torch.nn.Module) -> int:
        return sum(p.numel() * 4 for p in module.parameters())

    return {"model": nbytes(model), "layer": nbytes(model.model.layers[0]),
            "embedding": nbytes(model.model.embed_tokens),
            # what FSDP2's root group gathers (and, being the root, keeps until the next backward)
            "root": nbytes(model) - sum(nbytes(layer) for layer in model.model.layers),
            "intermediate": int(config.intermediate_size)}


def _run_fsdp2(mode: str, args: argparse.Namespace, out: Path, env: dict[str, str]) -> list[dict]:
    cmd = [sys.executable, str(HERE), "--strategy", "fsdp2", "--hidden", str(args.hidden), "--layers",
           str(args.layers), "--vocab", str(args.vocab), "--worker", mode, str(out)]
    log = out / f"{mode}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=FSDP2_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its process group: rank 0 and the rank 1 it launched
            proc.wait()
    reports = [out / f"{mode}-rank{r}.json" for r in (0, 1)]
    if proc.returncode != 0 or not all(p.exists() for p in reports):
        raise SystemExit(f"FSDP2 fit ({mode}) failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    return [json.loads(p.read_text()) for p in reports]


def _main_fsdp2(args: argparse.Namespace, out: Path, env: dict[str, str]) -> int:
    env = dict(env, PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no network needed: keep gloo on the loopback
    results = {mode: _run_fsdp2(mode, args, out, env) for mode, _ in MODES}
    mb = 2**20
    s = _sizes(args.hidden, args.layers, args.vocab)
    block = max(s["layer"], s["embedding"])
    batch = PROBE_BATCH * LENGTH * args.hidden * 4
    kept = NUM_SAMPLES * LENGTH * args.hidden * 4
    target = block + batch + kept
    print(f"[memory] FSDP2, 2 CPU processes: LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
          f"{s['model'] / 4e6:.1f}M parameters ({s['model'] / mb:.0f} MB fp32 whole, {s['model'] / 2 / mb:.0f} MB "
          "a rank's shard); 2-step fit")
    print(f"  target: one block {block / mb:.0f} MB (decoder layer {s['layer'] / mb:.0f} MB, embedding "
          f"{s['embedding'] / mb:.0f} MB) + one probe batch {batch / mb:.1f} MB ({PROBE_BATCH} x {LENGTH} x "
          f"{args.hidden} fp32; a layer's MLP holds {s['intermediate'] // args.hidden}x that) + layer-major kept "
          f"{kept / mb:.1f} MB ({NUM_SAMPLES} x {LENGTH} x {args.hidden}) = {target / mb:.0f} MB")
    print(f"  for scale: FSDP2's root group (embedding + final norm + LM head) {s['root'] / mb:.0f} MB, gathered "
          "by every forward through the root and kept until the next backward")
    print(f"  {'':40s} {'rank':>4s} {'run peak':>9s} {'(vs none)':>9s} | {'step 0: before':>14s} {'peak':>7s} "
          f"{'added':>7s} {'held':>7s}")
    for mode, label in MODES:
        for r, rep in enumerate(results[mode]):
            extra = rep["peak_mb"] - results["none"][r]["peak_mb"]
            added, held = rep["step0_peak_mb"] - rep["before_mb"], rep["after_mb"] - rep["before_mb"]
            print(f"  {label if r == 0 else '':40s} {r:4d} {rep['peak_mb']:7.0f}MB {extra:+7.0f}MB | "
                  f"{rep['before_mb']:12.0f}MB {rep['step0_peak_mb']:5.0f}MB {added:+5.0f}MB {held:+5.0f}MB")
    for mode, label in MODES[1:]:
        worst = max(rep["step0_peak_mb"] - rep["before_mb"] for rep in results[mode])
        verdict = "holds" if worst <= target / mb else "does NOT hold"
        print(f"  {label}: step-0 added <= {worst:.0f} MB per rank vs target {target / mb:.0f} MB: {verdict} "
              f"({worst * mb / s['model']:.2f} x the whole model)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--strategy", choices=("single", "fsdp2"), default="single",
                        help="single: one process (default); fsdp2: 2 CPU processes, FSDP2 (gloo)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 256; 32000 under fsdp2)")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the fits with glibc's MALLOC_MMAP_THRESHOLD_=BYTES: every larger block is mapped "
                             "and returned to the OS when freed, so RSS follows the live tensors instead of what "
                             "the heap keeps after freeing (glibc raises the threshold to 32 MB after a large free)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.vocab = args.vocab if args.vocab is not None else _default_vocab(args.strategy)
    if args.worker:
        if args.strategy == "fsdp2":
            _fsdp2_worker(args.worker[0], args.hidden, args.layers, Path(args.worker[1]), args.vocab)
        else:
            _worker(args.worker[0], args.hidden, args.layers, Path(args.worker[1]), args.vocab)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        print(f"[memory] glibc MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}: RSS follows the live tensors")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # The controls file is made on the side, from the model's config alone.
        sys.path.insert(0, str(REPO))
        from seedprints_lightning.offline.cli import main as seedprints_main
        from seedprints_lightning.train.models import make_config

        config = make_config("llama", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=max(2, args.hidden // 64), max_position_embeddings=64)
        config.save_pretrained(out / "model")
        seedprints_main(["controls", str(out / "model"), "-o", str(out / "controls.safetensors"), "--num",
                         str(NUM_CONTROLS), "--num-samples", str(NUM_SAMPLES), "--length", str(LENGTH),
                         "--batch-size", str(PROBE_BATCH), "-q"])
        if args.strategy == "fsdp2":
            return _main_fsdp2(args, out, env)
        results = {}
        for mode, _ in MODES:
            subprocess.run([sys.executable, str(HERE), "--hidden", str(args.hidden), "--layers", str(args.layers),
                            "--vocab", str(args.vocab), "--worker", mode, tmp], cwd=str(REPO), env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[mode] = json.loads((out / f"{mode}.json").read_text())
    params = results["none"]["params"]
    model_mb = params * 4 / 2**20
    print(f"[memory] LLaMA hidden {args.hidden}, {args.layers} layers: {params / 1e6:.1f}M parameters "
          f"({model_mb:.0f} MB fp32); 2-step CPU fit, peak RSS:")
    for mode, label in MODES:
        extra = results[mode]["peak_mb"] - results["none"]["peak_mb"]
        print(f"  {label:40s} {results[mode]['peak_mb']:8.0f} MB  ({extra:+.0f} MB, {extra / model_mb:+.2f} x the "
              "model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
