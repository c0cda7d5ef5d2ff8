"""The custody chain: one Lightning-free probe cycle for every trainer integration and the audit.

A probe's features flow one way through :class:`CustodyChain`::

    features [n, D] -> rounded for storage -> judged (birth test + custody link, against the
    controls) -> ledger record -> anchor, schedule and failure count advance -> decision

:meth:`CustodyChain.observe` is that cycle. The Lightning callback
(:class:`~seedprints_lightning.SeedPrintsCallback`) measures the features over its ranks,
calls ``observe`` and then logs and acts on the returned :class:`ChainStep`; any other
training loop does the same with its own measuring and acting.
:func:`~seedprints_lightning.core.verify.verify_chain` (:mod:`seedprints_lightning.core.verify`)
replays a ledger's records through the same class, without writing, to re-verify a run offline;
this module knows nothing of it (the dependency runs one way, verify -> chain).

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
import importlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from .checks import check_choice, check_int
from .controls import ControlSet
from .counters import FailureCount, LedgerCursor
from .errors import InputError
from .fingerprint import Fingerprint
from .ledger import CustodyLedger, storage_features
from .probes import ProbeSpec
from .schedule import ProbeSchedule
from .state import STATE_FORMAT_VERSION, ChainState
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

__all__ = ["Anchor", "ChainNote", "ChainRules", "ChainStep", "CustodyChain", "STATE_FORMAT_VERSION"]


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
    def state(self) -> ChainState:
        """The chain's checkpoint state (:class:`~seedprints_lightning.core.state.ChainState`): a CPU snapshot."""
        ref, controls, anchor = self.reference, self.controls, self.anchor
        return ChainState(
            reference_features=None if ref is None else ref.features.detach().cpu().clone(),
            reference_meta=None if ref is None else ref.metadata(), reference_source=self.reference_source,
            control_features=None if controls.features is None else controls.features.clone(),
            control_seeds=tuple(int(s) for s in controls.seeds),
            control_spec=None if controls.spec is None else controls.spec.to_dict(),
            anchor_features=None if anchor is None else anchor.features.clone(),
            anchor_step=None if anchor is None else anchor.step, anchor_index=None if anchor is None else anchor.index,
            next_probe_step=int(self.next_probe_step), interval=int(self.interval),
            ledger_next_index=int(self._cursor.next_index), ledger_last_sha256=self._cursor.last_sha256,
            last_probed_step=int(self.last_probed_step), consecutive_failures=int(self._failures.consecutive),
            warned_undetermined=bool(self.warned_undetermined), warned_birth=bool(self.warned_birth),
            history=[dict(entry) for entry in self.history])

    def state_dict(self) -> dict[str, Any]:
        """:meth:`state` as a checkpoint's dict (:meth:`ChainState.to_dict`: loads with ``weights_only=True``)."""
        return self.state().to_dict()

    def load_state_dict(self, state: dict[str, Any] | ChainState) -> None:
        """Restore :meth:`state_dict` (format 1 or 2, checked by :meth:`ChainState.from_dict`), or a ``ChainState``.

        An ``"explicit"`` reference is kept as it is. Anything but a SeedPrints state (``None``, another
        callback's state, an empty dict) is an :class:`InputError` that says so; only a SeedPrints state
        of an unknown version asks to upgrade.
        """
        restored = state if isinstance(state, ChainState) else ChainState.from_dict(state)
        if (restored.reference_features is not None and restored.reference_meta is not None
                and self.reference_source != "explicit"):
            self.reference = Fingerprint.from_metadata(restored.reference_features, restored.reference_meta)
            self.reference_source = "checkpoint"
        spec = restored.control_spec
        self.controls = ControlSet.none() if restored.control_features is None else ControlSet(
            features=restored.control_features, seeds=restored.control_seeds,
            spec=None if spec is None else ProbeSpec.from_dict(spec),
            description="fresh-init controls restored from the checkpoint")
        self.last_probed_step = restored.last_probed_step
        self._failures = dataclasses.replace(self._failures, consecutive=restored.consecutive_failures)
        self.warned_undetermined, self.warned_birth = restored.warned_undetermined, restored.warned_birth
        self.history = [dict(entry) for entry in restored.history]
        # Version 1 had no chain: its last probe is unknown, so the chain restarts at the reference.
        self.anchor = None if restored.anchor_features is None else Anchor(
            restored.anchor_features, restored.anchor_step, restored.anchor_index)
        if restored.next_probe_step is not None:
            self.next_probe_step, self.interval = restored.next_probe_step, restored.interval
        else:
            self.next_probe_step = self.last_probed_step + self.schedule.every_n_steps
            self.interval = self.schedule.every_n_steps
        self._cursor = LedgerCursor(restored.ledger_next_index, restored.ledger_last_sha256,
                                    numbered=self._cursor.numbered)
        self.restored = True


# --------------------------------------------------------------------------------------
# Names that moved out of this module in 0.8, still importable from here
# --------------------------------------------------------------------------------------

#: Name -> (module under ``seedprints_lightning.core``, its name there). Verification moved to
#: :mod:`.verify`, the record schema to :mod:`.records`, ``resolve_reference`` to :mod:`.reference`;
#: ``from seedprints_lightning.core.chain import verify_chain`` (a 0.7 import, and the 0.4 path
#: ``seedprints_lightning.chain`` through its shim) keeps working. They resolve lazily, on first
#: use, because :mod:`.verify` imports this module: a module-level import of it here would be an
#: import cycle (importing ``verify`` first would find this module's import of it half done).
_MOVED = {
    "ChainAudit": ("verify", "ChainAudit"), "ChainProblem": ("verify", "ChainProblem"),
    "PROBLEM_KINDS": ("verify", "PROBLEM_KINDS"), "ledger_head_of": ("verify", "ledger_head_of"),
    "verify_chain": ("verify", "verify_chain"), "resolve_reference": ("reference", "resolve_reference"),
    "LedgerText": ("records", "LedgerText"), "is_torn_line": ("records", "is_torn_line"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, attribute = _MOVED[name]
        value = getattr(importlib.import_module(f"{__package__}.{module}"), attribute)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MOVED))
