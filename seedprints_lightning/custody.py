"""The custody ledger: one hash-chained record per probe, and its offline re-verification.

Layout, beside ``reference.safetensors`` (the run's birth fingerprint) in the run's
``seedprints`` directory::

    custody.jsonl                       one JSON record per line, one line per probe
    probes/000012-step00001000.safetensors   that probe's features [n, D] (fp16)

Each record holds the probe's step, time, event, both verdicts (birth test and custody link,
with z, tau, threshold, the controls' z and the rule), the index and step of the anchor the
link was tested against, the sha256 of the probe's features file, and ``prev_sha256``: the
sha256 of the previous record's line (for the first record, of ``reference.safetensors``).
Editing, removing or reordering a record breaks the hash chain; altering a features file
breaks its hash; and since every verdict is recomputed from the stored features, a record
that claims a link held when it did not is caught too (:func:`verify_chain`).

Features are rounded to fp16 BEFORE the callback tests them, so the offline audit recomputes
exactly the callback's figures from the files (values outside fp16's range, a diverging model,
are kept in fp32). Size per probe: ``n * D * 2`` bytes plus a small header, 256 KB at the
defaults (n = 1000) for D = 128, 8 MB for D = 4096.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import FingerprintFileError, InputError
from .files import atomic_write, file_sha256, save_safetensors
from .fingerprint import Fingerprint
from .verdict import ProbeVerdict, VerdictRule, judge_probe

__all__ = [
    "CUSTODY_FILE",
    "CONTROLS_FILE",
    "ChainAudit",
    "ChainProblem",
    "CustodyLedger",
    "PROBES_DIR",
    "REFERENCE_FILE",
    "storage_features",
    "verify_chain",
]

REFERENCE_FILE = "reference.safetensors"
#: A child run's copy of its parent run's last held probe: the first anchor of its chain.
PARENT_ANCHOR_FILE = "parent_anchor.safetensors"
CONTROLS_FILE = "controls.safetensors"
CUSTODY_FILE = "custody.jsonl"
PROBES_DIR = "probes"
LEDGER_FORMAT = "seedprints-custody"
LEDGER_VERSION = 1
_FP16_MAX = 65504.0


def storage_features(features: torch.Tensor) -> torch.Tensor:
    """The features as a probe keeps them: fp16 when they fit (finite and within fp16's range), else fp32.

    The callback tests the rounded features, so what is stored is exactly what was tested.
    """
    features = features.detach().to("cpu")
    if torch.isfinite(features).all() and float(features.abs().max()) <= _FP16_MAX:
        return features.to(torch.float16).contiguous()
    return features.to(torch.float32).contiguous()


def _line_sha256(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)


def save_parent_anchor(directory: Path, features: torch.Tensor, step: int) -> Path:
    """Write the parent run's last held probe as this run's first anchor (``parent_anchor.safetensors``)."""
    return save_safetensors(Path(directory) / PARENT_ANCHOR_FILE, {"features": storage_features(features)},
                            {"seedprints": json.dumps({"step": int(step)})})


def load_parent_anchor(path: Path) -> tuple[torch.Tensor, int]:
    """``(features, step)`` of a file written by :func:`save_parent_anchor`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("features"), int(json.loads((handle.metadata() or {})["seedprints"])["step"])


def last_held_probe(audit: ChainAudit) -> tuple[torch.Tensor, int]:
    """The features and step of the last record whose link held in a verified chain (the chain's end)."""
    for record, verdict in zip(reversed(audit.records), reversed(audit.recomputed)):
        if verdict is not None and verdict.link.related:
            return load_probe_features(audit.run_dir / record["features_file"]), int(record["step"])
    raise InputError(f"{audit.run_dir}: the ledger has no record whose link held")


def load_probe_features(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor("features")


@dataclass
class CustodyLedger:
    """Append-only writer of ``custody.jsonl`` and the probe feature files (rank 0 only).

    ``last_sha256`` is the hash the next record chains to; the callback keeps it (and
    ``next_index``) in its checkpoint state, so a resumed run continues the same chain.
    """

    directory: Path
    next_index: int = 0
    last_sha256: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.directory) / CUSTODY_FILE

    def start(self, reference_sha256: str) -> None:
        """Begin a new chain tied to the reference file (a fresh run)."""
        self.next_index, self.last_sha256 = 0, reference_sha256

    def append(self, verdict: ProbeVerdict, features: torch.Tensor, *, event: str, anchor_index: int | None,
               reference_sha256: str, controls_sha256: str | None, identity_mode: str,
               identity_ratio: float | None, initial_anchor_sha256: str | None = None) -> dict[str, Any]:
        """Write the features file and append one record; return the record (with its ``sha256``)."""
        if self.last_sha256 is None:
            raise InputError("CustodyLedger.append before start(): the chain has no root")
        index = self.next_index
        name = f"{PROBES_DIR}/{index:06d}-step{verdict.step:08d}.safetensors"
        feature_path = Path(self.directory) / name
        meta = {"seedprints": json.dumps({"index": index, "step": verdict.step})}
        save_safetensors(feature_path, {"features": features}, meta)
        record = {
            "format": LEDGER_FORMAT, "version": LEDGER_VERSION, "index": index, "step": int(verdict.step),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "event": event,
            "features_file": name, "features_sha256": file_sha256(feature_path),
            "anchor_index": anchor_index, "anchor_step": int(verdict.anchor_step),
            "birth": verdict.birth.to_dict(), "link": verdict.link.to_dict(),
            "related": verdict.related, "birth_detectable": verdict.birth_detectable, "fail_on": verdict.fail_on,
            "identity_mode": identity_mode, "identity_ratio": identity_ratio,
            "reference_sha256": reference_sha256, "controls_sha256": controls_sha256,
            "initial_anchor_sha256": initial_anchor_sha256, "prev_sha256": self.last_sha256,
        }
        line = _canonical(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.next_index, self.last_sha256 = index + 1, _line_sha256(line)
        return dict(record, sha256=self.last_sha256)

    def rewind_to(self, last_sha256: str, next_index: int) -> Path | None:
        """Resume the chain after the record with hash ``last_sha256`` (the checkpoint's).

        Records written after it belong to a branch of the run that was abandoned (the run went
        on past the checkpoint, then was resumed from it). They are moved, never deleted, to
        ``custody.abandoned-<i>.jsonl``; the path is returned (None when nothing was moved).
        """
        self.next_index, self.last_sha256 = next_index, last_sha256
        if not self.path.exists():
            return None
        lines = self.path.read_text(encoding="utf-8").splitlines()
        keep = next_index
        if len(lines) <= keep:
            return None
        if keep > 0 and _line_sha256(lines[keep - 1]) != last_sha256:
            raise InputError(
                f"{self.path}: record {keep - 1} is not the one this checkpoint chained to (hash mismatch): the "
                "ledger belongs to another run or was edited; log to another directory (save_dir=...)"
            )
        i = 0
        while (moved := self.path.with_name(f"custody.abandoned-{i}.jsonl")).exists():
            i += 1
        moved.write_text("\n".join(lines[keep:]) + "\n", encoding="utf-8")
        kept = "".join(line + "\n" for line in lines[:keep])
        atomic_write(self.path, lambda tmp: tmp.write_text(kept, encoding="utf-8"))
        return moved


# --------------------------------------------------------------------------------------
# Offline verification
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    """One thing wrong with a ledger: which record (``None`` for the files around it), and what."""

    index: int | None
    kind: str  # "tampered", "broken_link", "missing"
    message: str


@dataclass
class ChainAudit:
    """The result of :func:`verify_chain`.

    ``ok`` when the files are intact, every recomputed figure matches its record, every link
    held, and (when a checkpoint was given) the checkpoint links to the chain.
    """

    run_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    recomputed: list[ProbeVerdict] = field(default_factory=list)
    problems: list[ChainProblem] = field(default_factory=list)
    checkpoint: ProbeVerdict | None = None
    checkpoint_name: str | None = None
    evidence: str = ""

    @property
    def tampered(self) -> list[ChainProblem]:
        return [p for p in self.problems if p.kind != "broken_link"]

    @property
    def broken_links(self) -> list[ChainProblem]:
        return [p for p in self.problems if p.kind == "broken_link"]

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.records)

    def table(self) -> str:
        header = f"{'record':>6}  {'step':>8}  {'anchor':>8}  {'link z':>9}  {'link thr':>9}  {'birth z':>8}  verdict"
        lines = [header, "-" * len(header)]
        for record, verdict in zip(self.records, self.recomputed):
            if verdict is None:  # its features file is missing, or the record cannot be re-tested
                lines.append(f"{record.get('index', '?')!s:>6}  {record.get('step', '?')!s:>8}  "
                             f"{record.get('anchor_step', '?')!s:>8}  {'-':>9}  {'-':>9}  {'-':>8}  not re-tested")
                continue
            word = {True: "link held", False: "LINK BROKEN", None: "undetermined"}[verdict.link.related]
            lines.append(f"{record['index']:>6}  {verdict.step:>8}  {verdict.anchor_step:>8}  {verdict.link.z:>9.2f}  "
                         f"{verdict.link.threshold:>9.2f}  {verdict.birth.z:>8.2f}  {word}")
        if self.checkpoint is not None:
            v = self.checkpoint
            word = {True: "descends", False: "DOES NOT DESCEND", None: "undetermined"}[v.link.related]
            lines.append(f"{'ckpt':>6}  {v.step:>8}  {v.anchor_step:>8}  {v.link.z:>9.2f}  {v.link.threshold:>9.2f}  "
                         f"{v.birth.z:>8.2f}  {word} ({self.checkpoint_name})")
        return "\n".join(lines)


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)


def _load_controls(run_dir: Path) -> tuple[torch.Tensor | None, str | None]:
    from .controls import load_controls

    path = run_dir / CONTROLS_FILE
    if not path.exists():
        return None, None
    features, _, _ = load_controls(path)
    return features, file_sha256(path)


def verify_chain(run_dir: str | os.PathLike, checkpoint_features: torch.Tensor | None = None, *,
                 checkpoint_step: int | None = None, checkpoint_name: str | None = None,
                 expected_head: tuple[int, str] | None = None) -> ChainAudit:
    """Re-verify a run's custody ledger offline, record by record, from its files.

    ``run_dir`` is the callback's ``seedprints`` directory (or a directory holding it). Every
    record's hash chain, features hash and recomputed verdicts are checked; with
    ``checkpoint_features`` (the features of a checkpoint on the reference's probe), the
    checkpoint is linked to the last held record at or before ``checkpoint_step``.

    ``expected_head`` is ``(number of records, sha256 of the last one)`` as a checkpoint's
    callback state knows it: the ledger must hold that record at that place. Without it, records
    cut from the END of the ledger cannot be told from a run that made fewer probes (the hash
    chain only protects what precedes a record).
    """
    run_dir = Path(run_dir)
    if not (run_dir / CUSTODY_FILE).exists() and (run_dir / "seedprints" / CUSTODY_FILE).exists():
        run_dir = run_dir / "seedprints"
    audit = ChainAudit(run_dir=run_dir)
    ledger, ref_path = run_dir / CUSTODY_FILE, run_dir / REFERENCE_FILE
    for path in (ledger, ref_path):
        if not path.exists():
            raise FingerprintFileError(f"{path} does not exist: {run_dir} is not a run directory written by "
                                       "SeedPrintsCallback (it needs reference.safetensors and custody.jsonl)")
    reference = Fingerprint.load(ref_path)
    reference_sha = file_sha256(ref_path)
    controls, controls_sha = _load_controls(run_dir)
    audit.evidence = (f"birth fingerprint {ref_path.name} (step {reference.step}, {reference.spec.describe()}); "
                      + (f"{controls.shape[0]} fresh-init controls from {CONTROLS_FILE}" if controls is not None
                         else "no controls file: analytic threshold and effect-size margin only"))
    lines = ledger.read_text(encoding="utf-8").splitlines()
    if not lines:
        audit.problems.append(ChainProblem(None, "missing", f"{ledger} has no record"))
        return audit

    def problem(index: int | None, kind: str, message: str) -> None:
        audit.problems.append(ChainProblem(index, kind, message))

    prev_sha, last_step = reference_sha, -1
    anchor, anchor_step, anchor_index = reference.features, int(reference.step or 0), None
    initial_path, initial_sha = run_dir / PARENT_ANCHOR_FILE, None
    if initial_path.exists():  # a child run: its chain continues from its parent's last held probe
        anchor, anchor_step = load_parent_anchor(initial_path)
        anchor = anchor.float()
        initial_sha = file_sha256(initial_path)
        audit.evidence += (f"; the chain starts at the parent run's last probe (step {anchor_step}, "
                           f"{PARENT_ANCHOR_FILE})")
    anchors: list[tuple[int, int | None, torch.Tensor]] = [(anchor_step, None, anchor)]  # the chain's held anchors
    for line_no, line in enumerate(lines):
        where = f"record {line_no} (line {line_no + 1} of {ledger.name})"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem(line_no, "tampered", f"{where} is not valid JSON ({exc})")
            return audit
        audit.records.append(record)
        if record.get("index") != line_no:
            problem(line_no, "tampered", f"{where} has index {record.get('index')!r}: a record is missing or the "
                                         "records were reordered")
        if record.get("prev_sha256") != prev_sha:
            problem(line_no, "tampered", f"{where}: prev_sha256 does not match the hash of the "
                    + ("reference file" if line_no == 0 else "previous record")
                    + ": a record before it was edited, removed or reordered")
        prev_sha = _line_sha256(line)
        step = int(record.get("step", -1))
        if step < last_step:
            problem(line_no, "tampered", f"{where}: step {step} comes after step {last_step}: records reordered")
        last_step = step
        if record.get("reference_sha256") != reference_sha:
            problem(line_no, "tampered", f"{where} was made against another {REFERENCE_FILE} (hash mismatch)")
        if record.get("initial_anchor_sha256") != initial_sha:
            problem(line_no, "tampered", f"{where} was made from another first anchor than {PARENT_ANCHOR_FILE} "
                                         "(hash mismatch, or the file was added or removed)")
        if record.get("controls_sha256") != controls_sha:
            problem(line_no, "tampered", f"{where} was made with other controls than {CONTROLS_FILE} (hash mismatch)")
        feature_path = run_dir / str(record.get("features_file", ""))
        if not feature_path.is_file():
            problem(line_no, "missing", f"{where}: its features file {feature_path} is missing")
            audit.recomputed.append(None)  # type: ignore[arg-type]
            continue
        if file_sha256(feature_path) != record.get("features_sha256"):
            problem(line_no, "tampered", f"{where}: {feature_path.name} was altered (sha256 mismatch)")
        live = load_probe_features(feature_path).float()
        try:
            birth_rule = VerdictRule.from_dict(record["birth"]["rule"])
            custody_rule = VerdictRule.from_dict(record["link"]["rule"])
            verdict = judge_probe(step, live, reference=reference.features, anchor=anchor, anchor_step=anchor_step,
                                  controls=() if controls is None else list(controls), birth_rule=birth_rule,
                                  custody_rule=custody_rule, fail_on=record.get("fail_on", "custody"),
                                  identity_mode=record.get("identity_mode", "coset"),
                                  identity_ratio=record.get("identity_ratio"))
        except (KeyError, TypeError, InputError) as exc:
            problem(line_no, "tampered", f"{where} cannot be re-tested ({type(exc).__name__}: {exc})")
            audit.recomputed.append(None)  # type: ignore[arg-type]
            continue
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
            problem(line_no, "broken_link", f"{where}, step {step}: the custody link from step {anchor_step} is "
                                            f"broken (z={verdict.link.z:.2f} <= threshold "
                                            f"{verdict.link.threshold:.2f})")
        elif verdict.link.related:
            anchor, anchor_step, anchor_index = live, step, line_no
            anchors.append((step, line_no, live))

    if expected_head is not None:
        count, head_sha = expected_head
        if count > len(lines):
            problem(None, "tampered", f"{ledger.name} holds {len(lines)} records but the checkpoint's callback state "
                                      f"chained to record {count - 1}: records were removed from the end")
        elif count > 0 and _line_sha256(lines[count - 1]) != head_sha:
            problem(count - 1, "tampered", f"record {count - 1} is not the one the checkpoint's callback state chained "
                                           "to (hash mismatch): it was edited, or the ledger is another run's")
    if checkpoint_features is not None:
        candidates = [a for a in anchors if checkpoint_step is None or a[0] <= checkpoint_step]
        a_step, _, a_features = candidates[-1] if candidates else anchors[0]
        last = audit.recomputed[-1] if audit.recomputed and audit.recomputed[-1] is not None else None
        rules = (last.birth.rule, last.link.rule) if last is not None else (None, None)
        kwargs = {} if rules[0] is None else {"birth_rule": rules[0], "custody_rule": rules[1]}
        live = storage_features(checkpoint_features).float()
        audit.checkpoint = judge_probe(checkpoint_step if checkpoint_step is not None else last_step, live,
                                       reference=reference.features, anchor=a_features, anchor_step=a_step,
                                       controls=() if controls is None else list(controls), **kwargs,
                                       identity_mode=audit.records[-1].get("identity_mode", "coset"),
                                       identity_ratio=audit.records[-1].get("identity_ratio"))
        audit.checkpoint_name = checkpoint_name
        if audit.checkpoint.link.related is not True:
            problem(None, "broken_link", f"checkpoint {checkpoint_name}: does not link to the chain (link from step "
                                         f"{a_step}: z={audit.checkpoint.link.z:.2f}, threshold "
                                         f"{audit.checkpoint.link.threshold:.2f})")
    return audit

