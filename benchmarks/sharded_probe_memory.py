"""One probe of an FSDP2 model on 2 CPU ranks: the memory a called probe and a gathered probe take.

    OMP_NUM_THREADS=1 python benchmarks/sharded_probe_memory.py [--hidden 1024] [--layers 8] [--vocab 32000]
    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/sharded_probe_memory.py

Two gloo processes shard a LLaMA (every decoder layer, then the root, ``fully_shard``) and probe
it three times each way (n = 200, L = 16, batch 50, split over the ranks):

* ``called``: ``extract_features`` through the model's forward (FSDP2 gathers each group around
  its forward; the root group, embedding + final norm + LM head, stays gathered until resharded);
* ``gathered``: ``extract_features_gathered`` (one block's full weights at a time, LM head never).

Per rank it prints the peak RSS during a probe over the RSS before it (heap trimmed, high-water
mark reset) and the RSS after it (trimmed), and, for the embedding alone, the peak of
``DTensor.full_tensor()`` against ``gather_full_tensor``. Set ``MALLOC_MMAP_THRESHOLD_`` to make RSS
follow the live tensors (see ``benchmarks/step0_memory.py``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NUM_SAMPLES, LENGTH, BATCH, REPEATS = 200, 16, 50, 3


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _trimmed_rss() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status("VmRSS")


def _peak_of(fn) -> tuple[float, float]:
    """(peak over the RSS before, RSS after over it), MB; ``fn`` runs between."""
    before = _trimmed_rss()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM
    result = fn()
    peak = _status("VmHWM") - before
    del result
    return peak, _trimmed_rss() - before


def _worker(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from seedprints_lightning.core.probes import ProbeSpec, extract_features
    from seedprints_lightning.core.processes import measure_over_ranks
    from seedprints_lightning.core.sharded import extract_features_gathered, gather_full_tensor
    from seedprints_lightning.faces.base import release_gathered_parameters
    from seedprints_lightning.train.models import make_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    config = make_config("llama", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=max(2, args.hidden // 64), max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    spec = ProbeSpec(num_samples=NUM_SAMPLES, length=LENGTH).resolve(model)

    def called():
        with torch.no_grad():
            features = measure_over_ranks(spec, lambda padded, r: extract_features(model, padded, sample_range=r,
                                                                                   batch_size=BATCH))
        release_gathered_parameters(model)  # what a face does after a probe
        return features

    def gathered():
        return measure_over_ranks(spec, lambda padded, r: extract_features_gathered(model, padded, sample_range=r,
                                                                                    batch_size=BATCH))

    report = {}
    for name, probe in (("gathered", gathered), ("called", called)):
        report[name] = [_peak_of(probe) for _ in range(REPEATS)]
    embedding = model.get_input_embeddings().weight.detach()
    report["embedding full_tensor()"] = [_peak_of(embedding.full_tensor)]
    report["embedding gather_full_tensor"] = [_peak_of(lambda: gather_full_tensor(embedding))]
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    os._exit(0)  # no gloo teardown at exit (tests/conftest.py: exit_after_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, f"{tmp}/init", args, tmp), nprocs=2, join=True)
        reports = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
    embedding_mb = args.vocab * args.hidden * 4 / 2**20
    print(f"[sharded probe] LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} on 2 gloo ranks; "
          f"n={NUM_SAMPLES} L={LENGTH} batch {BATCH}; embedding {embedding_mb:.0f} MB fp32; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    for name in reports[0]:
        cells = []
        for r, report in enumerate(reports):
            runs = ", ".join(f"+{peak:.0f} (held {held:+.0f})" for peak, held in report[name])
            cells.append(f"rank {r}: {runs}")
        print(f"  {name:30s} peak MB  " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
