"""Calibration benchmark: the measurements that set the package's defaults.

    python benchmarks/calibration.py            # full run (~10-15 min on 2 shared CPU cores)
    python benchmarks/calibration.py --quick    # ~1 min smoke run
    python benchmarks/calibration.py --markdown docs/calibration_tables.md

What it does, all on CPU, nothing stored on disk but the optional markdown:

* trains tiny LLaMA- and Qwen2-style causal LMs (several widths, several init seeds) with a
  plain PyTorch loop (AdamW, fixed lr, no Lightning), every run on the SAME byte-tokenised
  stdlib prose windows in the SAME order (window starts drawn once from a seeded generator);
* probes each run at fixed steps with token and embedding probes and keeps only the
  ``[n, D]`` features (no weights are kept);
* tests every pair that matters with :func:`~seedprints_lightning.core.stats.lineage_test` at
  several identity ratios:

  - ``own``: seed s at step t vs seed s at step 0 (must be related);
  - ``cross``: seed s' at step t vs seed s at step 0 (must be unrelated);
  - ``peers``: seed s vs seed s', both at step t (must be unrelated);
  - ``init``: two fresh inits (step 0) of different seeds (must be unrelated);
  - robustness: the last checkpoint after continued training on the ``code`` corpus, and
    after an 8-bit round trip, 30 % magnitude pruning or 1 % Gaussian noise (``own``
    variants must stay related, ``cross`` variants unrelated);

* repeats every test against fresh-init negative controls
  (:func:`seedprints_lightning.core.controls.probe_controls` with
  :func:`~seedprints_lightning.core.controls.control_seeds`, each tested as
  ``lineage_test(control, live)``) so the callback's full verdict
  (:func:`~seedprints_lightning.core.verdict.decide_identity`, birth rule: z over the controls) can be
  tabulated for several z margins and control counts;
* reports how z scales with the number of probe samples by re-testing row subsets.

``run_calibration(CalibrationConfig(...)) -> CalibrationReport`` is the callable API (the
test suite runs it at a tiny size); the report renders its markdown tables with
:meth:`CalibrationReport.markdown`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seedprints_lightning.core.controls import control_seeds, probe_controls  # noqa: E402
from seedprints_lightning.core.probes import ProbeSpec, extract_features  # noqa: E402
from seedprints_lightning.core.stats import LineageResult, lineage_test, z_threshold  # noqa: E402
from seedprints_lightning.core.verdict import VerdictRule, decide_identity  # noqa: E402
from seedprints_lightning.train.corpus import build_corpus  # noqa: E402
from seedprints_lightning.train.models import make_causal_lm  # noqa: E402
from seedprints_lightning.train.tokenizer import tokenize_directory  # noqa: E402

__all__ = [
    "CalibrationConfig",
    "CalibrationReport",
    "ModelSize",
    "PairRecord",
    "full_config",
    "n1000_config",
    "quick_config",
    "run_calibration",
]

UNRELATED = ("cross", "peers", "init")
MODIFICATIONS = ("quant8", "prune30", "noise1")


# --------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """One model configuration: architecture and size."""

    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int = 4

    @property
    def name(self) -> str:
        return f"{self.arch}-h{self.hidden_size}-L{self.num_layers}"


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything the benchmark does; the defaults are the full run."""

    models: tuple[ModelSize, ...] = (
        ModelSize("llama", 64, 2), ModelSize("llama", 128, 2),
        ModelSize("qwen2", 64, 2), ModelSize("qwen2", 128, 2),
    )
    seeds: tuple[int, ...] = (1, 2, 3, 4)  # trained init seeds
    extra_init_seeds: tuple[int, ...] = (11, 12, 13, 14)  # fresh inits only (step-0 pairs)
    steps: tuple[int, ...] = (0, 50, 150, 300)  # probe checkpoints (0 must be first)
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    data_seed: int = 0
    vocab_size: int = 256
    probe_kinds: tuple[str, ...] = ("token", "embedding")
    num_samples: int = 500
    length: int = 32
    probe_seed: int = 42
    probe_batch_size: int = 250
    ratios: tuple[float, ...] = (0.1, 0.5, 1.0)
    n_scaling: tuple[int, ...] = (125, 250)  # row subsets re-tested (plus num_samples)
    n_scaling_ratio: float = 1.0
    num_controls: tuple[int, ...] = (2, 4, 6)  # the largest is probed; smaller = first c
    margins: tuple[float, ...] = (0.0, 1.0, 2.33, 3.0, 5.0)
    alpha: float = 0.01
    domain_steps: int = 100  # continued training on the code corpus after the last step
    modifications: tuple[str, ...] = MODIFICATIONS
    prune_fraction: float = 0.3
    noise_fraction: float = 0.01
    corpus_max_bytes: int | None = None
    threads: int | None = 1  # 2 threads on a shared 2-core box ran ~10x slower (oversubscription)
    verbose: bool = True

    def __post_init__(self) -> None:
        if not self.steps or self.steps[0] != 0 or list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"steps must start at 0 and increase, got {self.steps}")
        if len(self.seeds) < 2:
            raise ValueError("need at least two trained seeds (cross and peers pairs)")
        clash = set(self.seeds) & set(self.extra_init_seeds)
        clash |= (set(self.seeds) | set(self.extra_init_seeds)) & set(control_seeds(max(self.num_controls, default=0)))
        if clash:
            raise ValueError(f"seeds used twice (trained / extra / control): {sorted(clash)}")
        unknown = set(self.modifications) - set(MODIFICATIONS)
        if unknown:
            raise ValueError(f"unknown modifications {sorted(unknown)}; choose from {MODIFICATIONS}")

    @property
    def max_controls(self) -> int:
        return max(self.num_controls, default=0)

    def probe_settings(self) -> Iterator[tuple[str, float]]:
        """Every ``(probe kind, identity ratio k/D)`` tested, kind-major: the order of the records and table rows."""
        return itertools.product(self.probe_kinds, self.ratios)


def full_config() -> CalibrationConfig:
    return CalibrationConfig()


def n1000_config() -> CalibrationConfig:
    """The n = 1000 supplement: token probes, every dimension, plain checkpoints only (~4-9 min)."""
    return dataclasses.replace(
        full_config(), probe_kinds=("token",), ratios=(1.0,), num_samples=1000, n_scaling=(250, 500),
        modifications=(), domain_steps=0, num_controls=(4, 6), margins=(2.33, 3.0, 5.0, 9.0, 10.0),
    )


def quick_config() -> CalibrationConfig:
    """About a minute: one width per architecture, short runs, fewer samples."""
    return CalibrationConfig(
        models=(ModelSize("llama", 64, 2), ModelSize("qwen2", 64, 2)),
        seeds=(1, 2, 3, 4), extra_init_seeds=(11, 12, 13), steps=(0, 20, 50),
        num_samples=300, n_scaling=(150,), domain_steps=20, num_controls=(2, 4),
        margins=(0.0, 2.33), ratios=(0.5, 1.0), modifications=("quant8", "noise1"),
    )


@dataclass(frozen=True)
class PairRecord:
    """One lineage test of a target against a base, with the live target's control tests.

    ``relation``: own / cross / peers / init. ``variant``: plain, code (continued training
    on the code corpus), or a parameter modification (quant8, prune30, noise1). ``step`` is
    the target's training step (for ``code``: prose steps + code steps). ``controls`` are
    ``lineage_test(control_i, target)`` for the first ``max_controls`` control seeds
    (empty for the n-scaling re-tests).
    """

    model: str
    kind: str
    ratio: float
    n: int
    relation: str
    variant: str
    step: int
    base_seed: int
    target_seed: int
    reference: LineageResult
    controls: tuple[LineageResult, ...] = ()

    @property
    def z(self) -> float:
        return float(self.reference.z)

    @property
    def expected_related(self) -> bool:
        return self.relation == "own"

    def verdict(self, num_controls: int, margin: float, alpha: float) -> bool:
        """The birth-test verdict (``decide_identity``, z margin ``margin``) with the first ``num_controls``."""
        v = decide_identity(self.reference, self.controls[:num_controls], VerdictRule(alpha=alpha, z_margin=margin))
        return bool(v.related)

    def slack(self, num_controls: int) -> float:
        """``z - max(control z)``: the largest margin at which this pair is still 'related'."""
        cz = [c.z for c in self.controls[:num_controls] if c.related is not None]
        return self.z - (max(cz) if cz else 0.0)


@dataclass
class CalibrationReport:
    config: CalibrationConfig
    records: list[PairRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    machine: str = ""
    final_loss: dict[str, float] = field(default_factory=dict)

    # ---------------------------------------------------------------- selection
    def select(self, *, model: str | None = None, kind: str | None = None, ratio: float | None = None,
               n: int | None = None, relation: str | Iterable[str] | None = None,
               variant: str | Iterable[str] | None = "plain", step: int | None = None) -> list[PairRecord]:
        n = self.config.num_samples if n is None else n
        rel = {relation} if isinstance(relation, str) else (set(relation) if relation is not None else None)
        var = {variant} if isinstance(variant, str) else (set(variant) if variant is not None else None)
        return [r for r in self.records
                if (model is None or r.model == model) and (kind is None or r.kind == kind)
                and (ratio is None or math.isclose(r.ratio, ratio)) and r.n == n
                and (rel is None or r.relation in rel) and (var is None or r.variant in var)
                and (step is None or r.step == step)]

    def verdict_rates(self, records: Sequence[PairRecord], num_controls: int, margin: float) -> tuple[int, int]:
        """(number called related, number of records) under the full verdict."""
        hits = sum(r.verdict(num_controls, margin, self.config.alpha) for r in records)
        return hits, len(records)

    def own_miss_streak(self, kind: str, ratio: float, num_controls: int, margin: float) -> int:
        """Longest run of consecutive checkpoints at which a run's own lineage was NOT confirmed."""
        worst = 0
        for m in self.config.models:
            for seed in self.config.seeds:
                recs = sorted(self.select(model=m.name, kind=kind, ratio=ratio, relation="own", variant="plain")
                              , key=lambda r: r.step)
                streak = 0
                for r in recs:
                    if r.target_seed != seed:
                        continue
                    streak = 0 if r.verdict(num_controls, margin, self.config.alpha) else streak + 1
                    worst = max(worst, streak)
        return worst

    def defaults_check(self, kind: str, ratio: float, num_controls: int, margin: float,
                       variants: Iterable[str] = ("plain",)) -> dict[str, tuple[int, int]]:
        """Per relation: (related verdicts, total) at these settings, all models and steps."""
        out = {}
        for relation in ("own", "cross", "peers", "init"):
            recs = self.select(kind=kind, ratio=ratio, relation=relation, variant=tuple(variants))
            if recs:
                out[relation] = self.verdict_rates(recs, num_controls, margin)
        return out

    # ---------------------------------------------------------------- tables
    def markdown(self) -> str:
        cfg = self.config
        alpha_z = z_threshold(cfg.alpha)
        out: list[str] = []
        add = out.append
        add(f"Machine: {self.machine}. Wall time: {self.timings.get('total', 0.0):.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in self.timings.items() if k != 'total')}).")
        add("")
        add(f"Settings: models {', '.join(m.name for m in cfg.models)}; vocab {cfg.vocab_size}; trained seeds "
            f"{list(cfg.seeds)}, extra init seeds {list(cfg.extra_init_seeds)}; AdamW lr {cfg.lr:g} wd "
            f"{cfg.weight_decay:g}, batch {cfg.batch_size} x {cfg.seq_len} tokens, one fixed window order "
            f"(data seed {cfg.data_seed}); probes n = {cfg.num_samples}, L = {cfg.length}, probe seed "
            f"{cfg.probe_seed}; coset identity dims, T = 10, analytic null, one-sided, alpha = {cfg.alpha:g} "
            f"(z > {alpha_z:.2f}); controls = control_seeds({cfg.max_controls}).")
        if self.final_loss:
            add("")
            add("Final training loss (prose, mean over seeds): " + ", ".join(
                f"{k} {v:.2f}" for k, v in self.final_loss.items()) + ".")
        add("")
        self._table_bare(add)
        self._table_worst(add, alpha_z)
        self._table_slack(add)
        self._table_verdict(add)
        self._table_robustness(add)
        self._table_n_scaling(add)
        return "\n".join(out)

    def _table_bare(self, add) -> None:
        cfg = self.config
        self._section(add, "### Bare lineage test (analytic null) per checkpoint",
                      "Rates are the fraction called related (p < alpha). own: detection rate, z mean / min. "
                      "cross and peers: false-positive rate, z mean / max. Step 0 rows are the fresh-init pairs "
                      f"(`init`: every pair of {len(cfg.seeds) + len(cfg.extra_init_seeds)} init seeds).")
        add("| model | probe | k/D | step | own det | own z mean / min | cross FP | cross z mean / max "
            "| peers FP | peers z mean / max |")
        add("|---|---|---|---|---|---|---|---|---|---|")
        for m in cfg.models:
            for kind, ratio in cfg.probe_settings():
                init = self.select(model=m.name, kind=kind, ratio=ratio, relation="init")
                add(f"| {m.name} | {kind} | {ratio:g} | 0 (init pairs) | | | {_rate(init)} | {_mean_max(init)} "
                    "| | |")
                for step in cfg.steps[1:]:
                    own = self.select(model=m.name, kind=kind, ratio=ratio, relation="own", step=step)
                    cross = self.select(model=m.name, kind=kind, ratio=ratio, relation="cross", step=step)
                    peers = self.select(model=m.name, kind=kind, ratio=ratio, relation="peers", step=step)
                    add(f"| {m.name} | {kind} | {ratio:g} | {step} | {_rate(own)} | {_mean_min(own)} | "
                        f"{_rate(cross)} | {_mean_max(cross)} | {_rate(peers)} | {_mean_max(peers)} |")
        add("")

    def _table_worst(self, add, alpha_z: float) -> None:
        cfg = self.config
        self._section(add, "### Worst cases over all models and checkpoints (bare test)",
                      f"own z min (must exceed {alpha_z:.2f}); unrelated z max per relation (must stay below it).")
        add("| probe | k/D | own z min | own det | cross z max | cross FP | peers z max | peers FP | init z max | "
            "init FP |")
        add("|---|---|---|---|---|---|---|---|---|---|")
        for kind, ratio in cfg.probe_settings():
            cells = []
            for rel in ("own", "cross", "peers", "init"):
                recs = self.select(kind=kind, ratio=ratio, relation=rel)
                zs = [r.z for r in recs]
                worst = (min(zs) if rel == "own" else max(zs)) if zs else float("nan")
                cells += [f"{worst:.1f}", _rate(recs)]
            add(f"| {kind} | {ratio:g} | " + " | ".join(cells) + " |")
        add("")

    @staticmethod
    def _section(add, title: str, text: str) -> None:
        for line in (title, "", text, ""):
            add(line)

    def _control_section(self, add, title: str, text: str) -> bool:
        """A section's heading and text, for sections that need controls (False, nothing added, without them)."""
        if not self.config.max_controls:
            return False
        self._section(add, title, text)
        return True

    def _table_slack(self, add) -> None:
        cfg = self.config
        text = ("A pair is called related iff z > z_alpha and z - max(control z) > margin. So a margin m "
                "separates own from unrelated iff own min < m is false and unrelated max >= m is false: "
                "every m in [unrelated max, own min) works (unrelated pairs below z_alpha are excluded from "
                "the unrelated max, since the analytic threshold already rejects them).")
        if not self._control_section(add, "### Room for the control margin: z minus the largest control z", text):
            return
        add("| probe | k/D | controls | own min(z - ctl max) | cross max | peers max | init max | feasible margins |")
        add("|---|---|---|---|---|---|---|---|")
        alpha_z = z_threshold(cfg.alpha)
        for kind, ratio in cfg.probe_settings():
            for c in cfg.num_controls:
                own = [r.slack(c) for r in self.select(kind=kind, ratio=ratio, relation="own")]
                cells, worst_unrel = [], -math.inf
                for rel in UNRELATED:
                    s = [r.slack(c) for r in self.select(kind=kind, ratio=ratio, relation=rel) if r.z > alpha_z]
                    v = max(s) if s else -math.inf
                    worst_unrel = max(worst_unrel, v)
                    cells.append("(none > z_alpha)" if not s else f"{v:.1f}")
                lo, hi = max(0.0, worst_unrel), (min(own) if own else math.nan)
                feas = f"[{lo:.1f}, {hi:.1f})" if hi > lo else "none"
                add(f"| {kind} | {ratio:g} | {c} | {hi:.1f} | " + " | ".join(cells) + f" | {feas} |")
        add("")

    def _table_verdict(self, add) -> None:
        cfg = self.config
        title = "### The callback's full verdict (decide_identity), all models and checkpoints"
        if not self._control_section(add, title, "Counts are related verdicts / pairs. own should be all; cross, "
                                                 "peers, init none. `controls 0` is the bare analytic test."):
            return
        add("| probe | k/D | controls | margin | own | cross | peers | init | own: longest miss streak |")
        add("|---|---|---|---|---|---|---|---|---|")
        for kind, ratio in cfg.probe_settings():
            for c in (0,) + tuple(cfg.num_controls):
                for margin in (cfg.margins if c else (0.0,)):
                    check = self.defaults_check(kind, ratio, c, margin)
                    counts = (check.get(r, (0, 0)) for r in ("own", "cross", "peers", "init"))
                    cells = [f"{h}/{t}" for h, t in counts]
                    streak = self.own_miss_streak(kind, ratio, c, margin)
                    add(f"| {kind} | {ratio:g} | {c} | {margin:g} | " + " | ".join(cells) + f" | {streak} |")
        add("")

    def _table_robustness(self, add) -> None:
        cfg = self.config
        variants = [v for v in ("code",) + tuple(cfg.modifications) if self.select(variant=v)]
        if not variants:
            return
        c = cfg.max_controls
        add(f"### Robustness of the last checkpoint (step {cfg.steps[-1]})")
        add("")
        add(f"`code`: {cfg.domain_steps} more steps on the code corpus. quant8: symmetric per-tensor int8 "
            f"round trip; prune30: {cfg.prune_fraction:.0%} smallest-magnitude entries of each tensor zeroed; "
            f"noise1: N(0, ({cfg.noise_fraction:g} x tensor std)^2) added per tensor; all on every weight "
            "matrix (>= 2-D: embeddings, attention, MLP, LM head), norms untouched. own: modified seed s vs "
            "seed s at init; cross: modified seed s' vs seed s at init. Bare = analytic test; verdict = "
            f"decide_identity with {c} controls at each margin.")
        add("")
        margins = cfg.margins if c else ()
        head = "| model | probe | k/D | variant | own z min | own bare | cross z max | cross bare | " + " | ".join(
            f"own / cross verdict m={m:g}" for m in margins) + " |"
        add(head)
        add("|" + "---|" * (8 + len(margins)))
        for m in cfg.models:
            for kind, ratio in cfg.probe_settings():
                for v in ("plain",) + tuple(variants):
                    step = cfg.steps[-1] + (cfg.domain_steps if v == "code" else 0)
                    own = self.select(model=m.name, kind=kind, ratio=ratio, relation="own", variant=v, step=step)
                    cross = self.select(model=m.name, kind=kind, ratio=ratio, relation="cross", variant=v,
                                        step=step)
                    if not own:
                        continue
                    verdicts = []
                    for mg in margins:
                        ho, to = self.verdict_rates(own, c, mg)
                        hc, tc = self.verdict_rates(cross, c, mg)
                        verdicts.append(f"{ho}/{to} / {hc}/{tc}")
                    add(f"| {m.name} | {kind} | {ratio:g} | {v} | {min(r.z for r in own):.1f} | {_rate(own)} | "
                        f"{max(r.z for r in cross):.1f} | {_rate(cross)} | " + " | ".join(verdicts) + " |")
        add("")

    def _table_n_scaling(self, add) -> None:
        cfg = self.config
        ns = sorted(set(cfg.n_scaling) | {cfg.num_samples})
        if len(ns) < 2:
            return
        add(f"### z against the number of probe samples n (k/D = {cfg.n_scaling_ratio:g}, row subsets of one probe "
            "set)")
        add("")
        add("own z mean at each checkpoint (all models), and the unrelated z max (cross + init). "
            "Under a calibrated null own z grows like sqrt(n) and unrelated z stays O(1).")
        add("")
        steps = cfg.steps[1:]
        add("| probe | n | " + " | ".join(f"own z mean @{s}" for s in steps) + " | own z min | unrelated z max |")
        add("|" + "---|" * (4 + len(steps)))
        for kind in cfg.probe_kinds:
            for n in ns:
                cells = []
                for s in steps:
                    own = self.select(kind=kind, ratio=cfg.n_scaling_ratio, n=n, relation="own", step=s)
                    cells.append(f"{np.mean([r.z for r in own]):.1f}" if own else "")
                own = self.select(kind=kind, ratio=cfg.n_scaling_ratio, n=n, relation="own")
                unrel = self.select(kind=kind, ratio=cfg.n_scaling_ratio, n=n, relation=("cross", "init"))
                add(f"| {kind} | {n} | " + " | ".join(cells) +
                    f" | {min(r.z for r in own):.1f} | {max(r.z for r in unrel):.1f} |")
        add("")


def _rate(recs: Sequence[PairRecord]) -> str:
    if not recs:
        return ""
    hits = sum(bool(r.reference.related) for r in recs)
    return f"{hits}/{len(recs)}"


def _mean_min(recs: Sequence[PairRecord]) -> str:
    zs = [r.z for r in recs]
    return f"{np.mean(zs):.1f} / {min(zs):.1f}" if zs else ""


def _mean_max(recs: Sequence[PairRecord]) -> str:
    zs = [r.z for r in recs]
    return f"{np.mean(zs):.1f} / {max(zs):.1f}" if zs else ""


# --------------------------------------------------------------------------------------
# Training and modifications
# --------------------------------------------------------------------------------------


def _window_starts(num_tokens: int, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """The fixed data order: ``[steps, batch]`` window starts from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - seq_len, (max(steps, 1), batch), generator=generator)


def _batch(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    index = starts[:, None] + torch.arange(seq_len)[None, :]
    return tokens[index]


def _train_steps(model, opt, tokens: torch.Tensor, starts: torch.Tensor, seq_len: int, first: int, last: int) -> float:
    """Train steps ``first .. last - 1`` (row ``i`` of ``starts`` is step ``i``); return the last loss."""
    model.train()
    loss_value = float("nan")
    for step in range(first, last):
        x = _batch(tokens, starts[step], seq_len)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
    return loss_value


@torch.no_grad()
def _modify(model, kind: str, cfg: CalibrationConfig, seed: int) -> None:
    """Apply one parameter modification in place to every >= 2-D weight."""
    generator = torch.Generator().manual_seed(seed)
    for _, p in model.named_parameters():
        if p.dim() < 2:
            continue
        if kind == "quant8":
            scale = p.abs().max() / 127.0
            if scale > 0:
                p.copy_(torch.round(p / scale).clamp_(-127, 127) * scale)
        elif kind == "prune30":
            k = int(cfg.prune_fraction * p.numel())
            if k >= 1:
                threshold = p.abs().flatten().kthvalue(k).values
                p.masked_fill_(p.abs() <= threshold, 0.0)
        elif kind == "noise1":
            p.add_(torch.randn(p.shape, generator=generator) * (p.std() * cfg.noise_fraction))
        else:  # pragma: no cover - validated in the config
            raise ValueError(kind)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _log(cfg: CalibrationConfig, msg: str) -> None:
    if cfg.verbose:
        print(msg, file=sys.stderr, flush=True)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def run_calibration(config: CalibrationConfig | None = None) -> CalibrationReport:
    """Train, probe and test everything ``config`` asks for; return the report."""
    cfg = config or CalibrationConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    report = CalibrationReport(config=cfg, machine=_machine())
    timings = defaultdict(float)

    t0 = time.perf_counter()
    prose = torch.from_numpy(tokenize_directory(build_corpus("prose", max_bytes=cfg.corpus_max_bytes)).astype(np.int64))
    needs_code = cfg.domain_steps > 0
    code = (torch.from_numpy(tokenize_directory(build_corpus("code", max_bytes=cfg.corpus_max_bytes)).astype(np.int64))
            if needs_code else None)
    last = cfg.steps[-1]
    prose_starts = _window_starts(len(prose), last, cfg.batch_size, cfg.seq_len, cfg.data_seed)
    code_starts = (_window_starts(len(code), cfg.domain_steps, cfg.batch_size, cfg.seq_len, cfg.data_seed + 1)
                   if needs_code else None)
    timings["data"] += time.perf_counter() - t0

    ctl_seeds = control_seeds(cfg.max_controls)
    for size in cfg.models:
        def build(seed: int, size=size):  # bound now: used within this iteration only
            return make_causal_lm(size.arch, seed=seed, vocab_size=cfg.vocab_size, hidden_size=size.hidden_size,
                                  num_layers=size.num_layers, num_heads=size.num_heads)

        # One probe spec per kind for the whole model config: every run, checkpoint and control
        # must see the same inputs. Embedding statistics come from the first seed's init (the
        # callback resolves them at step 0; HF inits give the same N(0, 0.02) for every seed).
        first = build(cfg.seeds[0])
        specs = {kind: ProbeSpec(kind=kind, num_samples=cfg.num_samples, length=cfg.length,
                                 seed=cfg.probe_seed).resolve(first) for kind in cfg.probe_kinds}
        del first

        def probe(model, specs=specs) -> dict[str, torch.Tensor]:
            t = time.perf_counter()
            out = {kind: extract_features(model, spec, batch_size=cfg.probe_batch_size) for kind, spec in specs.items()}
            timings["probe"] += time.perf_counter() - t
            return out

        # feats[(variant, seed, step)][kind] -> [n, D]
        feats: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}
        t = time.perf_counter()
        for seed in cfg.extra_init_seeds:
            feats[("plain", seed, 0)] = probe(build(seed))
        controls: dict[str, torch.Tensor] = {}
        if ctl_seeds:
            t_ctl = time.perf_counter()
            reference_model = build(cfg.seeds[0])
            for kind, spec in specs.items():
                controls[kind] = probe_controls(reference_model, spec, ctl_seeds, batch_size=cfg.probe_batch_size)
            del reference_model
            timings["probe"] += time.perf_counter() - t_ctl
        timings["inits"] += time.perf_counter() - t

        losses = []
        for seed in cfg.seeds:
            t = time.perf_counter()
            model = build(seed)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            done = 0
            for step in cfg.steps:
                losses_at = _train_steps(model, opt, prose, prose_starts, cfg.seq_len, done, step)
                done = step
                feats[("plain", seed, step)] = probe(model)
            losses.append(losses_at)
            saved = copy.deepcopy(model.state_dict())
            for i, mod in enumerate(cfg.modifications):
                _modify(model, mod, cfg, seed=1000 * seed + i)
                feats[(mod, seed, last)] = probe(model)
                model.load_state_dict(saved)
            if needs_code:
                _train_steps(model, opt, code, code_starts, cfg.seq_len, 0, cfg.domain_steps)
                feats[("code", seed, last + cfg.domain_steps)] = probe(model)
            del model, opt, saved
            timings["train+probe"] += time.perf_counter() - t
            _log(cfg, f"[calibration] {size.name} seed {seed}: trained ({time.perf_counter() - t_start:.0f} s total)")
        report.final_loss[size.name] = float(np.mean(losses))

        t = time.perf_counter()
        report.records.extend(_test_pairs(cfg, size.name, feats, controls))
        timings["tests"] += time.perf_counter() - t
        _log(cfg, f"[calibration] {size.name}: tested ({time.perf_counter() - t_start:.0f} s total)")

    report.timings = {k: float(v) for k, v in timings.items()}
    report.timings["total"] = time.perf_counter() - t_start
    return report


def _test_pairs(cfg: CalibrationConfig, model_name: str, feats, controls) -> list[PairRecord]:
    """Every pair of one model config, at every probe kind, ratio and (for one ratio) n."""
    last = cfg.steps[-1]
    pairs: list[tuple[str, str, int, tuple, tuple]] = []  # relation, variant, step, base key, target key
    init_seeds = tuple(cfg.seeds) + tuple(cfg.extra_init_seeds)
    for a, b in itertools.combinations(init_seeds, 2):
        pairs.append(("init", "plain", 0, ("plain", a, 0), ("plain", b, 0)))
    for step in cfg.steps[1:]:
        for s in cfg.seeds:
            pairs.append(("own", "plain", step, ("plain", s, 0), ("plain", s, step)))
            for s2 in cfg.seeds:
                if s2 != s:
                    pairs.append(("cross", "plain", step, ("plain", s, 0), ("plain", s2, step)))
        for s, s2 in itertools.combinations(cfg.seeds, 2):
            pairs.append(("peers", "plain", step, ("plain", s, step), ("plain", s2, step)))
    variants = [(m, last) for m in cfg.modifications]
    if cfg.domain_steps:
        variants.append(("code", last + cfg.domain_steps))
    for variant, step in variants:
        for s in cfg.seeds:
            pairs.append(("own", variant, step, ("plain", s, 0), (variant, s, step)))
            for s2 in cfg.seeds:
                if s2 != s:
                    pairs.append(("cross", variant, step, ("plain", s, 0), (variant, s2, step)))

    records: list[PairRecord] = []
    for kind, ratio in cfg.probe_settings():
        def test(base, target, n=None, ratio=ratio):
            if n is not None:
                base, target = base[:n], target[:n]
            return lineage_test(base, target, identity_ratio=ratio, alpha=cfg.alpha)

        control_cache: dict[tuple, tuple[LineageResult, ...]] = {}
        for relation, variant, step, base_key, target_key in pairs:
            target = feats[target_key][kind]
            if target_key not in control_cache:
                control_cache[target_key] = tuple(test(c, target) for c in controls.get(kind, ()))
            records.append(PairRecord(
                model=model_name, kind=kind, ratio=ratio, n=cfg.num_samples, relation=relation, variant=variant,
                step=step, base_seed=base_key[1], target_seed=target_key[1],
                reference=test(feats[base_key][kind], target), controls=control_cache[target_key]))
            if math.isclose(ratio, cfg.n_scaling_ratio) and variant == "plain" and relation != "peers":
                for n in cfg.n_scaling:
                    if n < cfg.num_samples:
                        records.append(PairRecord(
                            model=model_name, kind=kind, ratio=ratio, n=n, relation=relation, variant=variant,
                            step=step, base_seed=base_key[1], target_seed=target_key[1],
                            reference=test(feats[base_key][kind], target, n)))
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--n1000", action="store_true", help="the n = 1000 token-probe supplement")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pickle", metavar="PATH", help="also pickle the CalibrationReport to PATH")
    args = parser.parse_args(argv)
    cfg = quick_config() if args.quick else n1000_config() if args.n1000 else full_config()
    cfg = dataclasses.replace(cfg, threads=args.threads)
    report = run_calibration(cfg)
    flag = " --quick" if args.quick else " --n1000" if args.n1000 else ""
    text = (f"## Calibration ({flag.strip(' -') or 'full'} run)\n\n"
            f"Command: `python benchmarks/calibration.py{flag}`\n\n" + report.markdown())
    print(text)
    if args.pickle:
        import pickle

        with open(args.pickle, "wb") as handle:
            pickle.dump(report, handle)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
