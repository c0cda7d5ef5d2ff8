"""Peak host memory of a control: whole-model probe vs streamed (layer-major, one block at a time).

    python benchmarks/layerwise_memory.py [--layers 4 8 16 32] [--hidden 512] [--samples 100 400 1000] [--length 16]

Depth is swept at the first ``--samples`` value, n at the first ``--layers`` value.

For a LLaMA config of growing depth (vocabulary 32000, MLP 4 x hidden), each case runs in a fresh
process and reports its peak resident set size (``ru_maxrss``) and that peak minus the RSS after
the imports (what the work itself added; transformers' lazy import of the LLaMA modelling code
alone is ~125 MiB, so it is imported before the baseline):

* ``whole``: ``build_control_model``'s recipe, ``AutoModelForCausalLM.from_config`` under a seed, then
  ``extract_features``: the whole model (head included) is resident;
* ``streamed``: ``probe_streamed_control``: a meta-device model, each block drawn, probed and freed.

The streamed figure should stay flat with depth (one block + the embedding + activations) and grow
with n only by the activations (n x L x hidden floats between blocks); the whole-model figure grows
with the parameter count. The probe's wall time (features only, one thread) is printed for both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _config(layers: int, hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=8)


def _worker(mode: str, layers: int, hidden: int, samples: int, length: int) -> dict[str, float]:
    import accelerate  # noqa: F401  (imported before the baseline: imports are not the work measured)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (the lazy import costs ~125 MiB of RSS)
    from transformers import AutoModelForCausalLM

    from seedprints_lightning.core.layerwise import probe_streamed_control
    from seedprints_lightning.core.probes import ProbeSpec, extract_features

    torch.set_num_threads(1)
    config = _config(layers, hidden)
    spec = ProbeSpec(num_samples=samples, length=length, vocab_size=config.vocab_size)
    baseline = _rss_mib()
    start = time.perf_counter()
    if mode == "whole":
        torch.manual_seed(1_000_003)
        model = AutoModelForCausalLM.from_config(config).eval()
        features = extract_features(model, spec)
        params = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    else:
        features = probe_streamed_control(config, 1_000_003, spec)
        params = float("nan")
    seconds = time.perf_counter() - start
    assert features.shape == (samples, hidden)
    return {"peak": _rss_mib(), "baseline": baseline, "params_mib": params, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 400, 1000])
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "LAYERS", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, layers, samples = args.worker
        print(json.dumps(_worker(mode, int(layers), args.hidden, int(samples), args.length)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    print(f"LLaMA, hidden {args.hidden}, MLP {4 * args.hidden}, vocab 32000; token probes of length {args.length}; "
          "peak RSS in MiB (added = peak - RSS after imports), probe seconds")
    print(f"{'layers':>6} {'n':>5} {'params MiB':>10} {'whole peak':>10} {'added':>7} {'s':>6} {'streamed peak':>13} "
          f"{'added':>7} {'s':>6} {'added ratio':>11}")
    cases = [(layers, args.samples[0]) for layers in args.layers]
    cases += [(args.layers[0], samples) for samples in args.samples[1:]]
    for layers, samples in cases:
        results = {}
        for mode in ("whole", "streamed"):
            command = [sys.executable, str(Path(__file__).resolve()), "--hidden", str(args.hidden), "--length",
                       str(args.length), "--worker", mode, str(layers), str(samples)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{mode} worker failed:\n{done.stderr[-3000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        whole, streamed = results["whole"], results["streamed"]
        added_whole = whole["peak"] - whole["baseline"]
        added_streamed = streamed["peak"] - streamed["baseline"]
        print(f"{layers:>6} {samples:>5} {whole['params_mib']:>10.0f} {whole['peak']:>10.0f} {added_whole:>7.0f} "
              f"{whole['seconds']:>6.1f} {streamed['peak']:>13.0f} {added_streamed:>7.0f} {streamed['seconds']:>6.1f} "
              f"{added_whole / max(added_streamed, 1.0):>10.1f}x", flush=True)


if __name__ == "__main__":
    main()
