"""Peak host memory of the callback's step-0 work: built controls vs a controls file.

    python benchmarks/step0_memory.py [--hidden 1024] [--layers 8]

Three fresh processes fit the same model for 2 CPU steps and report their peak resident set
size (``ru_maxrss``): without the callback, with the callback building its 4 controls in the
run (one unsharded copy of the model alive at a time), and with ``controls=FILE`` precomputed by
``seedprints controls`` beforehand (the step-0 work is then the reference probe alone). The
differences to the first run are what the callback adds to the training footprint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent


def _worker(mode: str, hidden: int, layers: int, out: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import pytorch_lightning as pl
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))
    from seedprints_lightning import ProbeSpec, SeedPrintsCallback
    from seedprints_lightning.train.module import CausalLMModule

    module = CausalLMModule(arch="llama", vocab_size=256, hidden_size=hidden, num_layers=layers,
                            num_heads=max(2, hidden // 64), max_position_embeddings=64, init_seed=0)
    callbacks = []
    if mode != "none":
        kwargs = {"controls": str(out / "controls.safetensors")} if mode == "file" else {}
        callbacks.append(SeedPrintsCallback(probe=ProbeSpec(num_samples=200, length=16), probe_batch_size=50,
                                            save_dir=out / "seedprints", **kwargs))
    data = torch.randint(0, 256, (32, 33), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in data], batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)
    params = sum(p.numel() for p in module.parameters())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    (out / f"{mode}.json").write_text(json.dumps({"peak_mb": peak_mb, "params": params}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], args.hidden, args.layers, Path(args.worker[1]))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # The controls file is made on the side, from the model's config alone.
        sys.path.insert(0, str(REPO))
        from seedprints_lightning.offline.cli import main as seedprints_main
        from seedprints_lightning.train.models import make_config

        config = make_config("llama", vocab_size=256, hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=max(2, args.hidden // 64), max_position_embeddings=64)
        config.save_pretrained(out / "model")
        seedprints_main(["controls", str(out / "model"), "-o", str(out / "controls.safetensors"), "--num", "4",
                         "--num-samples", "200", "--length", "16", "--batch-size", "50", "-q"])
        results = {}
        for mode in ("none", "built", "file"):
            subprocess.run([sys.executable, str(HERE), "--hidden", str(args.hidden), "--layers", str(args.layers),
                            "--worker", mode, tmp], cwd=str(REPO), env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[mode] = json.loads((out / f"{mode}.json").read_text())
    params = results["none"]["params"]
    model_mb = params * 4 / 2**20
    print(f"[memory] LLaMA hidden {args.hidden}, {args.layers} layers: {params / 1e6:.1f}M parameters "
          f"({model_mb:.0f} MB fp32); 2-step CPU fit, peak RSS:")
    for mode, label in (("none", "no callback"), ("built", "callback, 4 controls built in the run"),
                        ("file", "callback, controls=FILE")):
        extra = results[mode]["peak_mb"] - results["none"]["peak_mb"]
        print(f"  {label:40s} {results[mode]['peak_mb']:8.0f} MB  ({extra:+.0f} MB, {extra / model_mb:+.2f} x the "
              "model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
