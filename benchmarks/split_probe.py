"""Probe time against the number of ranks: the probe is split over the ranks.

    python benchmarks/split_probe.py [--devices 1,2] [--num-samples 1000]

For each device count, one short CPU fit of the demo model (hidden 128, 4 layers) under DDP
(gloo; one process with devices=1) with SeedPrintsCallback probing every 2 steps; prints the
median of the callback's own ``seedprints/probe_seconds`` (features + all-gather + the 6 tests)
and its ratio to the single-process figure, measured in the same invocation. Each process uses
one torch thread, so 2 ranks need 2 free cores to show the split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def _worker(devices: int, num_samples: int, out: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from seedprints_lightning import ProbeSpec, SeedPrintsCallback
    from seedprints_lightning.train.demo import DEMO_MODEL
    from seedprints_lightning.train.module import CausalLMModule

    cb = SeedPrintsCallback(every_n_steps=2, adaptive_schedule=False, num_controls=4,
                            probe=ProbeSpec(num_samples=num_samples, length=32), save_dir=out / "seedprints")
    data = torch.randint(0, 256, (256, 65), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        [{"input_ids": row[:-1], "labels": row[1:]} for row in data], batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=8,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], default_root_dir=str(out))
    trainer.fit(CausalLMModule(**DEMO_MODEL, init_seed=0, lr=3e-3), loader)
    if trainer.global_rank == 0:
        (out / "probes.json").write_text(json.dumps([h["probe_seconds"] for h in cb.history]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(int(args.worker[0]), int(args.worker[1]), Path(args.worker[2]))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    medians = {}
    for devices in (int(d) for d in args.devices.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, str(HERE), "--worker", str(devices), str(args.num_samples), tmp],
                           cwd=str(REPO), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = json.loads((Path(tmp) / "probes.json").read_text())
        medians[devices] = statistics.median(seconds)
        base = medians[min(medians)]
        print(f"[split] devices={devices}: median probe {medians[devices]:.3f} s over {len(seconds)} probes, "
              f"ratio to {min(medians)} device(s) {medians[devices] / base:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
