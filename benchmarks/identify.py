"""Cost of ``identify`` at real width: one checkpoint against N run directories, screened against ``--exhaustive``.

    python benchmarks/identify.py [--runs 1,10,100] [--exhaustive-runs 1] [--extrapolate 100,1000] [--dim 4096]

Synthetic run directories in the real format (``reference.safetensors``, ``controls.safetensors``,
``custody.jsonl``, packed fp16 probe files), n = 1000, D = 4096, a reference and 135 probes per run
(136 fingerprints: a 100k-step run at the default interval) and 4 controls. Probe files are hard links
into a pool of 16 distinct random matrices (so 100 runs need 0.5 GB of disk, not 95 GB); every reference
is its own file (each run is its own lineage). Run 0's last probe is the checkpoint plus noise, so there
is one true match to find. Printed per N, on the same directories:

* ``index``: the first screened identify, which builds each run's screen index
  (``identify-screen.safetensors``). Hard-linked probes share one index entry computation, so this
  figure is NOT a real first build; the per-fingerprint build cost measured on distinct files is
  printed separately, with what it means for N real runs.
* ``screened``: identify with the index in place (every later identify of those runs).
* ``exhaustive``: ``identify(..., exhaustive=True)`` measured for N <= ``--exhaustive-runs``, else
  extrapolated linearly from the largest measured N's cost per test (and marked so).
* whether both found the same match, best step, z and corrected p (where exhaustive was measured).

N = 1000 is extrapolated from the largest measured N (screened: per run; exhaustive: per test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seedprints_lightning.core.controls import ControlSet  # noqa: E402
from seedprints_lightning.core.files import file_sha256, save_safetensors  # noqa: E402
from seedprints_lightning.core.fingerprint import Fingerprint  # noqa: E402
from seedprints_lightning.core.ledger import (  # noqa: E402
    CONTROLS_FILE,
    CUSTODY_FILE,
    REFERENCE_FILE,
    RunDirectory,
    encode_probe_features,
    load_probe_features,
    storage_features,
)
from seedprints_lightning.core.probes import ProbeSpec  # noqa: E402
from seedprints_lightning.core.stats import normalised_column_ranks  # noqa: E402
from seedprints_lightning.core.verdict import judge_probe  # noqa: E402
from seedprints_lightning.offline.identify import ScreenOptions, identify, load_runs  # noqa: E402

N_SAMPLES, POOL, CONTROLS = 1000, 16, 4


def _template_record(tmp: Path, spec: ProbeSpec) -> dict:
    """One genuine ledger record (from the real writer, at a small width): the fields every record carries."""
    g = torch.Generator().manual_seed(1)
    small = [storage_features(torch.randn(N_SAMPLES, 16, generator=g)).float() for _ in range(4)]
    verdict = judge_probe(1, small[1], reference=small[0], anchor=small[0], anchor_step=0, controls=small[2:4])
    run = RunDirectory(tmp / "template")
    run.path.mkdir(parents=True)
    ref_sha, _ = run.sync_reference(Fingerprint(features=small[0], spec=spec, step=0), fresh=True, origin="benchmark")
    ledger, _ = run.open_ledger(0, None, reference_sha256=ref_sha)
    record = ledger.append(verdict, storage_features(small[1]), event="interval", anchor_index=None,
                           identity_mode="coset", identity_ratio=None)
    ledger.close()
    return {k: v for k, v in record.items() if k != "sha256"}


def _write_pool(folder: Path, dim: int, checkpoint: torch.Tensor, g: torch.Generator) -> tuple[list, Path]:
    """POOL distinct probe files and the planted one (the checkpoint plus noise): ``[(path, sha256)]``."""
    folder.mkdir(parents=True)
    pool = []
    for i in range(POOL + 1):
        if i < POOL:
            features = storage_features(torch.randn(N_SAMPLES, dim, generator=g))
        else:
            features = storage_features(checkpoint + 0.5 * torch.randn(N_SAMPLES, dim, generator=g))
        path = folder / f"pool{i:03d}.safetensors"
        save_safetensors(path, encode_probe_features(features), {"seedprints": json.dumps({"pool": i})})
        pool.append((path, file_sha256(path)))
    controls = folder / "controls.safetensors"
    ControlSet(features=torch.randn(CONTROLS, N_SAMPLES, dim, generator=g).half().float(),
               seeds=tuple(range(CONTROLS)), spec=SPEC).save(controls)
    return pool, controls


def _write_runs(root: Path, first: int, count: int, probes: int, dim: int, pool: list, controls: Path,
                template: dict, g: torch.Generator) -> None:
    controls_sha = file_sha256(controls)
    for r in range(first, first + count):
        run = root / f"run{r:04d}" / "seedprints"
        (run / "probes").mkdir(parents=True)
        Fingerprint(features=storage_features(torch.randn(N_SAMPLES, dim, generator=g)).float(), spec=SPEC,
                    step=0).save(run / REFERENCE_FILE)
        os.link(controls, run / CONTROLS_FILE)
        ref_sha = prev = file_sha256(run / REFERENCE_FILE)
        lines = []
        for i in range(probes):
            step = 740 * (i + 1)
            source, sha = pool[POOL] if (r == 0 and i == probes - 1) else pool[(r * 7 + i) % POOL]
            name = f"probes/{i:06d}-step{step:08d}-bench000.safetensors"
            os.link(source, run / name)
            record = {**template, "index": i, "step": step, "features_file": name, "features_sha256": sha,
                      "reference_sha256": ref_sha, "controls_sha256": controls_sha, "prev_sha256": prev}
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
            prev = hashlib.sha256(line.encode()).hexdigest()
            lines.append(line + "\n")
        (run / CUSTODY_FILE).write_text("".join(lines), encoding="utf-8")


def _timed(fn):
    """``(result, wall seconds, CPU seconds of this process over all its threads)``."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def _answer(result) -> tuple:
    match = result.matches[0] if result.matches else None
    return (result.status, result.run, match and match.best_step, match and match.z,
            match and match.log10_p_corrected)


SPEC = ProbeSpec(num_samples=N_SAMPLES, length=32, vocab_size=32000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="10,100")
    parser.add_argument("--exhaustive-runs", type=int, default=10, help="measure exhaustive up to this N")
    parser.add_argument("--probes", type=int, default=135)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--extrapolate", type=lambda v: [int(x) for x in v.split(",")], default=[100, 1000],
                        help="N to extrapolate to, beyond the largest measured")
    parser.add_argument("--dir", default=None, help="where to write the runs (default: a temporary directory)")
    args = parser.parse_args()
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    counts = sorted(int(x) for x in args.runs.split(","))
    g = torch.Generator().manual_seed(9)
    checkpoint = storage_features(torch.randn(N_SAMPLES, args.dim, generator=g)).float()
    screen = ScreenOptions()
    print(f"identify: n={N_SAMPLES}, D={args.dim}, {args.probes} probes + reference per run, {CONTROLS} controls, "
          f"screen {screen.columns} columns / margin {screen.margin:g} SE, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        template = _template_record(tmp, SPEC)
        pool, controls = _write_pool(tmp / "pool", args.dim, checkpoint, g)
        # The index's per-fingerprint build cost on distinct files (read, sha256, inflate, normalise, rank).
        columns = screen.subset(args.dim)
        start = time.perf_counter()
        for path, sha in pool[:4]:  # what identify does per fingerprint: check the sha256, inflate, rank
            assert file_sha256(path) == sha
            normalised_column_ranks(load_probe_features(path).float(), columns)
        per_fp = (time.perf_counter() - start) / 4
        print(f"index build, per distinct fingerprint: {per_fp * 1e3:.0f} ms (a real first identify of N runs of "
              f"{args.probes + 1} fingerprints builds N x {args.probes + 1} of these once: "
              f"{per_fp * 100 * (args.probes + 1) / 60:.1f} min for N=100)")
        print(f"{'N runs':>7} {'tests':>7} {'index s':>8} {'screened s (cpu)':>17} {'exact':>6} "
              f"{'exhaustive s (cpu)':>19} {'ratio':>6}  answer")
        root, written, per_test, cpu_per_test, measured = tmp / "runs", 0, None, None, []
        for count in counts:
            _write_runs(root, written, count - written, args.probes, args.dim, pool, controls, template, g)
            written = count
            _, build, _ = _timed(lambda: identify({SPEC: checkpoint}, load_runs([root])))
            screened, seconds, cpu = _timed(lambda: identify({SPEC: checkpoint}, load_runs([root])))
            expected = os.fspath(root / "run0000" / "seedprints")
            assert screened.run == expected and screened.matches[0].best_step == 740 * args.probes, screened.summary()
            measured.append((count, seconds, cpu))
            candidates = count * (args.probes + 1 + CONTROLS)
            if count <= args.exhaustive_runs:
                exhaustive, ex_seconds, ex_cpu = _timed(lambda: identify({SPEC: checkpoint}, load_runs([root]),
                                                                         exhaustive=True))
                tests = exhaustive.tested["tests"] + exhaustive.tested["control_tests"]
                per_test, cpu_per_test = ex_seconds / tests, ex_cpu / tests
                same = "same" if _answer(exhaustive) == _answer(screened) else f"DIFFERENT {_answer(exhaustive)}"
                note = "measured"
            else:
                ex_seconds, ex_cpu = per_test * candidates, cpu_per_test * candidates
                same, note = "exhaustive extrapolated per test", "EXTRAPOLATED"
            print(f"{count:>7} {screened.tested['tests']:>7} {build:>8.1f} {seconds:>8.1f} ({cpu:>6.1f}) "
                  f"{screened.tested['exact_tests']:>6} {ex_seconds:>9.1f} ({ex_cpu:>7.1f}) "
                  f"{ex_seconds / seconds:>6.0f}  "
                  f"{same}: {Path(screened.run).parent.name} step {screened.matches[0].best_step} "
                  f"z={screened.matches[0].z:.1f} (exhaustive {note})")
        # Beyond the measured N: screened = fixed part (its exact tests) + a per-run part, fitted on the two
        # largest measured N; exhaustive per test.
        (n1, w1, c1), (n2, w2, c2) = measured[-2:] if len(measured) > 1 else (measured[-1], measured[-1])
        slope_w = (w2 - w1) / (n2 - n1) if n2 != n1 else w2 / n2
        slope_c = (c2 - c1) / (n2 - n1) if n2 != n1 else c2 / n2
        for big in args.extrapolate:
            if big <= counts[-1]:
                continue
            candidates = big * (args.probes + 1 + CONTROLS)
            wall, cpu = w2 + slope_w * (big - n2), c2 + slope_c * (big - n2)
            print(f"{big:>7} {big * (args.probes + 1):>7} {'':>8} {wall:>8.1f} ({cpu:>6.1f}) {'':>6} "
                  f"{per_test * candidates:>9.1f} ({cpu_per_test * candidates:>7.1f}) "
                  f"{per_test * candidates / wall:>6.0f}  EXTRAPOLATED: screened {slope_w:.3f} s ({slope_c:.3f} cpu s) "
                  f"per run over {w2 - slope_w * n2:.1f} s "
                  f"fixed, fitted on N={n1},{n2}; exhaustive {per_test:.3f} s ({cpu_per_test:.3f} cpu s) per test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
