"""The ``seedprints`` command line: thin argparse adapters over the library.

Commands::

    seedprints fingerprint SOURCE -o FILE.safetensors   probe a model, save its fingerprint
    seedprints controls SOURCE -o controls.safetensors  precompute a run's fresh-init controls
    seedprints compare A B [--expect related|unrelated] is B descended from A?
    seedprints plot LOGDIR [LOGDIR ...] [-o drift.png]  drift curves from TensorBoard logs
    seedprints audit REFERENCE CHECKPOINTS... [-o PNG]  every checkpoint against a reference
    seedprints audit --chain RUN_DIR [CKPT]             re-verify a run's custody ledger offline
                     [--public-key PUB.pem]             ... and every record's signature by the owner's key
    seedprints identify CKPT RUN_DIR [RUN_DIR ...]      which recorded run did CKPT come from?

SOURCE, A, B and REFERENCE may be a ``save_pretrained`` model directory, a Lightning
``.ckpt`` of ``CausalLMModule``, or (except for ``fingerprint``) a fingerprint file.

Exit codes: :class:`~seedprints_lightning.offline.exit_codes.ExitCode`, the one definition that
``--help`` and ``docs/cli.md`` are made from.

Every verdict is the callback's (:mod:`.verdict`): a test must clear the analytic threshold
and the fresh-init controls (stored in a fingerprint file, or built from a model's config),
with the birth rule when the base is an init (step 0) and the custody rule otherwise.

Every error prints one line, ``seedprints: error: <message>``, to stderr, without a
traceback. Progress bars go to stderr, results to stdout (``--json`` prints JSON only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..core.errors import (
    FingerprintFileError,
    IncompatibleFingerprintsError,
    ModelNotFoundError,
    SeedPrintsError,
    SourceError,
)
from .exit_codes import ExitCode
from .exit_codes import epilog as exit_codes_epilog

# Start-up cost: each subcommand imports what needs torch (every other package module) inside its
# handler. This module imports in about 25 ms and torch in about 2 s, so `seedprints --help`, a usage
# error and the exit-code table answer at once. The function-level imports below are all this one reason.

__all__ = ["EXIT_OK", "EXIT_EXPECT", "EXIT_USAGE", "EXIT_FILE", "EXIT_INCOMPATIBLE", "EXIT_TAMPERED",
           "EXIT_UNDETERMINED", "EXIT_INTERRUPTED", "EXIT_INTERNAL",
           "build_parser", "main"]

# The exit codes as plain ints under this module's public names; .exit_codes is the one definition.
EXIT_OK = int(ExitCode.OK)
EXIT_EXPECT = int(ExitCode.EXPECT)
EXIT_USAGE = int(ExitCode.USAGE)
EXIT_FILE = int(ExitCode.FILE)
EXIT_INCOMPATIBLE = int(ExitCode.INCOMPATIBLE)
EXIT_TAMPERED = int(ExitCode.TAMPERED)
EXIT_UNDETERMINED = int(ExitCode.UNDETERMINED)
EXIT_INTERRUPTED = int(ExitCode.INTERRUPTED)
EXIT_INTERNAL = int(ExitCode.INTERNAL)
#: Set to 1 to let an unexpected exception propagate with its traceback instead of one line, exit 70.
DEBUG_ENV = "SEEDPRINTS_DEBUG"

PROG = "seedprints"
EXIT_CODES_EPILOG = exit_codes_epilog()


class UsageError(Exception):
    """A command-line argument error (what argparse would print with the usage)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage and exiting, so errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------
# Argument types and shared options
# --------------------------------------------------------------------------------------


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _open_interval(include_one: bool):
    """argparse type: a number in (0, 1] (``include_one``) or (0, 1)."""
    interval = "(0, 1]" if include_one else "(0, 1)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (0.0 < value < 1.0 or (include_one and value == 1.0)):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value}")
        return value

    parse.__name__ = "number"
    return parse


_fraction = _open_interval(include_one=True)
_alpha = _open_interval(include_one=False)


def _add_probe_options(parser: argparse.ArgumentParser, *, applies: str) -> None:
    group = parser.add_argument_group("probe", f"which random inputs the models see ({applies})")
    group.add_argument("--kind", choices=("token", "embedding"), default=None,
                       help="token ids (any widths) or Gaussian input embeddings (one width); default: token")
    group.add_argument("--num-samples", type=_int_at_least(3), default=None, metavar="N",
                       help="number of probe sequences n (default 1000)")
    group.add_argument("--length", type=_int_at_least(1), default=None, metavar="L",
                       help="tokens per probe sequence (default 32)")
    group.add_argument("--seed", type=_int_at_least(0), default=None, metavar="S", help="probe seed (default 42)")
    group.add_argument("--vocab-size", type=_int_at_least(1), default=None, metavar="V",
                       help="token probes draw ids from [0, V) (default: the smallest vocabulary involved)")


def _add_spec_options(parser: argparse.ArgumentParser, spec_from_help: str, *, applies: str) -> None:
    """``--spec-from``, the probe options it excludes, and the runtime options: the commands that probe one model."""
    parser.add_argument("--spec-from", metavar="FILE", default=None, help=spec_from_help)
    _add_probe_options(parser, applies=applies)
    _add_runtime_options(parser)


def _add_judge_options(parser: argparse.ArgumentParser, *, applies: str) -> None:
    """The options of the commands that judge sources against a base: verdict output (``--json``, ``--expect``),
    then the probe (used ``applies``), test and runtime options."""
    parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    parser.add_argument("--expect", choices=("related", "unrelated"), default=None,
                        help="exit 1 unless every verdict is this (for CI)")
    _add_probe_options(parser, applies=applies)
    _add_test_options(parser)
    _add_runtime_options(parser)


def _probe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in ("kind", "num_samples", "length", "seed", "vocab_size")}


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--batch-size", type=_int_at_least(1), default=64, metavar="B",
                       help="probe sequences per forward pass (default 64)")
    group.add_argument("--device", default=None,
                       help="where to run the probes, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    group.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                       help="weights dtype while probing (default float32: reproducible across machines)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow .ckpt files holding arbitrary Python objects (only for files you made yourself)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("--load", choices=("auto", "whole", "streamed"), default="auto",
                       help="how models are read: whole (loaded, then probed), streamed (one block at a time from "
                            "safetensors / .ckpt / distributed checkpoints: peak memory one block plus activations; "
                            "LLaMA, Qwen2, Mistral, GPT-2), or auto (default: whole when 3x the weights fit the "
                            "available memory, else streamed)")


def _load_line(load: Any) -> str:
    """How a model was read, for the text output (``load`` is a fingerprint's ``extra["load"]``)."""
    if not isinstance(load, dict):
        return "fingerprint file (no model read)"
    line = f"{load.get('path')} ({load.get('reason')})"
    return line + (f"; note: {load['note']}" if load.get("note") else "")


def _runtime(args: argparse.Namespace) -> Any:
    import torch

    from .sources import ProbeRuntime

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {device!r} is not a torch device ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    return ProbeRuntime(batch_size=args.batch_size, device=device, dtype=getattr(torch, args.dtype),
                        trust_pickle=args.trust_pickle, progress=not args.quiet, load=getattr(args, "load", "auto"))


def _flags(keys: Sequence[str]) -> str:
    """Option names as the user typed them: ``num_samples`` -> ``--num-samples``."""
    return ", ".join("--" + key.replace("_", "-") for key in keys)


def _given_probe_options(args: argparse.Namespace) -> dict[str, Any]:
    return {key: value for key, value in _probe_kwargs(args).items() if value is not None}


def _refuse_probe_options(args: argparse.Namespace, why: str) -> None:
    """A probe option beside something that fixes the whole probe (a fingerprint, --spec-from) is a usage error."""
    given = _given_probe_options(args)
    if given:
        raise UsageError(f"{_flags(list(given))} {why}")


def _add_test_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("lineage test")
    dims = group.add_mutually_exclusive_group()
    dims.add_argument("--identity-ratio", type=_fraction, default=None, metavar="R",
                      help="fraction of the hidden dimensions used as identity dimensions (default 1.0)")
    dims.add_argument("--identity-k", type=_int_at_least(2), default=None, metavar="K",
                      help="number of identity dimensions (instead of --identity-ratio)")
    group.add_argument("--mode", choices=("coset", "base"), default="coset",
                       help="identity dims: intersection of both models' sets (coset, default) or the base's only")
    group.add_argument("--method", choices=("analytic", "empirical"), default="analytic",
                       help="closed-form Kendall null (default) or an empirical null of random matrices")
    group.add_argument("--alpha", type=_alpha, default=0.01, help="significance level of the one-sided test (0.01)")
    group.add_argument("--agg", action="store_true",
                       help="add the per-sample aggregate tau signal (max-z with Bonferroni x2)")
    group.add_argument("--controls", type=_int_at_least(0), default=4, metavar="N",
                       help="fresh-init controls to judge against (default 4; stored in a fingerprint file, else "
                            "built from a model's config; 0 = none)")
    group.add_argument("--rule", choices=("auto", "birth", "custody"), default="auto",
                       help="the callback's verdict rule: birth (base is an init), custody (base is trained: adds "
                            "the effect-size margin), auto (default: birth when the base's step is 0)")


def _test_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"identity_ratio": args.identity_ratio, "identity_k": args.identity_k, "identity_mode": args.mode,
            "method": args.method, "use_agg": args.agg}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' weight-loading bars and info logs while a command runs, then restore
    them: the CLI shows its own progress, and ``main()`` may be called from a user's program."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _fmt_p(log10_p: float) -> str:
    if log10_p > -4:
        return f"p = {10 ** log10_p:.3g}"
    return f"p = 10^{log10_p:.1f}"


def _verdict_lines(verdict: Any, evidence: str, rule_name: str) -> list[str]:
    result = verdict.result
    p_rule = ("one-sided, two signals with Bonferroni x2: p = min(1, 2 min(p_tau, p_agg)) = 1 - Phi(z)"
              if result.z_agg is not None else "one-sided: p = 1 - Phi(z)")
    if verdict.related is None:
        head = f"verdict: UNDETERMINED ({verdict.reason})"
    else:
        head = "verdict: RELATED (same lineage)" if verdict.related else "verdict: NOT SHOWN RELATED"
    controls = ", ".join(f"{z:.2f}" for z in verdict.control_z) or "none"
    lines = [
        head,
        f"  z           {result.z:.2f}   (related when z > {verdict.threshold:.2f}: {rule_name} rule, "
        f"{verdict.rule.describe()})",
        f"  log10 p     {result.log10_p:.2f}   ({_fmt_p(result.log10_p)}, {p_rule})",
        f"  mean tau    {result.tau_mean:.4f}   (controls: tau max {verdict.control_tau_max:.4f})",
        f"  controls z  {controls}",
        f"  evidence    {evidence}",
        f"  dimensions  {result.k} identity dims ({result.identity_mode} mode), n = {result.n} probes, "
        f"{result.method} null"
        + (f", {result.dropped_constant} constant dims dropped" if result.dropped_constant else ""),
    ]
    if verdict.related is False and verdict.reason:
        lines.append(f"  why         {verdict.reason}")
    return lines


def format_audit_table(rows: Sequence[Any]) -> str:
    """A plain-text table of :func:`~seedprints_lightning.offline.audit.audit_checkpoints` rows (one line each)."""
    from .audit import verdict_word

    header = ("checkpoint", "step", "z", "threshold", "log10 p", "tau_mean", "k", "verdict")
    body = [
        (row.name, "-" if row.step is None else str(row.step), f"{row.z:.2f}", f"{row.threshold:.2f}",
         _fmt_log10_p(row.log10_p), f"{row.tau_mean:.4f}", str(row.k), verdict_word(row.related))
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = []
    for line in [header, *body]:
        cells = [line[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _fmt_log10_p(value: float) -> str:
    return f"{value:.1f}" if math.isfinite(value) and abs(value) >= 100 else f"{value:.2f}"


def format_chain_table(audit: Any) -> str:
    """A plain-text table of a :class:`~seedprints_lightning.core.verify.ChainAudit`: one line per record."""
    header = f"{'record':>6}  {'step':>8}  {'anchor':>8}  {'link z':>9}  {'link thr':>9}  {'birth z':>8}  verdict"
    lines = [header, "-" * len(header)]
    for record, verdict in zip(audit.records, audit.recomputed):
        if verdict is None and record.get("kind") == "save":
            lines.append(f"{record.get('index', '?')!s:>6}  {record.get('step', '?')!s:>8}  {'-':>8}  {'-':>9}  "
                         f"{'-':>9}  {'-':>8}  checkpoint saved (weights sha256 "
                         f"{str(record.get('weights_sha256'))[:16]}...)")
            continue
        if verdict is None:  # its features file is missing, or the record cannot be re-tested
            lines.append(f"{record.get('index', '?')!s:>6}  {record.get('step', '?')!s:>8}  "
                         f"{record.get('anchor_step', '?')!s:>8}  {'-':>9}  {'-':>9}  {'-':>8}  not re-tested")
            continue
        word = {True: "link held", False: "LINK BROKEN", None: "undetermined"}[verdict.link.related]
        lines.append(f"{record['index']:>6}  {verdict.step:>8}  {verdict.anchor_step:>8}  {verdict.link.z:>9.2f}  "
                     f"{verdict.link.threshold:>9.2f}  {verdict.birth.z:>8.2f}  {word}")
    if audit.checkpoint is not None:
        v = audit.checkpoint
        word = {True: "descends", False: "DOES NOT DESCEND", None: "undetermined"}[v.link.related]
        lines.append(f"{'ckpt':>6}  {v.step:>8}  {v.anchor_step:>8}  {v.link.z:>9.2f}  {v.link.threshold:>9.2f}  "
                     f"{v.birth.z:>8.2f}  {word} ({audit.checkpoint_name})")
    return "\n".join(lines)


def _expect_met(expect: str | None, related: bool | None) -> bool:
    if expect is None:
        return True
    return related is (expect == "related")


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


@_quiet_transformers()
def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from ..core.probes import ProbeSpec
    from .audit import measurement_line
    from .sources import classify_source, fingerprint_source, load_source_fingerprint

    out = Path(args.output)
    if out.suffix == ".ckpt":
        raise UsageError(f"-o {out}: the .ckpt suffix means a Lightning checkpoint; use .safetensors")
    source = classify_source(args.source)
    if source.kind == "fingerprint":
        raise UsageError(f"{source.path} is already a fingerprint file; SOURCE must be a model directory or .ckpt")
    if args.spec_from is not None:
        _refuse_probe_options(args, "cannot be combined with --spec-from, which fixes the whole probe")
        spec = load_source_fingerprint(args.spec_from).spec
    else:
        fields = _given_probe_options(args)
        if fields.get("kind") == "embedding" and "vocab_size" in fields:
            raise UsageError("--vocab-size applies to token probes only")
        spec = ProbeSpec(**fields)
    fp = fingerprint_source(source, spec, num_controls=args.controls, runtime=_runtime(args))
    fp.check_finite(f"{source.describe()}" + (f" at step {fp.step}" if fp.step is not None else ""))
    written = fp.save(out)
    print(f"wrote {written}")
    print(f"  source    {source.describe()}" + (f", step {fp.step}" if fp.step is not None else ""))
    print(f"  probe     {fp.spec.describe()}")
    print(f"  features  [{fp.num_samples}, {fp.hidden_size}] float32 ({fp.model_class})")
    drawn = f", drawn {fp.controls_init_scheme}" if fp.controls_init_scheme else ""
    print(f"  controls  {len(fp.control_seeds)} fresh inits of its config stored with it (offline verdicts{drawn})")
    print(f"  load      {_load_line(fp.extra.get('load'))}")
    print(f"  measuring {measurement_line(fp.extra.get('measurement'))}")
    return EXIT_OK


@_quiet_transformers()
def _cmd_controls(args: argparse.Namespace) -> int:
    from ..core.controls import controls_from_config, load_config, save_controls
    from ..core.fingerprint import config_digest
    from ..core.probes import ProbeSpec
    from .sources import load_source_fingerprint

    out = Path(args.output)
    if args.spec_from is not None:
        _refuse_probe_options(args, "cannot be combined with --spec-from, which fixes the whole probe")
        spec = load_source_fingerprint(args.spec_from).spec
    else:
        spec = ProbeSpec(**_given_probe_options(args))
        if spec.kind == "embedding":
            raise UsageError("embedding probes take mean/std from the run's INIT embedding: use --spec-from "
                             "<the run's reference.safetensors>")
    config = load_config(args.source)
    runtime = _runtime(args)
    log = None if args.quiet else (lambda message: print(f"  {message}", file=sys.stderr, flush=True))
    info: dict[str, Any] = {}
    features, seeds = controls_from_config(config, spec, args.num, batch_size=runtime.batch_size,
                                           device=runtime.device, dtype=runtime.dtype, log=log, whole=args.whole,
                                           info=info)
    if spec.kind == "token" and spec.vocab_size is None:
        spec = ProbeSpec(**{**spec.to_dict(), "vocab_size": int(config.vocab_size)})
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    written = save_controls(out, features, seeds, spec,
                            extra={"model_class": architectures[0], "config_digest": config_digest(config),
                                   "source": str(args.source)}, init_scheme=info["init_scheme"])
    print(f"wrote {written}")
    print(f"  config    {args.source} ({architectures[0]})")
    print(f"  probe     {spec.describe()}")
    print(f"  controls  {len(seeds)} fresh inits, seeds {seeds[0]}..{seeds[-1]}, features [{features.shape[1]}, "
          f"{features.shape[2]}] each")
    how = ("streamed: each drawn and probed one block at a time" if info["init_scheme"] == "streamed-v1"
           else "whole: each built as one model")
    print(f"  init      {info['init_scheme']} ({how})")
    if info.get("note"):
        print(f"  note      {info['note']}")
    print(f"  use it    SeedPrintsCallback(controls={str(written)!r})")
    return EXIT_OK


@_quiet_transformers()
def _cmd_compare(args: argparse.Namespace) -> int:
    from ..core.fingerprint import Fingerprint
    from .audit import compare_sources, measurement_line
    from .sources import classify_source

    if _given_probe_options(args):
        fingerprints = [source for source in map(classify_source, (args.a, args.b)) if source.kind == "fingerprint"]
        for source in fingerprints:
            Fingerprint.load(source.path)  # a broken file is the first thing to report
        if fingerprints:
            _refuse_probe_options(args, "cannot be used when A or B is a fingerprint file: its probe spec is used")

    comparison = compare_sources(args.a, args.b, **_probe_kwargs(args), runtime=_runtime(args), **_test_kwargs(args),
                                 num_controls=args.controls, rule=args.rule, alpha=args.alpha)
    met = _expect_met(args.expect, comparison.related)
    if args.json:
        payload = comparison.to_dict()
        payload["threshold_z"] = comparison.verdict.threshold
        payload["expect"] = args.expect
        payload["expect_met"] = met if args.expect else None
        print(json.dumps(payload, indent=2))
    else:
        print(f"A (base)    {comparison.a.describe()}")
        print(f"B (target)  {comparison.b.describe()}")
        print(f"probe       {comparison.spec.describe()}")
        print(f"load        A: {_load_line(comparison.load_a)}")
        print(f"            B: {_load_line(comparison.load_b)}")
        print(f"measuring   A: {measurement_line(comparison.measurement_a)}")
        print(f"            B: {measurement_line(comparison.measurement_b)}")
        print("\n".join(_verdict_lines(comparison.verdict, comparison.evidence.description, comparison.rule_name)))
        if args.expect:
            print(f"expected {args.expect}: " + ("yes" if met else "NO"))
    return EXIT_OK if met else EXIT_EXPECT


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plotting import plot_drift, read_drift_curves, rename

    curves = {}
    for logdir in args.logdirs:
        for run, curve in read_drift_curves(logdir).items():
            name = run if len(args.logdirs) == 1 else f"{logdir.rstrip('/')}:{run}"
            curves[name] = rename(curve, name)
    out = Path(args.output) if args.output else Path(args.logdirs[0]) / "drift.png"
    written = plot_drift(curves, out, title=args.title)
    print(f"wrote {written}")
    for name, curve in curves.items():
        steps = curve.z.steps
        print(f"  {name}: {len(steps)} points, steps {steps[0]}..{steps[-1]}, last z {curve.z.values[-1]:.2f}")
    return EXIT_OK


@_quiet_transformers()
def _cmd_audit(args: argparse.Namespace) -> int:
    if args.chain is not None:
        return _cmd_audit_chain(args)
    if args.ledger is not None:
        raise UsageError("--ledger names a ledger file of a run directory: use it with --chain RUN_DIR")
    if args.public_key is not None:
        raise UsageError("--public-key verifies a run's signed ledger: use it with --chain RUN_DIR")
    from ..core.probes import ProbeSpec
    from .audit import audit_checkpoints, find_controls, rule_for_base, rule_name_for_base
    from .sources import classify_source, fingerprint_source

    if args.reference is None or not args.checkpoints:
        raise UsageError("audit needs REFERENCE and at least one checkpoint (or --chain RUN_DIR [CKPT])")
    runtime = _runtime(args)
    reference_source = classify_source(args.reference)
    probe = _given_probe_options(args)
    if reference_source.kind == "fingerprint":
        _refuse_probe_options(args, "cannot be used with a fingerprint REFERENCE: its probe spec is used")
    reference = fingerprint_source(reference_source, ProbeSpec(**probe) if probe else None,
                                   num_controls=args.controls if reference_source.kind != "fingerprint" else 0,
                                   runtime=runtime)
    evidence = find_controls(reference.spec, [(reference_source, reference)], num_controls=args.controls,
                             runtime=runtime)
    rule_name = rule_name_for_base(reference.step, args.rule)
    rule = rule_for_base(reference.step, args.rule, args.alpha)
    rows = audit_checkpoints(reference, args.checkpoints, runtime=runtime, **_test_kwargs(args), evidence=evidence,
                             rule=rule)
    differing = [row for row in rows if not _expect_met(args.expect, row.related)]
    written = None
    if args.output:
        from .plotting import plot_audit

        written = plot_audit(rows, args.output, title=args.title)
    if args.json:
        print(json.dumps({
            "reference": reference_source.to_dict(), "spec": reference.spec.to_dict(), "alpha": args.alpha,
            "reference_load": reference.extra.get("load") if reference_source.kind != "fingerprint" else None,
            "rule": rule.to_dict(), "rule_name": rule_name, "evidence": evidence.description,
            "rows": [row.to_dict() for row in rows], "expect": args.expect,
            "expect_met": (not differing) if args.expect else None, "plot": str(written) if written else None,
        }, indent=2))
    else:
        print(f"reference  {reference_source.describe()}")
        print(f"probe      {reference.spec.describe()}")
        agg_note = " (Bonferroni x2, --agg)" if args.agg else ""
        print(f"rule       {rule_name}: {rule.describe()} (one-sided){agg_note}")
        print(f"evidence   {evidence.description}")
        print(format_audit_table(rows))
        for row in rows:
            if row.load is not None:
                print(f"load       {row.name}: {_load_line(row.load)}")
        if written:
            print(f"wrote {written}")
        if args.expect:
            print(f"expected {args.expect}: " + ("all rows" if not differing else
                                                 f"NO for {len(differing)} of {len(rows)} rows"))
    return EXIT_OK if not differing else EXIT_EXPECT


def _public_key(path: str) -> Any:
    """The Ed25519 public key of ``--public-key``: a missing file exits 3, anything but a PEM Ed25519 public key 2."""
    from ..core.signing import load_public_key

    if not Path(path).expanduser().is_file():
        raise FingerprintFileError(f"--public-key {path}: " + ("no such file" if not Path(path).expanduser().exists()
                                                               else "not a file"))
    return load_public_key(Path(path).expanduser())


def _cmd_audit_chain(args: argparse.Namespace) -> int:
    from ..core.ledger import RunDirectory
    from ..core.verify import verify_chain
    from .audit import checkpoint_weights_digest
    from .sources import checkpoint_state, classify_source, fingerprint_source, source_step

    positional = [p for p in [args.reference, *args.checkpoints] if p is not None]
    if len(positional) > 1:
        raise UsageError("audit --chain takes at most one checkpoint: seedprints audit --chain RUN_DIR [CKPT]")
    public_key = _public_key(args.public_key) if args.public_key is not None else None
    checkpoint_features = checkpoint_step = checkpoint_name = state = weights_sha = None
    weights_how = checkpoint_load = None
    if positional:
        from ..core.fingerprint import Fingerprint

        spec = Fingerprint.load(RunDirectory.locate(args.chain).reference_path).spec
        source = classify_source(positional[0])
        fp = fingerprint_source(source, spec, runtime=_runtime(args))
        fp_step = fp.step if fp.step is not None else source_step(source, trust_pickle=args.trust_pickle)
        checkpoint_features, checkpoint_step, checkpoint_name = fp.features, fp_step, str(source.path)
        checkpoint_load = fp.extra.get("load") if source.kind != "fingerprint" else None
        state = checkpoint_state(source, trust_pickle=args.trust_pickle)  # its ledger head, its run's reference
        weights_sha, weights_how = checkpoint_weights_digest(source, trust_pickle=args.trust_pickle)
    audit = verify_chain(args.chain, checkpoint_features, checkpoint_step=checkpoint_step,
                         checkpoint_name=checkpoint_name, checkpoint_state=state, ledger=args.ledger,
                         public_key=public_key, checkpoint_weights_sha256=weights_sha)
    weights_line = _weights_line(audit, checkpoint_name, weights_how) if positional else None
    if args.json:
        print(json.dumps({
            "run_dir": str(audit.run_dir), "ok": audit.ok, "evidence": audit.evidence, "records": len(audit.records),
            "problems": [{"record": p.index, "kind": p.kind, "message": p.message} for p in audit.problems],
            "notes": list(audit.notes),
            "links": [None if v is None else {"step": v.step, "anchor_step": v.anchor_step, **v.link.to_dict()}
                      for v in audit.recomputed],
            "checkpoint": None if audit.checkpoint is None else {"name": audit.checkpoint_name,
                                                                 "step": audit.checkpoint.step,
                                                                 "load": checkpoint_load,
                                                                 **audit.checkpoint.link.to_dict()},
            "signed_by": list(audit.signed_by), "verified_key": audit.verified_key,
            "unsigned_records": list(audit.unsigned),
            # Lines that are no record (notes, not problems): blank lines, a torn last line (a crash
            # mid-write), and the torn lines the writer moved to custody.torn-<i>.txt.
            "blank_lines": list(audit.blank_lines), "torn_line": audit.torn_line, "torn_files": list(audit.torn_files),
            "saves": [{"record": r["index"], "step": r["step"], "weights_sha256": r["weights_sha256"]}
                      for r in audit.saves],
            "checkpoint_weights": None if not positional else {
                "weights_sha256": audit.checkpoint_weights_sha256, "read": weights_how,
                "saved_at": [{"record": r["index"], "step": r["step"]} for r in audit.checkpoint_saves],
                "message": weights_line},
        }, indent=2))
    else:
        print(f"run        {audit.run_dir}")
        print(f"evidence   {audit.evidence}")
        print(format_chain_table(audit))
        if weights_line is not None:
            print(f"weights    {weights_line}")
        if positional:
            print(f"load       {_load_line(checkpoint_load)}")
        for note in audit.notes:
            print(f"NOTE       {note}")
        for problem in audit.problems:
            print(f"PROBLEM    [{problem.kind}] {problem.message}")
        if audit.undetermined and not audit.tampered and not audit.broken_links:
            held = [a for a in audit.anchors if a.index is not None]
            print("chain      intact but NOT verified to its end: "
                  + (f"it holds up to record {held[-1].index} (step {held[-1].step}); " if held
                     else "no record's link held; ")
                  + "what follows is undetermined")
        if audit.ok:
            last = next((v for v in reversed(audit.recomputed) if v is not None), None)
            target = (f"checkpoint {audit.checkpoint_name}" if audit.checkpoint is not None
                      else f"the last probe (step {last.step})" if last is not None else "the last probe")
            torn = ("" if audit.torn_line is None else
                    f" (its torn last line {audit.torn_line}, a write a crash cut short, is no record: see the NOTE)")
            print(f"chain      intact: {len(audit.records)} records, every link held; {target} descends from the "
                  f"birth fingerprint{torn}")
    if audit.tampered:
        return EXIT_TAMPERED
    if audit.broken_links:
        return EXIT_EXPECT
    if audit.undetermined:
        return EXIT_UNDETERMINED
    return EXIT_OK if audit.ok else EXIT_EXPECT


def _weights_line(audit: Any, name: str | None, how: str | None) -> str:
    """What the ledger's save records say about the checkpoint's exact weights."""
    if audit.checkpoint_weights_sha256 is None:
        return f"not matched against the recorded saves: {how}"
    if audit.checkpoint_saves:
        where = ", ".join(f"step {r['step']} (record {r['index']})" for r in audit.checkpoint_saves)
        return f"{name} holds exactly the weights saved at {where}"
    if not audit.saves:
        return f"the ledger records no checkpoint save, so {name}'s exact weights cannot be matched to one"
    return (f"no recorded save has these weights ({len(audit.saves)} saves recorded; weights sha256 "
            f"{audit.checkpoint_weights_sha256[:16]}...)")


def _fmt_steps(steps: Any) -> str:
    return "-" if not steps else (f"{steps[0]}" if steps[0] == steps[1] else f"{steps[0]}-{steps[1]}")


def format_identification(result: Any) -> list[str]:
    """The readable lines of an :class:`~seedprints_lightning.offline.identify.Identification`."""
    tested, m = result.tested, result.tested.get("tests", 0)
    lines = [f"tested     {tested.get('runs', 0)} runs ({tested.get('lineages', 0)} lineages), {m} tests: each run's "
             f"reference and every recorded probe; Bonferroni over {m}: alpha {result.alpha:g} -> "
             f"{result.alpha / max(m, 1):.3g} per test, each run's custody rule against its controls "
             f"({tested.get('control_tests', 0)} control tests)"]
    if not result.matches:
        closest = max((r for r in result.runs if r.undetermined < r.tested), key=lambda r: r.z - r.threshold,
                      default=None)
        word = "UNDETERMINED" if result.status == "undetermined" else "none"
        lines.append(f"match      {word}: no run's fingerprints link to the checkpoint"
                     + (f" (closest: {closest.run}, z={closest.z:.2f} vs threshold {closest.threshold:.2f})"
                        if closest is not None else ""))
        if tested.get("undetermined"):
            reasons = sorted({r.reason for r in result.runs if r.undetermined and r.reason})
            lines.append(f"           {tested['undetermined']} tests undetermined, so a match may have been missed"
                         + (f" ({'; '.join(reasons)[:300]})" if reasons else ""))
        if tested.get("unreadable"):
            lines.append(f"           {tested['unreadable']} runs or fingerprints could not be read (skipped, below), "
                         "so a match may have been missed")
    for match in result.matches:
        best = match.best
        head = match.runs[0] if len(match.runs) == 1 else f"{len(match.runs)} runs of one lineage (shared init)"
        lines.append(f"match      {head}")
        if len(match.runs) > 1:
            for run in match.runs:
                lines.append(f"  run      {run}")
        lines.append(f"  steps    links to steps {_fmt_steps(best.steps)} of {best.run}, best step {best.best_step}")
        lines.append(f"  z        {best.z:.2f} (threshold {best.threshold:.2f}), log10 p {best.log10_p:.1f}, "
                     f"corrected log10 p {best.log10_p_corrected:.1f}")
        for other in match.links[1:]:
            lines.append(f"  also     {other.run}: steps {_fmt_steps(other.steps)}, best step {other.best_step}, "
                         f"z={other.z:.2f}")
    screen = getattr(result, "screen", None)
    if screen is not None:
        lines.append(f"screen     {tested.get('screened_out', 0)} of {m} candidates ruled out on {screen['columns']} "
                     f"seeded columns (bound: {screen['margin']:g} standard errors; "
                     f"{screen.get('stored_screens', 0)} from the ranks the runs stored, "
                     f"{screen.get('ranked_screens', 0)} ranked from their files); {tested.get('exact_tests', 0)} "
                     "exact tests" + (f"; FELL BACK to exact tests: {screen['fallback']}" if screen["fallback"]
                                      else ""))
    for run, reason in result.skipped:
        lines.append(f"skipped    {run}: {reason}")
    return lines


@_quiet_transformers()
def _cmd_identify(args: argparse.Namespace) -> int:
    from .identify import identify, load_runs
    from .sources import classify_source, fingerprint_source

    runs = load_runs(args.runs)
    source = classify_source(args.checkpoint)
    runtime = _runtime(args)
    features, refused, step = {}, {}, None
    if source.kind == "fingerprint":
        fp = fingerprint_source(source)
        features[fp.spec], step = fp.features, fp.step
    else:
        for spec in dict.fromkeys(run.spec for run in runs if hasattr(run, "spec")):  # one probe per distinct spec
            try:
                fp = fingerprint_source(source, spec, runtime=runtime)
            except IncompatibleFingerprintsError as exc:
                refused[spec] = str(exc)
                continue
            features[spec], step = fp.features, fp.step
    if not features and (refused or any(hasattr(run, "spec") for run in runs)):
        raise IncompatibleFingerprintsError("; ".join(dict.fromkeys(refused.values()))
                                            or f"{source.path} could not be probed")
    result = identify(features, runs, alpha=args.alpha, exhaustive=args.exhaustive, index=not args.no_index)
    if args.json:
        payload = result.to_json()
        payload["checkpoint"] = {**source.to_dict(), "step": step}
        payload["probed"] = [spec.to_dict() for spec in features]
        payload["refused"] = [{"spec": spec.to_dict(), "reason": reason} for spec, reason in refused.items()]
        print(json.dumps(payload, indent=2))
    else:
        print(f"checkpoint {source.describe()}" + (f", step {step}" if step is not None else ""))
        for spec in features:
            print(f"probe      {spec.describe()}")
        for spec, reason in refused.items():
            print(f"refused    {spec.describe()}: {reason}")
        for run in runs:
            for note in getattr(run, "notes", ()):
                print(f"NOTE       {run.path}: {note}")
        for note in result.notes:
            print(f"NOTE       {note}")
        print("\n".join(format_identification(result)))
    if result.status == "match":
        return EXIT_OK
    return EXIT_UNDETERMINED if result.status == "undetermined" else EXIT_EXPECT


# --------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description="SeedPrints lineage fingerprints: is this model descended from that init?",
                     epilog=EXIT_CODES_EPILOG, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
                description: str) -> argparse.ArgumentParser:
        """The subcommand ``name``, which ``handler(args)`` runs (its exit status)."""
        parser = sub.add_parser(name, help=help_text, description=description, epilog=EXIT_CODES_EPILOG,
                                formatter_class=formatter)
        parser.set_defaults(handler=handler)
        return parser

    fp = command(
        "fingerprint", _cmd_fingerprint, "probe a model and save its fingerprint",
        "Probe a model directory or Lightning .ckpt and save a fingerprint file.")
    fp.add_argument("source", metavar="SOURCE", help="save_pretrained model directory or Lightning .ckpt")
    fp.add_argument("-o", "--output", required=True, metavar="FILE.safetensors", help="fingerprint file to write")
    fp.add_argument("--controls", type=_int_at_least(0), default=4, metavar="N",
                    help="also store N fresh-init controls of the model's config (default 4), so compare/audit can "
                         "judge this file like the callback does; 0 = none")
    _add_spec_options(fp, "use the probe spec of this fingerprint file (so both models see the same inputs)",
                      applies="ignored with --spec-from")

    ctl = command(
        "controls", _cmd_controls, "precompute a run's fresh-init controls from a model config",
        "Probe N fresh inits of a model's config (the callback's control seeds) and save their features, "
        "for SeedPrintsCallback(controls=FILE): the training ranks then never build an unsharded copy of "
        "the model. SOURCE is a model directory or its config.json (only the config is read).")
    ctl.add_argument("source", metavar="SOURCE", help="model directory or config.json")
    ctl.add_argument("-o", "--output", required=True, metavar="FILE.safetensors", help="controls file to write")
    ctl.add_argument("--num", type=_int_at_least(1), default=4, metavar="N", help="number of controls (default 4)")
    ctl.add_argument("--whole", action="store_true",
                     help="build each control as one whole model (init scheme 'whole': one RNG stream, one copy of "
                          "the model in memory) instead of drawing and probing it one block at a time (the default "
                          "for LLaMA, Qwen2, Mistral and GPT-2: peak memory one block plus activations, and the same "
                          "weights as the run's in-run control of that seed)")
    _add_spec_options(ctl, "use the probe spec of this fingerprint file (the run's reference.safetensors)",
                      applies="ignored with --spec-from; must match the run's probe")

    cmp_ = command(
        "compare", _cmd_compare, "test whether B is descended from A",
        "Test whether B descends from A (A is the base). Each is a model directory, a Lightning .ckpt or a "
        "fingerprint file. Models are probed with a fingerprint's spec when one is given; two models share "
        "a probe built from the options below (token probes: the smaller vocabulary; embedding probes: "
        "mean/std of A's embedding matrix). p is one-sided: p = 1 - Phi(z).")
    cmp_.add_argument("a", metavar="A", help="base: model directory, .ckpt or fingerprint file")
    cmp_.add_argument("b", metavar="B", help="target: model directory, .ckpt or fingerprint file")
    _add_judge_options(cmp_, applies="only when A and B are both models")

    plot = command(
        "plot", _cmd_plot, "draw drift curves from TensorBoard logs",
        "Draw the seedprints/* scalars SeedPrintsCallback logged: z per step (symlog axis), the "
        "negative-control band, the decision threshold and the steps judged not related, one curve per "
        "run (every directory with events.out.tfevents.* files).")
    plot.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="TensorBoard log directory (searched recursively)")
    plot.add_argument("-o", "--output", default=None, metavar="PNG", help="output image (default: LOGDIR/drift.png)")
    plot.add_argument("--title", default=None, help="figure title")

    audit = command(
        "audit", _cmd_audit, "test checkpoints against a reference, or re-verify a run's custody chain",
        "Probe each checkpoint with the reference's spec and test it against the reference (a fingerprint "
        "file, or a model directory / .ckpt fingerprinted with the probe options). A directory argument "
        "expands to the .ckpt files and model directories in it, sorted by their global_step. "
        "With --chain RUN_DIR [CKPT]: re-verify the custody ledger SeedPrintsCallback wrote (hash chain, "
        "features files, every link recomputed) and, given a checkpoint, that it descends from the chain.")
    audit.add_argument("reference", metavar="REFERENCE", nargs="?", default=None,
                       help="fingerprint file, model directory or .ckpt (with --chain: the optional checkpoint)")
    audit.add_argument("checkpoints", nargs="*", metavar="CHECKPOINTS",
                       help=".ckpt files, save_pretrained directories, fingerprint files, or directories of them")
    audit.add_argument("--chain", metavar="RUN_DIR", default=None,
                       help="the callback's seedprints directory (or the log directory holding it): verify its "
                            "custody.jsonl link by link")
    audit.add_argument("--ledger", metavar="FILE", default=None,
                       help="with --chain: verify this ledger file of RUN_DIR instead of custody.jsonl, e.g. an "
                            "abandoned branch custody.abandoned-0.jsonl (it holds the whole branch)")
    audit.add_argument("--public-key", metavar="PUB.pem", default=None,
                       help="with --chain: also verify every record's Ed25519 signature against this public key (the "
                            "run owner's, from `openssl pkey -in key.pem -pubout`); a record not signed by it is "
                            "tampering (exit 5). Never read from the run directory")
    audit.add_argument("-o", "--output", default=None, metavar="PNG", help="also draw z against step into this PNG")
    audit.add_argument("--title", default=None, help="figure title (with -o)")
    _add_judge_options(audit, applies="only when REFERENCE is a model")

    ident = command(
        "identify", _cmd_identify, "which recorded run did a checkpoint come from?",
        "Probe CKPT once per probe spec of the runs and test it against every run's reference and every "
        "probe its ledger recorded (each run's custody rule against its controls, Bonferroni over every "
        "test). Names the matching run and the steps it links to, or none. RUN_DIR is a run's seedprints "
        "directory (or the log directory holding it), or a directory holding many runs (searched "
        "recursively). A run or probe file that cannot be read (missing, truncated, or not the file its ledger "
        "records) is skipped and named. Exit 0: a run matches; 1: none; 6: none, but some test could not be made "
        "or something was skipped unread.")
    ident.add_argument("checkpoint", metavar="CKPT", help=".ckpt, save_pretrained directory or fingerprint file")
    ident.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding them")
    ident.add_argument("--alpha", type=_alpha, default=0.01,
                       help="family-wise significance level over all the tests made (default 0.01)")
    ident.add_argument("--json", action="store_true",
                       help="print the result as JSON ('run': the run as given, or null)")
    ident.add_argument("--exhaustive", action="store_true",
                       help="test every fingerprint exactly (no screen on a subset of columns first; slower at real "
                            "width, same answer)")
    ident.add_argument("--no-index", action="store_true",
                       help="write no screen index (identify-screen.safetensors) beside the runs: build it in memory "
                            "(runs written by 0.9 on need none: their probe files hold the screen's columns)")
    _add_runtime_options(ident)
    return parser


def _error(message: object, code: int) -> int:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, IncompatibleFingerprintsError):
        return EXIT_INCOMPATIBLE
    if isinstance(exc, (FingerprintFileError, SourceError, ModelNotFoundError, OSError)):
        return EXIT_FILE
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _error(exc, EXIT_USAGE)
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        return args.handler(args)
    except UsageError as exc:
        return _error(f"{exc} (see '{PROG} {args.command} --help')", EXIT_USAGE)
    except (SeedPrintsError, OSError) as exc:
        return _error(exc, _exit_code(exc))
    except KeyboardInterrupt:
        return _error("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug: one line for the user, the traceback with SEEDPRINTS_DEBUG=1
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        at = f" at {Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno}" if where is not None else ""
        return _error(f"unexpected {type(exc).__name__}{at}: {exc} (a bug in seedprints-lightning {__version__}: "
                      f"please report it; {DEBUG_ENV}=1 shows the traceback)", EXIT_INTERNAL)


if __name__ == "__main__":
    raise SystemExit(main())
