"""Cost of ``identify``: one checkpoint against N recorded runs of 30 probes (n = 1000, D = 128).

    python benchmarks/identify.py [--runs 10,100,1000] [--probes 30] [--extrapolate-above 100]

Synthetic runs, in memory (:meth:`RunEvidence.from_features`): each run has a reference, 30
probes and 4 controls, fp16-rounded random ``[1000, 128]`` matrices drawn from a pool of 64 (so
memory stays small; every candidate is still normalised, sorted and tested in full). Run 0's
last probe is the checkpoint plus noise, so there is one true match to find. Printed per N: the
wall time of one identification, the tests made (``m`` = N x 31 candidate tests + N x 4 control
tests) and the cost per test. N above ``--extrapolate-above`` is extrapolated linearly from the
largest measured N's cost per test, and marked so (pass a larger value to measure it: N = 1000
takes about 3 minutes on 2 cores).

The loading cost is measured separately: ``--disk-runs`` run directories written in the real
format (reference, controls, ledger records, fp16 probe files) are read by ``load_runs`` and
identified, and the difference from the same runs in memory is reported per candidate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seedprints_lightning.core.controls import ControlSet  # noqa: E402
from seedprints_lightning.core.fingerprint import Fingerprint  # noqa: E402
from seedprints_lightning.core.ledger import RunDirectory, storage_features  # noqa: E402
from seedprints_lightning.core.probes import ProbeSpec  # noqa: E402
from seedprints_lightning.core.verdict import judge_probe  # noqa: E402
from seedprints_lightning.offline.identify import RunEvidence, identify, load_runs  # noqa: E402

N_SAMPLES, DIM, POOL, CONTROLS = 1000, 128, 64, 4
SPEC = ProbeSpec(num_samples=N_SAMPLES, length=32, vocab_size=32000)


def _pool(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [storage_features(torch.randn(N_SAMPLES, DIM, generator=g)).float() for _ in range(POOL)]


def _synthetic_runs(count: int, probes: int, pool: list[torch.Tensor], planted: torch.Tensor) -> list[RunEvidence]:
    runs = []
    for r in range(count):
        pick = [pool[(r * 7 + i) % POOL] for i in range(probes + 1 + CONTROLS)]
        reference = pick[0] + 1e-3 * r  # a distinct lineage digest per run
        features = [(10 * (i + 1), pick[1 + i]) for i in range(probes)]
        if r == 0:
            features[-1] = (10 * probes, planted)
        controls = torch.stack(pick[1 + probes:])
        runs.append(RunEvidence.from_features(f"run{r:04d}", SPEC, reference, features, controls=controls))
    return runs


def _write_runs(root: Path, count: int, probes: int, pool: list[torch.Tensor], planted: torch.Tensor) -> None:
    verdict = judge_probe(1, pool[1], reference=pool[0], anchor=pool[0], anchor_step=0, controls=pool[2:4])
    for r in range(count):
        run = RunDirectory(root / f"run{r:04d}" / "seedprints")
        run.path.mkdir(parents=True)
        pick = [pool[(r * 7 + i) % POOL] for i in range(probes + 1 + CONTROLS)]
        reference = Fingerprint(features=pick[0] + 1e-3 * r, spec=SPEC, step=0)
        ref_sha, _ = run.sync_reference(reference, fresh=True, origin="benchmark")
        ControlSet(features=torch.stack(pick[1 + probes:]), seeds=tuple(range(CONTROLS)), spec=SPEC).save(
            run.controls_path)
        ledger, _ = run.open_ledger(0, None, reference_sha256=ref_sha)
        for i in range(probes):
            features = planted if (r == 0 and i == probes - 1) else pick[1 + i]
            step_verdict = type(verdict)(step=10 * (i + 1), birth=verdict.birth, link=verdict.link, anchor_step=0)
            ledger.append(step_verdict, storage_features(features), event="interval", anchor_index=None,
                          identity_mode="coset", identity_ratio=None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="10,100,1000")
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--extrapolate-above", type=int, default=100)
    parser.add_argument("--disk-runs", type=int, default=10)
    args = parser.parse_args()
    pool = _pool()
    g = torch.Generator().manual_seed(9)  # the checkpoint: unlike every pool matrix, but for run 0's last probe
    checkpoint = storage_features(torch.randn(N_SAMPLES, DIM, generator=g))
    planted = storage_features(checkpoint + 0.5 * torch.randn(N_SAMPLES, DIM, generator=g)).float()
    print(f"identify: n={N_SAMPLES}, D={DIM}, {args.probes} probes + reference per run, {CONTROLS} controls per run, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'N runs':>7} {'tests':>8} {'control tests':>14} {'seconds':>9} {'ms/test':>8}  note")
    identify({SPEC: checkpoint}, _synthetic_runs(1, args.probes, pool, planted))  # warm up (numba compile)
    per_test = None
    for count in (int(x) for x in args.runs.split(",")):
        candidates, controls = count * (args.probes + 1), count * CONTROLS
        if count > args.extrapolate_above and per_test is not None:
            print(f"{count:>7} {candidates:>8} {controls:>14} {per_test * (candidates + controls):>9.1f} "
                  f"{per_test * 1e3:>8.2f}  EXTRAPOLATED from the largest measured N")
            continue
        runs = _synthetic_runs(count, args.probes, pool, planted)
        start = time.perf_counter()
        result = identify({SPEC: checkpoint}, runs)
        seconds = time.perf_counter() - start
        per_test = seconds / (candidates + controls)
        assert result.run == "run0000" and result.matches[0].best_step == 10 * args.probes, result.summary()
        print(f"{count:>7} {result.tested['tests']:>8} {result.tested['control_tests']:>14} {seconds:>9.2f} "
              f"{per_test * 1e3:>8.2f}  measured; match {result.run} z={result.matches[0].z:.1f}")

    if args.disk_runs:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            _write_runs(root, args.disk_runs, args.probes, pool, planted)
            start = time.perf_counter()
            loaded = load_runs([root])
            scan = time.perf_counter() - start
            start = time.perf_counter()
            on_disk = identify({SPEC: checkpoint}, loaded)
            from_disk = time.perf_counter() - start
            start = time.perf_counter()
            identify({SPEC: checkpoint}, _synthetic_runs(args.disk_runs, args.probes, pool, planted))
            in_memory = time.perf_counter() - start
            assert on_disk.run == os.fspath(root / "run0000" / "seedprints"), on_disk.summary()
            files = args.disk_runs * (args.probes + 2)
            print(f"loading, {args.disk_runs} run directories on disk: load_runs (scan, ledgers, references) "
                  f"{scan:.2f} s ({scan / args.disk_runs * 1e3:.1f} ms/run); identify from disk {from_disk:.2f} s vs "
                  f"in memory {in_memory:.2f} s: reading features {(from_disk - in_memory) / files * 1e3:.2f} ms per "
                  "file (probe, reference, controls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
