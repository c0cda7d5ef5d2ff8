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
that claims a link held when it did not is caught too (:func:`seedprints_lightning.chain.verify_chain`).

:class:`RunDirectory` is the one place that knows these paths, for the writers (every trainer
integration) and the readers (the audit) alike.

Features are rounded to fp16 BEFORE the callback tests them, so the offline audit recomputes
exactly the callback's figures from the files (values outside fp16's range, a diverging model,
are kept in fp32). Size per probe: ``n * D * 2`` bytes plus a small header, 256 KB at the
defaults (n = 1000) for D = 128, 8 MB for D = 4096.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FingerprintFileError, InputError
from .files import atomic_write, file_sha256, read_safetensors, save_safetensors
from .fingerprint import Fingerprint
from .verdict import ProbeVerdict

__all__ = [
    "CUSTODY_FILE",
    "CONTROLS_FILE",
    "CustodyLedger",
    "PARENT_ANCHOR_FILE",
    "PROBES_DIR",
    "REFERENCE_FILE",
    "RunDirectory",
    "line_sha256",
    "storage_features",
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


def line_sha256(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)


def save_parent_anchor(directory: Path, features: torch.Tensor, step: int) -> Path:
    """Write the parent run's last held probe as this run's first anchor (``parent_anchor.safetensors``)."""
    return save_safetensors(Path(directory) / PARENT_ANCHOR_FILE, {"features": storage_features(features)},
                            {"seedprints": json.dumps({"step": int(step)})})


def load_parent_anchor(path: Path) -> tuple[torch.Tensor, int]:
    """``(features, step)`` of a file written by :func:`save_parent_anchor`."""
    tensors, meta = read_safetensors(path, "parent anchor file")
    return tensors["features"], int(json.loads(meta["seedprints"])["step"])


def load_probe_features(path: Path) -> torch.Tensor:
    """The features a ledger record's probe file holds."""
    return read_safetensors(path, "probe features file")[0]["features"]


@dataclass
class CustodyLedger:
    """Append-only writer of ``custody.jsonl`` and the probe feature files (rank 0 only).

    ``last_sha256`` is the hash the next record chains to; the callback keeps it (and
    ``next_index``) in its checkpoint state, so a resumed run continues the same chain.
    """

    directory: Path
    next_index: int = 0
    last_sha256: str | None = None
    #: What every record of this chain was made against (sha256 of the files beside the ledger).
    reference_sha256: str | None = None
    controls_sha256: str | None = None
    initial_anchor_sha256: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.directory) / CUSTODY_FILE

    def append(self, verdict: ProbeVerdict, features: torch.Tensor, *, event: str, anchor_index: int | None,
               identity_mode: str, identity_ratio: float | None) -> dict[str, Any]:
        """Write the features file and append one record; return the record (with its ``sha256``)."""
        if self.last_sha256 is None:
            raise InputError("CustodyLedger.append before rewind_to(): the chain has no root (open the ledger with "
                             "RunDirectory.open_ledger)")
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
            "reference_sha256": self.reference_sha256, "controls_sha256": self.controls_sha256,
            "initial_anchor_sha256": self.initial_anchor_sha256, "prev_sha256": self.last_sha256,
        }
        line = _canonical(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.next_index, self.last_sha256 = index + 1, line_sha256(line)
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
        if keep > 0 and line_sha256(lines[keep - 1]) != last_sha256:
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



@dataclass(frozen=True)
class RunDirectory:
    """A run's ``seedprints`` directory: its paths, and the files the chain keeps beside the ledger."""

    path: Path

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)):
            raise InputError(f"RunDirectory needs a path (str or os.PathLike), got {type(self.path).__name__}")
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def locate(cls, path: str | os.PathLike) -> RunDirectory:
        """The directory itself, or its ``seedprints`` subdirectory when that is the one holding the ledger."""
        path = Path(path)
        if not (path / CUSTODY_FILE).exists() and (path / "seedprints" / CUSTODY_FILE).exists():
            return cls(path / "seedprints")
        if not (path / REFERENCE_FILE).exists() and (path / "seedprints" / REFERENCE_FILE).exists():
            return cls(path / "seedprints")
        return cls(path)

    reference_path = property(lambda self: self.path / REFERENCE_FILE)
    controls_path = property(lambda self: self.path / CONTROLS_FILE)
    ledger_path = property(lambda self: self.path / CUSTODY_FILE)
    parent_anchor_path = property(lambda self: self.path / PARENT_ANCHOR_FILE)

    def require(self) -> None:
        """Raise :class:`FingerprintFileError` unless this is a run directory with a ledger."""
        for path in (self.ledger_path, self.reference_path):
            if not path.exists():
                raise FingerprintFileError(f"{path} does not exist: {self.path} is not a run directory written by "
                                           "SeedPrintsCallback (it needs reference.safetensors and custody.jsonl)")

    def sync_reference(self, reference: Fingerprint, *, fresh: bool, origin: str) -> tuple[str, str | None]:
        """Write ``reference.safetensors``, or check that the one there is ``reference``.

        Returns ``(its sha256, a warning or None)``. A fresh step-0 reference replaces another
        run's file (with a warning: that chain ends here); a restored or explicit one must be
        the file's own (``origin`` names it in the error), since two runs in one directory would
        chain to each other's records.
        """
        path = self.reference_path
        existing = None
        if path.exists():
            try:
                existing = Fingerprint.load(path)
            except FingerprintFileError as exc:
                if not fresh:
                    raise InputError(f"{exc}; move it away or pass save_dir=<another directory>") from None
        same = (existing is not None and existing.spec == reference.spec
                and torch.equal(existing.features, reference.features))
        warning = None
        if existing is not None and not same:
            if not fresh:
                raise InputError(
                    f"the reference from {origin} (step {reference.step}, created {reference.created}) differs from "
                    f"{path} (step {existing.step}, created {existing.created}), the reference of the run that owns "
                    "this directory: another run's checkpoint or reference is being used in this run's directory. "
                    "Resume this run from its own checkpoint, or log to another directory (save_dir=...)"
                )
            warning = (f"SeedPrints: replacing {path} (another run's reference, taken at step {existing.step}) with "
                       "this run's new step-0 reference; its custody ledger starts anew")
        if not same:
            reference.save(path)
        return file_sha256(path), warning

    def open_ledger(self, next_index: int, last_sha256: str | None, *, reference_sha256: str,
                    controls_sha256: str | None = None, initial_anchor_sha256: str | None = None,
                    ) -> tuple[CustodyLedger, str | None]:
        """The ledger, positioned to continue after record ``next_index - 1`` (a new chain when none).

        Returns ``(ledger, a warning or None)``: records past that position (an earlier run's, or
        an abandoned branch of this one) are moved to ``custody.abandoned-N.jsonl``, never deleted.
        """
        ledger = CustodyLedger(self.path, reference_sha256=reference_sha256, controls_sha256=controls_sha256,
                               initial_anchor_sha256=initial_anchor_sha256)
        new_chain = last_sha256 is None or next_index == 0
        if new_chain:  # rooted in the reference file
            next_index, last_sha256 = 0, reference_sha256
        moved = ledger.rewind_to(last_sha256, next_index)
        if moved is None:
            return ledger, None
        if new_chain:
            return ledger, (f"SeedPrints: a new chain starts in {ledger.path}; the previous records were moved to "
                            f"{moved}")
        return ledger, (f"SeedPrints: resumed from a checkpoint older than the last probe; the ledger's records "
                        f"after it (an abandoned branch of the run) were moved to {moved}")
