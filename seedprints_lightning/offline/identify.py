"""Which of our runs did a checkpoint come from, and at about which step?

A checkpoint turned up. Every recorded run (a ``seedprints`` run directory) holds its step-0
reference, the stored features of every probe its custody ledger recorded, and its fresh-init
controls. :func:`identify` tests the checkpoint's features against every one of those
fingerprints, in every run, and names the run (and the steps of the probes it links to) that
the checkpoint descends from, or "none", or "undetermined".

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
  rate over the whole identification. The screen (below) does not change ``m``.

What cannot be read
-------------------
One rule: a run, or one fingerprint of a run, that cannot be read (a missing or damaged
``reference.safetensors``, a missing, truncated or corrupt probe file, a malformed ledger
record, controls that do not match the ledger) is skipped and named in ``skipped`` with the
reason. Every file is checked against the sha256 its ledger records before it is used (as
``audit --chain`` does), so a swapped features file is skipped as altered and never fakes a
match. When no readable candidate matches, a skipped one could have been the match, so the
answer is "undetermined", never "none"; a match found among the readable ones stands, with
the skips still named. Runs of another width or probe spec are skipped too, but they cannot
hold the checkpoint's lineage test, so they do not make the answer undetermined.

Lineages
--------
Runs whose references are identical (same probe spec and bit-equal step-0 features, i.e. the
same init) are one lineage: a checkpoint of either links to both runs' early probes, so which of
them it came from is not a lineage question. They are reported as one match listing every run
of the lineage, with each run's own links (``LineageMatch.links``), never one picked.

Speed: a screen, then exact tests
---------------------------------
At real width (D = 4096, n = 1000) one exact test costs about 0.2 s on 2 cores, and a run
holds about 136 fingerprints. By default (:class:`ScreenOptions`) every candidate is first
tested on a fixed, seeded random subset of ``s`` columns (64). The subset depends only on
``(seed, D, s)``, so a run (0.9 on) stores each fingerprint's ranks on it as it writes the file,
as a small tensor of their own that the ledger record binds by its sha256
(:mod:`seedprints_lightning.core.screen`): the screen reads 128 KB per fingerprint instead of
the 7 MB probe file, and builds nothing. For an older run (no stored ranks), or options other
than the stored ones (``columns``, ``seed``, ``temperature``), an index file beside the run
(``identify-screen.safetensors``) keeps the ranks, built once from the probe files. Kendall's
tau of a column depends only on ranks, so the screen's per-column taus equal the exact test's
on those columns.

* The bound: over the random draw of the subset, its mean tau estimates the mean over all ``D``
  columns with standard error ``sd sqrt((D - s) / (D - 1) / s)`` (sd floored at the null's
  ``sigma_n``), whatever the dependence between columns. A link needs a mean tau above the
  run's rule (at least ``tau_margin`` = 0.04, and the analytic threshold at ``alpha / m``), so a
  candidate whose bound ``mean + margin * se`` (``margin`` 6 standard errors) is below that is
  ruled out (:func:`~seedprints_lightning.core.stats.subset_tau_bounds`). docs/benchmarks.md
  ("Identify") states the margins measured on benchmark and trained runs.
* Exact tests are then made on every candidate the screen cannot decide against its run's
  exact control tests, on every candidate that could be its run's best (its upper bound
  reaches the best lower bound), on the best candidate overall, and on a seeded sample of the
  ruled-out ones. A candidate whose lower bound clears its run's exact threshold is reported
  as linked by the screen (``screen_linked_steps``); the match, its best step, z and corrected
  p always come from exact tests.
* Self-check: every exact result must fall inside its screen bounds. If one does not (the
  screen was set too strict, or the data defeat the bound), the screen is not trusted: every
  remaining candidate is tested exactly (``screen["fallback"]`` says why).

``exhaustive=True`` (``--exhaustive``) tests every candidate exactly, as before the screen.
A stored screen is used only while its bytes match the sha256 its record holds (the reference's:
its file's metadata, bound by the file's sha256): else the file is read whole and checked
against the ledger, so an altered file is skipped as unreadable (the answer is then
"undetermined", never "none"), and ``notes`` says which stored screens could not be used.
The index holds, per fingerprint, the file's recorded sha256 and its size, inode and mtime:
an entry is used only while all of them match (else it is rebuilt from the file, whose sha256
is checked against the ledger first). It is a cache for the screen only: every exact test reads
the probe file itself and checks its sha256.
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

from ..core.checks import check_bool, check_int, check_number
from ..core.controls import ControlSet
from ..core.errors import FingerprintFileError, IncompatibleFingerprintsError, InputError
from ..core.files import file_sha256, save_safetensors
from ..core.fingerprint import Fingerprint
from ..core.ledger import CONTROLS_FILE, CUSTODY_FILE, REFERENCE_FILE, SAVE_KIND, decode_probe_features
from ..core.probes import ProbeSpec
from ..core.records import is_torn_line, read_record
from ..core.screen import (
    SCREEN_COLUMNS,
    SCREEN_FIELD,
    SCREEN_SEED,
    StoredScreen,
    read_stored_screen,
    screen_columns,
    stored_screen_of_file,
)
from ..core.stats import (
    DEFAULT_TEMPERATURE,
    LineageResult,
    PreparedTarget,
    SubsetBounds,
    feature_matrix,
    kendall_null_sigma,
    normalised_column_ranks,
    subset_tau_bounds,
    z_threshold,
)
from ..core.verdict import CUSTODY_RULE, IdentityVerdict, VerdictRule, decide_identity, safe_lineage_test

__all__ = [
    "INDEX_FILE",
    "Candidate",
    "Identification",
    "LineageMatch",
    "RunEvidence",
    "RunLinks",
    "ScreenOptions",
    "UnreadableRun",
    "batched_lineage_tests",
    "identify",
    "load_runs",
]

FeatureSource = torch.Tensor | Callable[[], torch.Tensor]
#: Candidates whose taus are computed in one kernel call (``chunk * D`` columns of ``n`` samples).
_CHUNK = 16
#: The screen index a run directory keeps beside its ledger (built and refreshed by :func:`identify`).
INDEX_FILE = "identify-screen.safetensors"
_INDEX_FORMAT = "seedprints-identify-screen"
_INDEX_VERSION = 1


def _materialise(source: FeatureSource) -> torch.Tensor:
    return source() if callable(source) else source


# --------------------------------------------------------------------------------------
# Evidence: what a run holds
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Candidate:
    """One fingerprint of a run the checkpoint is tested against: the reference or a recorded probe.

    ``features`` is the ``[n, D]`` tensor or a zero-argument loader of it (load_runs passes a
    loader, so features are read only when they are tested; it checks the file's sha256 against
    ``sha256``, the ledger's record, and raises :class:`FingerprintFileError` when the file is
    missing, altered or unreadable). ``index`` is the ledger record index (``None`` for the
    reference); ``source`` the file. ``screen``: the screen ranks the run stored in that file as it
    wrote it (:class:`~seedprints_lightning.core.screen.StoredScreen`), or ``None`` (an older run:
    the screen ranks the file itself, through the index).
    """

    step: int
    features: FeatureSource = field(repr=False)
    index: int | None = None
    source: str | None = None
    sha256: str | None = None
    screen: StoredScreen | None = None

    def load(self) -> torch.Tensor:
        return _materialise(self.features)

    def describe(self) -> str:
        what = "reference" if self.index is None else f"record {self.index}"
        return f"{what} (step {self.step})"


@dataclass(frozen=True)
class UnreadableRun:
    """A run directory that could not be read at all (``reason`` says why).

    ``records`` is how many probe records its ledger lists (fingerprints that could not be
    tested). :func:`identify` names it in ``skipped``; with no match found among the readable
    runs, the answer is "undetermined": this run could have been the match.
    """

    path: str
    reason: str
    records: int = 0


@dataclass(frozen=True, eq=False)
class RunEvidence:
    """What one run offers to :func:`identify`.

    ``path`` is the run as the caller named it (reported back verbatim). ``lineage`` is the
    digest of the reference (spec + exact features): runs with equal ``lineage`` share an init.
    ``controls`` is ``[c, n, D]`` (or a loader of it, or ``None``); ``rule`` the custody rule the
    run's ledger records; ``unreadable`` the fingerprints of the run left out while loading, as
    ``(what, reason)`` (a malformed record, a missing features file); ``notes`` anything else
    to say. ``directory`` is the run directory (``None`` for evidence held in memory): the
    screen's index is kept there.
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
    unreadable: tuple[tuple[str, str], ...] = ()
    directory: str | None = None
    ledger_sha256: str | None = None

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
        reference = feature_matrix(reference, "reference")
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
    # The ledger makes a run: a run whose reference is missing is still a run (it is reported as
    # unreadable), never silently passed over.
    return (path / CUSTODY_FILE).is_file()


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
        raise FingerprintFileError(f"no seedprints run directory (one holding {CUSTODY_FILE}, beside its "
                                   f"{REFERENCE_FILE}) in or under {root}")
    return found


def _read_verified(path: Path, sha256: str, what: str) -> bytes:
    """The bytes of ``path``, checked against the sha256 its ledger records (FingerprintFileError otherwise)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FingerprintFileError(f"its {what} {path} is missing (deleted after the run was loaded)") from None
    except OSError as exc:
        raise FingerprintFileError(f"its {what} {path} cannot be read ({exc})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise FingerprintFileError(f"its {what} {path} does not match its ledger record (sha256 {actual[:12]}... "
                                   f"!= recorded {sha256[:12]}...): altered, truncated or replaced")
    return data


def _read_probe(path: Path, sha256: str) -> torch.Tensor:
    """A probe file's features, after its sha256 is checked against the ledger's record."""
    from safetensors.torch import load

    data = _read_verified(path, sha256, "features file")
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for damaged bytes
        raise FingerprintFileError(f"its features file {path} is not readable ({exc})") from None
    return decode_probe_features(tensors, path).float()


def _read_reference(path: Path, sha256: str) -> torch.Tensor:
    _read_verified(path, sha256, REFERENCE_FILE)
    return Fingerprint.load(path).features


def _load_run(run_dir: Path, shown: str) -> RunEvidence | UnreadableRun:
    try:
        ledger_bytes = (run_dir / CUSTODY_FILE).read_bytes()
    except OSError as exc:
        return UnreadableRun(shown, f"its ledger {CUSTODY_FILE} cannot be read ({exc})")
    notes: list[str] = []
    unreadable: list[tuple[str, str]] = []
    records: list[dict[str, Any]] = []
    lines = ledger_bytes.split(b"\n")
    for line_no, line in enumerate(lines):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        record, problem = read_record(line)
        if problem is not None and line_no == len(lines) - 1 and is_torn_line(line):
            # An unterminated last line that is no JSON: a write a crash cut short, so no record was
            # ever made (and no fingerprint recorded); said, not counted as unreadable.
            notes.append(f"ledger line {line_no + 1} is a torn write (a crash): no record")
            continue
        if problem is not None:
            unreadable.append((f"ledger line {line_no + 1}", f"{problem}: its fingerprint cannot be used"))
            continue
        records.append(record)
    probe_records = [r for r in records if r.get("kind") != SAVE_KIND]  # a save has no fingerprint of its own
    count = len(probe_records) + len(unreadable)
    ref_path = run_dir / REFERENCE_FILE
    if not ref_path.is_file():
        return UnreadableRun(shown, f"its {REFERENCE_FILE} is missing (its ledger lists {count} probes): the run's "
                                    "fingerprints cannot be tested", count)
    try:
        ref_sha = file_sha256(ref_path)
        reference_fp = Fingerprint.load(ref_path)
    except (FingerprintFileError, OSError) as exc:
        return UnreadableRun(shown, f"its {REFERENCE_FILE} cannot be read ({exc})", count)
    recorded_refs = {r.get("reference_sha256") for r in records} - {None}
    if recorded_refs and ref_sha not in recorded_refs:
        return UnreadableRun(shown, f"its {REFERENCE_FILE} is not the reference its ledger was made against (sha256 "
                                    f"{ref_sha[:12]}... is not the recorded {sorted(recorded_refs)[0][:12]}...): "
                                    "altered or replaced", count)
    spec = reference_fp.spec
    probes: list[Candidate] = []
    rule, identity_ratio = CUSTODY_RULE, None
    for record in probe_records:
        features_path = run_dir / record["features_file"]
        if not features_path.is_file():
            unreadable.append((f"record {record['index']} (step {record['step']})",
                               f"its features file {record['features_file']} is missing"))
            continue
        try:
            rule = VerdictRule.from_dict(record["link"]["rule"])
        except (InputError, KeyError, TypeError):
            pass
        identity_ratio = record.get("identity_ratio")
        sha = str(record["features_sha256"])
        stored = None
        if record.get(SCREEN_FIELD) is not None:
            try:
                stored = StoredScreen.from_json(record[SCREEN_FIELD])
            except InputError as exc:  # the screen ranks the probe file itself (its sha256 checked)
                notes.append(f"record {record['index']}: {exc}; its probe file is ranked instead")
        probes.append(Candidate(int(record["step"]), lambda p=features_path, s=sha: _read_probe(p, s),
                                int(record["index"]), os.fspath(features_path), sha, stored))
    controls: FeatureSource | None = None
    controls_path = run_dir / CONTROLS_FILE
    recorded_controls = {r.get("controls_sha256") for r in records} - {None}
    shape = tuple(reference_fp.features.shape)
    if controls_path.is_file() or recorded_controls:
        def controls_loader(p: Path = controls_path) -> list[torch.Tensor]:
            if recorded_controls:
                if not p.is_file():
                    raise FingerprintFileError(f"its {CONTROLS_FILE} is missing, though its ledger records controls")
                if file_sha256(p) not in recorded_controls:
                    raise FingerprintFileError(f"its {CONTROLS_FILE} is not the controls its ledger records "
                                               "(sha256 mismatch): altered or replaced")
            loaded = ControlSet.load(p)
            return loaded.as_list() if loaded.matches(spec, shape) else []
        controls = controls_loader
    elif reference_fp.controls is not None:
        controls = reference_fp.controls
    # The reference's stored screen is described in its own metadata, which the file's sha256 (just
    # checked against the ledger's records) binds.
    reference = Candidate(int(reference_fp.step or 0), lambda p=ref_path, s=ref_sha: _read_reference(p, s), None,
                          os.fspath(ref_path), ref_sha, stored_screen_of_file(ref_path))
    return RunEvidence(path=shown, spec=spec, reference=reference, probes=tuple(probes),
                       lineage=lineage_digest(spec, reference_fp.features), shape=shape, controls=controls,
                       rule=rule, identity_ratio=identity_ratio, notes=tuple(notes), unreadable=tuple(unreadable),
                       directory=os.fspath(run_dir), ledger_sha256=hashlib.sha256(ledger_bytes).hexdigest())


def load_runs(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[RunEvidence | UnreadableRun]:
    """Evidence of every run ``paths`` name: run directories, or directories holding many (searched recursively).

    A run directory holds ``custody.jsonl`` (and ``reference.safetensors``), or is the parent of
    such a ``seedprints`` directory. A run named as given keeps that name (``RunEvidence.path``);
    one found below a given directory is named ``given/relative/path``. A run found twice is
    loaded once. Features are not read here (only each reference, for the lineage digest). A run
    that cannot be read (its reference missing, damaged, or not the one its ledger records) is an
    :class:`UnreadableRun`, never left out. Raises :class:`FingerprintFileError` for a path that
    is missing or holds no run.
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


@dataclass(frozen=True)
class _Unusable:
    """The checkpoint's features on a spec could not be tested (``error`` says why)."""

    error: str


def batched_lineage_tests(bases: Sequence[Any], target: Any, *, alpha: float = 0.01,
                          identity_ratio: float | None = None, temperature: float = DEFAULT_TEMPERATURE,
                          chunk: int = _CHUNK, prepared: PreparedTarget | None = None) -> list[LineageResult]:
    """``[safe_lineage_test(b, target, identity_mode="coset", ...) for b in bases]``, batched.

    Equal to the unbatched results (same taus, same z): with every dimension an identity
    dimension (``identity_ratio`` None or 1) the target is prepared once
    (:class:`~seedprints_lightning.core.stats.PreparedTarget`, or ``prepared``) and the bases'
    taus are computed ``chunk`` at a time; otherwise (per-base identity dims) each test is
    :func:`~seedprints_lightning.core.verdict.safe_lineage_test`. A base that cannot be tested
    (NaN, another shape) gives an undetermined result with the reason, never an exception; a
    target that cannot be tested makes every result undetermined.
    """
    if identity_ratio is not None and float(identity_ratio) != 1.0:
        return [safe_lineage_test(b, target, alpha=alpha, identity_ratio=identity_ratio, temperature=temperature)
                for b in bases]
    try:
        prepared = prepared or PreparedTarget(target, temperature=temperature)
    except InputError as exc:
        n = int(target.shape[0]) if hasattr(target, "shape") and len(target.shape) else 0
        return [_undetermined_result(n, alpha, str(exc)) for _ in bases]
    return prepared.lineage_tests(list(bases), alpha=alpha, chunk=chunk)


def _undetermined_result(n: int, alpha: float, reason: str) -> LineageResult:
    return LineageResult(z=0.0, log10_p=0.0, p_value=1.0, tau_mean=0.0, k=0, n=n, related=None, alpha=alpha,
                         reason=reason)


# --------------------------------------------------------------------------------------
# The screen: options, the index beside each run, the bounds
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScreenOptions:
    """How :func:`identify` screens candidates before its exact tests (see the module docstring).

    Args:
        columns: ``s``, the columns of the seeded subset each candidate is screened on. Runs
            narrower than ``2 * columns`` are tested exactly.
        margin: the bound's half-width in standard errors of the subset mean (6: a normal tail
            of 1e-9 per candidate). Smaller is faster and less safe; the self-check still
            falls back to exact tests when an exact result leaves its bounds.
        seed: seeds the subset draw (the index is rebuilt when it changes).
        audit: ruled-out candidates re-tested exactly (a seeded sample) to check the bounds.
    """

    columns: int = SCREEN_COLUMNS
    margin: float = 6.0
    seed: int = SCREEN_SEED
    audit: int = 2

    def __post_init__(self) -> None:
        check_int("ScreenOptions.columns", self.columns, low=2)
        check_number("ScreenOptions.margin", self.margin)
        check_int("ScreenOptions.seed", self.seed, low=0)
        check_int("ScreenOptions.audit", self.audit, low=0)

    def subset(self, dim: int) -> np.ndarray:
        """The sorted column indices screened at width ``dim`` (:func:`.core.screen.screen_columns`)."""
        return screen_columns(dim, self.columns, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "margin": self.margin, "seed": self.seed, "audit": self.audit}


def _file_key(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_ino), int(st.st_mtime_ns)]


class _IndexCache:
    """Screen ranks shared within one identification by files of identical content (same inode, size, mtime).

    ``stored``: fingerprints screened from the ranks their run stored; ``ranked``: from the index
    or their files (the identification's ``screen`` dict reports both).
    """

    def __init__(self) -> None:
        self.by_file: dict[tuple[Any, ...], np.ndarray] = {}
        self.stored = 0
        self.ranked = 0


def _read_index(path: Path, columns: np.ndarray, temperature: float, shape: tuple[int, int]) -> dict[tuple, np.ndarray]:
    """``{(file, sha256, size, inode, mtime_ns): ranks}`` of a valid index file (empty when absent or stale)."""
    if not path.is_file():
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            meta = json.loads((handle.metadata() or {})[_INDEX_FORMAT])
            if (meta.get("version") != _INDEX_VERSION or meta.get("temperature") != temperature
                    or meta.get("columns") != columns.tolist() or meta.get("shape") != list(shape)):
                return {}
            ranks = handle.get_tensor("ranks")
        entries = meta["entries"]
        if ranks.shape[0] != len(entries):
            return {}
        return {(e["file"], e["sha256"], *e["key"]): ranks[i] for i, e in enumerate(entries)}
    except Exception:  # a damaged or foreign index is rebuilt, never trusted
        return {}


def _stored_ranks(cand: Candidate, n: int, columns: int, seed: int,
                  temperature: float) -> tuple[np.ndarray | None, str | None]:
    """``(ranks, None)`` from the screen the run stored in the candidate's file; ``(None, why)`` when unusable.

    ``(None, None)``: none stored, or one of other options (the file is ranked instead). A stored
    screen that cannot be read or does not match its recorded sha256 is never used: the caller
    reads the whole file, whose sha256 it checks against the ledger (so an altered file is
    skipped as unreadable, never screened out).
    """
    if cand.screen is None or cand.source is None or not cand.screen.matches(columns, seed, temperature):
        return None, None
    try:
        return read_stored_screen(cand.source, cand.screen, n), None
    except FingerprintFileError as exc:
        return None, str(exc)


def _screen_ranks(run: RunEvidence, candidates: Sequence[Candidate], columns: np.ndarray, seed: int,
                  temperature: float, use_index: bool, cache: _IndexCache,
                  notes: list[str]) -> tuple[np.ndarray | None, dict[int, str], set[int]]:
    """Ranks ``[c, s, n]`` of the candidates' screen columns, and read errors by position.

    The ranks a run stored as it wrote each file come first (:mod:`~seedprints_lightning.core.screen`);
    a file with none (an older run) is ranked through the index beside the run (where valid) or
    from the file. A candidate that cannot be read (missing, sha256 mismatch, damaged) is in the
    errors; only the positions in the returned set have ranks (a readable candidate the screen
    cannot rank, e.g. NaN features, is left to the exact test).
    """
    ranked: set[int] = set()
    n, dim = run.shape
    out: np.ndarray | None = None
    errors: dict[int, str] = {}
    directory = Path(run.directory) if run.directory is not None else None
    index_path = directory / INDEX_FILE if directory is not None else None
    stored = _read_index(index_path, columns, temperature, run.shape) if (index_path and use_index) else {}
    entries: list[dict[str, Any]] = []
    rows: list[np.ndarray] = []
    changed = False
    unusable: list[str] = []
    for pos, cand in enumerate(candidates):
        ranks, problem = _stored_ranks(cand, n, len(columns), seed, temperature)
        if problem is not None:
            unusable.append(f"{cand.describe()}: {problem}")
        if ranks is not None:
            if out is None:
                out = np.zeros((len(candidates), len(columns), n), dtype=ranks.dtype)
            out[pos] = ranks
            ranked.add(pos)
            cache.stored += 1
            continue
        key = None
        if directory is not None and cand.source is not None and cand.sha256 is not None:
            path = Path(cand.source)
            try:
                file_key = _file_key(path)
            except OSError:
                errors[pos] = f"its features file {path} is missing"
                continue
            rel = os.path.relpath(path, directory)
            key = (rel, cand.sha256, *file_key)
            ranks = stored.get(key)
            if ranks is None:
                ranks = cache.by_file.get((cand.sha256, *file_key, temperature, tuple(columns.tolist())))
        if ranks is None:
            try:
                features = cand.load()  # checks the sha256 against the ledger
            except (FingerprintFileError, OSError) as exc:
                errors[pos] = str(exc)
                continue
            try:
                ranks = normalised_column_ranks(features, columns, temperature=temperature)
            except InputError:  # readable but untestable (NaN rows of a diverged model): the exact test says why
                continue
            changed = True
            if key is not None:
                cache.by_file[(cand.sha256, *key[2:], temperature, tuple(columns.tolist()))] = ranks
        if out is None:
            out = np.zeros((len(candidates), len(columns), n), dtype=ranks.dtype)
        out[pos] = ranks
        ranked.add(pos)
        cache.ranked += 1
        if key is not None:
            entries.append({"file": key[0], "sha256": key[1], "key": list(key[2:])})
            rows.append(ranks)
    if index_path is not None and use_index and (changed or len(entries) != len(stored)) and rows:
        meta = {"format": _INDEX_FORMAT, "version": _INDEX_VERSION, "temperature": temperature,
                "columns": columns.tolist(), "shape": list(run.shape), "ledger_sha256": run.ledger_sha256,
                "entries": entries}
        try:
            save_safetensors(index_path, {"ranks": torch.from_numpy(np.stack(rows))},
                             {_INDEX_FORMAT: json.dumps(meta, sort_keys=True)})
        except OSError as exc:
            notes.append(f"{run.path}: the screen index could not be written ({exc}); it was built in memory")
    if unusable:
        notes.append(f"{run.path}: {len(unusable)} stored screen(s) could not be used, so their files were read whole "
                     f"and checked against the ledger ({'; '.join(unusable[:3])})")
    return out, errors, ranked


# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunLinks:
    """What one run's candidates said: the steps whose fingerprints the checkpoint links to, and the best link.

    ``z``, ``threshold`` and the p-values are the best exact test's (``exact`` False: no
    candidate of the run needed one, and they are the screen's estimate of the best candidate:
    ``z`` its full-width z, ``threshold`` the analytic one). ``screen_linked_steps``: linked
    steps certified by the screen bound alone (they are in ``linked_steps`` too).
    ``screened_out``: ``(step, record index, screen z)`` of the candidates the screen ruled out.
    ``unreadable``: candidates that could not be read (named in the identification's
    ``skipped``).
    """

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
    exact: bool = True
    exact_tests: int = 0
    screen_linked_steps: tuple[int, ...] = ()
    screened_out: tuple[tuple[int, int | None, float], ...] = ()
    unreadable: int = 0

    @property
    def steps(self) -> tuple[int, int] | None:
        return (min(self.linked_steps), max(self.linked_steps)) if self.linked_steps else None

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run, "steps": list(self.steps) if self.steps else None,
                "linked_steps": list(self.linked_steps),
                "best_step": self.best_step, "z": self.z, "threshold": self.threshold, "log10_p": self.log10_p,
                "log10_p_corrected": self.log10_p_corrected, "tested": self.tested, "undetermined": self.undetermined,
                "reason": self.reason, "exact": self.exact, "exact_tests": self.exact_tests,
                "screen_linked_steps": list(self.screen_linked_steps), "unreadable": self.unreadable,
                "screened_out": [{"step": s, "index": i, "screen_z": z} for s, i, z in self.screened_out]}


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
    control tests, undetermined tests, skipped runs, ``unreadable``: runs and fingerprints that
    could not be read, ``exact_tests``, ``screened_out``). ``skipped``: ``(run, reason)`` of
    what could not be tested: runs of another width or spec, and every unreadable run or
    fingerprint (the reason names the record). ``status`` is ``"match"``, ``"none"`` or
    ``"undetermined"`` (no match, and some test could not be made or some fingerprint could not
    be read, so a match may have been missed). ``screen``: the screen's options, or ``None``
    (exhaustive), with ``fallback`` (why every candidate was tested exactly after all, or
    ``None``).
    """

    matches: tuple[LineageMatch, ...]
    tested: dict[str, int]
    alpha: float
    runs: tuple[RunLinks, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    correction: str = "bonferroni"
    screen: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        if self.matches:
            return "match"
        return "undetermined" if (self.tested.get("undetermined", 0) or self.tested.get("unreadable", 0)) else "none"

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
        unread = self.tested.get("unreadable", 0)
        if unread:
            head += f"; {unread} unreadable skipped"
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
                "runs": [r.to_dict() for r in self.runs], "skipped": [list(s) for s in self.skipped],
                "screen": self.screen, "notes": list(self.notes)}


# --------------------------------------------------------------------------------------
# identify
# --------------------------------------------------------------------------------------

FeaturesBySpec = Mapping[ProbeSpec, Any] | Callable[[ProbeSpec], Any]


@dataclass
class _Slot:
    """One candidate's state during an identification."""

    run: int
    pos: int
    candidate: Candidate
    bounds: SubsetBounds | None = None
    result: LineageResult | None = None  # the exact test's
    error: str | None = None  # could not be read
    decision: str = "exact"  # "exact" | "out" | "linked" (by the screen)

    @property
    def screen_mean(self) -> float:
        return self.bounds.mean if self.bounds is not None else -math.inf


@dataclass
class _RunState:
    run: RunEvidence
    target: PreparedTarget
    rule: VerdictRule
    slots: list[_Slot]
    controls: list[LineageResult] | None = None
    control_error: str | None = None


def _load_controls(state: _RunState, alpha_t: float) -> None:
    """The run's control tests, once (an unreadable controls file is the run's ``control_error``)."""
    if state.controls is not None or state.control_error is not None:
        return
    try:
        controls = state.run.load_controls()
    except (FingerprintFileError, InputError, OSError) as exc:
        state.control_error = str(exc)
        return
    state.controls = batched_lineage_tests(controls, state.target.matrix, alpha=alpha_t,
                                           identity_ratio=state.run.identity_ratio,
                                           temperature=state.target.temperature, prepared=state.target)


def _exact_tests(state: _RunState, slots: Sequence[_Slot], alpha_t: float) -> None:
    """Exact tests of ``slots`` (one run's), loaded a chunk at a time so memory holds one chunk."""
    todo = [s for s in slots if s.result is None and s.error is None]
    for start in range(0, len(todo), _CHUNK):
        block, bases = [], []
        for slot in todo[start:start + _CHUNK]:
            try:
                bases.append(slot.candidate.load())
                block.append(slot)
            except (FingerprintFileError, InputError, OSError) as exc:
                slot.error = str(exc)
        results = batched_lineage_tests(bases, state.target.matrix, alpha=alpha_t,
                                        identity_ratio=state.run.identity_ratio,
                                        temperature=state.target.temperature, prepared=state.target)
        for slot, result in zip(block, results):
            slot.result = result


def _tau_threshold(state: _RunState) -> float:
    """The mean tau a full-width candidate of this run must exceed to link (its rule against its exact controls)."""
    rule, n, dim = state.rule, state.target.n, state.target.dim
    sigma = kendall_null_sigma(n)
    determined = [c for c in state.controls or () if c.related is not None and math.isfinite(c.z)]
    z_needed = z_threshold(rule.alpha)
    if determined:
        z_needed = max(z_needed, max(c.z for c in determined) + rule.z_margin)
    tau_max = max((c.tau_mean for c in determined), default=0.0)
    return max(z_needed * sigma / math.sqrt(dim), max(tau_max, 0.0) + rule.tau_margin)


def _screen(states: list[_RunState], options: ScreenOptions, alpha_t: float, use_index: bool,
            notes: list[str]) -> tuple[list[_RunState], dict[str, Any]]:
    """Screen every screenable run's candidates; make the exact tests the screen calls for (module docstring)."""
    cache = _IndexCache()
    screened: list[_RunState] = []
    for state in states:
        target = state.target
        if state.run.identity_ratio not in (None, 1.0) or target.dim < 2 * options.columns:
            continue
        columns = options.subset(target.dim)
        ranks, errors, ranked = _screen_ranks(state.run, [s.candidate for s in state.slots], columns, options.seed,
                                              target.temperature, use_index, cache, notes)
        for pos, reason in errors.items():
            state.slots[pos].error = reason
        good = [s for s in state.slots if s.error is None and s.pos in ranked]
        if good and ranks is not None:
            taus = target.screen_taus(ranks[[s.pos for s in good]], columns)
            for slot, bounds in zip(good, subset_tau_bounds(taus, target.dim, target.n, options.margin)):
                slot.bounds = bounds
        sigma = kendall_null_sigma(target.n)
        # Whatever the controls say, a link needs a mean tau above both of these.
        floor = max(state.rule.tau_margin, z_threshold(state.rule.alpha) * sigma / math.sqrt(target.dim))
        for slot in good:
            if slot.bounds is not None and slot.bounds.high < floor:
                slot.decision = "out"
        screened.append(state)
    info: dict[str, Any] = {**options.to_dict(), "fallback": None, "runs_screened": len(screened),
                            "stored_screens": cache.stored, "ranked_screens": cache.ranked}
    if not screened:
        return screened, info

    every = [slot for state in screened for slot in state.slots if slot.bounds is not None]
    exact: dict[int, list[_Slot]] = {}

    def want(state_i: int, slot: _Slot) -> None:
        exact.setdefault(state_i, [])
        if slot not in exact[state_i]:
            exact[state_i].append(slot)

    index_of = {id(state): i for i, state in enumerate(states)}
    for state in screened:
        i = index_of[id(state)]
        open_slots = [s for s in state.slots if s.bounds is not None and s.decision != "out"]
        open_slots += [s for s in state.slots if s.error is None and s.bounds is None]  # nothing screened: exact
        if not open_slots:
            continue
        _load_controls(state, alpha_t)
        if state.control_error is not None:
            continue  # the run's tests are undetermined: named below
        tau_needed = _tau_threshold(state)
        best_low = max((s.bounds.low for s in open_slots if s.bounds is not None), default=-math.inf)
        for slot in open_slots:
            b = slot.bounds
            if b is not None and b.high < tau_needed:
                slot.decision = "out"
            elif b is not None and b.low > tau_needed and b.high < best_low:
                slot.decision = "linked"
            else:
                slot.decision = "exact"
                want(i, slot)
            if b is not None and slot.decision != "out" and b.high >= best_low:
                slot.decision = "exact"  # it could be the run's best: its figures must be exact
                want(i, slot)
    # The best candidate overall, and a seeded sample of the ruled-out ones: exact, to check the bounds.
    if every:
        top = max(every, key=lambda s: s.screen_mean)
        want(top.run, top)
        out = [s for s in every if s.decision == "out"]
        rng = np.random.default_rng(options.seed)
        for k in rng.permutation(len(out))[:options.audit]:
            want(out[int(k)].run, out[int(k)])
    for i, slots in exact.items():
        _exact_tests(states[i], slots, alpha_t)

    violations = []
    for state in screened:
        for slot in state.slots:
            if slot.result is None or slot.bounds is None or slot.result.related is None:
                continue
            tau = slot.result.tau_mean
            if not slot.bounds.low - 1e-12 <= tau <= slot.bounds.high + 1e-12:
                violations.append(f"{state.run.path} {slot.candidate.describe()}: exact tau {tau:.4f} outside the "
                                  f"screen's [{slot.bounds.low:.4f}, {slot.bounds.high:.4f}]")
    for state in screened:  # screen-linked candidates need an exact link in their run (the best one)
        linked = [s for s in state.slots if s.decision == "linked"]
        if linked and state.controls is not None:
            verdicts = [decide_identity(s.result, state.controls, state.rule) for s in state.slots
                        if s.result is not None]
            if not any(v.related for v in verdicts):
                violations.append(f"{state.run.path}: the screen certified {len(linked)} links but no exact test "
                                  "of the run links")
    if violations:
        info["fallback"] = (f"{len(violations)} exact result(s) fell outside the screen's bounds ("
                            f"{'; '.join(violations[:3])}): every candidate was tested exactly")
        for state in screened:
            for slot in state.slots:
                slot.decision = "exact"
            _exact_tests(state, state.slots, alpha_t)
    return screened, info


def _run_links(state: _RunState, alpha_t: float, log_m: float, skipped: list[tuple[str, str]]) -> RunLinks:
    run = state.run
    for slot in state.slots:
        if slot.error is not None:
            skipped.append((run.path, f"{slot.candidate.describe()}: {slot.error}"))
    unreadable = sum(s.error is not None for s in state.slots)
    tested_slots = [s for s in state.slots if s.result is not None]
    if tested_slots or any(s.decision == "linked" for s in state.slots):
        _load_controls(state, alpha_t)
    if state.control_error is not None:
        skipped.append((run.path, f"the run's tests cannot be judged: {state.control_error}"))
        count = sum(s.error is None for s in state.slots)
        return RunLinks(run.path, (), None, 0.0, 0.0, 0.0, 0.0, len(state.slots), count,
                        reason=state.control_error, unreadable=unreadable)
    verdicts: list[tuple[_Slot, IdentityVerdict]] = [(s, decide_identity(s.result, state.controls or [], state.rule))
                                                      for s in tested_slots]
    linked = [(s, v) for s, v in verdicts if v.related is True]
    screen_linked = [s for s in state.slots if s.decision == "linked" and s.result is None]
    out = [s for s in state.slots if s.decision == "out" and s.result is None]
    undetermined = sum(v.related is None for _, v in verdicts)
    pool = linked or [(s, v) for s, v in verdicts if v.related is not None] or verdicts
    common = {"tested": len(state.slots), "undetermined": undetermined, "exact_tests": len(tested_slots),
              "screen_linked_steps": tuple(sorted({s.candidate.step for s in screen_linked})),
              "screened_out": tuple((s.candidate.step, s.candidate.index, round(s.bounds.z, 3)) for s in out
                                    if s.bounds is not None),
              "unreadable": unreadable}
    if pool:
        best_s, best_v = max(pool, key=lambda sv: sv[1].z)
        steps = {s.candidate.step for s, _ in linked} | ({s.candidate.step for s in screen_linked} if linked else set())
        return RunLinks(run=run.path, linked_steps=tuple(sorted(steps)), best_step=best_s.candidate.step if linked
                        else None, z=float(best_v.z), threshold=float(best_v.threshold),
                        log10_p=float(best_v.result.log10_p),
                        log10_p_corrected=min(0.0, float(best_v.result.log10_p) + log_m),
                        reason=None if linked else best_v.reason, **common)
    # Every readable candidate was ruled out by the screen: its estimate of the best one, marked not exact.
    screened = [s for s in state.slots if s.bounds is not None]
    sigma = kendall_null_sigma(state.target.n)
    best = max(screened, key=lambda s: s.screen_mean, default=None)
    z = 0.0 if best is None else best.bounds.mean * math.sqrt(state.target.dim) / sigma
    reason = ("every fingerprint of the run was ruled out by the screen" if best is not None
              else "no fingerprint of the run could be read")
    return RunLinks(run=run.path, linked_steps=(), best_step=None, z=float(z), threshold=z_threshold(alpha_t),
                    log10_p=0.0, log10_p_corrected=0.0, reason=reason, exact=False, **common)


def identify(features_by_spec: FeaturesBySpec, runs: Sequence[RunEvidence | UnreadableRun], *, alpha: float = 0.01,
             temperature: float = DEFAULT_TEMPERATURE, exhaustive: bool = False,
             screen: ScreenOptions | None = None, index: bool = True) -> Identification:
    """Which of ``runs`` the checkpoint descends from, and at about which step.

    Args:
        features_by_spec: the checkpoint's ``[n, D]`` features per probe spec: a mapping
            ``{ProbeSpec: features}``, or a callable ``probe(spec) -> features`` (called once per
            distinct spec of ``runs``, e.g. a model prober).
        runs: :class:`RunEvidence` and :class:`UnreadableRun` (``load_runs(...)``, or
            :meth:`RunEvidence.from_features`).
        alpha: family-wise significance level: every test is made at ``alpha / m`` (Bonferroni
            over the ``m`` candidate tests: each run's reference and every recorded probe).
        temperature: the softmax temperature of the tests.
        exhaustive: test every candidate exactly (no screen).
        screen: the screen's options (default :class:`ScreenOptions`).
        index: keep the screen's index beside each run directory (``identify-screen.safetensors``;
            False: build it in memory only, write nothing).

    Every candidate is judged by its run's custody rule (alpha replaced by ``alpha / m``)
    against its run's controls; see the module docstring. A run that cannot be tested (no
    features for its spec, another width) or read is listed in ``skipped``; if no run can be
    tested and none was unreadable, :class:`IncompatibleFingerprintsError` is raised.
    """

    check_number("alpha", alpha, low=0.0, high=1.0, low_open=True, high_open=True)
    check_bool("exhaustive", exhaustive)
    check_bool("index", index)
    if screen is not None and not isinstance(screen, ScreenOptions):
        raise InputError(f"screen must be a ScreenOptions(columns=..., margin=...), got {type(screen).__name__}")
    screen = screen or ScreenOptions()
    runs = list(runs)
    for i, run in enumerate(runs):
        if not isinstance(run, (RunEvidence, UnreadableRun)):
            raise InputError(f"runs[{i}] must be a RunEvidence (load_runs(...)), got {type(run).__name__}")
    if not runs:
        raise InputError("identify needs at least one run")

    skipped: list[tuple[str, str]] = []
    unreadable = 0
    readable: list[RunEvidence] = []
    for run in runs:
        if isinstance(run, UnreadableRun):
            skipped.append((run.path, run.reason))
            unreadable += 1
        else:
            readable.append(run)
            for what, reason in run.unreadable:
                skipped.append((run.path, f"{what}: {reason}"))
                unreadable += 1

    # One probe per distinct spec.
    targets: dict[ProbeSpec, PreparedTarget | _Unusable | str] = {}
    for spec in dict.fromkeys(run.spec for run in readable):
        if callable(features_by_spec) and not isinstance(features_by_spec, Mapping):
            features = features_by_spec(spec)
        elif spec in features_by_spec:
            features = features_by_spec[spec]
        else:
            targets[spec] = f"no checkpoint features for its probe spec ({spec.describe()})"
            continue
        try:
            targets[spec] = PreparedTarget(features, temperature=temperature)
        except InputError as exc:  # e.g. NaN features of a diverged checkpoint: its tests are undetermined
            targets[spec] = _Unusable(str(exc))

    testable: list[tuple[RunEvidence, PreparedTarget | _Unusable]] = []
    for run in readable:
        target = targets[run.spec]
        if isinstance(target, str):
            skipped.append((run.path, target))
        elif isinstance(target, PreparedTarget) and tuple(run.shape) != (target.n, target.dim):
            skipped.append((run.path, f"the run's features are {list(run.shape)} but the checkpoint's are "
                                      f"[{target.n}, {target.dim}]: another probe or model width"))
        else:
            testable.append((run, target))
    if not testable and not unreadable:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped)
        raise IncompatibleFingerprintsError(f"no run could be tested against the checkpoint ({reasons})")

    m = sum(len(run.candidates) for run, _ in testable)
    alpha_t = alpha / max(m, 1)
    log_m = math.log10(m) if m > 1 else 0.0
    notes: list[str] = []
    per_run: list[RunLinks] = []
    states: list[_RunState] = []
    for run, target in testable:
        if isinstance(target, _Unusable):
            count = len(run.candidates)
            per_run.append(RunLinks(run.path, (), None, 0.0, 0.0, 0.0, 0.0, count, count, reason=target.error))
            continue
        i = len(states)
        states.append(_RunState(run, target, replace(run.rule, alpha=alpha_t),
                                [_Slot(i, pos, c) for pos, c in enumerate(run.candidates)]))
    screen_info = None
    if not exhaustive and states:
        _, screen_info = _screen(states, screen, alpha_t, index, notes)
    for state in states:
        _exact_tests(state, [s for s in state.slots if s.decision == "exact"], alpha_t)
        links = _run_links(state, alpha_t, log_m, skipped)
        unreadable += links.unreadable + (1 if state.control_error is not None else 0)
        per_run.append(links)

    by_lineage: dict[str, list[RunEvidence]] = {}
    for run, _ in testable:
        by_lineage.setdefault(run.lineage, []).append(run)
    links_of = {links.run: links for links in per_run}
    matches = []
    for lineage, members in by_lineage.items():
        linked = sorted((links_of[r.path] for r in members if r.path in links_of and links_of[r.path].best_step
                         is not None), key=lambda link: -link.z)
        if linked:
            matches.append(LineageMatch(lineage=lineage, runs=tuple(r.path for r in members), links=tuple(linked)))
    matches.sort(key=lambda match: -match.z)
    controls_tested = sum(len(s.controls or ()) for s in states)
    tested = {"runs": len(per_run), "lineages": len(by_lineage), "specs": len(targets), "tests": m,
              "control_tests": controls_tested, "undetermined": sum(r.undetermined for r in per_run),
              "skipped_runs": len({p for p, _ in skipped} - {r.run for r in per_run}), "unreadable": unreadable,
              "exact_tests": sum(r.exact_tests for r in per_run),
              "screened_out": sum(len(r.screened_out) for r in per_run)}
    return Identification(matches=tuple(matches), tested=tested, alpha=float(alpha), runs=tuple(per_run),
                          skipped=tuple(skipped), screen=screen_info, notes=tuple(notes))
