"""``seedprints audit --chain`` at real width: the plain replay against the batched one, on one run directory.

    python benchmarks/audit_chain.py [--records 135] [--dim 4096] [--samples 1000] [--controls 4]
                                     [--run-dir DIR] [--threads N] [--plain-records K] [--write-plainly]

Writes (or reuses, with ``--run-dir`` holding one already) a synthetic run directory through
the real writer: :class:`~seedprints_lightning.core.chain.CustodyChain` with the run's
:class:`~seedprints_lightning.core.ledger.CustodyLedger` (``RunDirectory.open_ledger``), a
reference and ``--controls`` fresh-init controls of ``[n, D]`` Gaussian features, then
``--records`` probes, each the previous one plus N(0, 0.3^2) noise (every link holds, as in
a healthy run: 135 records are a 100k-step run at the default interval), every 10th followed
by a save record. The chain writes every record itself (``observe``: storage, verdict, ledger
line, anchor); only its verdicts are computed from prepared matrices (as the batched audit
computes them), which makes writing as fast as the batched audit. The plain audit below then
recomputes every one of those figures the plain way and compares it with the record, so a
recorded figure that differed would fail it. ``--write-plainly`` writes with ``chain.test``.

Then, in one process, one after the other on the same files:

* the plain replay, ``verify_chain(run, batched=False)``: every record through
  ``CustodyChain.observe``, each test normalising and sorting both of its sides;
* the batched one, ``verify_chain(run)`` (the default, what ``seedprints audit --chain`` runs):
  each matrix normalised and sorted once.

Both are timed on the first ``--plain-records`` records (default: all; a clean cut of a ledger
verifies on its own), for the ratio on the same records; the batched audit also on all of them.
It prints the times, seconds per record and the ratio, and checks that both audits pass and that
every recomputed figure is the same, bit for bit (``repr`` of every verdict), and equal to the
recorded one (the audit's own check: no problem). ``--threads`` sets torch's and the kernel's
threads (default: torch's, i.e. the cores).
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

from seedprints_lightning.core.chain import CustodyChain  # noqa: E402
from seedprints_lightning.core.controls import ControlSet, save_controls  # noqa: E402
from seedprints_lightning.core.files import file_sha256  # noqa: E402
from seedprints_lightning.core.fingerprint import Fingerprint  # noqa: E402
from seedprints_lightning.core.ledger import RunDirectory  # noqa: E402
from seedprints_lightning.core.probes import ProbeSpec  # noqa: E402
from seedprints_lightning.core.verify import _PreparedJudge, verify_chain  # noqa: E402


class PreparedVerdictChain(CustodyChain):
    """The real chain, whose :meth:`test` of the live probe takes the batched audit's path (the same figures)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._prepared = _PreparedJudge(self)

    def test(self, step, live, anchor=None):
        made = self._prepared.verdict(self, step, live) if anchor is None else None
        return made[0] if made is not None else super().test(step, live, anchor)


def write_run(path: Path, records: int, dim: int, samples: int, controls: int, seed: int = 0,
              plainly: bool = False) -> Path:
    """A run directory of ``records`` probe records (and a save record after every 10th), written by the real writer."""
    g = torch.Generator().manual_seed(seed)
    run = RunDirectory(path)
    spec = ProbeSpec(kind="token", num_samples=samples, length=32, vocab_size=32000, seed=42)
    reference = Fingerprint(features=torch.randn(samples, dim, generator=g), spec=spec, model_class="Synthetic",
                            step=0)
    reference.save(run.reference_path)
    control_set = ControlSet.none()
    if controls:
        seeds = tuple(1_000_003 + i for i in range(controls))
        save_controls(run.controls_path, torch.randn(controls, samples, dim, generator=g), seeds, spec)
        control_set = ControlSet.load(run.controls_path)
    chain = (CustodyChain if plainly else PreparedVerdictChain)(reference, controls=control_set,
                                                                reference_source="step0")
    ledger, _ = run.open_ledger(0, None, reference_sha256=file_sha256(run.reference_path),
                                controls_sha256=file_sha256(run.controls_path) if controls else None)
    chain.attach_ledger(ledger)
    features = reference.features
    start = time.perf_counter()
    for i in range(records):
        features = features + 0.3 * torch.randn(samples, dim, generator=g)
        step = 750 * (i + 1)
        chain.observe(step, features)
        if (i + 1) % 10 == 0:
            chain.record_save(step, f"{i:064x}"[-64:], checkpoint=f"step{step}.ckpt")
        if (i + 1) % 10 == 0 or i + 1 == records:
            elapsed = time.perf_counter() - start
            print(f"  written {i + 1}/{records} records ({elapsed / (i + 1):.2f} s per record)", flush=True)
    ledger.close()
    return run.path


def _records(path: Path) -> int:
    ledger = path / "custody.jsonl"
    return sum(1 for line in ledger.read_text().splitlines() if line.strip()) if ledger.is_file() else 0


def _first_records(path: Path, count: int, into: Path) -> Path:
    """A run directory holding the first ``count`` records of ``path``'s ledger (its other files linked, not copied)."""
    into.mkdir(parents=True)
    for name in ("reference.safetensors", "controls.safetensors", "probes"):
        if (path / name).exists():
            (into / name).symlink_to((path / name).resolve())
    lines = (path / "custody.jsonl").read_text().splitlines(keepends=True)
    (into / "custody.jsonl").write_text("".join(lines[:count]))
    return into


def _timed(label: str, run: Path, probes: int, **kwargs):
    start = time.perf_counter()
    audit = verify_chain(run, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{label:<34} {seconds:8.1f} s  ({seconds / probes:.3f} s per probe record)", flush=True)
    return audit, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=135, help="probe records (default 135: 100k steps)")
    parser.add_argument("--dim", type=int, default=4096, help="feature width D (default 4096)")
    parser.add_argument("--samples", type=int, default=1000, help="probe samples n (default 1000)")
    parser.add_argument("--controls", type=int, default=4, help="fresh-init controls (default 4)")
    parser.add_argument("--run-dir", default=None, help="write the run here, or reuse the one here")
    parser.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    parser.add_argument("--plain-records", type=int, default=None,
                        help="time both audits on the first K ledger records (default: all)")
    parser.add_argument("--write-plainly", action="store_true", help="write the run with chain.test (slow)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="audit-chain-")
    path = Path(scratch.name) / "seedprints" if args.run_dir is None else Path(args.run_dir)
    saves = args.records // 10
    print(f"audit --chain benchmark: {args.records} probe records (+{saves} saves), D={args.dim}, n={args.samples}, "
          f"{args.controls} controls, {torch.get_num_threads()} threads", flush=True)
    try:
        if _records(path) == args.records + saves:
            print(f"reusing {path}", flush=True)
        elif path.exists() and any(path.iterdir()):
            parser.error(f"{path} holds another run: pass an empty or new --run-dir")
        else:
            print(f"writing {path}", flush=True)
            write_run(path, args.records, args.dim, args.samples, args.controls, plainly=args.write_plainly)
        total = args.records + saves
        cut = total if args.plain_records is None else min(total, args.plain_records)
        sample = path if cut == total else _first_records(path, cut, Path(scratch.name) / "first")
        lines = (sample / "custody.jsonl").read_text().splitlines()
        probes = sum(1 for line in lines if '"kind":"save"' not in line)
        print(f"the first {cut} records ({probes} probes):", flush=True)
        plain, plain_s = _timed("  plain replay (batched=False)", sample, probes, batched=False)
        batched, batched_s = _timed("  batched (audit --chain default)", sample, probes)
        same = repr(batched.recomputed) == repr(plain.recomputed)
        print(f"  ratio {plain_s / batched_s:.2f} x; figures {'identical, bit for bit' if same else 'DIFFER'}; "
              f"plain audit {'ok' if plain.ok else 'NOT ok'}, batched audit {'ok' if batched.ok else 'NOT ok'} "
              "(every recomputed figure equals the recorded one)", flush=True)
        ok = same and plain.ok and batched.ok
        if cut < total:
            print(f"all {total} records ({args.records} probes):", flush=True)
            full, full_s = _timed("  batched (audit --chain default)", path, args.records)
            print(f"  batched audit {'ok' if full.ok else 'NOT ok'}; the plain replay at its rate above would take "
                  f"{plain_s / probes * args.records:.0f} s", flush=True)
            ok = ok and full.ok
        return 0 if ok else 1
    finally:
        scratch.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
