"""The ledger record schema: what a line of ``custody.jsonl`` must hold, read as the audit reads it.

A line flows bytes -> UTF-8 text -> JSON object -> every field typed (:func:`read_record`), against
one field table per record kind: a probe's record (:meth:`~seedprints_lightning.core.ledger.CustodyLedger.append`)
and a save's (:meth:`~seedprints_lightning.core.ledger.CustodyLedger.record_save`). :func:`read_ledger`
splits a ledger file into its record lines, its blank lines and a torn last line (a write a crash
cut short). The audit (:mod:`seedprints_lightning.core.verify`) and ``identify`` read records
through here, so a record is valid by one definition everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import InputError
from .verdict import FAIL_ON

__all__ = ["LEDGER_FORMAT", "LEDGER_VERSION", "SAVE_KIND", "LedgerRecordError", "LedgerText", "ProbeRecord",
           "SaveRecord", "canonical_json", "is_json_int", "is_torn_line", "ledger_lines", "read_ledger",
           "read_ledger_text", "read_record", "record_of"]

# The record format's constants live here, with its schema; core.ledger (the writer) imports them.
LEDGER_FORMAT = "seedprints-custody"
LEDGER_VERSION = 1
#: The ``kind`` of a record that a checkpoint save wrote (:meth:`CustodyLedger.record_save`); a probe's
#: record has no ``kind`` field.
SAVE_KIND = "save"


def canonical_json(record: dict[str, Any]) -> str:
    """A record's line as the ledger writes it (and a signature signs it): sorted keys, no spaces, no NaN."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)


def is_json_int(value: Any) -> bool:
    """An integer as JSON has one (``True`` and ``False`` are no integer of a record)."""
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
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts


def _optional(check: Any) -> Any:
    return lambda value: value is None or check(value)


_INT0 = (lambda v: is_json_int(v) and 0 <= v < 2 ** 63, "an integer in [0, 2**63)")
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
    "version": (lambda v: is_json_int(v) and v == LEDGER_VERSION,
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


def read_record(raw: bytes) -> tuple[Any, str | None]:
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
    try:
        record_of(record)  # the typed records' from_json are the one validation
    except LedgerRecordError as exc:
        return record, str(exc)
    return record, None


@dataclass(frozen=True)
class LedgerText:
    """A ledger file as the audit reads it: its record lines, and the lines that are no record.

    ``records`` are the record lines as bytes (``\\n`` ends a line; a ``\\r`` before it is
    dropped, as text mode would), ``line_numbers`` the line (from 1) of each. ``blank``: the
    blank lines (skipped: the writer never writes one, and the hash chain covers each record's
    line, not the line breaks between them). ``torn``: the last line when a write was cut short
    (:func:`is_torn_line`), and ``torn_line`` its number.
    """

    records: list[bytes]
    line_numbers: list[int]
    blank: list[int]
    torn: bytes | None = None
    torn_line: int | None = None


def is_torn_line(line: bytes) -> bool:
    """Whether an unterminated last line is a write cut short: the start of a JSON object that is no JSON.

    The writer writes a record's line and its line end in one write, as ASCII JSON, and cuts a
    failed write back; only a crash (SIGKILL, power loss) leaves a proper prefix of a line, which
    is never valid JSON. Bytes a power loss left unwritten read as NUL bytes. Undecodable bytes,
    or a line that parses, are no torn write (the audit checks them as records).
    """
    if not (line.startswith(b"{") or not line.strip(b"\x00")):
        return False
    try:
        json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return False
    except (ValueError, RecursionError):
        return True
    return False


def read_ledger_text(path: Path) -> LedgerText:
    """Read a ledger file: its record lines, its blank lines and a torn last line (:class:`LedgerText`)."""
    raw = path.read_bytes().split(b"\n")
    terminated = raw[-1] == b""  # the file ends with a line end (or is empty)
    if terminated:
        raw.pop()
    records, numbers, blank, torn, torn_line = [], [], [], None, None
    for number, line in enumerate(raw, start=1):
        line = line[:-1] if line.endswith(b"\r") else line
        if not line.strip():
            blank.append(number)
        elif not terminated and number == len(raw) and is_torn_line(line):
            torn, torn_line = line, number
        else:
            records.append(line)
            numbers.append(number)
    return LedgerText(records, numbers, blank, torn, torn_line)


def ledger_lines(path: Path) -> list[bytes]:
    """The ledger's record lines as bytes (:func:`read_ledger_text`: blank lines and a torn last line left out)."""
    return read_ledger_text(path).records


class LedgerRecordError(InputError):
    """A ledger line that is no valid record: the message says what is wrong (as the audit words it)."""


def _typed(cls: Any, data: dict[str, Any], table: dict[str, Any]) -> Any:
    problem = _fields_problem(data, table)
    if problem is not None:
        raise LedgerRecordError(f"is not a valid ledger record: it {problem}")
    names = [f.name for f in fields(cls) if f.name != "extra"]
    return cls(**{name: data[name] for name in names},
               extra={key: value for key, value in data.items() if key not in names})


def _as_json(record: Any, kind: str | None) -> dict[str, Any]:
    data = {f.name: getattr(record, f.name) for f in fields(record) if f.name != "extra"}
    if kind is not None:
        data["kind"] = kind
    return {**data, **record.extra}


@dataclass(frozen=True)
class ProbeRecord:
    """A probe's ledger record (:meth:`~seedprints_lightning.core.ledger.CustodyLedger.append` writes it).

    ``birth`` and ``link`` are the two tests as
    :meth:`~seedprints_lightning.core.verdict.IdentityVerdict.to_dict` writes them. ``extra``: the
    fields beyond the schema, kept as read (a ``signature``, a field of a newer writer).
    """

    format: str
    version: int
    index: int
    step: int
    time: str
    event: str
    features_file: str
    features_sha256: str
    anchor_index: int | None
    anchor_step: int
    birth: dict[str, Any]
    link: dict[str, Any]
    related: bool | None
    birth_detectable: bool
    fail_on: str
    identity_mode: str
    identity_ratio: float | None
    reference_sha256: str | None
    controls_sha256: str | None
    initial_anchor_sha256: str | None
    prev_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProbeRecord:
        """The record from its parsed line; a :class:`LedgerRecordError` naming the first wrong field."""
        if data.get("kind") is not None:
            raise LedgerRecordError(f"is not a probe's record: its kind is {_shown(data.get('kind'))}")
        return _typed(cls, data, _RECORD_FIELDS)

    def to_json(self) -> dict[str, Any]:
        """The record as its line's JSON object (the ledger writes it canonically: sorted keys)."""
        return _as_json(self, None)


@dataclass(frozen=True)
class SaveRecord:
    """A checkpoint save's ledger record (:meth:`~seedprints_lightning.core.ledger.CustodyLedger.record_save`)."""

    format: str
    version: int
    index: int
    step: int
    time: str
    event: str
    weights_sha256: str
    checkpoint: str | None
    reference_sha256: str | None
    controls_sha256: str | None
    initial_anchor_sha256: str | None
    prev_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SaveRecord:
        """The record from its parsed line; a :class:`LedgerRecordError` naming the first wrong field."""
        record = _typed(cls, data, _SAVE_FIELDS)
        return dataclasses.replace(record, extra={k: v for k, v in record.extra.items() if k != "kind"})

    def to_json(self) -> dict[str, Any]:
        """The record as its line's JSON object (``"kind": "save"`` included)."""
        return _as_json(self, SAVE_KIND)


def record_of(data: dict[str, Any]) -> ProbeRecord | SaveRecord:
    """The typed record of a parsed line, by its ``kind``; a :class:`LedgerRecordError` when it is none."""
    kind = data.get("kind")
    if kind is not None and kind != SAVE_KIND:
        raise LedgerRecordError(f"is not a valid ledger record: its kind {_shown(kind)} is none this "
                                f"seedprints-lightning knows (a probe's record has no kind, a save's is {SAVE_KIND!r})")
    return SaveRecord.from_json(data) if kind == SAVE_KIND else ProbeRecord.from_json(data)


def read_ledger(path: str | os.PathLike) -> list[ProbeRecord | SaveRecord]:
    """Every record of a ledger file (``custody.jsonl``), typed, in order.

    Blank lines are skipped (as the audit does: the writer never writes one). A line that is no
    valid record, or a torn last line (a write a crash cut short), is a :class:`LedgerRecordError`
    naming the line; ``seedprints audit --chain`` reports every such line and goes on. This reads
    records only: it checks no hash chain (that is :func:`~seedprints_lightning.core.verify.verify_chain`).
    """
    path = Path(path)
    text = read_ledger_text(path)
    if text.torn is not None:
        raise LedgerRecordError(f"line {text.torn_line} of {path} is torn (a write that a crash cut short), no "
                                "record: the run's writer moves it aside when it next opens the ledger; `seedprints "
                                "audit --chain` reports it")
    records = []
    for number, line in zip(text.line_numbers, text.records):
        record, problem = read_record(line)
        if problem is not None:
            raise LedgerRecordError(f"line {number} of {path} {problem}")
        records.append(record_of(record))
    return records
