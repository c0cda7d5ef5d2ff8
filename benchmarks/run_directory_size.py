"""What a run directory costs per probe, plain fp16 against the packed probe file, and why no exact encoding is smaller.

    python benchmarks/run_directory_size.py [--widths 4096 8192] [--samples 1000] [--length 4] [--probes DIR ...]

For each width D, the features of a fresh 1-layer LLaMA of that width (token probe, n samples)
are rounded as the callback stores them (``storage_features``), then written both ways: the
plain safetensors file (one fp16 ``[n, D]`` tensor, what 0.5 wrote) and the packed one
(``encode_probe_features``: low bytes as they are, high bytes deflated). Printed per width:
bytes per probe, the packed / plain ratio, the write and read time of the packed file (median
of 3, as ratios to the plain file's in the same run: this machine is noisy), that the read-back
is bit-exact, the order-0 entropy of the high and low bytes (no lossless coder that treats
values independently gets below their sum), and what 135 probes (a 100k-step run at
``every_n_steps=1000``) and 500 probes cost. ``--probes`` adds the probe files of existing run
directories (trained features, e.g. ``runs/demo-own/version_0/seedprints`` after ``make demo``).

The test reads values, not only ranks: the identity dimensions are chosen by column means, each
row is softmax-normalised over them (which couples a row's columns), and the aggregate signal
averages raw values. So per-column ranks do not determine the figures, and int16 ranks would be
as large as the fp16 values anyway.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from seedprints_lightning import ProbeSpec  # noqa: E402
from seedprints_lightning.core.files import save_safetensors  # noqa: E402
from seedprints_lightning.core.ledger import (  # noqa: E402
    encode_probe_features,
    load_probe_features,
    storage_features,
)
from seedprints_lightning.core.probes import extract_features  # noqa: E402


def _entropy_bits(values: np.ndarray) -> float:
    counts = np.bincount(values, minlength=256).astype(np.float64)
    p = counts[counts > 0] / values.size
    return float(-(p * np.log2(p)).sum())


def _median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(label: str, features: torch.Tensor, tmp: Path) -> dict[str, float]:
    features = storage_features(features)
    if features.dtype != torch.float16:
        raise SystemExit(f"{label}: the features do not fit fp16, so they are stored plain (fp32)")
    plain, packed = tmp / "plain.safetensors", tmp / "packed.safetensors"
    meta = {"seedprints": '{"index": 0, "step": 0}'}
    write_plain = _median_seconds(lambda: save_safetensors(plain, {"features": features}, meta))
    write_packed = _median_seconds(lambda: save_safetensors(packed, encode_probe_features(features), meta))
    read_plain = _median_seconds(lambda: load_probe_features(plain))
    read_packed = _median_seconds(lambda: load_probe_features(packed))
    back = load_probe_features(packed)
    exact = back.dtype == torch.float16 and torch.equal(back.view(torch.int16), features.view(torch.int16))
    pairs = features.numpy().astype("<f2").view(np.uint8).reshape(-1, 2)
    h_low, h_high = _entropy_bits(pairs[:, 0]), _entropy_bits(pairs[:, 1])
    plain_b, packed_b = plain.stat().st_size, packed.stat().st_size
    n, dim = features.shape
    print(f"{label}: n = {n}, D = {dim}: plain {plain_b / 2**20:.2f} MiB, packed {packed_b / 2**20:.2f} MiB "
          f"(x {packed_b / plain_b:.3f}); bit-exact read-back: {exact}")
    print(f"    write x {write_packed / write_plain:.1f} ({write_packed:.3f} s), read x {read_packed / read_plain:.1f} "
          f"({read_packed:.3f} s) of the plain file's; entropy: high byte {h_high:.2f} bits, low byte {h_low:.2f} bits "
          f"-> order-0 bound x {(h_high + h_low) / 16:.3f}")
    print(f"    135 probes: {135 * plain_b / 2**30:.2f} -> {135 * packed_b / 2**30:.2f} GiB; "
          f"500 probes: {500 * plain_b / 2**30:.2f} -> {500 * packed_b / 2**30:.2f} GiB", flush=True)
    if not exact:
        raise SystemExit(f"{label}: the packed file did not read back bit-exact")
    return {"ratio": packed_b / plain_b}


def init_features(width: int, samples: int, length: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from seedprints_lightning.train.models import make_config

    config = make_config("llama", vocab_size=1024, hidden_size=width, num_layers=1, num_heads=max(2, width // 128),
                         max_position_embeddings=max(64, length))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return extract_features(model, ProbeSpec(num_samples=samples, length=length), batch_size=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--length", type=int, default=4, help="probe length (the cost is the forward pass)")
    parser.add_argument("--probes", nargs="*", default=[], metavar="RUN_DIR",
                        help="run directories whose probes/*.safetensors to measure too")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            start = time.perf_counter()
            features = init_features(width, args.samples, args.length)
            label = f"fresh 1-layer LLaMA, width {width} (probe {time.perf_counter() - start:.0f} s)"
            ratios.append(measure(label, features, Path(tmp))["ratio"])
        for run_dir in args.probes:
            files = sorted(Path(run_dir).glob("probes/*.safetensors"))
            if not files:
                raise SystemExit(f"{run_dir} has no probes/*.safetensors")
            trained = torch.cat([load_probe_features(f).float() for f in files[-8:]], dim=1)
            ratios.append(measure(f"{run_dir}: its last {min(8, len(files))} probes side by side", trained,
                                  Path(tmp))["ratio"])
    print(f"packed / plain over all: {min(ratios):.3f} .. {max(ratios):.3f}"
          f" (geometric mean {math.exp(statistics.fmean(math.log(r) for r in ratios)):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
