"""Cost of ``identify`` at real width: one checkpoint against N run directories, screened against ``--exhaustive``.

    python benchmarks/identify.py [--runs 1,10,100] [--exhaustive-runs 1] [--extrapolate 100,1000] [--dim 4096]

Synthetic run directories in the real format (``reference.safetensors``, ``controls.safetensors``,
``custody.jsonl``, packed fp16 probe files), n = 1000, D = 4096, a reference and 135 probes per run
(136 fingerprints: a 100k-step run at the default interval) and 4 controls. Probe files are hard links
into a pool of 16 distinct random matrices (so 100 runs need 0.5 GB of disk, not 95 GB); every reference
is its own file (each run is its own lineage). Run 0's last probe is the checkpoint plus noise, so there
is one true match to find. Each N is written twice, from the same probe matrices:

* **as 0.9 writes a run**: the pool's probe files are written by the ledger writer itself
  (``CustodyLedger.append``, what every face calls), so each holds its stored screen ranks and each
  record their sha256; each reference is saved as ``RunDirectory.sync_reference`` saves it. Printed:
  ``stored``, identify with no index ever built (the script checks that none was written).
* **as 0.8 wrote a run** (no stored screen): ``old, built``, the first identify, which builds each run's
  index (``identify-screen.safetensors``; every probe file's entry is computed as for a distinct file,
  since the hard links would otherwise share one computation: that is the real one-time cost), and
  ``old, index``, identify with the index in place.
* ``exhaustive``: ``identify(..., exhaustive=True)`` measured for N <= ``--exhaustive-runs``, else
  extrapolated linearly from the largest measured N's cost per test (and marked so).
* whether all found the same match, best step, z and corrected p.

First, the cost of storing the screen as a run writes a probe: ``CustodyLedger.append`` at D = 4096,
n = 1000 with and without it (median of the pool's writes). The files are in the page cache in every
path (a real directory of 90 GB is not: the old path's build would read it all from disk, the
stored screens 128 KB per file). N = 1000 is extrapolated from the largest measured N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seedprints_lightning.core import ledger as ledger_module  # noqa: E402
from seedprints_lightning.core.controls import ControlSet  # noqa: E402
from seedprints_lightning.core.files import file_sha256, save_safetensors  # noqa: E402
from seedprints_lightning.core.fingerprint import Fingerprint  # noqa: E402
from seedprints_lightning.core.ledger import (  # noqa: E402
    CONTROLS_FILE,
    CUSTODY_FILE,
    REFERENCE_FILE,
    RunDirectory,
    encode_probe_features,
    storage_features,
)
from seedprints_lightning.core.probes import ProbeSpec  # noqa: E402
from seedprints_lightning.core.records import canonical_json  # noqa: E402
from seedprints_lightning.core.screen import SCREEN_FIELD, make_screen  # noqa: E402
from seedprints_lightning.core.verdict import judge_probe  # noqa: E402
from seedprints_lightning.offline import identify as identify_module  # noqa: E402
from seedprints_lightning.offline.identify import INDEX_FILE, ScreenOptions, identify, load_runs  # noqa: E402

N_SAMPLES, POOL, CONTROLS = 1000, 16, 4
SPEC = ProbeSpec(num_samples=N_SAMPLES, length=32, vocab_size=32000)


def _template(tmp: Path):
    """A genuine verdict and ledger record (from the real writer, at a small width): what every record carries."""
    g = torch.Generator().manual_seed(1)
    small = [storage_features(torch.randn(N_SAMPLES, 16, generator=g)).float() for _ in range(4)]
    verdict = judge_probe(1, small[1], reference=small[0], anchor=small[0], anchor_step=0, controls=small[2:4])
    run = RunDirectory(tmp / "template")
    run.path.mkdir(parents=True)
    ref_sha, _ = run.sync_reference(Fingerprint(features=small[0], spec=SPEC, step=0), fresh=True, origin="benchmark")
    ledger, _ = run.open_ledger(0, None, reference_sha256=ref_sha)
    record = ledger.append(verdict, storage_features(small[1]), event="interval", anchor_index=None,
                           identity_mode="coset", identity_ratio=None)
    ledger.close()
    return verdict, {k: v for k, v in record.items() if k != "sha256"}


def _write_pool(folder: Path, dim: int, checkpoint: torch.Tensor, verdict, g: torch.Generator):
    """The pool, twice: ``{"new": [(path, sha256, screen record)], "old": [...]}``, the controls, the write costs.

    "new": written by the ledger writer (``CustodyLedger.append``: the stored screen in each file and
    record); "old": the same matrices as 0.8 wrote them (no screen). ``costs``: seconds per append with
    and without the stored screen, and of ``make_screen`` alone.
    """
    folder.mkdir(parents=True)
    run = RunDirectory(folder / "writer")
    run.path.mkdir()
    ref_sha, _ = run.sync_reference(Fingerprint(features=torch.zeros(N_SAMPLES, dim), spec=SPEC, step=0), fresh=True,
                                    origin="benchmark")
    ledger, _ = run.open_ledger(0, None, reference_sha256=ref_sha)
    pool: dict[str, list] = {"new": [], "old": []}
    costs: dict[str, list[float]] = {"with": [], "without": [], "make_screen": []}
    for i in range(POOL + 1):
        noise = torch.randn(N_SAMPLES, dim, generator=g)
        features = storage_features(noise if i < POOL else checkpoint + 0.5 * noise)
        start = time.perf_counter()
        record = ledger.append(verdict, features, event="interval", anchor_index=None, identity_mode="coset",
                               identity_ratio=None)
        costs["with"].append(time.perf_counter() - start)
        path = run.path / record["features_file"]
        pool["new"].append((path, record["features_sha256"], record[SCREEN_FIELD]))
        old = folder / f"old{i:03d}.safetensors"
        save_safetensors(old, encode_probe_features(features), {"seedprints": json.dumps({"pool": i})})
        pool["old"].append((old, file_sha256(old), None))
        start = time.perf_counter()
        make_screen(features)
        costs["make_screen"].append(time.perf_counter() - start)
    # The writer without the screen (0.8's append), for the extra cost per probe.
    original = ledger_module.make_screen
    ledger_module.make_screen = lambda features: None
    try:
        for _ in range(5):
            features = storage_features(torch.randn(N_SAMPLES, dim, generator=g))
            start = time.perf_counter()
            ledger.append(verdict, features, event="interval", anchor_index=None, identity_mode="coset",
                          identity_ratio=None)
            costs["without"].append(time.perf_counter() - start)
    finally:
        ledger_module.make_screen = original
    ledger.close()
    controls = folder / "controls.safetensors"
    ControlSet(features=torch.randn(CONTROLS, N_SAMPLES, dim, generator=g).half().float(),
               seeds=tuple(range(CONTROLS)), spec=SPEC).save(controls)
    return pool, controls, {k: statistics.median(v) for k, v in costs.items()}


def _write_runs(root: Path, first: int, count: int, probes: int, dim: int, pool: list, controls: Path,
                template: dict, g: torch.Generator, screen: bool) -> None:
    controls_sha = file_sha256(controls)
    for r in range(first, first + count):
        run = root / f"run{r:04d}" / "seedprints"
        (run / "probes").mkdir(parents=True)
        # The reference as RunDirectory.sync_reference saves it (0.9: with its screen), or as 0.8 did.
        Fingerprint(features=storage_features(torch.randn(N_SAMPLES, dim, generator=g)).float(), spec=SPEC,
                    step=0).save(run / REFERENCE_FILE, screen=screen)
        os.link(controls, run / CONTROLS_FILE)
        ref_sha = prev = file_sha256(run / REFERENCE_FILE)
        lines = []
        for i in range(probes):
            step = 740 * (i + 1)
            source, sha, stored = pool[POOL] if (r == 0 and i == probes - 1) else pool[(r * 7 + i) % POOL]
            name = f"probes/{i:06d}-step{step:08d}-bench000.safetensors"
            os.link(source, run / name)
            record = {k: v for k, v in template.items() if k != SCREEN_FIELD}
            record.update(index=i, step=step, features_file=name, features_sha256=sha, reference_sha256=ref_sha,
                          controls_sha256=controls_sha, prev_sha256=prev)
            if stored is not None:
                record[SCREEN_FIELD] = stored
            line = canonical_json(record)
            prev = hashlib.sha256(line.encode()).hexdigest()
            lines.append(line + "\n")
        (run / CUSTODY_FILE).write_text("".join(lines), encoding="utf-8")


class _EveryFileItsOwn(dict):
    """An index cache that shares nothing: every hard-linked probe file is ranked as a distinct file would be."""

    def __setitem__(self, key, value) -> None:
        pass


def _timed(fn):
    """``(result, wall seconds, CPU seconds of this process over all its threads)``."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def _answer(result) -> tuple:
    match = result.matches[0] if result.matches else None
    return (result.status, match and Path(match.best.run).parent.name, match and match.best_step, match and match.z,
            match and match.log10_p_corrected)


def _identify_first_build(checkpoint, root: Path):
    """The old path's first identify: every run's index built from its probe files, none shared."""
    cache = identify_module._IndexCache

    class Unshared(cache):
        def __init__(self) -> None:
            super().__init__()
            self.by_file = _EveryFileItsOwn()

    identify_module._IndexCache = Unshared
    try:
        return identify({SPEC: checkpoint}, load_runs([root]))
    finally:
        identify_module._IndexCache = cache


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="10,100")
    parser.add_argument("--exhaustive-runs", type=int, default=10, help="measure exhaustive up to this N")
    parser.add_argument("--old-runs", type=int, default=10, help="measure the old path (index built) up to this N")
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
        verdict, template = _template(tmp)
        pool, controls, costs = _write_pool(tmp / "pool", args.dim, checkpoint, verdict, g)
        print(f"probe write (CustodyLedger.append, median): {costs['with'] * 1e3:.0f} ms with the stored screen, "
              f"{costs['without'] * 1e3:.0f} ms without: +{(costs['with'] - costs['without']) * 1e3:.0f} ms per probe "
              f"(make_screen alone {costs['make_screen'] * 1e3:.0f} ms)")
        print(f"{'N runs':>7} {'tests':>7} {'stored s (cpu)':>15} {'old, built s (cpu)':>19} {'old, index s':>13} "
              f"{'exact':>6} {'exhaustive s (cpu)':>19} {'built/stored':>13}  answer")
        written, per_test, cpu_per_test, measured = 0, None, None, []
        for count in counts:
            for kind in ("new", "old") if count <= args.old_runs else ("new",):
                _write_runs(tmp / kind, written, count - written, args.probes, args.dim, pool[kind], controls,
                            template, g, screen=kind == "new")
            written = count
            stored, seconds, cpu = _timed(lambda: identify({SPEC: checkpoint}, load_runs([tmp / "new"])))
            assert not list((tmp / "new").rglob(INDEX_FILE)), "the stored screens should need no index"
            assert not stored.notes, stored.notes
            assert stored.screen["ranked_screens"] == 0 and stored.screen["stored_screens"] == stored.tested["tests"]
            assert _answer(stored)[1:3] == ("run0000", 740 * args.probes), stored.summary()
            measured.append((count, seconds, cpu))
            answers = {"stored": _answer(stored)}
            built_s = built_cpu = index_s = None
            if count <= args.old_runs:
                for entry in (tmp / "old").rglob(INDEX_FILE):
                    entry.unlink()  # every old run's index built in this measurement, from its probe files
                built, built_s, built_cpu = _timed(lambda: _identify_first_build(checkpoint, tmp / "old"))
                indexed, index_s, _ = _timed(lambda: identify({SPEC: checkpoint}, load_runs([tmp / "old"])))
                answers.update(built=_answer(built), indexed=_answer(indexed))
            candidates = count * (args.probes + 1 + CONTROLS)
            if count <= args.exhaustive_runs:
                exhaustive, ex_seconds, ex_cpu = _timed(lambda: identify({SPEC: checkpoint}, load_runs([tmp / "new"]),
                                                                         exhaustive=True))
                tests = exhaustive.tested["tests"] + exhaustive.tested["control_tests"]
                per_test, cpu_per_test = ex_seconds / tests, ex_cpu / tests
                answers["exhaustive"] = _answer(exhaustive)
                note = "measured"
            elif per_test is not None:
                ex_seconds, ex_cpu, note = per_test * candidates, cpu_per_test * candidates, "EXTRAPOLATED"
            else:  # --exhaustive-runs 0: nothing measured to extrapolate from
                ex_seconds = ex_cpu = float("nan")
                note = "not measured"
            same = len(set(answers.values())) == 1
            shown = (f"{'same' if same else 'DIFFERENT ' + str(answers)} ({', '.join(answers)}): "
                     f"{answers['stored'][1]} step {answers['stored'][2]} z={answers['stored'][3]:.1f}")
            old = (f"{built_s:>9.1f} ({built_cpu:>6.1f}) {index_s:>13.1f}" if built_s is not None
                   else f"{'':>19} {'':>13}")
            ratio = f"{built_s / seconds:>13.0f}" if built_s is not None else f"{'':>13}"
            print(f"{count:>7} {stored.tested['tests']:>7} {seconds:>6.1f} ({cpu:>6.1f}) {old} "
                  f"{stored.tested['exact_tests']:>6} {ex_seconds:>9.1f} ({ex_cpu:>7.1f}) {ratio}  {shown} "
                  f"(exhaustive {note})")
        # Beyond the measured N: stored = fixed part (its exact tests) + a per-run part, fitted on the two
        # largest measured N; exhaustive per test.
        (n1, w1, c1), (n2, w2, c2) = measured[-2:] if len(measured) > 1 else (measured[-1], measured[-1])
        slope_w = (w2 - w1) / (n2 - n1) if n2 != n1 else w2 / n2
        slope_c = (c2 - c1) / (n2 - n1) if n2 != n1 else c2 / n2
        for big in args.extrapolate:
            if big <= counts[-1] or per_test is None:  # nothing to extrapolate the exhaustive path from
                continue
            candidates = big * (args.probes + 1 + CONTROLS)
            wall, cpu = w2 + slope_w * (big - n2), c2 + slope_c * (big - n2)
            print(f"{big:>7} {big * (args.probes + 1):>7} {wall:>6.1f} ({cpu:>6.1f}) {'':>19} {'':>13} {'':>6} "
                  f"{per_test * candidates:>9.1f} ({cpu_per_test * candidates:>7.1f}) {'':>13}  EXTRAPOLATED: stored "
                  f"{slope_w:.3f} s ({slope_c:.3f} cpu s) per run over {w2 - slope_w * n2:.1f} s fixed, fitted on "
                  f"N={n1},{n2}; exhaustive {per_test:.3f} s ({cpu_per_test:.3f} cpu s) per test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
