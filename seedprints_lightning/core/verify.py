"""Offline verification of a custody ledger: its records replayed through the live chain.

:func:`verify_chain` reads a run directory's ledger (:mod:`seedprints_lightning.core.records`),
checks each record's hash chain and file hashes, and replays every probe through a
:class:`~seedprints_lightning.core.chain.CustodyChain` set up as the run's was, so every
recorded figure is recomputed; the result is a :class:`ChainAudit`. The live chain
(:mod:`seedprints_lightning.core.chain`) knows nothing of this module: the dependency runs one
way, verification -> chain.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .chain import Anchor, ChainRules, CustodyChain
from .controls import ControlSet
from .errors import InputError
from .files import file_sha256
from .fingerprint import Fingerprint
from .ledger import (
    CONTROLS_FILE,
    PARENT_ANCHOR_FILE,
    REFERENCE_FILE,
    TORN_PREFIX,
    RunDirectory,
    load_parent_anchor,
    load_probe_features,
    lost_chain_of,
    storage_features,
)
from .records import LEDGER_FORMAT, SAVE_KIND, LedgerText, is_json_int, ledger_lines, read_ledger_text, read_record
from .signing import RecordSigner, check_signed_ledger, key_id_of, load_public_key

# resolve_identity_k is stats' own rule for how many identity dimensions a test uses; the batched
# judge must use exactly that rule to know when it may share a preparation.
from .stats import PreparedTarget, prepared_pair_taus, resolve_identity_k
from .verdict import ProbeVerdict, decide_identity
from .weights import find_saves

__all__ = ["PROBLEM_KINDS", "ChainAudit", "ChainProblem", "ledger_head_of", "verify_chain"]


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with a ledger: which record (``None`` for the files around it), and what."""

    index: int | None
    kind: str  # one of PROBLEM_KINDS
    message: str


#: Every kind of :class:`ChainProblem`, and what it says about the evidence (the command line's
#: exit code follows the class: ``seedprints audit --chain``):
#:
#: * ``"tampered"`` (exit 5): the files were edited, damaged or removed. ``"tampered"``: a record
#:   is malformed, edited, reordered or cut, or a features file altered; ``"missing"``: a
#:   features file or every record is gone.
#: * ``"mismatch"`` (exit 1): the files are intact, but the chain or the checkpoint does not hold.
#:   ``"broken_link"``: a custody link (or the checkpoint's) is broken; ``"other_run"``: the
#:   checkpoint's callback state was chained to another run's ledger; ``"abandoned_branch"``: to
#:   records of this run that a resume from an earlier checkpoint moved to ``custody.abandoned-N.jsonl``.
#: * ``"undetermined"``: a link whose lineage could not be measured (see :class:`ChainAudit`).
#:
#: A kind not listed here counts as tampering.
PROBLEM_KINDS = {"tampered": "tampered", "missing": "tampered", "broken_link": "mismatch",
                 "other_run": "mismatch", "abandoned_branch": "mismatch", "undetermined": "undetermined"}


@dataclass
class ChainAudit:
    """The result of :func:`verify_chain`, built once when the replay is done.

    ``ok`` when the files are intact, every recomputed figure matches its record, every link
    held, and (when a checkpoint was given) the checkpoint links to the chain. ``recomputed``
    has one verdict per record (``None`` where the record could not be re-tested).

    An undetermined link (the probe's lineage could not be measured: a diverged model's NaN, a
    model with constant hidden states) vouches for nothing. A stretch of them that a later held
    link bridges (that link is tested against the last held probe before the stretch) is only
    noted in ``notes``; a stretch that reaches the end of the ledger, or an undetermined
    checkpoint link, is an ``"undetermined"`` problem: the chain then shows descent only up to
    its last held link (:meth:`last_held_probe`).
    """

    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    recomputed: list[ProbeVerdict | None] = field(default_factory=list)
    problems: list[ChainProblem] = field(default_factory=list)
    checkpoint: ProbeVerdict | None = None
    checkpoint_name: str | None = None
    evidence: str = ""
    #: Every anchor the chain held, in order: the first (reference or parent probe), then each held record.
    anchors: list[Anchor] = field(default_factory=list)
    #: Reports that are no problem: stretches of undetermined records that a later held link bridged.
    notes: list[str] = field(default_factory=list)
    #: When the ledger continues a chain whose ledger the directory lost (a resume found none):
    #: ``records``, ``head_sha256``, ``resumed_at_step``, from ``parent_anchor.safetensors``; else ``None``.
    continues_lost_chain: dict[str, Any] | None = None
    #: The save records of the ledger (``kind == "save"``: a checkpoint saved at that step held the
    #: weights whose digest the record holds); they take a line each and are not re-tested.
    saves: list[dict[str, Any]] = field(default_factory=list)
    #: The ``key_id`` of every key whose signature is on a record (sorted; empty: no record is signed).
    signed_by: tuple[str, ...] = ()
    #: The ``key_id`` of the public key every record's signature was checked against (``None``: not checked).
    verified_key: str | None = None
    #: With ``checkpoint_weights_sha256``: that digest, and the save records holding exactly those weights.
    checkpoint_weights_sha256: str | None = None
    checkpoint_saves: list[dict[str, Any]] = field(default_factory=list)
    #: When some record is signed: the index of every well-formed record that is not (a resume without the key).
    unsigned: tuple[int, ...] = ()
    #: The ledger's blank lines (numbers from 1): skipped, and named in ``notes``.
    blank_lines: list[int] = field(default_factory=list)
    #: The ledger's last line when a write was cut short (a crash): no record, named in ``notes``; else ``None``.
    torn_line: int | None = None
    #: ``custody.torn-<i>.txt`` files of the directory: torn last lines the writer moved out of the ledger.
    torn_files: list[str] = field(default_factory=list)

    def is_save(self, index: int) -> bool:
        """Whether record ``index`` is a save record (no probe, nothing re-tested)."""
        return 0 <= index < len(self.records) and self.records[index].get("kind") == SAVE_KIND

    def _of_class(self, name: str) -> list[ChainProblem]:
        return [p for p in self.problems if PROBLEM_KINDS.get(p.kind, "tampered") == name]

    @property
    def tampered(self) -> list[ChainProblem]:
        """The files were edited, damaged or removed (:data:`PROBLEM_KINDS` class ``"tampered"``)."""
        return self._of_class("tampered")

    @property
    def undetermined(self) -> list[ChainProblem]:
        return [p for p in self.problems if p.kind == "undetermined"]

    @property
    def broken_links(self) -> list[ChainProblem]:
        """The files are intact but the chain or the checkpoint does not hold: broken links, and a checkpoint
        of another run or of an abandoned branch (:data:`PROBLEM_KINDS` class ``"mismatch"``)."""
        return self._of_class("mismatch")

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.records)

    def last_held_probe(self) -> Anchor:
        """The chain's end: the last anchor that is a record of this ledger (a child run continues from it)."""
        for anchor in reversed(self.anchors):
            if anchor.index is not None:
                return anchor
        raise InputError(f"{self.run_dir}: the ledger has no record whose link held")


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts: list[str] = []
    start = prev = None
    for i in [*indices, None]:
        if start is not None and (i is None or i != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if i is not None and start is None:
            start = i
        prev = i
    return ", ".join(parts)


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)


class _RecordJudge:
    """How the audit's replay judges one record's probe: ``judge(chain, step, features, event, index)``.

    The plain replay is :meth:`CustodyChain.observe`, each test a :func:`lineage_test` call that
    normalises and sorts both sides again. :class:`_PreparedJudge` makes the same figures faster.
    """

    def judge(self, chain: CustodyChain, step: int, features: torch.Tensor, event: str, index: int) -> ProbeVerdict:
        return chain.observe(step, features, event).verdict


class _PreparedJudge(_RecordJudge):
    """The replay with every matrix normalised and sorted once (``seedprints audit --chain``'s default).

    A record's tests share their target (its probe) and most of their bases: the reference and
    every control are the same for every record, and the anchor is the probe of the last held
    record, prepared when that record was the target. Each matrix is prepared once
    (:class:`~seedprints_lightning.core.stats.PreparedTarget`) and each pair costs only the
    counting pass (:func:`~seedprints_lightning.core.stats.prepared_pair_taus`), so a record
    costs one sort instead of two per test. The figures are exactly the plain replay's: the same
    taus (same normalisation, same kernel), and the verdicts composed as
    :func:`~seedprints_lightning.core.verdict.judge_probe` composes them (``tests/test_audit_batched.py``).
    Only tests whose identity dimensions are every column can share a preparation; a record
    judged with fewer (``identity_ratio`` < 1), or whose features a test refuses (NaN rows), is
    judged by the plain replay.
    """

    def __init__(self, chain: CustodyChain) -> None:
        self.reference: Any = None
        self.controls: list[Any] | None = None
        self.anchor: tuple[torch.Tensor, Any] | None = None  # (the anchor's stored features, its preparation)

    def judge(self, chain: CustodyChain, step: int, features: torch.Tensor, event: str, index: int) -> ProbeVerdict:
        made = self.verdict(chain, step, features)
        if made is None:  # a test this cannot share (or that refuses the features): the plain replay says how
            return super().judge(chain, step, features, event, index)
        verdict, stored, live = made
        # What observe changes that the audit reads: a held link makes the probe the next anchor.
        if verdict.link.related is True:
            chain.anchor = Anchor(stored, step, index)
            self.anchor = (stored, live)
        return verdict

    def verdict(self, chain: CustodyChain, step: int, features: torch.Tensor) -> tuple[ProbeVerdict, Any, Any] | None:
        """``(the verdict chain.test would give, the stored features, their preparation)``; None: test plainly."""
        ref = chain.reference
        rules = chain.rules
        stored = storage_features(features)
        try:
            width = None if ref is None else int(ref.features.shape[1])
            if ref is None or tuple(features.shape) != tuple(ref.features.shape) \
                    or resolve_identity_k(width, None, rules.identity_ratio) != width:
                return None
            live = PreparedTarget(stored.float())
            if self.reference is None:
                self.reference = PreparedTarget(ref.features)
                self.controls = [PreparedTarget(c) for c in chain.controls.as_list()]
            anchor = chain.anchor
            anchor_prep = None
            if anchor is not None:
                if self.anchor is None or self.anchor[0] is not anchor.features:
                    self.anchor = (anchor.features, PreparedTarget(anchor.features.float()))
                anchor_prep = self.anchor[1]
            return self._verdict(step, live, anchor_prep, anchor, chain), stored, live
        except InputError:
            return None

    def _verdict(self, step: int, live: Any, anchor_prep: Any, anchor: Anchor | None,
                 chain: CustodyChain) -> ProbeVerdict:
        """:func:`~seedprints_lightning.core.verdict.judge_probe`'s verdicts, from prepared sides."""
        rules = chain.rules
        mode = rules.identity_mode
        taus_ref = prepared_pair_taus(self.reference, live)
        taus_controls = [prepared_pair_taus(c, live) for c in self.controls or []]

        def result(taus: torch.Tensor, alpha: float, identity_mode: str) -> Any:
            made = live.result_of_taus(taus, alpha=alpha)  # labelled "coset": every column either way
            return made if identity_mode == "coset" else dataclasses.replace(made, identity_mode=identity_mode)

        birth_alpha, custody_alpha = rules.birth_rule.alpha, rules.custody_rule.alpha
        birth = decide_identity(result(taus_ref, birth_alpha, mode),
                                [result(t, birth_alpha, mode) for t in taus_controls], rules.birth_rule)
        reference = chain.reference
        if anchor is None and mode == "coset":  # the anchor is the reference: the link shares the birth test
            link = decide_identity(birth.result, birth.controls, rules.custody_rule)
        else:
            base_taus = taus_ref if anchor is None else prepared_pair_taus(anchor_prep, live)
            controls = (birth.controls if mode == "coset"
                        else [result(t, custody_alpha, "coset") for t in taus_controls])
            link = decide_identity(result(base_taus, custody_alpha, "coset"), controls, rules.custody_rule)
        anchor_step = anchor.step if anchor is not None else int(reference.step or 0)
        return ProbeVerdict(step=int(step), birth=birth, link=link, anchor_step=int(anchor_step),
                            fail_on=rules.fail_on)


@dataclass
class _Findings:
    """What a replay found, collected as it goes: :func:`verify_chain` builds its :class:`ChainAudit` from it once."""

    records: list[dict[str, Any]] = field(default_factory=list)
    recomputed: list[ProbeVerdict | None] = field(default_factory=list)
    problems: list[ChainProblem] = field(default_factory=list)
    anchors: list[Anchor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    saves: list[dict[str, Any]] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)  # joined by "; "
    key_of: dict[int, str | None] = field(default_factory=dict)  # each well-formed record's signing key

    def problem(self, index: int | None, kind: str, message: str) -> None:
        self.problems.append(ChainProblem(index, kind, message))

    def is_save(self, index: int) -> bool:
        return 0 <= index < len(self.records) and self.records[index].get("kind") == SAVE_KIND


@dataclass(frozen=True)
class _RunFiles:
    """The sha256 of each file the records were made against (``None``: the run had no such file)."""

    reference: str
    controls: str | None
    initial_anchor: str | None


def _replay_chain(run: RunDirectory, found: _Findings) -> tuple[CustodyChain, _RunFiles, dict[str, Any] | None]:
    """A chain set up as the run's was (reference, controls, first anchor), the files' hashes, and the lost chain
    the ledger continues (``parent_anchor.safetensors`` says so), if any."""
    reference = Fingerprint.load(run.reference_path)
    controls = ControlSet.load(run.controls_path) if run.controls_path.exists() else ControlSet.none()
    found.evidence.append(
        f"birth fingerprint {REFERENCE_FILE} (step {reference.step}, {reference.spec.describe()}); "
        + (f"{len(controls)} fresh-init controls from {CONTROLS_FILE}" if len(controls)
           else "no controls file: analytic threshold and effect-size margin only"))
    anchor, initial_sha, lost = None, None, None
    if run.parent_anchor_path.exists():  # a child run: its chain continues from its parent's last held probe
        features, step = load_parent_anchor(run.parent_anchor_path)
        anchor, initial_sha = Anchor(features, step), file_sha256(run.parent_anchor_path)
        lost = lost_chain_of(run.parent_anchor_path)
        if lost is None:
            found.evidence.append(f"the chain starts at the parent run's last probe (step {step}, "
                                  f"{PARENT_ANCHOR_FILE})")
        else:
            found.evidence.append(
                f"this ledger CONTINUES A LOST CHAIN: the resume at step {lost.get('resumed_at_step')} found no "
                f"ledger in this directory, whose chain had {lost.get('records')} records (head sha256 "
                f"{lost.get('head_sha256')}); it starts at that chain's anchor (step {step}, {PARENT_ANCHOR_FILE})")
    chain = CustodyChain(reference, controls=controls, anchor=anchor, reference_source="ledger")
    controls_sha = file_sha256(run.controls_path) if len(controls) else None
    return chain, _RunFiles(file_sha256(run.reference_path), controls_sha, initial_sha), lost


class _Replay:
    """Each record of one ledger in turn: checked in the hash chain, then (a probe) replayed through the chain.

    A file the records were made against that is gone from the directory is one ``"missing"``
    problem naming it (:meth:`report_gone`), not one hash mismatch per record; what it alone could
    show (a control threshold, a link from the first anchor) is then taken from the records as they say.
    """

    def __init__(self, run: RunDirectory, ledger: Path, chain: CustodyChain, files: _RunFiles, judge: _RecordJudge,
                 found: _Findings) -> None:
        self.run, self.ledger, self.chain, self.files, self.judge, self.found = run, ledger, chain, files, judge, found
        self.gone = {key: path for key, path, expected in (
            ("controls_sha256", run.controls_path, files.controls),
            ("initial_anchor_sha256", run.parent_anchor_path, files.initial_anchor))
            if expected is None and not path.exists()}
        self.gone_records: dict[str, list[int]] = {key: [] for key in self.gone}
        self.gone_sha: dict[str, str] = {}
        self.prev_sha, self.last_step = files.reference, -1

    def record(self, line_no: int, line: bytes, sha: str, where: str) -> None:
        """Check and replay the record on ``line`` (its place ``line_no``, its hash ``sha``)."""
        self.chain.number_records_from(line_no)  # a record's index is its place in the ledger: the replay numbers so
        record, malformed = read_record(line)
        found = self.found
        if malformed is not None:  # nothing of it can be trusted: the next record's prev_sha256 tells the rest
            found.problem(line_no, "tampered", f"{where} {malformed}")
            found.records.append(record if isinstance(record, dict) else {})
            found.recomputed.append(None)
            self.prev_sha = sha
            return
        found.records.append(record)
        signature = record.get("signature")
        found.key_of[line_no] = None
        if isinstance(signature, dict) and isinstance(signature.get("key_id"), str):
            found.key_of[line_no] = signature["key_id"]
        self._check_place(line_no, record, where)
        self.prev_sha = sha
        missing_here = self._check_files(line_no, record, where)
        if record.get("kind") == SAVE_KIND:  # a checkpoint save: chained, nothing to re-test
            found.saves.append(record)
            found.recomputed.append(None)
            return
        self._replay_probe(line_no, record, where, missing_here)

    def _check_place(self, line_no: int, record: dict[str, Any], where: str) -> None:
        """Its index, its link to the previous record's hash, its step after the previous record's."""
        if record.get("index") != line_no:
            self.found.problem(line_no, "tampered", f"{where} has index {record.get('index')!r}: a record is missing "
                                                    "or the records were reordered")
        if record.get("prev_sha256") != self.prev_sha:
            self.found.problem(line_no, "tampered", f"{where}: prev_sha256 does not match the hash of the "
                               + ("reference file" if line_no == 0 else "previous record")
                               + ": a record before it was edited, removed or reordered")
        step = record["step"]
        if step < self.last_step:
            self.found.problem(line_no, "tampered", f"{where}: step {step} comes after step {self.last_step}: "
                                                    "records reordered")
        self.last_step = step

    def _check_files(self, line_no: int, record: dict[str, Any], where: str) -> set[str]:
        """The run files' hashes the record claims; returns the keys of the gone files it was made with."""
        missing_here = set()
        for key, expected, what in (
                ("reference_sha256", self.files.reference,
                 f"was made against another {REFERENCE_FILE} (hash mismatch)"),
                ("initial_anchor_sha256", self.files.initial_anchor,
                 f"was made from another first anchor than {PARENT_ANCHOR_FILE} (hash mismatch, or the file was "
                 "added or removed)"),
                ("controls_sha256", self.files.controls,
                 f"was made with other controls than {CONTROLS_FILE} (hash mismatch)")):
            claimed = record.get(key)
            if claimed != expected and key in self.gone and claimed is not None:
                self.gone_records[key].append(line_no)
                self.gone_sha.setdefault(key, str(claimed))
                missing_here.add(key)
            elif claimed != expected:
                self.found.problem(line_no, "tampered", f"{where} {what}")
        return missing_here

    def _replay_probe(self, line_no: int, record: dict[str, Any], where: str, missing_here: set[str]) -> None:
        """Recompute a probe record's tests through the chain and compare them with what it says."""
        found, chain, step = self.found, self.chain, record["step"]
        feature_path = self.run.path / str(record.get("features_file", ""))
        if not feature_path.is_file():
            found.problem(line_no, "missing", f"{where}: its features file {feature_path} is missing")
            found.recomputed.append(None)
            return
        if file_sha256(feature_path) != record.get("features_sha256"):
            found.problem(line_no, "tampered", f"{where}: {feature_path.name} was altered (sha256 mismatch)")
        anchor_before = chain.anchor
        anchor_index = None if chain.anchor is None else chain.anchor.index
        # Without the controls file no threshold can be recomputed (z can); without the first-anchor
        # file no link from it can be recomputed at all.
        thresholds_unknown = "controls_sha256" in missing_here
        link_unknown = "initial_anchor_sha256" in missing_here and anchor_index is None
        try:
            chain.judge_by(ChainRules.from_record(record))
            features = load_probe_features(feature_path).float()
            verdict = self.judge.judge(chain, step, features, str(record.get("event")), line_no)
        except (KeyError, TypeError, ValueError) as exc:  # InputError, FingerprintFileError (features file)
            found.problem(line_no, "tampered", f"{where} cannot be re-tested ({type(exc).__name__}: {exc})")
            found.recomputed.append(None)
            return
        found.recomputed.append(verdict)
        if record.get("anchor_index") != anchor_index:
            found.problem(line_no, "tampered", f"{where} claims anchor record {record.get('anchor_index')!r} but the "
                                               f"last held link before it is {anchor_index!r}")
        for name, recomputed in (("link", verdict.link), ("birth", verdict.birth)):
            if name == "link" and link_unknown:
                continue
            claimed = record.get(name, {})
            if ((not thresholds_unknown and claimed.get("related") != recomputed.related)
                    or not _close(claimed.get("z", math.nan), recomputed.z)):
                found.problem(line_no, "tampered", f"{where}: the recorded {name} test (z={claimed.get('z')}, "
                                                   f"related={claimed.get('related')}) differs from the recomputed "
                                                   f"one (z={recomputed.z:.4f}, related={recomputed.related})")
        held, as_recorded = verdict.link.related, ""
        if thresholds_unknown or link_unknown:  # the record's own verdict, for what the missing file alone shows
            held, as_recorded = record["link"]["related"], " (as recorded: the file to recompute it is missing)"
            if held is not True:
                chain.anchor = anchor_before
            elif chain.anchor is None or chain.anchor.index != line_no:  # (the replay made it the anchor already)
                chain.anchor = Anchor(storage_features(features), step, line_no)
        if held is False:
            found.problem(line_no, "broken_link", f"{where}, step {step}: the custody link from step "
                                                  f"{verdict.anchor_step} is broken (z={verdict.link.z:.2f} <= "
                                                  f"threshold {verdict.link.threshold:.2f}){as_recorded}")
        elif held:
            found.anchors.append(chain.anchor)

    def report_gone(self) -> None:
        """One ``"missing"`` problem for each gone file that records were made with."""
        for key, path in self.gone.items():
            if self.gone_records[key]:
                what = ("each test's z was recomputed, but not whether it cleared its controls' threshold (the "
                        "records' own verdicts are followed)" if key == "controls_sha256" else
                        "the links from that first anchor cannot be recomputed (the records' own verdicts are "
                        "followed)")
                self.found.problem(None, "missing", f"{path.name} is missing from {self.run.path}, but records "
                                                    f"{_ranges(self.gone_records[key])} were made with it (sha256 "
                                                    f"{self.gone_sha[key]}): {what}. Restore the file (e.g. from a "
                                                    "copy of the run directory) to verify them")


def _public_key(public_key: Any) -> Any:
    """The Ed25519 public key to check signatures against (``None``: not checked); an InputError if it is none."""
    if public_key is None:
        return None
    key = public_key.public_key if isinstance(public_key, RecordSigner) else public_key
    if isinstance(key, (str, bytes, os.PathLike)):
        key = load_public_key(key)
    key_id_of(key)  # an InputError unless it is an Ed25519 public key
    return key


def verify_chain(run_dir: str | os.PathLike, checkpoint_features: torch.Tensor | None = None, *,
                 checkpoint_step: int | None = None, checkpoint_name: str | None = None,
                 expected_head: tuple[int, str] | None = None,
                 checkpoint_state: dict[str, Any] | None = None,
                 ledger: str | os.PathLike | None = None, public_key: Any = None,
                 checkpoint_weights_sha256: str | None = None, batched: bool = True) -> ChainAudit:
    """Re-verify a run's custody ledger offline, record by record, from its files.

    ``run_dir`` is the run's ``seedprints`` directory (or a directory holding it). Every record's
    hash chain and features hash are checked, and its features are replayed through a
    :class:`CustodyChain` set up as the run's was (same reference, controls and first anchor,
    each record's own rules), so every recorded figure is recomputed; with
    ``checkpoint_features`` (a checkpoint's features on the reference's probe), the checkpoint
    is linked to the last held record at or before ``checkpoint_step``.

    ``expected_head`` is ``(number of records, sha256 of the last one)`` as a checkpoint's
    callback state knows it: the ledger must hold that record at that place. Without it, records
    cut from the END of the ledger cannot be told from a run that made fewer probes (the hash
    chain only protects what precedes a record).

    ``checkpoint_state`` is the checkpoint's callback state itself (:meth:`CustodyChain.state_dict`):
    its ledger head is then ``expected_head``, and a checkpoint that belongs to no place in this
    ledger is named as such instead of as tampering: ``"other_run"`` when its state holds another
    birth fingerprint than ``reference.safetensors`` (or its last held probe is not this
    ledger's), ``"abandoned_branch"`` when its head record is in a ``custody.abandoned-N.jsonl``
    beside the ledger (:data:`PROBLEM_KINDS`).

    Every line is read as bytes and checked (UTF-8, JSON, an object, every field of the right
    type) before any figure of it is used: a malformed line is a ``"tampered"`` problem naming
    it, and the audit goes on with the next. It never raises for what a ledger holds. Two kinds
    of line are no record and no problem, only a note: a blank line (skipped: the hash chain
    covers each record's line, not the line breaks between them), and a torn last line (no line
    end, the start of a JSON object that is no JSON: a write that a crash cut short, since the
    writer appends whole records and cuts a failed write back). The chain then ends at the last
    whole record; a checkpoint whose state chained past it is still records removed from the end
    (``"tampered"``). The ``custody.torn-<i>.txt`` files the writer moved such lines to are noted too.

    A ``controls.safetensors`` (or ``parent_anchor.safetensors``) that the records were made with
    but that is gone is one ``"missing"`` problem naming it; what only that file could show (the
    control thresholds; the links from the first anchor) is taken from the records as they say.
    ``ledger`` must be a file of the run directory that holds ledger records (an
    :class:`InputError` otherwise).

    When the ledger continues a lost chain (a resume found no ledger in the directory:
    ``parent_anchor.safetensors`` says so), a checkpoint from before the loss is a ``"missing"``
    problem that says so, not records removed from the end. ``ledger`` verifies another ledger
    file of the directory instead of ``custody.jsonl``: an abandoned branch
    (``custody.abandoned-<i>.jsonl``) holds the whole branch and verifies alike.

    ``public_key`` (an Ed25519 public key, or a PEM path / PEM text:
    :func:`~seedprints_lightning.core.signing.load_public_key`): every record must also carry a valid
    signature by that key (:func:`~seedprints_lightning.core.signing.check_signed_ledger`); an unsigned
    record, one signed by another key, or one whose signature no longer matches its content (edited,
    whether or not the chain after it was re-hashed) is a ``"tampered"`` problem naming it. Without
    it signatures are not checked; ``signed_by`` still lists the keys that signed (and
    ``evidence`` says so). Nothing in the run directory is trusted as the key.

    Save records (``"kind": "save"``, written by ``CustodyLedger.record_save`` when a checkpoint
    was saved) are checked in the chain (index, ``prev_sha256``, step order, file hashes) and not
    replayed. ``checkpoint_weights_sha256`` (:func:`~seedprints_lightning.core.weights.weights_digest`
    of a checkpoint's weights) fills ``checkpoint_saves`` with the save records holding exactly
    those weights (informative: no match is no problem).

    ``batched`` (the default) prepares each matrix once (the reference, every control, each probe,
    which is the next record's anchor) instead of normalising and sorting both sides of every test
    again: the same figures, exactly, in a fraction of the time (``benchmarks/audit_chain.py``).
    ``batched=False`` replays every record through :meth:`CustodyChain.observe`.
    """
    signing_key = _public_key(public_key)
    run = RunDirectory.locate(run_dir)
    run.require(ledger)
    explicit = ledger is not None
    found = _Findings()
    chain, files, lost_chain = _replay_chain(run, found)
    found.anchors.append(chain.anchor if chain.anchor is not None
                         else Anchor(chain.reference.features, int(chain.reference.step or 0)))
    ledger = run.ledger_file(ledger)
    text = read_ledger_text(ledger)
    if explicit and ledger.resolve() != run.ledger_path.resolve():
        _require_ledger(ledger, text, run)
    lines = text.records
    shas = [hashlib.sha256(line).hexdigest() for line in lines]  # line_sha256 of each line's text
    torn_files = sorted(p.name for p in run.path.glob(f"{TORN_PREFIX}*.txt"))
    _note_what_is_no_record(found, text, ledger.name, run, torn_files)
    audit = functools.partial(ChainAudit, run_dir=run.path, blank_lines=list(text.blank), torn_line=text.torn_line,
                              torn_files=torn_files, continues_lost_chain=lost_chain)
    if not lines:
        found.problem(None, "missing", f"{ledger} has no record" + (
            f" (its only line, line {text.torn_line}, is torn: a first write that a crash cut short)"
            if text.torn is not None else ""))
        return audit(**_collected(found))

    replay = _Replay(run, ledger, chain, files, _PreparedJudge(chain) if batched else _RecordJudge(), found)
    for line_no, line in enumerate(lines):
        replay.record(line_no, line, shas[line_no], f"record {line_no} (line {text.line_numbers[line_no]} of "
                                                    f"{ledger.name})")
    replay.report_gone()
    signers = {key for key in found.key_of.values() if key is not None}
    verified_key = None
    if signing_key is not None:
        verified_key = _check_signatures(found, lines, signing_key, ledger.name, text.line_numbers)
    elif signers:
        found.evidence.append(_signers_evidence(found.key_of, len(lines)))
    if expected_head is None and checkpoint_state is not None:
        expected_head = ledger_head_of(checkpoint_state)
    _check_head(found, run, chain, text, ledger.name, shas, lost_chain, checkpoint_state, expected_head,
                checkpoint_name)
    _report_undetermined(found)
    checkpoint = None
    if checkpoint_features is not None:
        checkpoint = _link_checkpoint(found, chain, checkpoint_features, checkpoint_step, checkpoint_name,
                                      replay.last_step)
    return audit(**_collected(found), checkpoint=checkpoint,
                 checkpoint_name=checkpoint_name if checkpoint is not None else None,
                 signed_by=tuple(sorted(signers)),
                 unsigned=tuple(i for i, key in found.key_of.items() if key is None) if signers else (),
                 verified_key=verified_key, checkpoint_weights_sha256=checkpoint_weights_sha256,
                 checkpoint_saves=([] if checkpoint_weights_sha256 is None
                                   else find_saves(found.saves, checkpoint_weights_sha256)))


def _collected(found: _Findings) -> dict[str, Any]:
    """The :class:`ChainAudit` fields that the replay collected in ``found``."""
    return {"records": found.records, "recomputed": found.recomputed, "problems": found.problems,
            "anchors": found.anchors, "notes": found.notes, "saves": found.saves,
            "evidence": "; ".join(found.evidence)}


def _check_head(found: _Findings, run: RunDirectory, chain: CustodyChain, text: LedgerText, ledger_name: str,
                shas: list[str], lost_chain: dict[str, Any] | None, state: dict[str, Any] | None,
                head: tuple[int, str] | None, checkpoint_name: str | None) -> None:
    """Whether the checkpoint's callback state chained to a place in this ledger (its head record is here)."""
    lost = _lost_chain_problem(lost_chain, found.anchors, chain, state, head, shas, ledger_name)
    foreign = None if lost else _foreign_checkpoint(run, chain, state, head, shas, checkpoint_name)
    if lost:
        found.problem(None, "missing", lost)
    elif foreign is not None:
        found.problem(None, *foreign)
    elif head is not None:
        count, head_sha = head
        records = len(shas)
        if count > records:
            torn = ("" if text.torn is None else
                    f" (the ledger ends in a torn line, but a record is written whole before the chain moves past it, "
                    f"so record {records} was whole once and was cut later)")
            found.problem(None, "tampered", f"{ledger_name} holds {records} records but the checkpoint's callback "
                                            f"state chained to record {count - 1}: records were removed from the "
                                            f"end{torn}")
        elif count > 0 and shas[count - 1] != head_sha:
            found.problem(count - 1, "tampered", f"record {count - 1} is not the one the checkpoint's callback state "
                                                 "chained to (hash mismatch): it was edited, or the ledger is another "
                                                 "run's")


def _require_ledger(path: Path, text: LedgerText, run: RunDirectory) -> None:
    """An :class:`InputError` unless ``path`` (a ledger named by the caller) holds at least one ledger record.

    ``custody.jsonl`` itself is never refused here: whatever it holds is audited (as tampering
    when it is no ledger). Another file that holds no record at all is no ledger of the run.
    """
    for line in text.records:
        record, _ = read_record(line)
        if isinstance(record, dict) and record.get("format") == LEDGER_FORMAT:
            return
    names = sorted(p.name for p in run.path.glob("custody*.jsonl"))
    raise InputError(
        f"the ledger to verify (--ledger) {path} is not a custody ledger: none of its {len(text.records)} lines is a "
        f"{LEDGER_FORMAT} record. Leave --ledger out to verify {run.ledger_path.name}, or pass one of the run's "
        f"ledger files ({', '.join(names) if names else 'none in ' + str(run.path)})")


def _note_what_is_no_record(found: _Findings, text: LedgerText, ledger_name: str, run: RunDirectory,
                            torn_files: list[str]) -> None:
    """Notes (no problem) for blank lines, a torn last line and the writer's ``custody.torn-<i>.txt`` files."""
    if text.blank:
        lines = ", ".join(map(str, text.blank))
        found.notes.append(f"line{'s' if len(text.blank) > 1 else ''} {lines} of {ledger_name} "
                           f"{'are' if len(text.blank) > 1 else 'is'} blank: skipped (the writer never writes a blank "
                           "line, and the hash chain covers each record's line, not the line breaks between records, "
                           "so no record is changed by it)")
    if text.torn is not None:
        whole = len(text.records)
        found.notes.append(
            f"line {text.torn_line} of {ledger_name} is torn: {len(text.torn)} bytes with no line end that are no "
            "JSON, the start of a record whose write a crash cut short (the writer appends a record whole or not at "
            "all, and the chain moves past a record only once it is on disk). It is no record and no sign of "
            f"tampering: the ledger ends at its last whole record"
            + (f", record {whole - 1}" if whole else "")
            + f"; the run's writer moves the fragment to {TORN_PREFIX}<i>.txt when it next opens the ledger")
    for name in torn_files:
        size = (run.path / name).stat().st_size
        found.notes.append(f"{name} ({size} bytes) is a torn last line that the run's writer moved out of the ledger "
                           "before it appended again (a write that a crash cut short): kept as it was, it is no "
                           "record and no sign of tampering")


def _signers_evidence(key_of: dict[int, str | None], count: int) -> str:
    """Which records which key signed, and how many are unsigned (the signatures are not checked)."""
    keys = sorted({key for key in key_of.values() if key is not None})
    unsigned = [i for i, key in key_of.items() if key is None]
    check = "signatures not checked: give the owner's public key (--public-key) to check them"
    if len(keys) == 1 and not unsigned:
        return f"records signed by key {keys[0]} ({check})"
    parts = [f"records {_ranges([i for i, k in key_of.items() if k == key])} signed by key {key}" for key in keys]
    if unsigned:
        parts.append(f"{len(unsigned)} of {count} records are unsigned (records {_ranges(unsigned)}: written "
                     "without the signing key, e.g. a resume that was not given it)")
    return "; ".join(parts) + f" ({check})"


def _check_signatures(found: _Findings, lines: list[bytes], key: Any, ledger_name: str,
                      line_numbers: list[int] | None = None) -> str:
    """Every record must carry a valid signature by ``key``: each one that does not is a ``"tampered"`` problem.

    Returns the key's ``key_id`` (the audit's ``verified_key``).
    """
    key_id = key_id_of(key)
    problems = check_signed_ledger(lines, key)
    for line_no, message in problems:
        number = line_numbers[line_no] if line_numbers is not None else line_no + 1
        found.problem(line_no, "tampered", f"record {line_no} (line {number} of {ledger_name}) {message}: it is "
                                           f"not vouched for by the public key given (key_id {key_id})")
    if problems:
        found.evidence.append(f"signatures checked against key {key_id}: {len(problems)} of {len(lines)} records "
                              "are not signed by it")
    else:
        found.evidence.append(f"signed by key {key_id}: every record's signature verified against the public key "
                              "given")
    return key_id


def ledger_head_of(state: Any) -> tuple[int, str] | None:
    """``(records, sha256 of the last)`` of the ledger a callback state was chained to, if it says."""
    if not isinstance(state, dict):
        return None
    count, sha = state.get("ledger_next_index", 0), state.get("ledger_last_sha256")
    if not sha or not isinstance(sha, str) or not is_json_int(count):
        return None
    return int(count), sha


def _lost_chain_problem(lost: dict[str, Any] | None, anchors: list[Anchor], chain: CustodyChain,
                        state: dict[str, Any] | None, head: tuple[int, str] | None, shas: list[str],
                        ledger_name: str) -> str | None:
    """What to say when the checkpoint chained to a record of the lost chain this ledger continues, else None."""
    if lost is None or head is None:
        return None
    count, head_sha = head
    if 0 < count <= len(shas) and shas[count - 1] == head_sha:
        return None  # a record of this ledger: a checkpoint from after the resume
    records = lost.get("records")
    if (not is_json_int(records) or not 0 < count <= records
            or (count == records and head_sha != lost.get("head_sha256"))):
        return None
    reference, ours = state.get("reference_features") if isinstance(state, dict) else None, chain.reference.features
    if isinstance(reference, torch.Tensor) and not (tuple(reference.shape) == tuple(ours.shape)
                                                    and torch.equal(reference.float(), ours.float())):
        return None  # another run's checkpoint
    which = "its head" if count == records else "a record before its head, which cannot be checked"
    return (f"the checkpoint chained to record {count - 1} of a ledger this directory no longer holds (lost before the "
            f"resume at step {lost.get('resumed_at_step')}: that chain had {records} records, head sha256 "
            f"{lost.get('head_sha256')}; record {count - 1} is {which}); {ledger_name} continues that chain from its "
            f"anchor at step {anchors[0].step}, so the records up to the checkpoint are not verified. Restore "
            "the lost ledger to verify them")


def _foreign_checkpoint(run: RunDirectory, chain: CustodyChain, state: dict[str, Any] | None,
                        head: tuple[int, str] | None, shas: list[str], name: str | None) -> tuple[str, str] | None:
    """``(kind, message)`` when the checkpoint's callback state was chained to no place in this ledger."""
    if not isinstance(state, dict):
        return None
    what = f"checkpoint {name}" if name else "the checkpoint"
    reference = state.get("reference_features")
    ours = chain.reference.features
    if isinstance(reference, torch.Tensor) and not (
            tuple(reference.shape) == tuple(ours.shape) and torch.equal(reference.float(), ours.float())):
        return "other_run", (
            f"{what} belongs to another run: its callback state was chained to a ledger with another birth "
            f"fingerprint than {run.reference_path}, so this ledger says nothing about it (this is no sign of "
            "tampering); audit it against its own run's directory")
    if head is None:
        return None
    count, head_sha = head
    if 0 < count <= len(shas) and shas[count - 1] == head_sha:
        return None  # its head is here: the checkpoint belongs to this chain
    for abandoned in sorted(run.path.glob("custody.abandoned-*.jsonl")):
        try:
            if head_sha in (hashlib.sha256(line).hexdigest() for line in ledger_lines(abandoned)):
                return "abandoned_branch", (
                    f"{what} belongs to an abandoned branch of this run: the record its callback state chained to "
                    f"is in {abandoned.name}, not in {run.ledger_path.name} (the run went on past this checkpoint, "
                    "then was resumed from an earlier one, which moved those records aside); the current chain "
                    "does not vouch for it")
        except OSError:
            continue
    anchor, index = state.get("anchor_features"), state.get("anchor_index")
    if isinstance(anchor, torch.Tensor) and is_json_int(index) and 0 <= index < len(shas):
        # Same birth fingerprint (same init and probe) but another chain: its last held probe is not ours.
        record, malformed = read_record(ledger_lines(run.ledger_path)[index])
        path = run.path / record["features_file"] if malformed is None else None
        try:
            ours = load_probe_features(path) if path is not None and path.is_file() else None
        except (KeyError, ValueError):
            ours = None
        if ours is not None and (tuple(ours.shape) != tuple(anchor.shape)
                                 or not torch.equal(ours.float(), anchor.float())):
            return "other_run", (
                f"{what} belongs to another run: its callback state was chained to a ledger with the same birth "
                f"fingerprint, but its last held probe (record {index}) is not this ledger's record {index} (this "
                "is no sign of tampering); audit it against its own run's directory")
    return None


def _report_undetermined(found: _Findings) -> None:
    """Each stretch of records whose link is undetermined: a note when a later link held, else a problem."""
    start: int | None = None
    # Save records hold no probe: a stretch of undetermined probes runs across them.
    probes = [i for i in range(len(found.recomputed)) if not found.is_save(i)]
    verdicts = [found.recomputed[i] for i in probes]
    for index in range(len(verdicts) + 1):
        verdict = verdicts[index] if index < len(verdicts) else None
        if verdict is not None and verdict.link.related is None:
            start = index if start is None else start
            continue
        if start is None:
            continue
        first, last = verdicts[start], verdicts[index - 1]
        first_record, last_record = probes[start], probes[index - 1]
        where = (f"record {first_record} (step {first.step})" if index - 1 == start
                 else f"records {first_record}-{last_record} (steps {first.step}-{last.step})")
        why = f"the lineage could not be measured ({first.link.reason})"
        if index == len(verdicts):
            found.problem(first_record, "undetermined", f"{where}: undetermined, {why}: nothing vouches for the "
                                                        f"model after step {first.anchor_step}, the last held link")
        elif verdict is not None and verdict.link.related is True:
            found.notes.append(f"{where}: undetermined, {why}; the link at step {verdict.step} from step "
                               f"{verdict.anchor_step} held across them")
        start = None


def _link_checkpoint(found: _Findings, chain: CustodyChain, features: torch.Tensor, step: int | None,
                     name: str | None, last_step: int) -> ProbeVerdict:
    """Test a checkpoint against the last anchor at or before its step, with the last record's rules."""
    candidates = [a for a in found.anchors if step is None or a.step <= step]
    anchor = candidates[-1] if candidates else found.anchors[0]
    # The first anchor may be the reference itself: the link then shares the birth test.
    verdict = chain.test(step if step is not None else last_step, storage_features(features).float(), anchor=anchor)
    if verdict.link.related is None:
        found.problem(None, "undetermined", f"checkpoint {name}: its link to the chain is undetermined "
                                            f"({verdict.link.reason}): its lineage could not be measured, so nothing "
                                            "vouches for it")
    elif verdict.link.related is not True:
        found.problem(None, "broken_link", f"checkpoint {name}: does not link to the chain (link from step "
                                           f"{anchor.step}: z={verdict.link.z:.2f}, threshold "
                                           f"{verdict.link.threshold:.2f})")
    return verdict
