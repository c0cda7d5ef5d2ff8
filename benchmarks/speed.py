"""Speed benchmarks, reported as ratios measured within one run (the machines are noisy).

    python benchmarks/speed.py [--quick] [--only kendall,probe,overhead]

1. ``lineage_test`` (every dimension) against a per-column ``scipy.stats.kendalltau`` loop
   on ``n = 10000, D = 768``: the loop includes the same normalisation, so both compute
   the same z.
2. Probe throughput (tokens/s) of ``extract_features`` against the same model's own eval
   forward pass on the same batch shape.
3. Training wall time of the CPU demo model with ``SeedPrintsCallback`` at its default
   interval against the same run without it.

Each timing is the best of ``--repeats`` runs, interleaved so that background load hits
both sides alike. Results and the command go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch
from scipy import stats as sps


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def scipy_reference_z(a: np.ndarray, b: np.ndarray, temperature: float = 10.0) -> float:
    """The formulas of docs/method.md with one scipy Kendall tau per column (all dims, coset)."""
    def softmax(x):
        x = x / temperature
        x = x - x.max(axis=1, keepdims=True)
        e = np.exp(x)
        return e / e.sum(axis=1, keepdims=True)

    an, bn = softmax(a.astype(np.float64)), softmax(b.astype(np.float64))
    taus = [sps.kendalltau(an[:, j], bn[:, j]).statistic for j in range(a.shape[1])]
    n, k = a.shape[0], a.shape[1]
    sigma = math.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1)))
    return float(np.mean(taus) / (sigma / math.sqrt(k)))


def bench_kendall(n: int, dim: int, repeats: int) -> dict[str, float]:
    from seedprints_lightning import lineage_test

    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, dim, generator=g)
    target = 0.2 * base + torch.randn(n, dim, generator=g)
    a_np, b_np = base.numpy(), target.numpy()
    ours_z = lineage_test(base, target, identity_ratio=1.0).z
    ref_z = scipy_reference_z(a_np, b_np)
    t_ours, t_ref = [], []
    for _ in range(repeats):  # interleave so background load hits both alike
        t_ours.append(best_of(lambda: lineage_test(base, target, identity_ratio=1.0), 1))
        t_ref.append(best_of(lambda: scipy_reference_z(a_np, b_np), 1))
    ours, ref = min(t_ours), min(t_ref)
    print(f"[kendall] n={n} D={dim}: lineage_test {ours:.3f} s, scipy per-column loop {ref:.3f} s, "
          f"speed-up x{ref / ours:.2f}; z ours {ours_z:.6f} vs scipy {ref_z:.6f} "
          f"(rel diff {abs(ours_z - ref_z) / abs(ref_z):.1e})")
    return {"lineage_test_s": ours, "scipy_loop_s": ref, "speedup": ref / ours}


def bench_probe(repeats: int, num_samples: int, length: int) -> dict[str, float]:
    from seedprints_lightning import ProbeSpec, extract_features
    from seedprints_lightning.core.probes import preserve_module_modes
    from seedprints_lightning.train.demo import DEMO_MODEL  # the demo's model sizes
    from seedprints_lightning.train.models import make_causal_lm

    model = make_causal_lm(seed=0, **DEMO_MODEL)
    spec = ProbeSpec(kind="token", num_samples=num_samples, length=length).resolve(model)
    batch_size = 64
    batches = [b.input_ids for b in spec.batches(batch_size)]

    def own_forward():
        with preserve_module_modes(model), torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)

    def probe():
        extract_features(model, spec, batch_size=batch_size)

    t_probe, t_own = [], []
    for _ in range(repeats):
        t_probe.append(best_of(probe, 1))
        t_own.append(best_of(own_forward, 1))
    tokens = num_samples * length
    probe_tps, own_tps = tokens / min(t_probe), tokens / min(t_own)
    print(f"[probe] n={num_samples} L={length}: probe {probe_tps:,.0f} tok/s, model eval forward {own_tps:,.0f} tok/s, "
          f"ratio {probe_tps / own_tps:.2f}")
    return {"probe_tokens_per_s": probe_tps, "forward_tokens_per_s": own_tps, "ratio": probe_tps / own_tps}


def time_training_overhead(steps: int) -> tuple[float, float]:
    """Wall seconds of the same seeded CPU fit of the demo model with and without the callback.

    The callback is at its DEFAULT interval (``every_n_steps`` default), so the measured cost
    is what a user pays for leaving it in a run: the step-0 reference, the fresh-init controls
    and the probes at the default interval (and one at train end). Neither fit has a logger,
    checkpointing, a progress bar or validation; the data module is set up before the clock
    starts, after an untimed 2-step warm-up fit. Torch's thread count is the caller's.
    Returns ``(with_seconds, without_seconds)``.
    """
    import tempfile
    from pathlib import Path

    import pytorch_lightning as pl

    from seedprints_lightning.faces.lightning import SeedPrintsCallback

    # The demo's own builders, so that the timed fit is the demo's fit.
    from seedprints_lightning.train.demo import DEMO_MODEL, OWN_SEED, _data, _module, _quiet_lightning, _trainer

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    timings: dict[bool, float] = {}
    with _quiet_lightning(), tempfile.TemporaryDirectory(prefix="seedprints-overhead-") as root:
        # An untimed 2-step fit first: the first fit in a process pays one-time costs (lazy
        # imports, allocator and kernel warm-up) that would otherwise land on one side only.
        warm = _data()
        warm.prepare_data()
        _trainer(2, [], root=root).fit(_module(DEMO_MODEL, OWN_SEED), datamodule=warm)
        for with_callback in (False, True):
            pl.seed_everything(0, workers=True, verbose=False)
            data = _data()
            data.prepare_data()
            data.setup("fit")
            module = _module(DEMO_MODEL, OWN_SEED)
            callbacks = [SeedPrintsCallback(save_dir=Path(root) / "seedprints")] if with_callback else []
            trainer = _trainer(steps, callbacks, root=root)
            start = time.perf_counter()
            trainer.fit(module, datamodule=data)
            timings[with_callback] = time.perf_counter() - start
    return timings[True], timings[False]


def bench_overhead(repeats: int, steps: int) -> dict[str, float]:
    """End-to-end ratio of a short run, and the steady-state overhead at the default interval.

    A short run pays the one-time start (step-0 reference and controls) over few steps, so
    its ratio overstates what a real run pays; the steady-state figure is one probe as the
    callback makes it (features, then ``CustodyChain.observe``: the tests against reference, anchor
    and controls) divided by ``every_n_steps`` training steps, both timed here.
    """
    import inspect

    from seedprints_lightning import Fingerprint, ProbeSpec, SeedPrintsCallback, extract_features
    from seedprints_lightning.core.chain import CustodyChain
    from seedprints_lightning.core.controls import DEFAULT_NUM_CONTROLS, ControlSet, control_seeds, probe_controls
    from seedprints_lightning.core.schedule import ProbeSchedule
    from seedprints_lightning.train.demo import DEMO_MODEL
    from seedprints_lightning.train.models import make_causal_lm

    with_cb, without_cb = [], []
    for _ in range(repeats):
        a, b = time_training_overhead(steps=steps)
        with_cb.append(a)
        without_cb.append(b)
    step_s = min(without_cb) / steps
    interval = inspect.signature(SeedPrintsCallback).parameters["every_n_steps"].default

    model = make_causal_lm(seed=0, **DEMO_MODEL)
    spec = ProbeSpec().resolve(model)
    seeds = control_seeds(DEFAULT_NUM_CONTROLS)
    chain = CustodyChain(Fingerprint(features=extract_features(model, spec), spec=spec, step=0),
                         controls=ControlSet(probe_controls(model, spec, seeds), seeds, spec))
    probes = iter(range(1, 1_000_000))

    def one_probe():
        # What the callback does per probe: features, then the chain's cycle (fp16 rounding, the
        # birth test, the custody link and one test per control, shared by both).
        chain.observe(next(probes), extract_features(model, spec))

    probe_s = min(best_of(one_probe, 1) for _ in range(repeats))
    steady = 100 * probe_s / (interval * step_s)
    # The dense start: probes the default schedule makes while ramping up to every_n_steps
    # (strong links), and what they cost over that stretch and over a 100k-step run.
    schedule = ProbeSchedule(every_n_steps=interval)
    probe_steps, (step, gap) = [], schedule.first()
    while step <= 100_000:
        probe_steps.append(step)
        step, gap = schedule.after(step, gap, True, 10.0)
    ramp_end = 4 * interval
    ramp_probes = sum(1 for s in probe_steps if s <= ramp_end)
    ramp_pct = 100 * ramp_probes * probe_s / (ramp_end * step_s)
    run_pct = 100 * len(probe_steps) * probe_s / (100_000 * step_s)
    end_to_end = 100 * (min(with_cb) / min(without_cb) - 1)
    print(f"[overhead] CPU demo model: {steps}-step fit with callback {min(with_cb):.2f} s, without "
          f"{min(without_cb):.2f} s ({end_to_end:+.1f} %, the step-0 reference + {DEFAULT_NUM_CONTROLS} controls "
          f"and the dense start's probes); train step {1000 * step_s:.1f} ms, one probe {probe_s:.2f} s -> "
          f"steady-state overhead at the default every_n_steps={interval}: {steady:.2f} %; dense start: "
          f"{ramp_probes} probes in the first {ramp_end} steps ({ramp_pct:.1f} % of that stretch); a 100k-step "
          f"run: {len(probe_steps)} probes, {run_pct:.2f} %")
    return {"with_s": min(with_cb), "without_s": min(without_cb), "end_to_end_pct": end_to_end, "steady_pct": steady,
            "ramp_probes": ramp_probes, "ramp_pct": ramp_pct, "run_pct": run_pct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="kendall,probe,overhead")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"python {platform.python_version()}")
    if "kendall" in parts:
        bench_kendall(2000 if args.quick else 10000, 128 if args.quick else 768, args.repeats)
    if "probe" in parts:
        bench_probe(args.repeats, 256 if args.quick else 1000, 32)
    if "overhead" in parts:
        bench_overhead(args.repeats if not args.quick else 1, 40 if args.quick else 200)


if __name__ == "__main__":
    main()
