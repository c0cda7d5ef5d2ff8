"""The custody ledger: one hash-chained record per probe, and its offline re-verification.

Layout, beside ``reference.safetensors`` (the run's birth fingerprint) in the run's
``seedprints`` directory::
    custody.jsonl                       one JSON record per line, one line per probe
    probes/000012-step00001000-3f9a0c1d.safetensors   that probe's features [n, D] (fp16, packed
                                        losslessly: :func:`encode_probe_features`), and from D >= 128 its
                                        screen ranks for ``identify`` (``screen_ranks``, [64, n] int16, bound
                                        by the record's ``screen.sha256``: :mod:`.screen`); the last part of the
                                        name is the writing branch's token, so no branch overwrites another's
    custody.abandoned-<i>.jsonl         a branch that a resume from an older checkpoint abandoned: the whole
                                        branch (the records it shares with the ledger, then its own), which
                                        verifies on its own (``verify_chain(run, ledger=...)``)
    custody.lock                        the writer's exclusive OS lock (:class:`RunLock`)
    custody.torn-<i>.txt                the bytes of a record whose write a crash cut short (a last line
                                        with no line end), moved out of the ledger by the writer before
                                        it appended again (:func:`cut_torn_tail`); never overwritten

A record is appended whole or not at all: the writer remembers the ledger's size, and when the
write (or its flush to disk) fails (a full disk, a file-size limit, an I/O error) it cuts the
file back to that size before raising, so the chain does not advance and the next record starts
on a line of its own. A crash (SIGKILL, power loss) in the middle of a write can still leave a
torn last line; the writer never appends after one: when it next opens or appends to the ledger
it moves the fragment to ``custody.torn-<i>.txt`` (with a warning) and cuts the ledger back to
its last whole record. The audit tells such a torn last line from an edited one
(:func:`~seedprints_lightning.core.verify.verify_chain`). Blank lines (which the writer never
writes) are skipped by both: the hash chain covers each record's line, not the line breaks.

Each record holds the probe's step, time, event, both verdicts (birth test and custody link,
with z, tau, threshold, the controls' z and the rule), the index and step of the anchor the
link was tested against, the sha256 of the probe's features file, and ``prev_sha256``: the
sha256 of the previous record's line (for the first record, of ``reference.safetensors``).
Editing, removing or reordering a record breaks the hash chain; altering a features file
breaks its hash; and since every verdict is recomputed from the stored features, a record
that claims a link held when it did not is caught too (:func:`seedprints_lightning.core.verify.verify_chain`).

Two further, optional things a ledger can hold. A **save record** (``"kind": "save"``:
:meth:`CustodyLedger.record_save`, written when a face saves a checkpoint) holds the step and the
:func:`~seedprints_lightning.core.weights.weights_digest` of the saved weights; it is chained like a
probe's record, takes the next index, and lets the audit say which recorded save a checkpoint's
exact weights are. A **signature** (a ledger opened with ``signer=``): every record is signed
with the run owner's Ed25519 key before its line is written (:mod:`.signing`), so a ledger
rewritten by someone without the key fails ``verify_chain(..., public_key=...)``.

:class:`RunDirectory` is the one place that knows these paths, for the writers (every trainer
integration) and the readers (the audit) alike. A run directory belongs to one run: one process
writes it at a time (:class:`RunLock`), a new run refuses a directory that holds another run's
ledger or reference (:meth:`RunDirectory.refuse_new_chain`), and no file of an abandoned branch
is ever overwritten.

Features are rounded to fp16 BEFORE the callback tests them, so the offline audit recomputes
exactly the callback's figures from the files (values outside fp16's range, a diverging model,
are kept in fp32). Size per probe: about ``0.86 * n * D * 2`` bytes (the plain fp16 matrix is
``n * D * 2``; ``docs/benchmarks.md``, Run directory size), 7 MB at the defaults (n = 1000) for
D = 4096. Probe files written plain (one fp16 ``features`` tensor, before 0.6) are read as well.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import os
import secrets
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checks import check_int
from .errors import FingerprintFileError, InputError
from .files import atomic_write, file_sha256, read_safetensors, save_safetensors
from .fingerprint import Fingerprint
from .records import (  # the format is defined there
    LEDGER_FORMAT,
    LEDGER_VERSION,
    SAVE_KIND,
    ProbeRecord,
    SaveRecord,
    canonical_json,
)
from .screen import SCREEN_FIELD, SCREEN_TENSOR, StoredScreen, make_screen
from .signing import check_signer, sign_ledger_line
from .verdict import ProbeVerdict

__all__ = [
    "CUSTODY_FILE",
    "CONTROLS_FILE",
    "CustodyLedger",
    "LOCK_FILE",
    "LedgerRepairWarning",
    "PARENT_ANCHOR_FILE",
    "PROBES_DIR",
    "REFERENCE_FILE",
    "RunDirectory",
    "RunLock",
    "SAVE_KIND",
    "TORN_PREFIX",
    "check_save_dir",
    "cut_torn_tail",
    "ledger_record_lines",
    "line_sha256",
    "record_save",
    "storage_features",
]

REFERENCE_FILE = "reference.safetensors"
#: A child run's copy of its parent run's last held probe: the first anchor of its chain.
PARENT_ANCHOR_FILE = "parent_anchor.safetensors"
CONTROLS_FILE = "controls.safetensors"
CUSTODY_FILE = "custody.jsonl"
#: The writer's exclusive lock on the run directory (:class:`RunLock`).
LOCK_FILE = "custody.lock"
PROBES_DIR = "probes"
#: ``custody.torn-<i>.txt``: a torn last line (a write a crash cut short) that the writer moved out of the ledger.
TORN_PREFIX = "custody.torn-"
_FP16_MAX = 65504.0
# The packed probe file's tensors (encode_probe_features) and zlib's level: on the demo's trained
# features 6 and 9 gave the same size (x 0.855 of plain), 1 a 1.2 % larger file in half the time.
_LOW_BYTES = "features_low_bytes"
_HIGH_BYTES_DEFLATED = "features_high_bytes_deflated"
_DEFLATE_LEVEL = 6


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


class LedgerRepairWarning(UserWarning):
    """The writer moved a torn last line (a write a crash cut short) out of the ledger before appending."""


def ledger_record_lines(text: str) -> list[str]:
    """The record lines of a ledger's text: every line but blank ones (the writer never writes a blank line)."""
    return [line for line in text.splitlines() if line.strip()]


def _whole_record(fragment: bytes) -> bool:
    """Whether an unterminated last line is a whole record (a JSON object) that only lacks its line end."""
    try:
        return isinstance(json.loads(fragment.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every filesystem lets a directory be opened; the data itself is synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def cut_torn_tail(path: str | os.PathLike) -> Path | None:
    """Make ``path`` (a ledger) end with a whole line, so a record appended next starts on a line of its own.

    The writer appends every record with its line end in one write and cuts a failed write back
    (:meth:`CustodyLedger._write`), so a last line with no line end is a write that a crash cut
    short. It is moved, never deleted, to the first free ``custody.torn-<i>.txt`` beside the
    ledger (its bytes as they were), and the ledger is cut back to its last whole line; the path
    of that file is returned (``None`` when nothing was cut). A last line that is a whole JSON
    object and lacks only its line end gets the line end (the hash chain covers the line's text,
    not its end), and a last line of blanks is cut (no evidence is in it).
    """
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return None
        # The start of the last line: read back block by block to the last line end (a line is ~1.5 kB).
        start, block = size, 1 << 16
        while start > 0:
            begin = max(0, start - block)
            handle.seek(begin)
            chunk = handle.read(start - begin)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start = begin + cut + 1
                break
            start = begin
        handle.seek(start)
        fragment = handle.read()
        if _whole_record(fragment):
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            return None
        moved = None
        if fragment.strip():
            i = 0
            while True:  # "x": an existing side file (an earlier fragment) is never overwritten
                moved = path.with_name(f"{TORN_PREFIX}{i}.txt")
                try:
                    with open(moved, "xb") as side:
                        side.write(fragment)
                        side.flush()
                        os.fsync(side.fileno())
                    break
                except FileExistsError:
                    i += 1
            _fsync_directory(path.parent)
        handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())
    return moved


def _torn_warning(path: Path, moved: Path | None, when: str) -> str | None:
    if moved is None:
        return None
    return (f"SeedPrints: {path} ended in a torn line ({moved.stat().st_size} bytes with no line end: a write that a "
            f"crash cut short), found {when}; it was moved to {moved} (kept as evidence, not a record) and the ledger "
            "was cut back to its last whole record, so the next record starts on a line of its own. seedprints "
            "audit --chain reports it as a note, not as tampering")


# The tests' old name for records.canonical_json (the line's format is defined beside the record schema).
_canonical = canonical_json


def save_parent_anchor(directory: Path, features: torch.Tensor, step: int,
                       continues: dict[str, Any] | None = None) -> Path:
    """Write the first anchor of this directory's ledger (``parent_anchor.safetensors``).

    A child run's is its parent run's last held probe. ``continues`` (``records``,
    ``head_sha256``, ``resumed_at_step``) marks a ledger that continues a chain whose ledger
    this directory lost (:func:`~seedprints_lightning.core.opening.open_chain`): the anchor is that
    chain's last held probe, and the audit names the loss.
    """
    meta: dict[str, Any] = {"step": int(step)}
    if continues is not None:
        meta["continues_lost_chain"] = dict(continues)
    return save_safetensors(Path(directory) / PARENT_ANCHOR_FILE, {"features": storage_features(features)},
                            {"seedprints": json.dumps(meta, sort_keys=True)})


def load_parent_anchor(path: Path) -> tuple[torch.Tensor, int]:
    """``(features, step)`` of a file written by :func:`save_parent_anchor`."""
    tensors, meta = read_safetensors(path, "parent anchor file")
    return tensors["features"], int(json.loads(meta["seedprints"])["step"])


def lost_chain_of(path: Path) -> dict[str, Any] | None:
    """What a first-anchor file says about the lost chain its ledger continues (``None``: it continues none)."""
    _, meta = read_safetensors(path, "parent anchor file")
    lost = json.loads(meta["seedprints"]).get("continues_lost_chain")
    return dict(lost) if isinstance(lost, dict) else None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_save_dir(path: str | os.PathLike, name: str = "save_dir") -> Path:
    """Raise :class:`InputError` unless ``path`` can be (or is) a run directory this process may write.

    Checked: ``path`` is not an existing regular file (nor anything but a directory); the
    nearest existing directory (``path`` or its nearest existing ancestor) is a directory (not a
    regular file above ``path``) that this process may write and enter (``os.access`` with
    ``W_OK | X_OK``: an approximation on network filesystems and ACLs, where the first write may
    still fail).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{name}={os.fspath(path)!r} exists and is not a directory (a regular file?): the run's "
                         "seedprints files need a directory. Pass another path, or move the file away")
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        raise InputError(f"{name}={os.fspath(path)!r} cannot be created: {existing} is a file, not a directory. "
                         "Pass a path outside it, or move the file away")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "it" if existing == path.absolute() else f"its nearest existing parent {existing}"
        raise InputError(f"{name}={os.fspath(path)!r} is not writable: {what} does not let this process create "
                         "files. Pass a directory you can write, or fix its permissions")
    return path


class RunLock:
    """The exclusive OS lock (``custody.lock``, :mod:`filelock`) of the one process writing a run directory.

    Taken without waiting when the writer opens the ledger: a second writer (another process, or
    another live face object in this process) gets an :class:`InputError` naming the directory,
    never a turn to interleave its records. Released by :meth:`release` (every face calls it
    when its run ends), by the OS when the process dies (a crash, SIGKILL: the next run needs no
    clean-up), and when this object is garbage collected. On contention the lock is retried once
    after a garbage collection, so a face object of this process that was dropped without ending
    its run (a simulated crash) releases it; a lock held by a live object is never taken over.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._lock: Any = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> RunLock:
        """Take the lock (no wait); raise :class:`InputError` when another writer holds it."""
        if self.held:
            return self
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), thread_local=False, is_singleton=False)
        try:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                gc.collect()  # a dropped face object of this process releases its lock when collected
                lock.acquire(timeout=0)
        except Timeout:
            raise InputError(
                f"{self.path.parent}: another process is writing this run (its lock {self.path} is held, by another "
                "process or a face object of this process whose run has not ended): two writers would interleave "
                "their records in one ledger. End that run first (or wait for it), or log this run to another "
                "directory (save_dir=...). (On a filesystem without OS file locks, filelock may keep a crashed "
                f"run's lock: delete {self.path} only if no run is writing there)"
            ) from None
        self._lock = lock
        return self

    def release(self) -> None:
        """Release the lock (no-op when not held)."""
        lock, self._lock = self._lock, None
        if lock is not None and lock.is_locked:
            lock.release(force=True)


def encode_probe_features(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a probe file for ``features`` (as :func:`storage_features` made them), losslessly packed.

    fp16 features are split into their two bytes. The high byte (sign, exponent, two mantissa
    bits) carries about 5.5 bits of entropy and is deflated; the low byte (the rest of the
    mantissa) is close to uniform, so it is stored as it is: deflating it saves nothing and
    doubles the time. Every bit is kept, so the audit recomputes exactly the judged figures
    (``docs/benchmarks.md``, Run directory size: 0.86 x the plain fp16 file). fp32 features
    (a diverging model's) are stored as they are.
    """
    if features.dtype != torch.float16:
        return {"features": features.contiguous()}
    pairs = features.contiguous().numpy().astype("<f2", copy=False).view(np.uint8).reshape(-1, 2)
    high = np.frombuffer(zlib.compress(pairs[:, 1].tobytes(), _DEFLATE_LEVEL), dtype=np.uint8)
    return {_LOW_BYTES: torch.from_numpy(pairs[:, 0].reshape(features.shape).copy()),
            _HIGH_BYTES_DEFLATED: torch.from_numpy(high.copy())}


def decode_probe_features(tensors: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    """The features of a probe file's tensors (plain, or packed by :func:`encode_probe_features`).

    A stored screen beside them (:data:`~seedprints_lightning.core.screen.SCREEN_TENSOR`, 0.9 on) is
    not part of the features and is left out.
    """
    tensors = {key: value for key, value in tensors.items() if key != SCREEN_TENSOR}
    if "features" in tensors:  # plain: fp32, and every probe file written before the packed encoding
        return tensors["features"]
    if set(tensors) != {_LOW_BYTES, _HIGH_BYTES_DEFLATED}:
        raise FingerprintFileError(
            f"{path} holds tensors {sorted(tensors)}, not a probe's features: it was not written by "
            "seedprints-lightning, or by a newer version (upgrade seedprints-lightning)")
    low = tensors[_LOW_BYTES]
    if low.dtype != torch.uint8 or low.dim() != 2:
        raise FingerprintFileError(f"{path} is damaged: its {_LOW_BYTES} are {low.dtype} {tuple(low.shape)}, "
                                   "not a uint8 [n, D] matrix")
    try:
        high = zlib.decompress(tensors[_HIGH_BYTES_DEFLATED].numpy().tobytes())
    except zlib.error as exc:
        raise FingerprintFileError(f"{path} is damaged: its {_HIGH_BYTES_DEFLATED} do not inflate ({exc})") from exc
    if len(high) != low.numel():
        raise FingerprintFileError(f"{path} is damaged: {len(high)} high bytes for {low.numel()} low bytes")
    pairs = np.empty((low.numel(), 2), dtype=np.uint8)
    pairs[:, 0] = low.reshape(-1).numpy()
    pairs[:, 1] = np.frombuffer(high, dtype=np.uint8)
    return torch.from_numpy(pairs.view("<f2").astype(np.float16).reshape(tuple(low.shape)))


def load_probe_features(path: Path) -> torch.Tensor:
    """The features a ledger record's probe file holds."""
    return decode_probe_features(read_safetensors(path, "probe features file")[0], Path(path))


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may take part of them, then fail on the next)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` (one record's line) to ``path`` and sync it, or leave the file as it was and raise.

    Unbuffered (``os.write``), so nothing is left in a buffer to be written after the file is cut
    back. On any failure (ENOSPC, EFBIG from a file-size limit, EIO, an interrupt) the file is
    truncated back to its size before the write, then the error propagates; should that cut fail
    too, the torn line is left for :func:`cut_torn_tail`, which the next append runs first.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException as exc:
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError as cut:
                if isinstance(exc, OSError):
                    exc.add_note(f"{path} could not be cut back to its last whole record ({cut}); the next append "
                                 f"moves the torn line to {TORN_PREFIX}<i>.txt first")
            raise
    finally:
        os.close(fd)


@dataclass
class CustodyLedger:
    """Append-only writer of ``custody.jsonl`` and the probe feature files (rank 0 only).

    ``last_sha256`` is the hash the next record chains to; the callback keeps it (and
    ``next_index``) in its checkpoint state, so a resumed run continues the same chain.
    ``branch`` is a random token in every probe file name this writer makes, so two branches of
    a run (a resume from an older checkpoint) never overwrite each other's files. ``lock`` is
    the run directory's :class:`RunLock` (held while writing; :meth:`close` releases it, and an
    append after that takes it again). ``signer`` (a
    :class:`~seedprints_lightning.core.signing.RecordSigner`, or ``None``) signs every record before
    its line is written (:func:`~seedprints_lightning.core.signing.sign_ledger_line`); the ledger
    keeps it only in memory (it is not in any state, and cannot be pickled or copied).
    """

    directory: Path
    next_index: int = 0
    last_sha256: str | None = None
    #: What every record of this chain was made against (sha256 of the files beside the ledger).
    reference_sha256: str | None = None
    controls_sha256: str | None = None
    initial_anchor_sha256: str | None = None
    lock: RunLock | None = None
    branch: str = field(default_factory=lambda: secrets.token_hex(4))
    signer: Any = field(default=None, repr=False, compare=False)
    #: What :meth:`rewind_to` repaired (a torn last line moved aside), for the face to warn; else ``None``.
    repair_warning: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_signer(self.signer)

    @property
    def path(self) -> Path:
        return Path(self.directory) / CUSTODY_FILE

    @property
    def signed(self) -> bool:
        return self.signer is not None

    def _write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Sign ``record`` (with a signer), append its line, advance the chain; return it as written (+ ``sha256``)."""
        if self.signer is not None:
            record = sign_ledger_line(self.signer, record)
        line = canonical_json(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Never start a record on a torn line (a crash cut the last write short): move it aside first.
        warning = _torn_warning(self.path, cut_torn_tail(self.path), "before appending record "
                                f"{self.next_index}")
        if warning is not None:
            warnings.warn(warning, LedgerRepairWarning, stacklevel=3)
        _append_whole(self.path, (line + "\n").encode("utf-8"))
        self.next_index, self.last_sha256 = self.next_index + 1, line_sha256(line)
        return dict(record, sha256=self.last_sha256)

    def _require_root(self, what: str) -> None:
        if self.last_sha256 is None:
            raise InputError(f"CustodyLedger.{what} before rewind_to(): the chain has no root (open the ledger with "
                             "RunDirectory.open_ledger)")

    def record_save(self, step: int, weights_sha256: str, *, checkpoint: str | None = None) -> dict[str, Any]:
        """Append a save record: the checkpoint saved at ``step`` holds the weights whose digest is ``weights_sha256``.

        ``weights_sha256`` is :func:`~seedprints_lightning.core.weights.weights_digest` of the saved
        model's state dict; ``checkpoint`` optionally names the file (informative only: the audit
        matches the weights, never the name). The record is chained (and signed) like a probe's and
        takes the next index; ``verify_chain`` checks its place in the chain and skips it in the
        replay. Returns the record with its ``sha256`` (the chain's new head).
        """

        self._require_root("record_save")
        step = check_int("step", step, low=0, hint="the optimizer step of the save")
        if not (isinstance(weights_sha256, str) and len(weights_sha256) == 64
                and all(c in "0123456789abcdef" for c in weights_sha256)):
            raise InputError(f"weights_sha256 must be a sha256 hex digest (weights_digest(state_dict)), got "
                             f"{weights_sha256!r:.80}")
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise InputError(f"checkpoint must be a str (the file's name) or None, got {type(checkpoint).__name__}")
        self._hold_lock()
        record = SaveRecord(
            format=LEDGER_FORMAT, version=LEDGER_VERSION, index=self.next_index,
            step=step, time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), event="save",
            weights_sha256=weights_sha256, checkpoint=checkpoint,
            reference_sha256=self.reference_sha256, controls_sha256=self.controls_sha256,
            initial_anchor_sha256=self.initial_anchor_sha256, prev_sha256=self.last_sha256,
        )
        return self._write(record.to_json())

    def close(self) -> None:
        """Release the run directory's lock (the run ended); a later :meth:`append` takes it again."""
        if self.lock is not None:
            self.lock.release()

    def _hold_lock(self) -> None:
        """Take the lock again after :meth:`close`, if the ledger still ends where this chain stands."""
        if self.lock is None or self.lock.held:
            return
        self.lock.acquire()
        try:  # a run that crashed here while this one had closed it may have left a torn last line
            warning = _torn_warning(self.path, cut_torn_tail(self.path), "when this run took the ledger again")
        except BaseException:
            self.lock.release()
            raise
        if warning is not None:
            warnings.warn(warning, LedgerRepairWarning, stacklevel=3)
        lines = ledger_record_lines(self.path.read_text(encoding="utf-8")) if self.path.exists() else []
        tail = line_sha256(lines[-1]) if lines else self.reference_sha256
        if len(lines) != self.next_index or tail != self.last_sha256:
            self.lock.release()
            raise InputError(f"{self.path} changed since this run closed it (it holds {len(lines)} records, this "
                             f"chain stands at {self.next_index}): another run wrote there. Start a new run in "
                             "another directory (save_dir=...)")

    def _probe_name(self, index: int, step: int) -> str:
        """A probe file name no file of the directory has (a new branch token on the unlikely clash)."""
        while True:
            name = f"{PROBES_DIR}/{index:06d}-step{step:08d}-{self.branch}.safetensors"
            if not (Path(self.directory) / name).exists():
                return name
            self.branch = secrets.token_hex(4)

    def append(self, verdict: ProbeVerdict, features: torch.Tensor, *, event: str, anchor_index: int | None,
               identity_mode: str, identity_ratio: float | None) -> dict[str, Any]:
        """Write the features file and append one record (signed with a signer); return it (with its ``sha256``)."""
        self._require_root("append")
        self._hold_lock()
        index = self.next_index
        name = self._probe_name(index, int(verdict.step))
        feature_path = Path(self.directory) / name
        meta = {"seedprints": json.dumps({"index": index, "step": verdict.step})}
        tensors = encode_probe_features(features)
        # identify's screen ranks, a small tensor of their own (read without the features); the record
        # holds their sha256, so the chain binds them as it binds the file (core/screen.py).
        screen = make_screen(features)
        if screen is not None:
            tensors[SCREEN_TENSOR] = screen[0]
        save_safetensors(feature_path, tensors, meta)
        try:
            return self._write(self._probe_record(verdict, index, name, feature_path, event=event,
                                                  anchor_index=anchor_index, identity_mode=identity_mode,
                                                  identity_ratio=identity_ratio,
                                                  screen=None if screen is None else screen[1]))
        except BaseException:
            # The record was not written: no record names this file, and a full disk needs its space back.
            feature_path.unlink(missing_ok=True)
            raise

    def _probe_record(self, verdict: ProbeVerdict, index: int, name: str, feature_path: Path, *, event: str,
                      anchor_index: int | None, identity_mode: str, identity_ratio: float | None,
                      screen: StoredScreen | None = None) -> dict[str, Any]:
        return ProbeRecord(
            format=LEDGER_FORMAT, version=LEDGER_VERSION, index=index, step=int(verdict.step),
            time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), event=event,
            features_file=name, features_sha256=file_sha256(feature_path),
            anchor_index=anchor_index, anchor_step=int(verdict.anchor_step),
            birth=verdict.birth.to_dict(), link=verdict.link.to_dict(),
            related=verdict.related, birth_detectable=verdict.birth_detectable, fail_on=verdict.fail_on,
            identity_mode=identity_mode, identity_ratio=identity_ratio,
            reference_sha256=self.reference_sha256, controls_sha256=self.controls_sha256,
            initial_anchor_sha256=self.initial_anchor_sha256, prev_sha256=self.last_sha256,
            extra={} if screen is None else {SCREEN_FIELD: screen.to_json()},
        ).to_json()

    def rewind_to(self, last_sha256: str, next_index: int) -> Path | None:
        """Resume the chain after the record with hash ``last_sha256`` (the checkpoint's).

        Records written after it belong to a branch of the run that was abandoned (the run went
        on past the checkpoint, then was resumed from it). They are moved, never deleted, to
        ``custody.abandoned-<i>.jsonl``, which holds the whole branch (the ``next_index`` records
        it shares with the ledger, then its own), so it verifies on its own; the path is
        returned (None when nothing was moved). A ledger that does not hold the checkpoint's
        record ``next_index - 1`` (fewer records, or another one there) is an :class:`InputError`.

        First, a torn last line (a write a crash cut short) is moved to ``custody.torn-<i>.txt``
        (:func:`cut_torn_tail`; :attr:`repair_warning` says so) and blank lines are not counted as
        records; a kept ledger that is rewritten is written without them.
        """
        self.next_index, self.last_sha256 = next_index, last_sha256
        self.repair_warning = None
        if not self.path.exists():
            return None
        self.repair_warning = _torn_warning(self.path, cut_torn_tail(self.path), "when the run opened the ledger")
        lines = ledger_record_lines(self.path.read_text(encoding="utf-8"))
        keep = next_index
        if len(lines) < keep:
            raise InputError(
                f"{self.path} holds {len(lines)} records but this run's checkpoint chained to record {keep - 1}: "
                "records were lost, or the directory is an older copy. Resume into the directory that holds the whole "
                f"ledger, or move {self.path.parent} away to continue in a new ledger that names the loss"
            )
        if keep > 0 and line_sha256(lines[keep - 1]) != last_sha256:
            raise InputError(
                f"{self.path}: record {keep - 1} is not the one this checkpoint chained to (hash mismatch): the "
                "ledger belongs to another run or was edited; log to another directory (save_dir=...)"
            )
        if len(lines) == keep:
            return None
        i = 0
        while (moved := self.path.with_name(f"custody.abandoned-{i}.jsonl")).exists():
            i += 1
        moved.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        kept = "".join(line + "\n" for line in lines[:keep])
        atomic_write(self.path, lambda tmp: tmp.write_text(kept, encoding="utf-8"))
        return moved


def record_save(ledger: CustodyLedger, step: int, weights_sha256: str, *,
                checkpoint: str | None = None) -> dict[str, Any]:
    """``ledger.record_save(step, weights_sha256, checkpoint=...)``: record a checkpoint save (see there).

    The record takes the ledger's next index: a face that also keeps a
    :class:`~seedprints_lightning.core.chain.CustodyChain` must advance the chain's numbering with it
    on every process (:meth:`~seedprints_lightning.core.chain.CustodyChain.record_save` does both).
    """
    if not isinstance(ledger, CustodyLedger):
        raise InputError(f"record_save needs a CustodyLedger, got {type(ledger).__name__}")
    return ledger.record_save(step, weights_sha256, checkpoint=checkpoint)


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
    lock_path = property(lambda self: self.path / LOCK_FILE)

    def require(self, ledger: str | os.PathLike | None = None) -> None:
        """Raise :class:`FingerprintFileError` unless this is a run directory with a ledger (``ledger``: that one)."""
        chosen = self.ledger_file(ledger)
        if ledger is not None and not chosen.is_file() and self.reference_path.exists():
            raise FingerprintFileError(f"the ledger to verify (--ledger) {chosen} does not exist (or is no file) "
                                       f"in the run directory {self.path}{self._ledger_names()}")
        for path in (chosen, self.reference_path):
            if not path.exists():
                raise FingerprintFileError(f"{path} does not exist: {self.path} is not a run directory written by "
                                           "SeedPrintsCallback (it needs reference.safetensors and custody.jsonl)")

    def ledger_file(self, ledger: str | os.PathLike | None = None) -> Path:
        """``custody.jsonl``, or ``ledger`` (e.g. ``custody.abandoned-0.jsonl``; relative to this directory).

        ``ledger`` must name a file of this directory (an absolute path, ``..`` or a link that
        leads out of it is an :class:`InputError`): an audit verifies this run's ledgers only.
        """
        if ledger is None:
            return self.ledger_path
        if not isinstance(ledger, (str, os.PathLike)):
            raise InputError(f"ledger must be a file name in the run directory (str or os.PathLike), got "
                             f"{type(ledger).__name__}")
        path = self.path / Path(ledger).expanduser()
        if path.resolve().parent != self.path.resolve():
            raise InputError(
                f"the ledger to verify (--ledger) {os.fspath(ledger)!r} is not a file of the run directory "
                f"{self.path}: the audit verifies a ledger of that run, which lies beside its {REFERENCE_FILE} "
                f"({CUSTODY_FILE}, or an abandoned branch "
                f"custody.abandoned-<i>.jsonl). Leave --ledger out to verify {CUSTODY_FILE}, or pass the name of a "
                f"ledger file in {self.path}" + self._ledger_names())
        return path

    def _ledger_names(self) -> str:
        names = sorted(p.name for p in self.path.glob("custody*.jsonl")) if self.path.is_dir() else []
        return f" (it holds {', '.join(names)})" if names else ""

    def record_count(self) -> int:
        """How many records ``custody.jsonl`` holds (0 when it is absent; blank lines and a torn last line are none)."""
        if not self.ledger_path.is_file():
            return 0
        data = self.ledger_path.read_bytes()
        lines = [line for line in data.split(b"\n") if line.strip()]
        if lines and not data.endswith(b"\n") and not _whole_record(lines[-1]):
            lines.pop()  # a write a crash cut short: no record (cut_torn_tail moves it aside)
        return len(lines)

    def lock(self) -> RunLock:
        """This directory's writer lock, taken (:class:`RunLock`; :class:`InputError` when another writer holds it)."""
        return RunLock(self.path).acquire()

    def refuse_new_chain(self) -> None:
        """Raise :class:`InputError` when this directory holds another run's ledger (a record in ``custody.jsonl``).

        A new run (a fresh step-0 reference) must not start a chain over it: that run's evidence
        would be replaced. (A reference file with no record is checked by :meth:`sync_reference`.)
        """
        count = self.record_count()
        if count:
            raise InputError(self._taken(f"another run's custody ledger ({self.ledger_path.name} holds {count} "
                                         "records)"))

    def _taken(self, what: str) -> str:
        return (f"{self.path} holds {what}: a run directory belongs to one run, and a new run (a fresh step-0 "
                "reference) would replace its evidence. Log this run to a new directory (save_dir=<another "
                f"directory>), or remove or move {self.path} away first; to continue that run, resume it from its "
                "checkpoint")

    def sync_reference(self, reference: Fingerprint, *, fresh: bool, origin: str) -> tuple[str, str | None]:
        """Write ``reference.safetensors``, or check that the one there is ``reference``.

        Returns ``(its sha256, a warning or None)``. The file there must be ``reference`` itself:
        a fresh step-0 reference never replaces another run's file (the directory belongs to that
        run: an :class:`InputError` that says to log elsewhere), and a restored or explicit one
        must be the file's own (``origin`` names it in the error), since two runs in one
        directory would chain to each other's records.
        """
        path = self.reference_path
        existing = None
        if path.exists():
            try:
                existing = Fingerprint.load(path)
            except FingerprintFileError as exc:
                raise InputError(f"{exc}; move it away or pass save_dir=<another directory>") from None
        same = (existing is not None and existing.spec == reference.spec
                and torch.equal(existing.features, reference.features))
        if existing is not None and not same:
            if fresh:
                raise InputError(self._taken(f"another run's reference {path.name} (taken at step {existing.step}, "
                                             f"created {existing.created})"))
            raise InputError(
                f"the reference from {origin} (step {reference.step}, created {reference.created}) differs from "
                f"{path} (step {existing.step}, created {existing.created}), the reference of the run that owns "
                "this directory: another run's checkpoint or reference is being used in this run's directory. "
                "Resume this run from its own checkpoint, or log to another directory (save_dir=...)"
            )
        if not same:
            reference.save(path, screen=True)  # with identify's screen ranks (core/screen.py)
        return file_sha256(path), None

    def open_ledger(self, next_index: int, last_sha256: str | None, *, reference_sha256: str,
                    controls_sha256: str | None = None, initial_anchor_sha256: str | None = None,
                    lock: RunLock | None = None, signer: Any = None) -> tuple[CustodyLedger, str | None]:
        """The ledger, positioned to continue after record ``next_index - 1`` (a new chain when none).

        ``signer`` (a :class:`~seedprints_lightning.core.signing.RecordSigner`) signs every record
        the ledger writes from now on (records already there are left as they are).

        Returns ``(ledger, a warning or None)``: records past that position (an earlier run's, or
        an abandoned branch of this one) are moved to ``custody.abandoned-N.jsonl`` with the
        records the branch shares with the ledger, never deleted. The ledger holds ``lock``
        (this directory's :class:`RunLock`; taken here when not given) until it is closed.
        """
        check_signer(signer)
        own_lock = lock is None
        lock = self.lock() if lock is None else lock
        ledger = CustodyLedger(self.path, reference_sha256=reference_sha256, controls_sha256=controls_sha256,
                               initial_anchor_sha256=initial_anchor_sha256, lock=lock, signer=signer)
        new_chain = last_sha256 is None or next_index == 0
        if new_chain:  # rooted in the reference file
            next_index, last_sha256 = 0, reference_sha256
        try:
            moved = ledger.rewind_to(last_sha256, next_index)
        except BaseException:
            if own_lock:
                lock.release()
            raise
        repaired = ledger.repair_warning
        if moved is None:
            return ledger, repaired
        check = f"seedprints audit --chain {self.path} --ledger {moved.name} verifies it"
        if new_chain:
            message = (f"SeedPrints: a new chain starts in {ledger.path}; the previous records were moved to "
                       f"{moved} ({check})")
        else:
            message = (f"SeedPrints: resumed from a checkpoint older than the last probe; the ledger's records "
                       f"after it (an abandoned branch of the run) were moved to {moved} with the records the branch "
                       f"shares with the ledger ({check})")
        return ledger, message if repaired is None else f"{repaired}. {message}"
