"""The custody chain: one Lightning-free probe cycle for every trainer integration and the audit.

A probe's features flow one way through :class:`CustodyChain`::

    features [n, D] -> rounded for storage -> judged (birth test + custody link, against the
    controls) -> ledger record -> anchor, schedule and failure count advance -> decision

:meth:`CustodyChain.observe` is that cycle. The Lightning callback
(:class:`~seedprints_lightning.SeedPrintsCallback`) measures the features over its ranks,
calls ``observe`` and then logs and acts on the returned :class:`ChainStep`; any other
training loop does the same with its own measuring and acting. :func:`verify_chain` replays a
ledger's records through the same class, without writing, to re-verify a run offline.

The chain holds the reference (the run's birth fingerprint), one
:class:`~seedprints_lightning.core.controls.ControlSet`, the judging settings (:class:`ChainRules`),
the anchor (the last probe whose own link held), the schedule position, its run of failed probes
(:class:`~seedprints_lightning.core.counters.FailureCount`) and its place in the ledger
(:class:`~seedprints_lightning.core.counters.LedgerCursor`: on the process that writes files, with
the :class:`~seedprints_lightning.core.ledger.CustodyLedger`). Its
:meth:`~CustodyChain.state_dict` is the callback's checkpoint state (CPU tensors and plain
types: it loads with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checks import check_choice, check_int
from .controls import ControlSet
from .counters import FailureCount, LedgerCursor
from .errors import InputError
from .files import file_sha256, is_seedprints_state
from .fingerprint import Fingerprint
from .ledger import (
    CONTROLS_FILE,
    LEDGER_FORMAT,
    LEDGER_VERSION,
    PARENT_ANCHOR_FILE,
    REFERENCE_FILE,
    SAVE_KIND,
    CustodyLedger,
    RunDirectory,
    load_parent_anchor,
    load_probe_features,
    lost_chain_of,
    storage_features,
)
from .probes import ProbeSpec
from .schedule import ProbeSchedule
from .verdict import (
    BIRTH_RULE,
    CUSTODY_RULE,
    FAIL_ON,
    METRIC_NAMES,
    METRIC_TAGS,
    ProbeVerdict,
    VerdictRule,
    judge_probe,
)

__all__ = ["Anchor", "ChainAudit", "ChainNote", "ChainProblem", "ChainRules", "ChainStep", "CustodyChain",
           "PROBLEM_KINDS", "STATE_FORMAT_VERSION", "resolve_reference", "verify_chain"]

#: Version of :meth:`CustodyChain.state_dict`'s layout (2: custody chain; 1 had no anchor and no schedule).
STATE_FORMAT_VERSION = 2


@dataclass(frozen=True)
class ChainRules:
    """How every probe of a chain is judged (each ledger record stores them, so a replay uses the same)."""

    birth_rule: VerdictRule = BIRTH_RULE
    custody_rule: VerdictRule = CUSTODY_RULE
    fail_on: str = "custody"
    identity_mode: str = "coset"
    identity_ratio: float | None = None

    def __post_init__(self) -> None:
        check_choice("fail_on", self.fail_on, FAIL_ON)
        check_choice("identity_mode", self.identity_mode, ("coset", "base"))

    @classmethod
    def from_margins(cls, *, alpha: float, birth_z_margin: float, link_z_margin: float, link_tau_margin: float,
                     fail_on: str = "custody", identity_mode: str = "coset",
                     identity_ratio: float | None = None) -> ChainRules:
        """The rules from a trainer integration's arguments (the birth test has no tau margin)."""
        def rule(prefix: str, z_margin: float, tau_margin: float) -> VerdictRule:
            # VerdictRule validates the margins; the message names the argument as the user typed it.
            try:
                return VerdictRule(alpha=float(alpha), z_margin=z_margin, tau_margin=tau_margin)
            except InputError as exc:
                raise InputError(f"{prefix}{exc}") from None

        return cls(birth_rule=rule("birth_", birth_z_margin, 0.0),
                   custody_rule=rule("link_", link_z_margin, link_tau_margin), fail_on=fail_on,
                   identity_mode=identity_mode,
                   identity_ratio=None if identity_ratio is None else float(identity_ratio))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ChainRules:
        """The rules a ledger record was judged by (``KeyError``/``TypeError``/``InputError`` when it cannot say)."""
        return cls(birth_rule=VerdictRule.from_dict(record["birth"]["rule"]),
                   custody_rule=VerdictRule.from_dict(record["link"]["rule"]),
                   fail_on=record.get("fail_on", "custody"), identity_mode=record.get("identity_mode", "coset"),
                   identity_ratio=record.get("identity_ratio"))


@dataclass(frozen=True)
class Anchor:
    """What a custody link is tested against: a held probe's stored features, its step and record index.

    ``index`` is ``None`` for a chain's first anchor that is no record of its own (a parent run's
    last held probe).
    """

    features: torch.Tensor
    step: int
    index: int | None = None


@dataclass(frozen=True)
class ChainNote:
    """A one-time report about a probe that is not identity loss; the faces word it for the user.

    ``kind`` is ``"undetermined"`` (the first probe whose lineage could not be measured; ``counted``:
    whether it counted towards ``patience``) or ``"birth_faded"`` (the birth test stopped being
    detectable while the custody chain holds).
    """

    kind: str
    verdict: ProbeVerdict
    consecutive_failures: int
    patience: int
    counted: bool = False


@dataclass(frozen=True)
class ChainStep:
    """What one :meth:`CustodyChain.observe` found and decided.

    ``identity_lost`` is the chain's decision (``patience`` consecutive failed probes) with its
    ``reason`` (the figures, in one line); ``notes`` are one-time :class:`ChainNote` reports (a
    probe undetermined, the birth test faded) that are not identity loss. ``metrics`` are the
    logged tags, all finite.
    """

    verdict: ProbeVerdict
    event: str
    metrics: dict[str, float]
    record_index: int | None
    consecutive_failures: int
    next_step: int
    identity_lost: bool
    reason: str | None
    notes: tuple[ChainNote, ...] = ()


class CustodyChain:
    """The run's reference, controls, anchor, schedule position, failure count and ledger position.

    The failure count (:attr:`failures`, a :class:`~seedprints_lightning.core.counters.FailureCount`)
    and the ledger position (:attr:`cursor`, a :class:`~seedprints_lightning.core.counters.LedgerCursor`)
    are frozen and read-only: only the chain moves them on.

    Args:
        reference: the birth fingerprint (``None`` until :meth:`begin` or :meth:`load_state_dict`).
        controls: the fresh-init negative controls (see :class:`~seedprints_lightning.core.controls.ControlSet`).
        rules: how probes are judged.
        schedule: when to probe (:class:`~seedprints_lightning.core.schedule.ProbeSchedule`).
        patience: consecutive failed probes before :attr:`ChainStep.identity_lost`.
        count_undetermined: whether an undetermined probe (its lineage could not be measured:
            non-finite or degenerate features, no usable identity dimension) counts towards
            ``patience`` like a failed one (the default: a model the chain cannot measure is not
            vouched for), or neither counts nor resets the count.
        anchor: the first anchor, when it is not the reference (a child run continues its
            parent's chain from the parent's last held probe).
        reference_source: where the reference came from, for messages (``"explicit"``,
            ``"checkpoint"``, ``"step0"``); ``"explicit"`` keeps it across :meth:`load_state_dict`.
    """

    def __init__(self, reference: Fingerprint | None = None, *, controls: ControlSet | None = None,
                 rules: ChainRules | None = None, schedule: ProbeSchedule | None = None, patience: int = 2,
                 anchor: Anchor | None = None, reference_source: str | None = None,
                 count_undetermined: bool = True) -> None:
        for name, value, kind in (("reference", reference, Fingerprint), ("controls", controls, ControlSet),
                                  ("rules", rules, ChainRules), ("schedule", schedule, ProbeSchedule),
                                  ("anchor", anchor, Anchor)):
            if value is not None and not isinstance(value, kind):
                raise InputError(f"{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        self.reference = reference
        self.reference_source = reference_source if reference is not None else None
        self.controls = controls if controls is not None else ControlSet.none()
        self.rules = rules if rules is not None else ChainRules()
        self.schedule = schedule if schedule is not None else ProbeSchedule()
        self._failures = FailureCount(patience, count_undetermined)
        self.initial_anchor = anchor
        self.anchor = anchor
        self.next_probe_step, self.interval = self.schedule.first()
        self.last_probed_step = -1
        self.warned_undetermined = False
        self.warned_birth = False
        self.history: list[dict[str, Any]] = []
        self.last_verdict: ProbeVerdict | None = None
        self._cursor = LedgerCursor()
        self.restored = False

    # ------------------------------------------------------------------ set-up
    def begin(self, reference: Fingerprint, step: int = 0, source: str = "step0") -> None:
        """Start a new chain at ``reference`` (taken at ``step``): anchor, schedule and ledger position reset."""
        self.reference, self.reference_source = reference, source
        self.anchor = self.initial_anchor
        self.last_probed_step = int(step)
        self.next_probe_step, self.interval = self.schedule.first()
        self.next_probe_step += int(step)
        self._cursor = LedgerCursor(numbered=self._cursor.numbered)

    def attach_ledger(self, ledger: CustodyLedger) -> None:
        """Write every further record to ``ledger``.

        A new chain (no record yet) takes the ledger's position; a chain with records must find
        the ledger positioned right after its last record (a resume's ledger is rewound there).
        """
        self._cursor = self._cursor.attached(ledger)

    def use_controls(self, controls: ControlSet) -> None:
        """Judge the next probes against ``controls`` (restored, loaded from a file, or built at train start)."""
        if not isinstance(controls, ControlSet):
            raise InputError(f"controls must be a ControlSet, got {type(controls).__name__}")
        self.controls = controls

    def keep_records(self, keep: bool) -> None:
        """Whether this chain numbers its probes as ledger records (False: a run that writes no file)."""
        self._cursor = dataclasses.replace(self._cursor, numbered=bool(keep))

    def number_records_from(self, index: int) -> None:
        """The next record's index: the writing process's ledger's (shared with every rank), or a replay's line."""
        self._cursor = self._cursor.at(index)

    def judge_by(self, rules: ChainRules) -> None:
        """Judge the next probes by ``rules`` (a replay uses each ledger record's own)."""
        if not isinstance(rules, ChainRules):
            raise InputError(f"rules must be ChainRules, got {type(rules).__name__}")
        self.rules = rules

    def continue_in_new_ledger(self) -> None:
        """Go on in a NEW ledger, numbered from 0, whose first anchor is the current one (no record of its own).

        For a resume whose ledger was lost: with no held probe yet the current anchor is the
        reference; it becomes the first anchor as stored (fp16), so the new ledger's first-anchor
        file records the loss either way.
        """
        ref = self._require_reference()
        current = self.anchor if self.anchor is not None else Anchor(ref.features, int(ref.step or 0))
        self.initial_anchor = self.anchor = Anchor(storage_features(current.features), current.step)
        self._cursor = self._cursor.rewound()

    def record_save(self, step: int, weights_sha256: str, checkpoint: str | None = None) -> int | None:
        """Record a checkpoint save (the digest of the weights it holds) as the chain's next record.

        Call it on every process, before the chain's state goes into that checkpoint: the process
        holding the ledger appends the record; every process advances the numbering alike.
        Returns the record's index (``None`` when the chain keeps no records).
        """
        index, self._cursor = self._cursor.advanced(
            lambda ledger: ledger.record_save(step, weights_sha256, checkpoint=checkpoint))
        return index

    @property
    def cursor(self) -> LedgerCursor:
        """Where the chain stands in its ledger (next record index, last record sha256, the ledger written).

        Read-only and frozen: the set-up methods above and each record move it on.
        """
        return self._cursor

    @property
    def anchor_step(self) -> int | None:
        return None if self.anchor is None else self.anchor.step

    @property
    def control_features(self) -> torch.Tensor | None:
        return self.controls.features

    # ------------------------------------------------------------------ the cycle
    def due(self, step: int) -> bool:
        """Whether a probe is due at optimizer step ``step`` (once per step: accumulation repeats a step)."""
        return self.reference is not None and step >= self.next_probe_step and step != self.last_probed_step

    def test(self, step: int, live: torch.Tensor, anchor: Anchor | None = None) -> ProbeVerdict:
        """Judge ``live`` features at ``step`` against the reference and ``anchor`` (default: the current one).

        Changes nothing. An ``anchor`` whose features are the reference's is the reference itself.
        """
        ref = self._require_reference()
        chosen = self.anchor if anchor is None else (None if anchor.features is ref.features else anchor)
        anchor_features = chosen.features.float() if chosen is not None else ref.features
        anchor_step = chosen.step if chosen is not None else int(ref.step or 0)
        anchor = anchor_features
        rules = self.rules
        return judge_probe(step, live, reference=ref.features, anchor=anchor, anchor_step=anchor_step,
                           controls=self.controls.as_list(), birth_rule=rules.birth_rule,
                           custody_rule=rules.custody_rule, fail_on=rules.fail_on,
                           identity_mode=rules.identity_mode, identity_ratio=rules.identity_ratio)

    def observe(self, step: int, features: torch.Tensor, event: str = "interval", *,
                measure_seconds: float = 0.0) -> ChainStep:
        """One probe of the live model at ``step``: judge, record, advance, decide.

        ``features`` are the live model's ``[n, D]`` on the reference's probe. They are rounded
        for storage first (:func:`~seedprints_lightning.core.ledger.storage_features`) and the
        rounded values are tested, so the ledger holds exactly what was judged.
        ``measure_seconds`` (the forward passes) is added to the logged ``probe_seconds``.
        """
        start = time.perf_counter()
        ref = self._require_reference()
        step = check_int("step", step, low=0, hint="the optimizer step of this probe")
        if not isinstance(features, torch.Tensor):
            raise InputError(f"features must be the live model's [n, D] torch.Tensor, got {type(features).__name__}")
        if tuple(features.shape) != tuple(ref.features.shape):
            raise InputError(
                f"the probe returned features of shape {tuple(features.shape)} but the reference has "
                f"{tuple(ref.features.shape)}: the model (or feature_fn) no longer matches the reference"
            )
        stored = storage_features(features)
        verdict = self.test(step, stored.float())
        metrics = verdict.to_metrics(measure_seconds + time.perf_counter() - start)
        index = self._record(verdict, stored, event)
        if verdict.link.related is True:
            self.anchor = Anchor(stored, step, index)
        self.last_probed_step, self.last_verdict = step, verdict
        self.next_probe_step, self.interval = self.schedule.after(step, self.interval, verdict.link.related,
                                                                  verdict.link.headroom)
        identity_lost, reason, notes = self.decide(verdict)
        entry: dict[str, Any] = {"step": step, "event": event}
        entry.update({name: metrics.get(tag) for name, tag in zip(METRIC_NAMES, METRIC_TAGS)})
        entry.update({"related": verdict.related, "birth_detectable": verdict.birth_detectable,
                      "link_related": verdict.link.related, "anchor_step": verdict.anchor_step,
                      "control_z": [float(z) for z in verdict.birth.control_z], "reason": verdict.reason,
                      "record_index": index, "next_step": int(self.next_probe_step),
                      "consecutive_failures": int(self._failures.consecutive)})
        self.history.append(entry)
        return ChainStep(verdict=verdict, event=event, metrics=metrics, record_index=index,
                         consecutive_failures=self._failures.consecutive, next_step=int(self.next_probe_step),
                         identity_lost=identity_lost, reason=reason, notes=notes)

    def decide(self, verdict: ProbeVerdict) -> tuple[bool, str | None, tuple[ChainNote, ...]]:
        """Count ``verdict`` and decide: ``(identity lost, why, one-time notes)``.

        A failed probe counts, a held one resets the count. An undetermined one (the lineage could
        not be measured) counts too when ``count_undetermined`` (the default): a chain must not
        vouch for a model it cannot measure, and a swap to a model with degenerate hidden states,
        or a run that diverged to NaN, is then acted on after ``patience`` probes like a broken link.
        Otherwise it neither counts nor resets the count.
        """
        failures = self._failures = self._failures.counted(verdict.related)
        notes = []
        if verdict.related is None and not self.warned_undetermined:
            self.warned_undetermined = True
            notes.append(ChainNote("undetermined", verdict, failures.consecutive, failures.patience,
                                   counted=failures.count_undetermined))
        if (self.rules.fail_on == "custody" and verdict.birth.related is False and verdict.link.related
                and not self.warned_birth):
            self.warned_birth = True
            notes.append(ChainNote("birth_faded", verdict, failures.consecutive, failures.patience))
        if not failures.exhausted:
            return False, None, tuple(notes)
        what = "could not be measured" if verdict.related is None else "is lost"
        reason = (f"the lineage identity {what} at step {verdict.step}: {failures.consecutive} consecutive "
                  f"failed or undetermined probes (patience {failures.patience})")
        return True, reason + (f"; {verdict.reason}" if verdict.reason else ""), tuple(notes)

    @property
    def failures(self) -> FailureCount:
        """The run of consecutive failed (and counted undetermined) probes, and the patience it is held to.

        Read-only and frozen: :meth:`decide` counts each probe.
        """
        return self._failures

    def _record(self, verdict: ProbeVerdict, stored: torch.Tensor, event: str) -> int | None:
        anchor_index = None if self.anchor is None else self.anchor.index
        index, self._cursor = self._cursor.advanced(lambda ledger: ledger.append(
            verdict, stored, event=event, anchor_index=anchor_index, identity_mode=self.rules.identity_mode,
            identity_ratio=self.rules.identity_ratio))
        return index

    def _require_reference(self) -> Fingerprint:
        if self.reference is None:
            raise InputError("the custody chain has no reference yet: begin() it or load its state first")
        return self.reference

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and plain types only (loads with ``torch.load(weights_only=True)``); never empty."""
        ref, controls, anchor = self.reference, self.controls, self.anchor
        return {
            "format_version": STATE_FORMAT_VERSION,
            "reference_features": None if ref is None else ref.features.detach().cpu().clone(),
            "reference_meta": None if ref is None else ref.metadata(),
            "reference_source": self.reference_source,
            "control_features": None if controls.features is None else controls.features.clone(),
            "control_seeds": [int(s) for s in controls.seeds],
            "control_spec": None if controls.spec is None else controls.spec.to_dict(),
            "anchor_features": None if anchor is None else anchor.features.clone(),
            "anchor_step": None if anchor is None else anchor.step,
            "anchor_index": None if anchor is None else anchor.index,
            "next_probe_step": int(self.next_probe_step),
            "interval": int(self.interval),
            **self._cursor.state_dict(),
            "last_probed_step": int(self.last_probed_step),
            "consecutive_failures": int(self._failures.consecutive),
            "warned_undetermined": bool(self.warned_undetermined),
            "warned_birth": bool(self.warned_birth),
            "history": [dict(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (format 1 or 2); an ``"explicit"`` reference is kept as it is.

        Anything but a SeedPrints state (``None``, another callback's state, an empty dict) is an
        :class:`InputError` that says so; only a SeedPrints state of an unknown version asks to upgrade.
        """
        if not _is_chain_state(state):
            raise InputError(f"this is not a SeedPrints state: {_describe_state(state)}. Pass what "
                             "CustodyChain.state_dict() (or a SeedPrints callback's state_dict()) returned, e.g. a "
                             "Lightning checkpoint's checkpoint['callbacks']['SeedPrintsCallback']")
        version = state.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= STATE_FORMAT_VERSION:
            raise InputError(
                f"the checkpoint's SeedPrintsCallback state has format version {version!r}; this "
                f"seedprints-lightning reads versions 1 to {STATE_FORMAT_VERSION}: upgrade the package"
            )
        features, meta = state.get("reference_features"), state.get("reference_meta")
        if features is not None and meta is not None and self.reference_source != "explicit":
            self.reference, self.reference_source = Fingerprint.from_metadata(features, meta), "checkpoint"
        controls, spec = state.get("control_features"), state.get("control_spec")
        self.controls = ControlSet.none() if controls is None else ControlSet(
            features=controls, seeds=tuple(int(s) for s in state.get("control_seeds", ())),
            spec=None if spec is None else ProbeSpec.from_dict(spec),
            description="fresh-init controls restored from the checkpoint")
        self.last_probed_step = int(state.get("last_probed_step", -1))
        self._failures = dataclasses.replace(self._failures, consecutive=int(state.get("consecutive_failures", 0)))
        self.warned_undetermined = bool(state.get("warned_undetermined", False))
        self.warned_birth = bool(state.get("warned_birth", False))
        self.history = [dict(entry) for entry in state.get("history", [])]
        # Version 1 had no chain: its last probe is unknown, so the chain restarts at the reference.
        anchor = state.get("anchor_features")
        self.anchor = None if anchor is None else Anchor(anchor, int(state["anchor_step"]), state.get("anchor_index"))
        if "next_probe_step" in state:
            self.next_probe_step, self.interval = int(state["next_probe_step"]), int(state["interval"])
        else:
            self.next_probe_step = self.last_probed_step + self.schedule.every_n_steps
            self.interval = self.schedule.every_n_steps
        self._cursor = LedgerCursor.from_state_dict(state, numbered=self._cursor.numbered)
        self.restored = True


#: Keys every SeedPrints state has had, in every format version (with ``format_version``).
_STATE_KEYS = ("reference_features", "reference_meta")


def _is_chain_state(state: Any) -> bool:
    """A SeedPrints state (:func:`~seedprints_lightning.core.files.is_seedprints_state`) with the chain's own keys."""
    return is_seedprints_state(state) and all(key in state for key in _STATE_KEYS)


def _describe_state(state: Any) -> str:
    if state is None:
        return "got None (no state was saved, or it was read from the wrong key)"
    if not isinstance(state, dict):
        return f"got {type(state).__name__} {_shown_briefly(state)}, not a dict"
    if not state:
        return "got an empty dict"
    keys = sorted(map(str, state))
    shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
    missing = [key for key in ("format_version", *_STATE_KEYS) if key not in state]
    return (f"got a dict with the keys {shown} but without {', '.join(map(repr, missing))} (another callback's "
            "state?)")


def _shown_briefly(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def resolve_reference(reference: Any, probe: ProbeSpec | None = None,
                      ) -> tuple[Fingerprint | None, Anchor | None, str]:
    """``(reference, first anchor, where it came from)`` of a trainer integration's ``reference=`` argument.

    ``reference`` is ``None`` (the run's own step 0), a :class:`~seedprints_lightning.Fingerprint`,
    its file, or a parent run's ``seedprints`` directory: then the parent's ledger is re-verified
    and the child's chain starts at the parent's last held probe. ``probe``, when given, must be
    the reference's spec.
    """
    if reference is None:
        return None, None, ""
    anchor = None
    if isinstance(reference, Fingerprint):
        explicit, origin = reference, "the Fingerprint passed as reference="
    elif isinstance(reference, (str, os.PathLike)) and Path(reference).is_dir():
        audit = verify_chain(reference)
        if not audit.ok:
            first = audit.problems[0].message if audit.problems else "no record"
            raise InputError(
                f"reference={os.fspath(reference)!r}: the parent run's custody chain does not verify ({first}); a "
                "child run can only continue an intact chain. Pass the parent's fingerprint file instead to start a "
                "new chain from it"
            )
        last = audit.last_held_probe()
        explicit, anchor = Fingerprint.load(audit.run_dir / REFERENCE_FILE), Anchor(last.features, last.step)
        origin = f"reference={os.fspath(reference)!r} (the parent run's birth fingerprint)"
    elif isinstance(reference, (str, os.PathLike)):
        explicit = Fingerprint.load(reference)  # raises FingerprintFileError with the path
        origin = f"reference={os.fspath(reference)!r}"
    else:
        raise InputError(f"reference must be a Fingerprint, a path to a fingerprint file, or None, got "
                         f"{type(reference).__name__}")
    if probe is not None and probe != explicit.spec:
        raise InputError(
            f"probe={probe} differs from the reference's spec ({explicit.spec.describe()}); the reference's "
            "inputs must be used, so leave probe=None when you pass reference="
        )
    return explicit, anchor, origin


# --------------------------------------------------------------------------------------
# Offline verification: the ledger's records replayed through CustodyChain
# --------------------------------------------------------------------------------------


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
    """The result of :func:`verify_chain`.

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


# --------------------------------------------------------------------------------------
# A ledger line as the audit reads it: bytes -> text -> JSON object -> every field typed
# --------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float's range
        return False


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_inside(value: Any) -> bool:
    """A relative path that stays in the run directory (what the writer names a features file)."""
    from pathlib import PurePosixPath

    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


_INT0 = (lambda v: _is_int(v) and 0 <= v < 2 ** 63, "an integer in [0, 2**63)")
_NUMBER = (_is_number, "a finite number")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_OPT_BOOL = (_optional(lambda v: isinstance(v, bool)), "true, false or null")
_STR = (lambda v: isinstance(v, str), "a string")
_SHA = (_is_sha256, "a sha256 hex digest")
_OPT_SHA = (_optional(_is_sha256), "a sha256 hex digest or null")
_RULE_FIELDS = {"alpha": _NUMBER, "z_margin": _NUMBER, "tau_margin": _NUMBER}
#: One test's fields (:meth:`~seedprints_lightning.core.verdict.IdentityVerdict.to_dict`).
_TEST_FIELDS: dict[str, Any] = {
    "z": _NUMBER, "log10_p": _NUMBER, "tau_mean": _NUMBER, "k": _INT0, "n": _INT0, "threshold": _NUMBER,
    "related": _OPT_BOOL, "reason": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "control_z": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "an array of finite numbers"),
    "control_tau_max": _NUMBER, "rule": _RULE_FIELDS,
}
#: Every field :meth:`~seedprints_lightning.core.ledger.CustodyLedger.append` writes, and what it must be
#: (a nested dict is an object's own fields). Fields beyond these are allowed.
_RECORD_FIELDS: dict[str, Any] = {
    "format": (lambda v: v == LEDGER_FORMAT, repr(LEDGER_FORMAT)),
    "version": (lambda v: _is_int(v) and v == LEDGER_VERSION,
                f"{LEDGER_VERSION} (the ledger version this seedprints-lightning reads; upgrade it for a newer one)"),
    "index": _INT0, "step": _INT0, "time": _STR, "event": _STR,
    "features_file": (_is_inside, "a relative path inside the run directory"), "features_sha256": _SHA,
    "anchor_index": (_optional(_INT0[0]), "an integer >= 0 or null"), "anchor_step": _INT0,
    "birth": _TEST_FIELDS, "link": _TEST_FIELDS, "related": _OPT_BOOL, "birth_detectable": _BOOL,
    "fail_on": (lambda v: v in FAIL_ON, " or ".join(map(repr, FAIL_ON))),
    "identity_mode": (lambda v: v in ("coset", "base"), "'coset' or 'base'"),
    "identity_ratio": (_optional(_is_number), "a finite number or null"),
    "reference_sha256": _OPT_SHA, "controls_sha256": _OPT_SHA, "initial_anchor_sha256": _OPT_SHA,
    "prev_sha256": _SHA,
}
#: Every field of a save record (:meth:`~seedprints_lightning.core.ledger.CustodyLedger.record_save`).
_SAVE_FIELDS: dict[str, Any] = {
    "format": _RECORD_FIELDS["format"], "version": _RECORD_FIELDS["version"],
    "kind": (lambda v: v == SAVE_KIND, repr(SAVE_KIND)), "index": _INT0, "step": _INT0, "time": _STR,
    "event": _STR, "weights_sha256": _SHA, "checkpoint": (_optional(lambda v: isinstance(v, str)), "a string or null"),
    "reference_sha256": _OPT_SHA, "controls_sha256": _OPT_SHA, "initial_anchor_sha256": _OPT_SHA,
    "prev_sha256": _SHA,
}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def _shown(value: Any) -> str:
    text = json.dumps(value, allow_nan=True, default=str)
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} {text if len(text) <= 40 else text[:37] + '...'}"


def _fields_problem(data: dict[str, Any], fields: dict[str, Any], prefix: str = "") -> str | None:
    """What is wrong with ``data``'s ``fields`` (the first thing), or ``None``."""
    for key, expected in fields.items():
        name = f"{prefix}{key}"
        if key not in data:
            return f"has no {name!r} field"
        value = data[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                return f"field {name!r} must be an object, got {_shown(value)}"
            inner = _fields_problem(value, expected, f"{name}.")
            if inner is not None:
                return inner
        elif not expected[0](value):
            return f"field {name!r} must be {expected[1]}, got {_shown(value)}"
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the ledger writes")


def _read_record(raw: bytes) -> tuple[Any, str | None]:
    """``(the parsed line or None, what makes it no valid ledger record or None)``: never raises."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"is not UTF-8 text (byte {exc.start} of the line): the file was damaged or edited"
    try:
        record = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are 5000-digit integers
        return None, f"is not valid JSON ({str(exc)[:200]})"
    if not isinstance(record, dict):
        return record, f"is {_shown(record)}, not a ledger record (a JSON object)"
    kind = record.get("kind")
    if kind is not None and kind != SAVE_KIND:
        return record, (f"is not a valid ledger record: its kind {_shown(kind)} is none this seedprints-lightning "
                        f"knows (a probe's record has no kind, a save's is {SAVE_KIND!r})")
    problem = _fields_problem(record, _SAVE_FIELDS if kind == SAVE_KIND else _RECORD_FIELDS)
    return record, None if problem is None else f"is not a valid ledger record: it {problem}"


def _ledger_lines(path: Path) -> list[bytes]:
    """The ledger's lines as bytes (``\\n`` ends a line; a ``\\r`` before it is dropped, as text mode would)."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)


def _replay_chain(run: RunDirectory, audit: ChainAudit) -> tuple[CustodyChain, str, str | None, str | None]:
    """A chain set up as the run's was (reference, controls, first anchor), and the files' hashes."""
    reference = Fingerprint.load(run.reference_path)
    controls = ControlSet.load(run.controls_path) if run.controls_path.exists() else ControlSet.none()
    audit.evidence = (f"birth fingerprint {REFERENCE_FILE} (step {reference.step}, {reference.spec.describe()}); "
                      + (f"{len(controls)} fresh-init controls from {CONTROLS_FILE}" if len(controls)
                         else "no controls file: analytic threshold and effect-size margin only"))
    anchor, initial_sha = None, None
    if run.parent_anchor_path.exists():  # a child run: its chain continues from its parent's last held probe
        features, step = load_parent_anchor(run.parent_anchor_path)
        anchor, initial_sha = Anchor(features, step), file_sha256(run.parent_anchor_path)
        lost = audit.continues_lost_chain = lost_chain_of(run.parent_anchor_path)
        if lost is None:
            audit.evidence += f"; the chain starts at the parent run's last probe (step {step}, {PARENT_ANCHOR_FILE})"
        else:
            audit.evidence += (
                f"; this ledger CONTINUES A LOST CHAIN: the resume at step {lost.get('resumed_at_step')} found no "
                f"ledger in this directory, whose chain had {lost.get('records')} records (head sha256 "
                f"{lost.get('head_sha256')}); it starts at that chain's anchor (step {step}, {PARENT_ANCHOR_FILE})")
    chain = CustodyChain(reference, controls=controls, anchor=anchor, reference_source="ledger")
    controls_sha = file_sha256(run.controls_path) if len(controls) else None
    return chain, file_sha256(run.reference_path), controls_sha, initial_sha


def verify_chain(run_dir: str | os.PathLike, checkpoint_features: torch.Tensor | None = None, *,
                 checkpoint_step: int | None = None, checkpoint_name: str | None = None,
                 expected_head: tuple[int, str] | None = None,
                 checkpoint_state: dict[str, Any] | None = None,
                 ledger: str | os.PathLike | None = None, public_key: Any = None,
                 checkpoint_weights_sha256: str | None = None) -> ChainAudit:
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
    it, and the audit goes on with the next. It never raises for what a ledger holds.

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
    """
    signing_key = None
    if public_key is not None:
        from .signing import RecordSigner, key_id_of, load_public_key

        signing_key = public_key.public_key if isinstance(public_key, RecordSigner) else public_key
        if isinstance(signing_key, (str, bytes, os.PathLike)):
            signing_key = load_public_key(signing_key)
        key_id_of(signing_key)  # an InputError unless it is an Ed25519 public key
    run = RunDirectory.locate(run_dir)
    run.require(ledger)
    audit = ChainAudit(run_dir=run.path)
    chain, reference_sha, controls_sha, initial_sha = _replay_chain(run, audit)
    audit.anchors.append(chain.anchor if chain.anchor is not None
                         else Anchor(chain.reference.features, int(chain.reference.step or 0)))
    ledger = run.ledger_file(ledger)
    lines = _ledger_lines(ledger)
    shas = [hashlib.sha256(line).hexdigest() for line in lines]  # line_sha256 of each line's text
    if not lines:
        audit.problems.append(ChainProblem(None, "missing", f"{ledger} has no record"))
        return audit

    def problem(index: int | None, kind: str, message: str) -> None:
        audit.problems.append(ChainProblem(index, kind, message))

    prev_sha, last_step, signers = reference_sha, -1, set()
    for line_no, line in enumerate(lines):
        where = f"record {line_no} (line {line_no + 1} of {ledger.name})"
        chain.number_records_from(line_no)  # a record's index is its line: the replay numbers them so
        record, malformed = _read_record(line)
        if malformed is not None:  # nothing of it can be trusted: the next record's prev_sha256 tells the rest
            problem(line_no, "tampered", f"{where} {malformed}")
            audit.records.append(record if isinstance(record, dict) else {})
            audit.recomputed.append(None)
            prev_sha = shas[line_no]
            continue
        audit.records.append(record)
        signature = record.get("signature")
        if isinstance(signature, dict) and isinstance(signature.get("key_id"), str):
            signers.add(signature["key_id"])
        if record.get("index") != line_no:
            problem(line_no, "tampered", f"{where} has index {record.get('index')!r}: a record is missing or the "
                                         "records were reordered")
        if record.get("prev_sha256") != prev_sha:
            problem(line_no, "tampered", f"{where}: prev_sha256 does not match the hash of the "
                    + ("reference file" if line_no == 0 else "previous record")
                    + ": a record before it was edited, removed or reordered")
        prev_sha = shas[line_no]
        step = record["step"]
        if step < last_step:
            problem(line_no, "tampered", f"{where}: step {step} comes after step {last_step}: records reordered")
        last_step = step
        for key, expected, what in (
                ("reference_sha256", reference_sha, f"was made against another {REFERENCE_FILE} (hash mismatch)"),
                ("initial_anchor_sha256", initial_sha, f"was made from another first anchor than {PARENT_ANCHOR_FILE} "
                                                       "(hash mismatch, or the file was added or removed)"),
                ("controls_sha256", controls_sha,
                 f"was made with other controls than {CONTROLS_FILE} (hash mismatch)")):
            if record.get(key) != expected:
                problem(line_no, "tampered", f"{where} {what}")
        if record.get("kind") == SAVE_KIND:  # a checkpoint save: chained, nothing to re-test
            audit.saves.append(record)
            audit.recomputed.append(None)
            continue
        feature_path = run.path / str(record.get("features_file", ""))
        if not feature_path.is_file():
            problem(line_no, "missing", f"{where}: its features file {feature_path} is missing")
            audit.recomputed.append(None)
            continue
        if file_sha256(feature_path) != record.get("features_sha256"):
            problem(line_no, "tampered", f"{where}: {feature_path.name} was altered (sha256 mismatch)")
        anchor_index = None if chain.anchor is None else chain.anchor.index
        try:
            chain.judge_by(ChainRules.from_record(record))
            observed = chain.observe(step, load_probe_features(feature_path).float(), str(record.get("event")))
        except (KeyError, TypeError, ValueError) as exc:  # InputError, FingerprintFileError (features file)
            problem(line_no, "tampered", f"{where} cannot be re-tested ({type(exc).__name__}: {exc})")
            audit.recomputed.append(None)
            continue
        verdict = observed.verdict
        audit.recomputed.append(verdict)
        if record.get("anchor_index") != anchor_index:
            problem(line_no, "tampered", f"{where} claims anchor record {record.get('anchor_index')!r} but the last "
                                         f"held link before it is {anchor_index!r}")
        for name, recomputed in (("link", verdict.link), ("birth", verdict.birth)):
            claimed = record.get(name, {})
            if claimed.get("related") != recomputed.related or not _close(claimed.get("z", math.nan), recomputed.z):
                problem(line_no, "tampered", f"{where}: the recorded {name} test (z={claimed.get('z')}, related="
                                             f"{claimed.get('related')}) differs from the recomputed one "
                                             f"(z={recomputed.z:.4f}, related={recomputed.related})")
        if verdict.link.related is False:
            problem(line_no, "broken_link", f"{where}, step {step}: the custody link from step {verdict.anchor_step} "
                                            f"is broken (z={verdict.link.z:.2f} <= threshold "
                                            f"{verdict.link.threshold:.2f})")
        elif verdict.link.related:
            audit.anchors.append(chain.anchor)

    audit.signed_by = tuple(sorted(signers))
    if signing_key is not None:
        _check_signatures(audit, lines, signing_key, ledger.name)
    elif signers:
        audit.evidence += (f"; records signed by key {', '.join(audit.signed_by)} (signatures not checked: give the "
                           "owner's public key to check them)")
    if checkpoint_weights_sha256 is not None:
        from .weights import find_saves

        audit.checkpoint_weights_sha256 = checkpoint_weights_sha256
        audit.checkpoint_saves = find_saves(audit.saves, checkpoint_weights_sha256)
    if expected_head is None and checkpoint_state is not None:
        expected_head = ledger_head_of(checkpoint_state)
    lost = _lost_chain_problem(audit, chain, checkpoint_state, expected_head, shas, ledger.name)
    foreign = None if lost else _foreign_checkpoint(run, chain, checkpoint_state, expected_head, shas, checkpoint_name)
    if lost:
        problem(None, "missing", lost)
    elif foreign is not None:
        problem(None, *foreign)
    elif expected_head is not None:
        count, head_sha = expected_head
        if count > len(lines):
            problem(None, "tampered", f"{ledger.name} holds {len(lines)} records but the checkpoint's callback state "
                                      f"chained to record {count - 1}: records were removed from the end")
        elif count > 0 and shas[count - 1] != head_sha:
            problem(count - 1, "tampered", f"record {count - 1} is not the one the checkpoint's callback state chained "
                                           "to (hash mismatch): it was edited, or the ledger is another run's")
    _report_undetermined(audit)
    if checkpoint_features is not None:
        _link_checkpoint(audit, chain, checkpoint_features, checkpoint_step, checkpoint_name, last_step)
    return audit


def _check_signatures(audit: ChainAudit, lines: list[bytes], key: Any, ledger_name: str) -> None:
    """Every record must carry a valid signature by ``key``: each one that does not is a ``"tampered"`` problem."""
    from .signing import check_signed_ledger, key_id_of

    key_id = key_id_of(key)
    audit.verified_key = key_id
    problems = check_signed_ledger(lines, key)
    for line_no, message in problems:
        audit.problems.append(ChainProblem(line_no, "tampered", (
            f"record {line_no} (line {line_no + 1} of {ledger_name}) {message}: it is not vouched for by the "
            f"public key given (key_id {key_id})")))
    if problems:
        audit.evidence += (f"; signatures checked against key {key_id}: {len(problems)} of {len(lines)} records "
                           "are not signed by it")
    else:
        audit.evidence += f"; signed by key {key_id}: every record's signature verified against the public key given"


def ledger_head_of(state: Any) -> tuple[int, str] | None:
    """``(records, sha256 of the last)`` of the ledger a callback state was chained to, if it says."""
    if not isinstance(state, dict):
        return None
    count, sha = state.get("ledger_next_index", 0), state.get("ledger_last_sha256")
    if not sha or not isinstance(sha, str) or not _is_int(count):
        return None
    return int(count), sha


def _lost_chain_problem(audit: ChainAudit, chain: CustodyChain, state: dict[str, Any] | None,
                        head: tuple[int, str] | None, shas: list[str], ledger_name: str) -> str | None:
    """What to say when the checkpoint chained to a record of the lost chain this ledger continues, else None."""
    lost = audit.continues_lost_chain
    if lost is None or head is None:
        return None
    count, head_sha = head
    if 0 < count <= len(shas) and shas[count - 1] == head_sha:
        return None  # a record of this ledger: a checkpoint from after the resume
    records = lost.get("records")
    if not _is_int(records) or not 0 < count <= records or (count == records and head_sha != lost.get("head_sha256")):
        return None
    reference, ours = state.get("reference_features") if isinstance(state, dict) else None, chain.reference.features
    if isinstance(reference, torch.Tensor) and not (tuple(reference.shape) == tuple(ours.shape)
                                                    and torch.equal(reference.float(), ours.float())):
        return None  # another run's checkpoint
    which = "its head" if count == records else "a record before its head, which cannot be checked"
    return (f"the checkpoint chained to record {count - 1} of a ledger this directory no longer holds (lost before the "
            f"resume at step {lost.get('resumed_at_step')}: that chain had {records} records, head sha256 "
            f"{lost.get('head_sha256')}; record {count - 1} is {which}); {ledger_name} continues that chain from its "
            f"anchor at step {audit.anchors[0].step}, so the records up to the checkpoint are not verified. Restore "
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
            if head_sha in (hashlib.sha256(line).hexdigest() for line in _ledger_lines(abandoned)):
                return "abandoned_branch", (
                    f"{what} belongs to an abandoned branch of this run: the record its callback state chained to "
                    f"is in {abandoned.name}, not in {run.ledger_path.name} (the run went on past this checkpoint, "
                    "then was resumed from an earlier one, which moved those records aside); the current chain "
                    "does not vouch for it")
        except OSError:
            continue
    anchor, index = state.get("anchor_features"), state.get("anchor_index")
    if isinstance(anchor, torch.Tensor) and _is_int(index) and 0 <= index < len(shas):
        # Same birth fingerprint (same init and probe) but another chain: its last held probe is not ours.
        record, malformed = _read_record(_ledger_lines(run.ledger_path)[index])
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


def _report_undetermined(audit: ChainAudit) -> None:
    """Each stretch of records whose link is undetermined: a note when a later link held, else a problem."""
    start: int | None = None
    # Save records hold no probe: a stretch of undetermined probes runs across them.
    probes = [i for i in range(len(audit.recomputed)) if not audit.is_save(i)]
    verdicts = [audit.recomputed[i] for i in probes]
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
            audit.problems.append(ChainProblem(first_record, "undetermined", (
                f"{where}: undetermined, {why}: nothing vouches for the model after step {first.anchor_step}, the "
                "last held link")))
        elif verdict is not None and verdict.link.related is True:
            audit.notes.append(f"{where}: undetermined, {why}; the link at step {verdict.step} from step "
                               f"{verdict.anchor_step} held across them")
        start = None


def _link_checkpoint(audit: ChainAudit, chain: CustodyChain, features: torch.Tensor, step: int | None,
                     name: str | None, last_step: int) -> None:
    """Test a checkpoint against the last anchor at or before its step, with the last record's rules."""
    candidates = [a for a in audit.anchors if step is None or a.step <= step]
    anchor = candidates[-1] if candidates else audit.anchors[0]
    # The first anchor may be the reference itself: the link then shares the birth test.
    audit.checkpoint = chain.test(step if step is not None else last_step, storage_features(features).float(),
                                  anchor=anchor)
    audit.checkpoint_name = name
    if audit.checkpoint.link.related is None:
        audit.problems.append(ChainProblem(None, "undetermined", f"checkpoint {name}: its link to the chain is "
                                           f"undetermined ({audit.checkpoint.link.reason}): its lineage could not be "
                                           "measured, so nothing vouches for it"))
    elif audit.checkpoint.link.related is not True:
        audit.problems.append(ChainProblem(None, "broken_link", f"checkpoint {name}: does not link to the chain (link "
                                           f"from step {anchor.step}: z={audit.checkpoint.link.z:.2f}, threshold "
                                           f"{audit.checkpoint.link.threshold:.2f})"))
