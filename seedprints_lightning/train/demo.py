"""The CPU demo (``make demo``): a run keeps its chain of custody; a wrong resume breaks it.

    python -m seedprints_lightning.train.demo [--out runs] [--steps 300] [--quick] [--threads 1]

Two scenarios, each a real ``Trainer.fit`` of a small LLaMA-style model on the offline
standard-library prose corpus at an ordinary learning rate (3e-3), with
:class:`~seedprints_lightning.SeedPrintsCallback` at its defaults apart from a short
``every_n_steps``:

A. "own": pretraining from scratch (init seed 42). The birth test (live model vs step 0)
   fades within a few dozen steps at this learning rate; the custody chain (each probe linked
   to the last good one) must hold at every probe, and the ledger must re-verify offline.
B. "wrong resume": the same run, but after step ``steps / 3`` its weights are replaced by
   those of another run (init seed 123, trained on the same data for the same number of
   steps: what resuming from the wrong checkpoint directory does), with
   ``on_identity_lost="raise"``. The callback must raise
   :class:`~seedprints_lightning.IdentityLostError` after the swap, and not before.

The exit status is 0 only if both scenarios behaved as they should. Outputs: TensorBoard
logs ``<out>/demo-own/version_N`` and ``<out>/demo-wrong-resume/version_N``, and drift plots
``<out>/demo-own/drift.png``, ``<out>/demo-wrong-resume/drift.png``, ``<out>/demo-drift.png``.

:data:`DEMO_MODEL` and the demo's trainer, module and data builders are also used by ``benchmarks/speed.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ..core.errors import IdentityLostError
from ..core.probes import ProbeSpec
from ..core.verify import verify_chain
from ..faces.lightning import SeedPrintsCallback
from ..offline.plotting import plot_drift, read_drift_curves
from .corpus import build_corpus
from .data import TextDataModule
from .module import CausalLMModule

__all__ = [
    "DEMO_DATA",
    "DEMO_MODEL",
    "DEMO_STEPS",
    "DemoRun",
    "ScenarioResult",
    "check_own",
    "check_wrong_resume",
    "format_table",
    "main",
    "run_own",
    "run_wrong_resume",
]

#: ``make_causal_lm`` keyword arguments of the demo model (everything but ``seed``); the same
#: sizes as ``configs/demo.yaml``. About 1.1M parameters: ~0.2 s per step on one CPU core.
DEMO_MODEL: dict[str, Any] = dict(
    arch="llama",
    vocab_size=256,  # one id per byte (ByteTokenizer)
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    intermediate_size=512,
    max_position_embeddings=128,
)
#: TextDataModule arguments of the demo. No validation split: the demo is about the callback.
DEMO_DATA: dict[str, Any] = dict(corpus="prose", seq_len=64, batch_size=16, val_fraction=0.0, seed=0)
#: An ordinary learning rate for this model (the birth test's z falls to ~3 by step 75 at it:
#: docs/method.md); the custody chain is what must hold.
DEMO_LR = 3e-3
DEMO_WARMUP_STEPS = 20
DEMO_STEPS = 300
#: Probes per run (``every_n_steps = steps // DEMO_PROBES``).
DEMO_PROBES = 12
OWN_SEED = 42  # the seeds of docs/method.md's measurements
OTHER_SEED = 123

#: ``--quick`` (tests, smoke runs): a smaller model and run, same code path.
QUICK_MODEL: dict[str, Any] = dict(DEMO_MODEL, hidden_size=64, num_layers=2, intermediate_size=256)
QUICK_STEPS = 18
QUICK_PROBES = 6

_INTRO = """\
SeedPrints demo: does a training run keep the identity of its random init?
  Data:      prose (docstrings and comments) cut from this Python's standard library,
             built offline and cached at {corpus}
  Tokenizer: byte-level (256 ids, one per byte): nothing to download, nothing to train,
             and the same ids on every machine, so the run is reproducible.
  Model:     LLaMA-style, hidden {hidden_size}, {num_layers} layers, {num_heads} heads, from scratch; {steps} steps
             of {batch_size} x {seq_len} bytes, lr {lr:g}; {threads} torch thread(s).
  Callback:  SeedPrintsCallback at its defaults ({probe_desc}, {num_controls} fresh-init
             controls, alpha {alpha:g}, patience {patience}, fail_on '{fail_on}'); probes densely at the start,
             then every {every} steps. Each probe tests the birth certificate (vs step 0) and the custody
             link (vs the last good probe).
"""


def _callback_defaults() -> dict[str, Any]:
    """The SeedPrintsCallback defaults the demo runs with, read from its signature (for the intro)."""
    params = inspect.signature(SeedPrintsCallback.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    spec = defaults.get("probe") or ProbeSpec()
    defaults["probe_desc"] = f"{spec.num_samples} random-{spec.kind} probes of length {spec.length}"
    return defaults


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Keep the demo's output to its own lines: Lightning's banners and known-noise warnings off.

    Logger levels and warning filters are restored on exit, so callers (tests) see no change.
    """
    # Both Lightning packages are imported by now (this module imports the callback, which imports
    # lightning.pytorch when installed for its second Callback base): each sets its logger to INFO when
    # imported, so the levels read here are the ones to restore.
    loggers = [logging.getLogger(name) for name in
               ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _trainer(steps: int, callbacks: list[Any], logger: Any = False, root: str | Path | None = None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=max(1, min(10, steps // 10)),
        default_root_dir=str(root) if root is not None else None,
    )


def _module(model: dict[str, Any], seed: int) -> CausalLMModule:
    return CausalLMModule(**model, init_seed=seed, lr=DEMO_LR, warmup_steps=DEMO_WARMUP_STEPS)


def _data(data: dict[str, Any] | None = None) -> TextDataModule:
    return TextDataModule(**(data or DEMO_DATA), vocab_size=256)


def _seedprints(**kwargs: Any) -> Any:
    return SeedPrintsCallback(**kwargs)


class SwapWeights(pl.Callback):
    """Replace ``pl_module.model``'s weights with ``state_dict`` once, just after ``at_step``.

    Runs at the start of the first batch with ``trainer.global_step == at_step``, so the
    probe at ``at_step`` (run at the end of the previous batch) still saw the own weights, and
    every step after ``at_step`` trains the foreign ones. The parameters are overwritten in
    place: the optimizer keeps its (own-run) moments, as after a resume that loaded the wrong
    model file but the right optimizer state.
    """

    def __init__(self, at_step: int, state_dict: dict[str, torch.Tensor], *, verbose: bool = True) -> None:
        self.at_step, self.state_dict_to_load, self.verbose = at_step, state_dict, verbose
        self.swapped_at: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.swapped_at is None and trainer.global_step == self.at_step:
            with torch.no_grad():
                pl_module.model.load_state_dict(self.state_dict_to_load)
            self.swapped_at = int(trainer.global_step)
            if self.verbose:
                print(f"  [step {self.swapped_at}] weights replaced by another run's (init seed {OTHER_SEED}) -- a "
                      "wrong resume", flush=True)


class ProbePrinter(pl.Callback):
    """Print each new entry of a SeedPrintsCallback's history as it appears (place it after it)."""

    def __init__(self, seedprints: Any) -> None:
        self.seedprints, self.printed = seedprints, 0

    def _flush(self) -> None:
        for entry in self.seedprints.history[self.printed:]:
            print(f"  [step {entry['step']}] {_row(entry)}", flush=True)
        self.printed = len(self.seedprints.history)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._flush()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self._flush()


def _verdict(entry: dict[str, Any]) -> str:
    return {True: "related", False: "NOT related", None: "undetermined"}[entry.get("related")]


def _row(entry: dict[str, Any]) -> str:
    birth = "detectable" if entry.get("birth_detectable") else "faded"
    return (f"birth z={entry['z']:7.2f} (thr {entry['threshold']:5.2f}, {birth:10s})  link z={entry['link_z']:7.2f} "
            f"from step {entry['anchor_step']:>3} (thr {entry['link_threshold']:6.2f})  {_verdict(entry)}")


# ----------------------------------------------------------------------------- scenarios


@dataclass
class ScenarioResult:
    """What one scenario did: the callback's ``history`` and how the fit ended."""

    name: str
    history: list[dict[str, Any]]
    log_dir: Path
    final_step: int
    max_steps: int
    seconds: float
    error: IdentityLostError | None = None
    swap_step: int | None = None
    drift_png: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoRun:
    """What both scenarios take: how long they train, how often they probe, and the model, data and callback.

    Args:
        steps: optimizer steps of the scenario.
        every: the callback's ``every_n_steps``; ``None`` means ``steps // DEMO_PROBES`` (at least 1).
        model: ``make_causal_lm`` keyword arguments (everything but ``seed``); ``None`` means :data:`DEMO_MODEL`.
        verbose: print each probe as it is made.
        callback_kwargs: further ``SeedPrintsCallback`` arguments.
        data: ``TextDataModule`` arguments; ``None`` means :data:`DEMO_DATA`.
    """

    steps: int = DEMO_STEPS
    every: int | None = None
    model: dict[str, Any] | None = None
    verbose: bool = True
    callback_kwargs: dict[str, Any] | None = None
    data: dict[str, Any] | None = None

    @property
    def every_n_steps(self) -> int:
        return self.every or max(1, self.steps // DEMO_PROBES)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return self.model or DEMO_MODEL


def _scenario(name: str, out: Path, run: DemoRun, *, on_identity_lost: str, swap: SwapWeights | None) -> ScenarioResult:
    from pytorch_lightning.loggers import TensorBoardLogger

    start = time.perf_counter()
    pl.seed_everything(0, workers=True, verbose=False)
    seedprints = _seedprints(every_n_steps=run.every_n_steps, on_identity_lost=on_identity_lost,
                             **(run.callback_kwargs or {}))
    callbacks: list[Any] = [seedprints] + ([swap] if swap is not None else [])
    if run.verbose:
        callbacks.append(ProbePrinter(seedprints))
    logger = TensorBoardLogger(save_dir=str(out), name=name)
    trainer = _trainer(run.steps, callbacks, logger=logger, root=out)
    error: IdentityLostError | None = None
    try:
        trainer.fit(_module(run.model_kwargs, OWN_SEED), datamodule=_data(run.data))
    except IdentityLostError as exc:
        error = exc
    logger.experiment.flush()
    result = ScenarioResult(
        name=name, history=list(seedprints.history), log_dir=Path(logger.log_dir), final_step=int(trainer.global_step),
        max_steps=run.steps, seconds=time.perf_counter() - start, error=error,
        swap_step=swap.swapped_at if swap is not None else None,
    )
    if seedprints.save_dir is not None and (seedprints.save_dir / "custody.jsonl").exists():
        result.extra["chain"] = verify_chain(seedprints.save_dir)
    try:
        result.drift_png = _plot(result, out / name / "drift.png")
    except Exception as exc:  # the verdict does not depend on the picture; say why it is missing
        result.extra["plot_error"] = f"{type(exc).__name__}: {exc}"
    return result


def run_own(out: str | Path, run: DemoRun | None = None) -> ScenarioResult:
    """Scenario A: pretrain from scratch (seed 42) with the callback warning on identity loss."""
    return _scenario("demo-own", Path(out), run or DemoRun(), on_identity_lost="warn", swap=None)


def run_wrong_resume(out: str | Path, run: DemoRun | None = None, *, swap_step: int | None = None) -> ScenarioResult:
    """Scenario B: the same run, with another run's weights swapped in after ``swap_step``.

    The foreign weights come from a run with init seed 123 trained for ``swap_step`` steps on
    the same data (no callback): a checkpoint of the same age, as a wrong resume would load.
    ``None`` swaps at the probe nearest a third of the run. The callback raises; the result's
    ``error`` holds the :class:`IdentityLostError`.
    """
    run = run or DemoRun()
    every = run.every_n_steps
    if swap_step is None:
        swap_step = max(every, every * round(run.steps / 3 / every))
    if run.verbose:
        print(f"  training the other run (init seed {OTHER_SEED}) for {swap_step} steps: the foreign checkpoint ...",
              flush=True)
    pl.seed_everything(0, workers=True, verbose=False)
    other = _module(run.model_kwargs, OTHER_SEED)
    _trainer(swap_step, [], root=Path(out)).fit(other, datamodule=_data(run.data))
    foreign = {k: v.detach().clone() for k, v in other.model.state_dict().items()}
    swap = SwapWeights(swap_step, foreign, verbose=run.verbose)
    return _scenario("demo-wrong-resume", Path(out), run, on_identity_lost="raise", swap=swap)


def check_own(result: ScenarioResult) -> tuple[bool, str]:
    """A passes when the run reached its last step, every custody link held and the ledger re-verifies."""
    if result.error is not None:
        return False, f"raised {type(result.error).__name__} at step {result.final_step}"
    if not result.history:
        return False, "the callback made no probe"
    bad = [e["step"] for e in result.history if e.get("related") is not True]
    if bad:
        return False, f"custody link broken at step(s) {bad}"
    if result.final_step != result.max_steps:
        return False, f"stopped at step {result.final_step} of {result.max_steps}"
    audit = result.extra.get("chain")
    if audit is not None and not audit.ok:
        return False, f"the custody ledger does not re-verify: {audit.problems[0].message}"
    faded = [e["step"] for e in result.history if not e.get("birth_detectable")]
    lead = min(e["link_z"] / e["link_threshold"] for e in result.history)
    birth = (f"birth test faded from step {faded[0]} on (z {result.history[-1]['z']:.1f} at the end)" if faded
             else "birth test detectable throughout")
    return True, (f"custody held at all {len(result.history)} probes (smallest link z / threshold {lead:.1f}); "
                  f"{birth}; ledger re-verified offline")


def check_wrong_resume(result: ScenarioResult) -> tuple[bool, str]:
    """B passes when the swap happened, every probe before it held, and the callback raised after it."""
    if result.swap_step is None:
        return False, "the weights were never swapped (the run ended first)"
    before = [e for e in result.history if e["step"] <= result.swap_step]
    after = [e for e in result.history if e["step"] > result.swap_step]
    if not before:
        return False, f"no probe before the swap at step {result.swap_step}: nothing shows the run was related first"
    early = [e["step"] for e in before if e.get("related") is not True]
    if early:
        return False, f"custody broken before the swap, at step(s) {early}"
    if result.error is None:
        return False, (f"no IdentityLostError after the swap at step {result.swap_step} "
                       f"(ran to step {result.final_step})")
    if not after:
        return False, f"raised before any probe after the swap at step {result.swap_step}"
    kept = [e["step"] for e in after if e.get("related") is True]
    if kept:
        return False, f"the swapped model was called kept at step(s) {kept}"
    raised_at = after[-1]["step"]
    return True, (f"custody held up to the swap after step {result.swap_step}, then IdentityLostError at step "
                  f"{raised_at} ({len(after)} probe(s) after the swap, all linked to step {after[0]['anchor_step']})")


def format_table(result: ScenarioResult) -> str:
    """The scenario's probes as a text table (step, birth test, custody link, verdict)."""
    header = (f"{'step':>6}  {'birth z':>8}  {'thr':>6}  {'birth':>10}  {'link z':>8}  {'from':>5}  "
              f"{'link thr':>8}  verdict")
    lines = [header, "-" * len(header)]
    swapped = False
    for entry in result.history:
        if result.swap_step is not None and not swapped and entry["step"] > result.swap_step:
            lines.append(f"{'':>6}  -- weights swapped after step {result.swap_step} --")
            swapped = True
        verdict = _verdict(entry)
        if result.error is not None and entry is result.history[-1]:
            verdict += "  -> IdentityLostError"
        birth = "detectable" if entry.get("birth_detectable") else "faded"
        lines.append(f"{entry['step']:>6}  {entry['z']:>8.2f}  {entry['threshold']:>6.2f}  {birth:>10}  "
                     f"{entry['link_z']:>8.2f}  {entry['anchor_step']:>5}  {entry['link_threshold']:>8.2f}  {verdict}")
    return "\n".join(lines)


def _plot(result: ScenarioResult, out_path: Path, title: str | None = None) -> Path:
    curves = [dataclasses.replace(c, run=result.name) for c in read_drift_curves(result.log_dir).values()]
    if title is None:
        title = f"SeedPrints drift: {result.name}"
        if result.swap_step is not None:
            title += f" (weights swapped after step {result.swap_step})"
    return plot_drift(curves, out_path, title=title)


def _plot_both(own: ScenarioResult, wrong: ScenarioResult, out_path: Path) -> Path:
    curves = []
    for result in (own, wrong):
        curves += [dataclasses.replace(c, run=result.name) for c in read_drift_curves(result.log_dir).values()]
    return plot_drift(curves, out_path, title="SeedPrints: own run vs a wrong resume")


# ----------------------------------------------------------------------------- overhead


# ----------------------------------------------------------------------------- main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m seedprints_lightning.train.demo",
        description="SeedPrints CPU demo: an own run keeps its identity, a wrong resume loses it.",
    )
    parser.add_argument("--out", default="runs", help="root of the TensorBoard logs and plots (default: runs)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per scenario (default {DEMO_STEPS}, {QUICK_STEPS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller model and run (hidden 64, 2 layers): a smoke test in seconds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the demo's small matrices gain little from more, and on a "
                             "shared machine oversubscribed threads are many times slower)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 6:
        parser.error("--steps must be at least 6 (probes before and after the swap at steps/3)")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run both scenarios; print the tables and PASS/FAIL; return 0 only if both passed."""
    args = _parse(argv)
    steps = args.steps or (QUICK_STEPS if args.quick else DEMO_STEPS)
    run = DemoRun(steps=steps, every=max(1, steps // (QUICK_PROBES if args.quick else DEMO_PROBES)),
                  model=QUICK_MODEL if args.quick else DEMO_MODEL)
    out = Path(args.out)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        with _quiet_lightning():
            return _run(args, run, out=out, started=started)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, run: DemoRun, *, out: Path, started: float) -> int:
    steps = run.steps
    corpus = build_corpus("prose")
    defaults = _callback_defaults()
    print(_INTRO.format(corpus=corpus, steps=steps, lr=DEMO_LR, every=run.every_n_steps, threads=args.threads,
                        seq_len=DEMO_DATA["seq_len"], batch_size=DEMO_DATA["batch_size"],
                        probe_desc=defaults["probe_desc"], num_controls=defaults["num_controls"],
                        alpha=defaults["alpha"], fail_on=defaults["fail_on"],
                        patience=defaults["patience"], **run.model_kwargs), flush=True)

    print(f"Scenario A (own): pretraining init seed {OWN_SEED} for {steps} steps; the callback warns if the "
          "custody chain breaks.", flush=True)
    own = run_own(out, run)
    print(f"  done in {own.seconds:.0f} s; logs in {own.log_dir}", flush=True)
    chain = own.extra.get("chain")
    if chain is not None:
        print(f"  offline audit of its ledger (seedprints audit --chain {chain.run_dir}): "
              + ("intact" if chain.ok else f"FAILED: {chain.problems[0].message}"), flush=True)
    print(flush=True)

    print(f"Scenario B (wrong resume): the same run, but after step ~{steps // 3} the weights are replaced by "
          f"another run's; the callback raises (on_identity_lost='raise').", flush=True)
    wrong = run_wrong_resume(out, run)
    if wrong.error is not None:
        print(f"  caught IdentityLostError:\n    {wrong.error}", flush=True)
    print(f"  done in {wrong.seconds:.0f} s; logs in {wrong.log_dir}\n", flush=True)

    both = None
    try:
        both = _plot_both(own, wrong, out / "demo-drift.png")
    except Exception as exc:
        print(f"  (combined plot not written: {type(exc).__name__}: {exc})")

    ok_a, why_a = check_own(own)
    ok_b, why_b = check_wrong_resume(wrong)
    for title, result in (("A: own run (init seed 42)", own), ("B: wrong resume", wrong)):
        print(f"{title}\n{format_table(result)}\n")
    for result in (own, wrong):
        if result.drift_png is not None:
            print(f"drift plot: {result.drift_png}")
        else:
            print(f"drift plot of {result.name} NOT written: {result.extra.get('plot_error')}")
    if both is not None:
        print(f"drift plot (both runs): {both}")
    print(f"see the curves live:  tensorboard --logdir {out}\n")
    print(f"{'PASS' if ok_a else 'FAIL'}  A own run: {why_a}")
    print(f"{'PASS' if ok_b else 'FAIL'}  B wrong resume: {why_b}")
    passed = ok_a and ok_b and own.drift_png is not None
    print(f"{'PASS' if passed else 'FAIL'}  demo ({time.perf_counter() - started:.0f} s wall)", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
