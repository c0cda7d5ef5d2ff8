"""Which of our runs did a checkpoint come from, and at about which step?

A checkpoint turned up. Every recorded run (a ``seedprints`` run directory) holds its step-0
reference, the stored features of every probe its custody ledger recorded, and its fresh-init
controls. :func:`identify` tests the checkpoint's features against every one of those
fingerprints, in every run, and names the run (and the steps of the probes it links to) that
the checkpoint descends from, or "none".

The tests
---------
* Each candidate (a run's reference or one recorded probe) is a base, the checkpoint the
  target: ``lineage_test(candidate, checkpoint)``, ``coset`` identity dimensions with the run's
  ``identity_ratio``, as the audit links a checkpoint to a chain (``chain._link_checkpoint``).
* Each is judged by the run's custody rule (the ``link.rule`` its ledger records, else
  :data:`~seedprints_lightning.core.verdict.CUSTODY_RULE`) against the run's controls
  (``lineage_test(control_i, checkpoint)``), so a link here is a link the audit would accept:
  the controls calibrate the inflated null, and the rule's ``tau_margin`` keeps out models of
  another seed trained on the same data.
* Multiple testing: ``m`` candidate tests are made (over all runs and probes), so the rule's
  ``alpha`` is replaced by ``alpha / m`` (Bonferroni over every test made; the control tests
  calibrate, they are not hypotheses, and are not counted). The reported
  ``log10_p_corrected = min(0, log10_p + log10 m)``. ``alpha`` is thus a family-wise error
  rate over the whole identification.

Lineages
--------
Runs whose references are identical (same probe spec and bit-equal step-0 features, i.e. the
same init) are one lineage: a checkpoint of either links to both runs' early probes, so which of
them it came from is not a lineage question. They are reported as one match listing every run
of the lineage, with each run's own links (``LineageMatch.links``), never one picked.

Speed
-----
The checkpoint's features are validated, softmax-normalised and sorted per column ONCE per
probe spec; each candidate is softmax-normalised, and the Kendall taus of a chunk of
candidates are one call of the compiled per-column kernel of :mod:`.._kendall_cpu` (the
kernel :func:`~seedprints_lightning.core.stats.kendall_tau_b` uses), with the checkpoint's column
order passed in instead of re-sorted. ``z``, ``log10_p`` and the :class:`LineageResult` are made
by the same functions :func:`~seedprints_lightning.core.stats.lineage_test` uses, so a batched result
equals ``lineage_test``'s (tests/test_identify.py checks it). Runs with ``identity_ratio < 1``
(per-candidate identity dims) take the unbatched path. Candidates are loaded run by run, so
memory holds one run's features at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core._kendall_cpu import _KERNEL_LOCK, _tau_b_from_orders
from ..core.chain import _read_record
from ..core.controls import ControlSet
from ..core.errors import FingerprintFileError, IncompatibleFingerprintsError, InputError
from ..core.fingerprint import Fingerprint
from ..core.ledger import CONTROLS_FILE, CUSTODY_FILE, REFERENCE_FILE, SAVE_KIND, load_probe_features
from ..core.probes import ProbeSpec
from ..core.stats import (
    DEFAULT_TEMPERATURE,
    LineageResult,
    _analytic_signal,
    _as_float_matrix,
    _check_pair,
    _resolve_k,
    _undetermined,
    kendall_tau_b,
    softmax_normalise,
)
from ..core.verdict import CUSTODY_RULE, VerdictRule, decide_identity, safe_lineage_test

__all__ = [
    "Candidate",
    "Identification",
    "LineageMatch",
    "RunEvidence",
    "RunLinks",
    "batched_lineage_tests",
    "identify",
    "load_runs",
]

FeatureSource = torch.Tensor | Callable[[], torch.Tensor]
#: Candidates whose taus are computed in one kernel call (``chunk * D`` columns of ``n`` samples).
_CHUNK = 16


def _materialise(source: FeatureSource) -> torch.Tensor:
    return source() if callable(source) else source


# --------------------------------------------------------------------------------------
# Evidence: what a run holds
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Candidate:
    """One fingerprint of a run the checkpoint is tested against: the reference or a recorded probe.

    ``features`` is the ``[n, D]`` tensor or a zero-argument loader of it (load_runs passes a
    loader, so features are read only when their run is tested). ``index`` is the ledger record
    index (``None`` for the reference).
    """

    step: int
    features: FeatureSource = field(repr=False)
    index: int | None = None
    source: str | None = None

    def load(self) -> torch.Tensor:
        return _materialise(self.features)


@dataclass(frozen=True, eq=False)
class RunEvidence:
    """What one run offers to :func:`identify`.

    ``path`` is the run as the caller named it (reported back verbatim). ``lineage`` is the
    digest of the reference (spec + exact features): runs with equal ``lineage`` share an init.
    ``controls`` is ``[c, n, D]`` (or a loader of it, or ``None``); ``rule`` the custody rule the
    run's ledger records; ``notes`` what was left out while loading (malformed records).
    """

    path: str
    spec: ProbeSpec
    reference: Candidate
    probes: tuple[Candidate, ...]
    lineage: str
    shape: tuple[int, int]
    controls: FeatureSource | None = field(default=None, repr=False)
    rule: VerdictRule = CUSTODY_RULE
    identity_ratio: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return (self.reference, *self.probes)

    def load_controls(self) -> list[torch.Tensor]:
        if self.controls is None:
            return []
        controls = _materialise(self.controls)
        if isinstance(controls, ControlSet):
            return controls.as_list()
        return [] if controls is None else list(controls)

    @classmethod
    def from_features(cls, path: str | os.PathLike, spec: ProbeSpec, reference: torch.Tensor,
                      probes: Iterable[tuple[int, FeatureSource]] = (), *, reference_step: int = 0,
                      controls: FeatureSource | None = None, rule: VerdictRule = CUSTODY_RULE,
                      identity_ratio: float | None = None) -> RunEvidence:
        """Evidence from fingerprints held in memory (``probes`` as ``(step, features)`` pairs)."""
        if not isinstance(spec, ProbeSpec):
            raise InputError(f"spec must be a ProbeSpec, got {type(spec).__name__}")
        reference = _as_float_matrix(reference, "reference")
        return cls(path=os.fspath(path), spec=spec, reference=Candidate(int(reference_step), reference, None, "memory"),
                   probes=tuple(Candidate(int(step), feats, i, "memory") for i, (step, feats) in enumerate(probes)),
                   lineage=lineage_digest(spec, reference), shape=tuple(reference.shape), controls=controls, rule=rule,
                   identity_ratio=identity_ratio)


def lineage_digest(spec: ProbeSpec, reference: torch.Tensor) -> str:
    """sha256 of the probe spec and the exact float32 reference features: equal for runs of one init."""
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    digest.update(str(tuple(reference.shape)).encode())
    digest.update(reference.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _is_run_dir(path: Path) -> bool:
    return (path / REFERENCE_FILE).is_file() and (path / CUSTODY_FILE).is_file()


def _find_run_dirs(given: str | os.PathLike) -> list[Path]:
    """The run directories ``given`` names: itself, its ``seedprints`` child, or every one below it (sorted)."""
    root = Path(given)
    if not root.exists():
        raise FingerprintFileError(f"{root} does not exist")
    if not root.is_dir():
        raise FingerprintFileError(f"{root} is not a directory (give run directories or directories holding them)")
    for path in (root, root / "seedprints"):
        if _is_run_dir(path):
            return [path]
    found = []
    for current, dirs, _files in os.walk(root, followlinks=False):
        dirs.sort()
        if _is_run_dir(Path(current)):
            found.append(Path(current))
            dirs[:] = [d for d in dirs if d != "probes"]
    if not found:
        raise FingerprintFileError(f"no seedprints run directory (one holding {REFERENCE_FILE} and {CUSTODY_FILE}) "
                                   f"in or under {root}")
    return found


def _load_run(run_dir: Path, shown: str) -> RunEvidence:
    reference_fp = Fingerprint.load(run_dir / REFERENCE_FILE)
    spec = reference_fp.spec
    notes: list[str] = []
    probes: list[Candidate] = []
    rule, identity_ratio = CUSTODY_RULE, None
    lines = (run_dir / CUSTODY_FILE).read_bytes().split(b"\n")
    for line_no, line in enumerate(lines):
        line = line.rstrip(b"\r")
        if not line:
            continue
        record, problem = _read_record(line)
        if problem is not None:
            notes.append(f"record {line_no} {problem}: left out")
            continue
        if record.get("kind") == SAVE_KIND:  # a checkpoint save: no fingerprint of its own
            continue
        features_path = run_dir / record["features_file"]
        if not features_path.is_file():
            notes.append(f"record {line_no}: its features file {features_path} is missing: left out")
            continue
        try:
            rule = VerdictRule.from_dict(record["link"]["rule"])
        except (InputError, KeyError, TypeError):
            pass
        identity_ratio = record.get("identity_ratio")
        probes.append(Candidate(int(record["step"]), lambda p=features_path: load_probe_features(p).float(),
                                int(record["index"]), os.fspath(features_path)))
    controls: FeatureSource | None = None
    controls_path = run_dir / CONTROLS_FILE
    if controls_path.is_file():
        def controls_loader(p: Path = controls_path) -> list[torch.Tensor]:
            loaded = ControlSet.load(p)
            return loaded.as_list() if loaded.matches(spec, tuple(reference_fp.features.shape)) else []
        controls = controls_loader
    elif reference_fp.controls is not None:
        controls = reference_fp.controls
    ref_path = run_dir / REFERENCE_FILE
    reference = Candidate(int(reference_fp.step or 0), lambda p=ref_path: Fingerprint.load(p).features, None,
                          os.fspath(ref_path))
    return RunEvidence(path=shown, spec=spec, reference=reference, probes=tuple(probes),
                       lineage=lineage_digest(spec, reference_fp.features),
                       shape=tuple(reference_fp.features.shape), controls=controls, rule=rule,
                       identity_ratio=identity_ratio, notes=tuple(notes))


def load_runs(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[RunEvidence]:
    """Evidence of every run ``paths`` name: run directories, or directories holding many (searched recursively).

    A run directory holds ``reference.safetensors`` and ``custody.jsonl`` (or is the parent of
    such a ``seedprints`` directory). A run named as given keeps that name (``RunEvidence.path``);
    one found below a given directory is named ``given/relative/path``. A run found twice is
    loaded once. Features are not read here (only each reference, for the lineage digest).
    Raises :class:`FingerprintFileError` for a path that is missing or holds no run.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs, seen = [], set()
    for given in paths:
        root = Path(given)
        for run_dir in _find_run_dirs(given):
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            if run_dir in (root, root / "seedprints"):
                shown = os.fspath(given)
            else:
                shown = os.fspath(Path(given) / run_dir.relative_to(root))
            runs.append(_load_run(run_dir, shown))
    return runs


# --------------------------------------------------------------------------------------
# Batched lineage tests: one target (the checkpoint), many bases
# --------------------------------------------------------------------------------------


class _Target:
    """The checkpoint's features on one spec, normalised and sorted per column once."""

    error: str | None = None

    def __init__(self, features: Any, temperature: float) -> None:
        self.matrix = _as_float_matrix(features, "checkpoint features")
        self.n, self.dim = (int(s) for s in self.matrix.shape)
        self.temperature = float(temperature)
        self.dims = torch.arange(self.dim, device=self.matrix.device)
        self.columns = softmax_normalise(self.matrix, self.dims, self.temperature).t()  # [D, n] contiguous
        self.on_cpu = self.matrix.device.type == "cpu"
        if self.on_cpu:
            self.rows = np.ascontiguousarray(self.columns.numpy())
            self.order = np.argsort(self.rows, axis=1)
            self._tiled: tuple[np.ndarray, np.ndarray] | None = None

    def tiled(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The target's rows and their sort order repeated ``count`` times (made once for the largest count)."""
        if self._tiled is None or self._tiled[0].shape[0] < count * self.dim:
            self._tiled = (np.tile(self.rows, (count, 1)), np.tile(self.order, (count, 1)))
        rows = count * self.dim  # a leading slice of a C-contiguous array is C-contiguous
        return self._tiled[0][:rows], self._tiled[1][:rows]


def _argsort_rows(x: np.ndarray) -> np.ndarray:
    """``np.argsort(x, axis=1)``, the rows split over torch's intra-op threads (numpy's sort releases the GIL)."""
    threads = max(1, min(torch.get_num_threads(), x.shape[0] // 64))
    if threads == 1:
        return np.argsort(x, axis=1)
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty(x.shape, dtype=np.intp)
    bounds = np.linspace(0, x.shape[0], threads + 1).astype(int)

    def sort(i: int) -> None:
        out[bounds[i]:bounds[i + 1]] = np.argsort(x[bounds[i]:bounds[i + 1]], axis=1)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(sort, range(threads)))
    return out


@dataclass(frozen=True)
class _Unusable:
    """The checkpoint's features on a spec could not be tested (``error`` says why)."""

    error: str


def _taus_against(bases: Sequence[torch.Tensor], target: _Target) -> list[torch.Tensor]:
    """Per base, the ``[D]`` Kendall taus of its normalised columns against the target's (all dims)."""
    if not bases:
        return []
    columns = [softmax_normalise(b.to(target.matrix.device), target.dims, target.temperature).t() for b in bases]
    if target.on_cpu:
        x = np.ascontiguousarray(torch.cat(columns).numpy())
        y, order_y = target.tiled(len(bases))
        order_x = _argsort_rows(x)
        import numba

        with _KERNEL_LOCK:
            numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
            taus = torch.from_numpy(_tau_b_from_orders(x, y, order_x, order_y))
    else:  # the torch kernel (CUDA): the columns of every base side by side
        x = torch.cat(columns).t()
        taus = kendall_tau_b(x, target.columns.t().repeat(1, len(bases)))
    return list(taus.split(target.dim))


def _result_of_taus(all_taus: torch.Tensor, target: _Target, alpha: float) -> LineageResult:
    """The :class:`LineageResult` :func:`~seedprints_lightning.core.stats.lineage_test` makes of these taus."""
    defined = torch.isfinite(all_taus)
    taus, dims = all_taus[defined], target.dims.cpu()[defined.cpu()]
    dropped, k, n = int((~defined).sum()), int(dims.numel()), target.n
    if k == 0:
        return _undetermined(n, 0, alpha, "analytic", "coset", "every identity column is constant in one of the "
                             "models: the features carry no signal", dropped=dropped)
    signal = _analytic_signal(taus, n)
    return LineageResult(
        z=float(signal.z), log10_p=float(signal.log10_p), p_value=float(10.0 ** signal.log10_p),
        tau_mean=float(taus.mean()), k=k, n=n, related=bool(signal.log10_p < math.log10(alpha)), alpha=float(alpha),
        method="analytic", identity_mode="coset", dropped_constant=dropped,
        identity_dims=tuple(int(d) for d in dims.tolist()),
    )


def batched_lineage_tests(bases: Sequence[Any], target: Any, *, alpha: float = 0.01,
                          identity_ratio: float | None = None, temperature: float = DEFAULT_TEMPERATURE,
                          chunk: int = _CHUNK, _prepared: _Target | None = None) -> list[LineageResult]:
    """``[safe_lineage_test(b, target, identity_mode="coset", ...) for b in bases]``, batched.

    Equal to the unbatched results (same taus, same z): with every dimension an identity
    dimension (``identity_ratio`` None or 1) the target is normalised and sorted once and the
    bases' taus are computed ``chunk`` at a time; otherwise (per-base identity dims) each test
    is :func:`~seedprints_lightning.core.verdict.safe_lineage_test`. A base that cannot be tested
    (NaN, another shape) gives an undetermined result with the reason, never an exception; a
    target that cannot be tested makes every result undetermined.
    """
    if identity_ratio is not None and float(identity_ratio) != 1.0:
        return [safe_lineage_test(b, target, alpha=alpha, identity_ratio=identity_ratio, temperature=temperature)
                for b in bases]
    try:
        prepared = _prepared or _Target(target, temperature)
        _resolve_k(prepared.dim, None, None)
    except InputError as exc:
        n = int(target.shape[0]) if hasattr(target, "shape") and len(target.shape) else 0
        return [_undetermined(n, 0, alpha, "analytic", "coset", str(exc)) for _ in bases]
    results: list[LineageResult | None] = [None] * len(bases)
    usable: list[tuple[int, torch.Tensor]] = []
    for i, base in enumerate(bases):
        try:
            matrix = _as_float_matrix(base, "base")
            _check_pair(matrix, prepared.matrix)
            usable.append((i, matrix))
        except InputError as exc:
            results[i] = _undetermined(prepared.n, 0, alpha, "analytic", "coset", str(exc))
    for start in range(0, len(usable), max(1, int(chunk))):
        block = usable[start:start + max(1, int(chunk))]
        for (i, _), taus in zip(block, _taus_against([m for _, m in block], prepared)):
            results[i] = _result_of_taus(taus, prepared, alpha)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLinks:
    """What one run's candidates said: the steps whose fingerprints the checkpoint links to, and the best link."""

    run: str
    linked_steps: tuple[int, ...]
    best_step: int | None
    z: float
    threshold: float
    log10_p: float
    log10_p_corrected: float
    tested: int
    undetermined: int
    reason: str | None = None

    @property
    def steps(self) -> tuple[int, int] | None:
        return (min(self.linked_steps), max(self.linked_steps)) if self.linked_steps else None

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "steps": list(self.steps) if self.steps else None,
                "linked_steps": list(self.linked_steps),
                "best_step": self.best_step, "z": self.z, "threshold": self.threshold, "log10_p": self.log10_p,
                "log10_p_corrected": self.log10_p_corrected, "tested": self.tested, "undetermined": self.undetermined,
                "reason": self.reason}


@dataclass(frozen=True)
class LineageMatch:
    """One lineage the checkpoint descends from.

    ``runs``: every run of the lineage (shared init), as given; ``links``: each of them that the
    checkpoint links to, best first. ``steps`` (first, last linked step), ``best_step``, ``z`` and
    the p-values are the best run's (the highest z: ``best_step`` is the probe it is closest to).
    """

    lineage: str
    runs: tuple[str, ...]
    links: tuple[RunLinks, ...]

    @property
    def best(self) -> RunLinks:
        return self.links[0]

    @property
    def run(self) -> str | list[str]:
        return self.runs[0] if len(self.runs) == 1 else list(self.runs)

    steps = property(lambda self: self.best.steps)
    best_step = property(lambda self: self.best.best_step)
    z = property(lambda self: self.best.z)
    log10_p = property(lambda self: self.best.log10_p)
    log10_p_corrected = property(lambda self: self.best.log10_p_corrected)

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "runs": list(self.runs), "shared_init": len(self.runs) > 1,
                "lineage": self.lineage, "best_run": self.best.run,
                "steps": list(self.steps) if self.steps else None, "best_step": self.best_step, "z": self.z,
                "threshold": self.best.threshold, "log10_p": self.log10_p,
                "log10_p_corrected": self.log10_p_corrected, "links": [link.to_dict() for link in self.links]}


@dataclass(frozen=True)
class Identification:
    """The outcome of :func:`identify`.

    ``matches``: every lineage the checkpoint links to, strongest first (empty: "none").
    ``tested``: counts (runs, lineages, specs probed, candidate tests = the Bonferroni ``m``,
    control tests, undetermined tests, skipped runs). ``skipped``: ``(run, reason)`` of runs that
    could not be tested (another width, no features for their spec). ``status`` is ``"match"``,
    ``"none"`` or ``"undetermined"`` (no match, and some test could not be made, so a match
    may have been missed).
    """

    matches: tuple[LineageMatch, ...]
    tested: dict[str, int]
    alpha: float
    runs: tuple[RunLinks, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    correction: str = "bonferroni"

    @property
    def status(self) -> str:
        if self.matches:
            return "match"
        return "undetermined" if self.tested.get("undetermined", 0) else "none"

    @property
    def run(self) -> str | list[str] | None:
        """The matching run as given; a list when several runs match (a shared init, or several lineages)."""
        if not self.matches:
            return None
        if len(self.matches) == 1:
            return self.matches[0].run
        return [r for m in self.matches for r in m.runs]

    def summary(self) -> str:
        m = self.tested.get("tests", 0)
        head = (f"{self.tested.get('runs', 0)} runs, {m} tests (Bonferroni over {m}: alpha {self.alpha:g} -> "
                f"{self.alpha / max(m, 1):.3g} per test)")
        if not self.matches:
            return f"{self.status}: no run matches; {head}"
        parts = []
        for match in self.matches:
            runs = ", ".join(match.runs) + (" (one lineage: shared init)" if len(match.runs) > 1 else "")
            steps = match.steps
            parts.append(f"{runs}: links to steps {steps[0]}-{steps[1]} of {match.best.run}, closest {match.best_step} "
                         f"(z={match.z:.1f} vs threshold {match.best.threshold:.1f}, corrected log10 p="
                         f"{match.log10_p_corrected:.1f})")
        return f"match: {'; '.join(parts)}; {head}"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "run": self.run, "matches": [m.to_dict() for m in self.matches],
                "tested": dict(self.tested), "alpha": self.alpha, "correction": self.correction,
                "runs": [r.to_dict() for r in self.runs], "skipped": [list(s) for s in self.skipped]}


# --------------------------------------------------------------------------------------
# identify
# --------------------------------------------------------------------------------------

FeaturesBySpec = Mapping[ProbeSpec, Any] | Callable[[ProbeSpec], Any]


def _judge_run(run: RunEvidence, target: _Target, alpha_per_test: float, m: int,
               rule: VerdictRule) -> tuple[RunLinks, int]:
    candidates = run.candidates
    bases = [c.load() for c in candidates]
    controls = run.load_controls()
    results = batched_lineage_tests([*bases, *controls], target.matrix, alpha=alpha_per_test,
                                    identity_ratio=run.identity_ratio, temperature=target.temperature,
                                    _prepared=target)
    tests, control_results = results[:len(bases)], results[len(bases):]
    verdicts = [decide_identity(r, control_results, rule) for r in tests]
    linked = [(c, v) for c, v in zip(candidates, verdicts) if v.related is True]
    log_m = math.log10(m) if m > 1 else 0.0
    pool = linked or [(c, v) for c, v in zip(candidates, verdicts) if v.related is not None] or list(
        zip(candidates, verdicts))
    best_c, best_v = max(pool, key=lambda cv: cv[1].z)
    links = RunLinks(
        run=run.path, linked_steps=tuple(sorted({c.step for c, _ in linked})),
        best_step=best_c.step if linked else None, z=best_v.z, threshold=float(best_v.threshold),
        log10_p=float(best_v.result.log10_p), log10_p_corrected=min(0.0, float(best_v.result.log10_p) + log_m),
        tested=len(tests), undetermined=sum(v.related is None for v in verdicts),
        reason=None if linked else best_v.reason)
    return links, len(controls)


def identify(features_by_spec: FeaturesBySpec, runs: Sequence[RunEvidence], *, alpha: float = 0.01,
             temperature: float = DEFAULT_TEMPERATURE) -> Identification:
    """Which of ``runs`` the checkpoint descends from, and at about which step.

    Args:
        features_by_spec: the checkpoint's ``[n, D]`` features per probe spec: a mapping
            ``{ProbeSpec: features}``, or a callable ``probe(spec) -> features`` (called once per
            distinct spec of ``runs``, e.g. a model prober).
        runs: :class:`RunEvidence` (``load_runs(...)`` or :meth:`RunEvidence.from_features`).
        alpha: family-wise significance level: every test is made at ``alpha / m`` (Bonferroni
            over the ``m`` candidate tests: each run's reference and every recorded probe).

    Every candidate is judged by its run's custody rule (alpha replaced by ``alpha / m``)
    against its run's controls; see the module docstring. A run that cannot be tested (no
    features for its spec, another width) is listed in ``skipped``; if no run can be tested
    :class:`IncompatibleFingerprintsError` is raised.
    """
    from ..core.checks import check_number

    check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    runs = list(runs)
    for i, run in enumerate(runs):
        if not isinstance(run, RunEvidence):
            raise InputError(f"runs[{i}] must be a RunEvidence (load_runs(...)), got {type(run).__name__}")
    if not runs:
        raise InputError("identify needs at least one run")

    # One probe per distinct spec.
    targets: dict[ProbeSpec, _Target | _Unusable | str] = {}
    for spec in dict.fromkeys(run.spec for run in runs):
        if callable(features_by_spec) and not isinstance(features_by_spec, Mapping):
            features = features_by_spec(spec)
        elif spec in features_by_spec:
            features = features_by_spec[spec]
        else:
            targets[spec] = f"no checkpoint features for its probe spec ({spec.describe()})"
            continue
        try:
            targets[spec] = _Target(features, temperature)
        except InputError as exc:  # e.g. NaN features of a diverged checkpoint: its tests are undetermined
            targets[spec] = _Unusable(str(exc))

    testable: list[tuple[RunEvidence, _Target | _Unusable]] = []
    skipped: list[tuple[str, str]] = []
    for run in runs:
        target = targets[run.spec]
        if isinstance(target, str):
            skipped.append((run.path, target))
        elif isinstance(target, _Target) and tuple(run.shape) != (target.n, target.dim):
            skipped.append((run.path, f"the run's features are {list(run.shape)} but the checkpoint's are "
                                      f"[{target.n}, {target.dim}]: another probe or model width"))
        else:
            testable.append((run, target))
    if not testable:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped)
        raise IncompatibleFingerprintsError(f"no run could be tested against the checkpoint ({reasons})")

    m = sum(len(run.candidates) for run, _ in testable)
    alpha_per_test = alpha / m
    per_run: list[RunLinks] = []
    undetermined = controls_tested = 0
    for run, target in testable:
        if isinstance(target, _Unusable):
            count = len(run.candidates)
            links = RunLinks(run.path, (), None, 0.0, 0.0, 0.0, 0.0, count, count, reason=target.error)
        else:
            links, control_count = _judge_run(run, target, alpha_per_test, m, replace(run.rule, alpha=alpha_per_test))
            controls_tested += control_count
        undetermined += links.undetermined
        per_run.append(links)

    by_lineage: dict[str, list[RunEvidence]] = {}
    for run, _ in testable:
        by_lineage.setdefault(run.lineage, []).append(run)
    links_of = {links.run: links for links in per_run}
    matches = []
    for lineage, members in by_lineage.items():
        linked = sorted((links_of[r.path] for r in members if r.path in links_of and links_of[r.path].linked_steps),
                        key=lambda link: -link.z)
        if linked:
            matches.append(LineageMatch(lineage=lineage, runs=tuple(r.path for r in members), links=tuple(linked)))
    matches.sort(key=lambda match: -match.z)
    tested = {"runs": len(per_run), "lineages": len(by_lineage), "specs": len(targets), "tests": m,
              "control_tests": controls_tested, "undetermined": undetermined, "skipped_runs": len(skipped)}
    return Identification(matches=tuple(matches), tested=tested, alpha=float(alpha), runs=tuple(per_run),
                          skipped=tuple(skipped))
