"""What SeedPrints costs a GPU pretraining run, and how the paper's toy model behaves from two seeds.

Three measurements, each printed as ratios taken in this one run (machines are noisy):

1. ``overhead``: the mean training step of the paper's toy LLaMA (vocab 32000, hidden 768,
   12 layers, 12 heads: 160M parameters; bf16 autocast, AdamW, batch 8 x 256 tokens) against one
   probe as the callback makes it (features on ``ProbeSpec()``, then ``CustodyChain.observe``:
   the birth test, the link and 4 control tests), and the steady-state overhead at the default
   interval, ``probe_s / (every_n_steps * step_s)``; plus the one-time step-0 work (reference and
   4 controls).
2. ``kendall``: ``lineage_test`` at n = 10000, D = 4096 on the device against the CPU kernel.
3. ``seeds`` (``--seeds-steps N``): the toy model from init seeds 42 and 123 trained in lockstep
   on the same batches; own (42 at step t vs 42 at step 0), cross (123 at t vs 42 at 0) and peers
   (42 vs 123 at t) z, with the verdict against 4 fresh-init controls.

Run on a GPU machine::

    pip install --no-deps -e . && python benchmarks/gpu_overhead.py --seeds-steps 300

On a CPU, ``--tiny`` runs the same code at toy sizes (a check of the script, not a measurement).
Record the device and the figures in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seedprints_lightning import ProbeSpec, extract_features, lineage_test
from seedprints_lightning.core.chain import CustodyChain
from seedprints_lightning.core.controls import ControlSet, control_seeds, probe_controls
from seedprints_lightning.core.fingerprint import Fingerprint
from seedprints_lightning.core.verdict import BIRTH_RULE, decide_identity
from seedprints_lightning.train import make_causal_lm

TOY = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
TINY = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _batches(vocab: int, batch: int, seq: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)


def _train_step(model, optimizer, ids, device: torch.device) -> None:
    with _autocast(device):
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def overhead(sizes: dict, device: torch.device, spec: ProbeSpec, steps: int, every_n_steps: int) -> None:
    model = make_causal_lm("llama", seed=1, **sizes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batches = _batches(sizes["vocab_size"], 8, 256 if device.type == "cuda" else 32, device)
    spec = spec.resolve(model)

    def features():
        with _autocast(device):
            return extract_features(model, spec, batch_size=64)

    setup_s, (reference, controls) = _timed(lambda: (features(), probe_controls(model, spec, control_seeds(4))),
                                            device)
    chain = CustodyChain(Fingerprint(features=reference, spec=spec, step=0),
                         controls=ControlSet(controls, control_seeds(4), spec))
    for _ in range(3):  # warm-up: kernels, allocator, the numba kernel on CPU
        _train_step(model, optimizer, next(batches), device)
    step_times = [_timed(lambda: _train_step(model, optimizer, next(batches), device), device)[0]
                  for _ in range(steps)]
    step_s = statistics.median(step_times)
    probe_times = [_timed(lambda i=i: chain.observe(i + 1, features()), device)[0] for i in range(3)]
    probe_s = statistics.median(probe_times)
    print(f"overhead  params {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M, probe {spec.describe()}")
    print(f"  training step        {step_s * 1e3:9.1f} ms (median of {steps})")
    print(f"  one probe            {probe_s * 1e3:9.1f} ms (features + birth + link + 4 control tests)")
    print(f"  probe / step         {probe_s / step_s:9.2f}")
    print(f"  steady overhead      {100 * probe_s / (every_n_steps * step_s):9.3f} % at every_n_steps={every_n_steps}")
    print(f"  step-0 set-up        {setup_s:9.2f} s (reference + 4 controls, once)")


def kendall(device: torch.device, n: int, dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, dim, generator=g)
    target = base + 0.5 * torch.randn(n, dim, generator=g)
    cpu_s, cpu = _timed(lambda: lineage_test(base, target), torch.device("cpu"))
    line = f"kendall   n={n} D={dim}: CPU {cpu_s:.3f} s (z {cpu.z:.2f})"
    if device.type == "cuda":
        b, t = base.to(device), target.to(device)
        lineage_test(b, t)  # warm-up
        dev_s, dev = _timed(lambda: lineage_test(b, t), device)
        line += f", {device} {dev_s:.3f} s (z {dev.z:.2f}); CPU / GPU {cpu_s / dev_s:.1f}"
    print(line)


def seeds(sizes: dict, device: torch.device, spec: ProbeSpec, steps: int) -> None:
    models = {s: make_causal_lm("llama", seed=s, **sizes).to(device) for s in (42, 123)}
    optimizers = {s: torch.optim.AdamW(m.parameters(), lr=3e-4) for s, m in models.items()}
    spec = spec.resolve(models[42])

    def features(model):
        with _autocast(device):
            return extract_features(model, spec, batch_size=64).cpu()

    init = features(models[42])
    controls = list(probe_controls(models[42], spec, control_seeds(4)))
    batches = _batches(sizes["vocab_size"], 8, 256 if device.type == "cuda" else 32, device)
    checkpoints = sorted({min(steps, s) for s in (100, steps // 2, steps)})
    print(f"seeds     own / cross / peers z (control z max), {spec.describe()}")
    for step in range(1, steps + 1):
        ids = next(batches)
        for s in models:
            _train_step(models[s], optimizers[s], ids, device)
        if step in checkpoints:
            own, other = features(models[42]), features(models[123])
            cells = []
            for base, live in ((init, own), (init, other), (own, other)):
                verdict = decide_identity(lineage_test(base, live), [lineage_test(c, live) for c in controls],
                                          BIRTH_RULE)
                cells.append(f"{verdict.result.z:7.2f} ({verdict.control_z_max:5.2f}, "
                             f"{'related' if verdict.related else 'not'})")
            print(f"  step {step:5d}  " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a check of the script, not a measurement")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed (default 20)")
    parser.add_argument("--every-n-steps", type=int, default=1000, help="the callback's interval (default 1000)")
    parser.add_argument("--seeds-steps", type=int, default=0, help="also train two seeds this many steps")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = TINY if args.tiny else TOY
    spec = ProbeSpec(num_samples=200, length=8) if args.tiny else ProbeSpec()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device    {name}, torch {torch.__version__}")
    overhead(sizes, device, spec, args.steps, args.every_n_steps)
    kendall(device, *((1000, 128) if args.tiny else (10000, 4096)))
    if args.seeds_steps:
        seeds(sizes, device, spec, args.seeds_steps)


if __name__ == "__main__":
    main()
