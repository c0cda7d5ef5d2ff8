"""Custody calibration: what stops a healthy run, what lets a swap through.

    python benchmarks/custody.py collect --out /tmp/custody-cache [--jobs llama-128-3e-3,...]
    python benchmarks/custody.py analyse --cache /tmp/custody-cache [--markdown out.md]

``collect`` trains tiny LLaMA- and Qwen2-style causal LMs with a plain PyTorch loop (AdamW
betas 0.9/0.95, linear warmup over 20 steps then a constant learning rate, batch 8 x 64 bytes of
the offline stdlib prose corpus, the SAME windows in the SAME order for every run) from two
init seeds (42 and 123), for 2000 steps, and probes each run with the callback's default probe
(token, n = 1000, L = 32) at steps 0, 1, 2, 4, 8, 16, 32 and every 50 steps after ("dense-*"
jobs: every step from 0 to 100, the fastest-moving stretch). It keeps
only the probe features (fp16, as the callback's custody ledger keeps them), plus the features
of the 4 fresh-init controls of each config. One extra job ("birth") probes LLaMA width 128 at
lr 3e-3 with n = 10000 token AND embedding probes at a few steps, to measure how the birth
test's detectability grows with n.

``analyse`` replays the callback's verdict (:mod:`seedprints_lightning.core.verdict`) on the
stored features: every link a schedule would make (own links, by interval and learning rate),
every peer swap and wrong resume (the other seed's model at step t against our anchor), early,
midway and late, and the birth test; it prints markdown tables (docs/benchmarks.md).
Everything runs on the CPU, one torch thread per process; run several jobs in parallel with
``--jobs``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seedprints_lightning.core.controls import control_seeds, probe_controls  # noqa: E402
from seedprints_lightning.core.probes import ProbeSpec, extract_features  # noqa: E402
from seedprints_lightning.train.corpus import build_corpus  # noqa: E402
from seedprints_lightning.train.models import make_causal_lm  # noqa: E402
from seedprints_lightning.train.tokenizer import tokenize_directory  # noqa: E402

SEEDS = (42, 123)
STEPS = 2000
BATCH, SEQ_LEN = 8, 64
WARMUP = 20
DATA_SEED = 0
NUM_CONTROLS = 4
PROBE = dict(kind="token", num_samples=1000, length=32, seed=42)
BIRTH_STEPS = (0, 100, 250, 500, 1000, 2000)
BIRTH_N = 10000


def probe_steps(last: int = STEPS) -> list[int]:
    """0, the geometric start 1..32, then every 50 steps."""
    steps = [0, 1, 2, 4, 8, 16, 32] + list(range(50, last + 1, 50))
    return sorted(set(s for s in steps if s <= last))


DENSE_LAST = 100


def all_jobs() -> list[str]:
    jobs = [f"llama-{w}-{lr}" for lr in ("1e-3", "3e-3", "6e-3") for w in (64, 128, 256)]
    jobs += [f"qwen2-128-{lr}" for lr in ("1e-3", "3e-3", "6e-3")]
    jobs += [f"dense-{job}" for job in ("llama-128-3e-3", "llama-128-6e-3", "qwen2-128-6e-3", "llama-256-3e-3",
                                        "llama-256-6e-3")]
    return jobs + ["birth"]


def parse_job(job: str) -> tuple[str, int, float]:
    arch, width, lr = job.removeprefix("dense-").split("-", 2)
    return arch, int(width), float(lr)


def build(arch: str, width: int, seed: int):
    return make_causal_lm(arch, seed=seed, vocab_size=256, hidden_size=width, num_layers=4,
                          num_heads=max(2, width // 32), max_position_embeddings=128)


def _tokens() -> torch.Tensor:
    return torch.from_numpy(tokenize_directory(build_corpus("prose")).astype(np.int64))


def _train(model, tokens: torch.Tensor, lr: float, steps: list[int], probe) -> dict[int, dict]:
    """Train to steps[-1] on the shared data order, calling ``probe(model)`` at each step in ``steps``."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (steps[-1], BATCH), generator=generator)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / WARMUP))
    out = {0: probe(model)}
    done = 0
    for target in steps[1:]:
        model.train()
        for step in range(done, target):
            index = starts[step][:, None] + torch.arange(SEQ_LEN + 1)[None, :]
            window = tokens[index]
            loss = model(input_ids=window[:, :-1], labels=window[:, :-1]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        done = target
        out[target] = probe(model)
        out[target]["loss"] = float(loss.detach())
    return out


def collect(job: str, out: Path) -> None:
    torch.set_num_threads(1)
    path = out / f"{job}.pt"
    if path.exists():
        print(f"[custody] {job}: cached", flush=True)
        return
    t0 = time.perf_counter()
    tokens = _tokens()
    if job == "birth":
        arch, width, lr = "llama", 128, 3e-3
        first = build(arch, width, SEEDS[0])
        specs = {kind: ProbeSpec(kind=kind, num_samples=BIRTH_N, length=32, seed=42).resolve(first)
                 for kind in ("token", "embedding")}
    else:
        arch, width, lr = parse_job(job)
        first = build(arch, width, SEEDS[0])
        specs = {"token": ProbeSpec(**PROBE).resolve(first)}
    controls = {kind: probe_controls(first, spec, control_seeds(NUM_CONTROLS), batch_size=250).half()
                for kind, spec in specs.items()}
    del first

    def probe(model) -> dict:
        return {kind: extract_features(model, spec, batch_size=250).half() for kind, spec in specs.items()}

    runs = {}
    seeds = SEEDS[:1] if job == "birth" else SEEDS
    for seed in seeds:
        # "dense-*" jobs probe every step up to DENSE_LAST: the first ~100 steps (warmup ending,
        # peak learning rate) move the model fastest, and links there need the finest look.
        steps = (list(BIRTH_STEPS) if job == "birth" else list(range(DENSE_LAST + 1)) if job.startswith("dense-")
                 else probe_steps())
        runs[seed] = _train(build(arch, width, seed), tokens, lr, steps, probe)
        print(f"[custody] {job} seed {seed}: {time.perf_counter() - t0:.0f} s, loss "
              f"{runs[seed][steps[-1]]['loss']:.3f}",
              flush=True)
    torch.save({"job": job, "arch": arch, "width": width, "lr": lr, "controls": controls, "runs": runs,
                "specs": {k: s.to_dict() for k, s in specs.items()}, "seconds": time.perf_counter() - t0},
               out / f".{job}.pt.tmp")
    os.replace(out / f".{job}.pt.tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--jobs", default=",".join(all_jobs()))
    a = sub.add_parser("analyse")
    a.add_argument("--cache", type=Path, required=True)
    a.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "collect":
        args.out.mkdir(parents=True, exist_ok=True)
        for job in args.jobs.split(","):
            collect(job, args.out)
        return 0
    from custody_analysis import analyse  # noqa: E402  (written against seedprints_lightning.core.verdict)

    text = analyse(args.cache)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
