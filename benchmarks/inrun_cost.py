"""What one in-run probe's TEST costs the training host at real width, against a training step.

    python benchmarks/inrun_cost.py [--widths 4096 8192] [--samples 1000] [--repeats 3]

For each width D: one probe's tests as a face runs them (``CustodyChain.observe``: the birth test
against the reference, the custody link against the anchor, and the default 4 fresh-init controls
against the live features; no ledger file, so only the statistics are timed), on ``[n, D]``
features, against one optimizer step (forward, backward, AdamW) of a one-decoder-layer LLaMA of
that width (vocab 1024 so the step is the layer's, batch 1 x 128 tokens) on the same CPU. A real model of that width has
~32 such layers, so its step costs at least ~32x the step measured here: the printed share is an
upper bound of the test's cost relative to a real step on this host. The forward passes of the
probe itself are not included (they cost what ``n`` sequences of the model's own forward cost;
docs/benchmarks.md, Speed).

Both are timed in one run, interleaved, best of ``--repeats``. Results and the command go to
docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import platform

import torch
from speed import best_of  # benchmarks/speed.py: run as a script, this folder is on sys.path


def probe_test_seconds(dim: int, samples: int, repeats: int) -> float:
    from seedprints_lightning.core.chain import CustodyChain
    from seedprints_lightning.core.controls import DEFAULT_NUM_CONTROLS, ControlSet
    from seedprints_lightning.core.fingerprint import Fingerprint
    from seedprints_lightning.core.probes import ProbeSpec

    g = torch.Generator().manual_seed(dim)
    base = torch.randn(samples, dim, generator=g)
    reference = Fingerprint(features=base.half().float(), spec=ProbeSpec(num_samples=samples, vocab_size=32000), step=0)
    controls = ControlSet(features=torch.randn(DEFAULT_NUM_CONTROLS, samples, dim, generator=g),
                          seeds=tuple(range(DEFAULT_NUM_CONTROLS)))
    chain = CustodyChain(reference, controls=controls)
    live = 0.7 * base + 0.3 * torch.randn(samples, dim, generator=g)
    step = iter(range(1, 10 ** 6))
    return best_of(lambda: chain.observe(next(step), live), repeats)


def train_step_seconds(dim: int, repeats: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=dim, intermediate_size=int(dim * 8 / 3) // 256 * 256, num_hidden_layers=1,
                         num_attention_heads=dim // 128, num_key_value_heads=dim // 128, vocab_size=1024)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 1024, (1, 128))

    def step() -> None:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state is allocated on the first step
    return best_of(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, n = {args.samples}")
    print(f"{'D':>6} {'test s/probe':>13} {'1-layer step s':>15} {'test / 1-layer step':>20} "
          f"{'test / 32-layer step (est.)':>28}")
    for dim in args.widths:
        test = probe_test_seconds(dim, args.samples, args.repeats)
        step = train_step_seconds(dim, args.repeats)
        print(f"{dim:>6} {test:>13.2f} {step:>15.2f} {test / step:>20.2f} {test / (32 * step):>28.3f}")


if __name__ == "__main__":
    main()
