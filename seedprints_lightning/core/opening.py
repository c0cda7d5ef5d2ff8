"""What every face does at train start, Lightning-free: reference, files, controls, ledger.

A face owns its loop's few adapters (how the live model's features are measured, how its
processes agree: :class:`~seedprints_lightning.core.processes.Processes`, how it acts).
Everything else about opening a run is :func:`open_chain`, so each face writes the same run
directory, the same ledger and the same chain state::
    open_chain(chain, step=..., run=RunDirectory(save_dir), processes=..., take_reference=...,
               controls=ControlsSource(...))      # then, every probe:  chain.observe(step, features)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .chain import Anchor, CustodyChain
from .controls import ControlSet, control_seeds, init_scheme_of
from .errors import InputError
from .files import file_sha256
from .fingerprint import Fingerprint
from .ledger import (
    REFERENCE_FILE,
    RunDirectory,
    RunLock,
    check_save_dir,
    load_parent_anchor,
    save_parent_anchor,
    storage_features,
)
from .probes import ProbeSpec
from .processes import Processes
from .signing import check_signer

__all__ = ["ControlsSource", "close_chain", "open_chain", "probe_spec_differs"]


@dataclass(frozen=True)
class ControlsSource:
    """Where a run's fresh-init controls come from: its checkpoint state, a precomputed file, or a build.

    ``build(seeds, spec)`` probes fresh inits of the run's model (one alive at a time);
    ``identity`` (``model_class``, ``config_digest``) is what the run's model is, checked against a
    file and recorded in ``controls.safetensors``.
    """

    num_controls: int
    build: Callable[[tuple[int, ...], ProbeSpec], ControlSet]
    identity: dict[str, str | None] = field(default_factory=dict)
    file: ControlSet | None = None
    file_path: str | None = None


def open_chain(chain: CustodyChain, *, step: int, run: RunDirectory | None, processes: Processes,
               take_reference: Callable[[], Fingerprint], controls: ControlsSource, origin: str,
               warn: Callable[[str], None], missing_state: str = "seedprints state", signer: Any = None) -> bool:
    """Make ``chain`` ready to observe at ``step``; True when a new chain starts here (nothing to link yet).

    The reference is the chain's own (explicit or restored) or, at step 0 only, ``take_reference()``;
    a trained run without one is an error that names ``missing_state`` and the fix. With ``run``
    (``None`` writes no file), the writer process first takes the directory's lock
    (:class:`~seedprints_lightning.core.ledger.RunLock`, held by the ledger until :func:`close_chain`),
    then writes or checks ``reference.safetensors`` (``origin`` names where a restored or explicit
    reference came from), saves the controls and positions the ledger; every process raises the
    writer's errors alike. A run directory belongs to one run:
    - a new chain from a fresh step-0 reference is refused in a directory that holds another
      run's ledger (a record in ``custody.jsonl``) or another reference;
    - a resume (restored state with records) whose directory has no ledger (deleted, or an
      empty file) warns (``warn``: the directory, the number of lost records, the head's hash)
      and continues in a NEW ledger: rooted in the checkpoint's reference (written from the
      restored state), its first anchor the chain's current anchor (``parent_anchor.safetensors``,
      whose metadata names the lost chain: records, head sha256, the resume's step), numbered
      from 0, so it verifies on its own and the audit names the loss. A ledger that is there but
      does not hold the checkpoint's head (fewer records, another record) is an error: move the
      directory away to continue as above, or resume into the one that holds the ledger.

    ``signer`` (a :class:`~seedprints_lightning.core.signing.RecordSigner`: ``load_signing_key(path)``)
    makes the writer's ledger sign every record it writes (other processes write none and ignore
    it). The signer lives only in the ledger object: never in the chain's ``state_dict``, so a
    resume passes it again.
    """
    if signer is not None:
        check_signer(signer)
    fresh = chain.reference is None
    if fresh and step != 0:
        where = run.reference_path if run is not None else f"<run>/seedprints/{REFERENCE_FILE}"
        raise InputError(
            f"SeedPrints has no reference at global_step={step}: the checkpoint has no {missing_state}, so "
            "the run's step-0 reference is unknown and will not be taken from trained weights. Pass "
            f"reference=<run>/seedprints/{REFERENCE_FILE} (e.g. {where}) or resume from a checkpoint saved with "
            "the callback"
        )
    lock = _claim(run, processes, fresh)
    try:
        if fresh:
            chain.begin(take_reference(), step)
        chain.keep_records(run is not None)
        reference_sha = _sync_reference(chain, run, fresh, processes, origin, warn) if run is not None else None
        _ensure_controls(chain, run, processes, controls)
        if run is not None:
            _open_ledger(chain, run, processes, lock, reference_sha, step, warn, signer)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    # The writer holds the ledger; every process numbers the records alike (the anchor's index).
    chain.number_records_from(int(processes.broadcast(chain.cursor.next_index)))
    return fresh


def probe_spec_differs(asked: ProbeSpec | None, used: ProbeSpec) -> bool:
    """Whether a face constructed with ``probe=asked`` asks for other inputs than the chain's ``used`` spec.

    ``asked=None`` is ``ProbeSpec()``, as the faces document. A field ``asked`` leaves ``None`` (the
    vocabulary, the embedding statistics) is filled from the model when a new chain starts, so it
    asks for nothing: only the fields it sets are compared. A restored chain's spec always wins
    (the run's reference and every recorded probe were taken with it); the faces warn on a difference.
    """
    asked = asked if asked is not None else ProbeSpec()
    for spec_field in dataclasses.fields(asked):
        wanted = getattr(asked, spec_field.name)
        if wanted is not None and wanted != getattr(used, spec_field.name):
            return True
    return False


def close_chain(chain: CustodyChain) -> None:
    """The run ended: release its directory's lock (a later probe of this chain takes it again)."""
    if chain.cursor.ledger is not None:
        chain.cursor.ledger.close()


def _raise_shared(error: str | None, processes: Processes) -> None:
    error = processes.broadcast(error)
    if error is not None:
        raise InputError(error)


def _claim(run: RunDirectory | None, processes: Processes, fresh: bool) -> RunLock | None:
    """The writer's lock on ``run``, before any file is touched; a new chain in another run's directory is refused."""
    if run is None:
        return None
    error = lock = None
    if processes.is_writer:
        try:
            check_save_dir(run.path)
            lock = run.lock()
            if fresh:
                run.refuse_new_chain()
        except InputError as exc:
            error = str(exc)
            if lock is not None:
                lock.release()
                lock = None
    _raise_shared(error, processes)
    return lock


def _sync_reference(chain: CustodyChain, run: RunDirectory, fresh: bool, processes: Processes, origin: str,
                    warn: Callable[[str], None]) -> str | None:
    error = sha = None
    if processes.is_writer:
        try:
            sha, warning = run.sync_reference(chain.reference, fresh=fresh, origin=origin)
        except InputError as exc:
            error, warning = str(exc), None
        if warning:
            warn(warning)
    _raise_shared(error, processes)
    return sha


def _open_ledger(chain: CustodyChain, run: RunDirectory, processes: Processes, lock: RunLock | None,
                 reference_sha: str | None, step: int, warn: Callable[[str], None], signer: Any = None) -> None:
    error, lost = None, False
    if processes.is_writer:
        try:
            continues = None
            cursor = chain.cursor
            if cursor.next_index > 0 and cursor.last_sha256 is not None and run.record_count() == 0:
                lost, records, head = True, cursor.next_index, cursor.last_sha256
                continues = {"records": records, "head_sha256": head, "resumed_at_step": int(step)}
                chain.continue_in_new_ledger()
                warn(f"SeedPrints: resuming at step {step}, but {run.path} holds no custody ledger (custody.jsonl is "
                     f"missing or empty) while the checkpoint's chain had {records} records (head record "
                     f"{records - 1}, sha256 {head}): that evidence is lost from this directory. The chain continues "
                     "in a NEW ledger there, numbered from 0, rooted in the checkpoint's reference and anchored at "
                     f"the chain's current anchor (step {chain.anchor.step}, saved as {run.parent_anchor_path.name}, "
                     "which records the loss); it verifies on its own, and audits of older checkpoints report the "
                     "lost records. To keep one ledger instead, stop, restore the directory from a backup and "
                     "resume again")
            initial_sha = _first_anchor_sha(chain, run, continues)
            controls_sha = file_sha256(run.controls_path) if len(chain.controls) else None
            ledger, moved = run.open_ledger(chain.cursor.next_index, chain.cursor.last_sha256,
                                            reference_sha256=reference_sha,
                                            controls_sha256=controls_sha, initial_anchor_sha256=initial_sha,
                                            lock=lock, signer=signer)
            chain.attach_ledger(ledger)
            if moved:
                warn(moved)
        except InputError as exc:
            error = str(exc)
    error, lost = processes.broadcast((error, lost))
    if error is not None:
        raise InputError(error)
    if lost and not processes.is_writer:
        chain.continue_in_new_ledger()


def _first_anchor_sha(chain: CustodyChain, run: RunDirectory, continues: dict[str, Any] | None) -> str | None:
    """The sha256 of the ledger's first-anchor file: written when a new ledger starts, the file's own on a resume."""
    path = run.parent_anchor_path
    initial, cursor = chain.initial_anchor, chain.cursor
    if cursor.next_index > 0 and cursor.last_sha256 is not None:  # the ledger goes on: its first anchor is the file's
        if initial is not None and not path.exists():  # a child run's file, deleted: written again as it was
            save_parent_anchor(run.path, initial.features, initial.step)
        return file_sha256(path) if path.exists() else None
    if initial is None:
        return None
    if continues is not None or not path.exists() or not _same_anchor(path, initial):
        save_parent_anchor(run.path, initial.features, initial.step, continues)
    return file_sha256(path)


def _same_anchor(path: Any, anchor: Anchor) -> bool:
    try:
        features, step = load_parent_anchor(path)
    except Exception:  # an unreadable file is rewritten
        return False
    stored = storage_features(anchor.features)
    return step == anchor.step and features.dtype == stored.dtype and torch.equal(features, stored)


def _ensure_controls(chain: CustodyChain, run: RunDirectory | None, processes: Processes,
                     source: ControlsSource) -> None:
    """The chain's controls: restored with its state, loaded from the file, or built (split over the processes).

    A build over several processes (``processes.world`` > 1: :func:`_build_split`) is split: rank
    ``r`` of ``w`` builds and probes the controls ``i`` with ``i % w == r`` (each a rank-local fresh
    init: no collective inside ``source.build``), then one ``processes.all_gather`` hands every rank
    every control, in seed order.
    Every rank runs that one gather whatever happened (its own build's error rides in it), so a
    failing rank raises on all of them instead of leaving the others waiting.
    """
    seeds, spec = control_seeds(source.num_controls), chain.reference.spec
    if not seeds:
        chain.use_controls(ControlSet.none())
        return
    restored = chain.controls.matches(spec, chain.reference.features.shape) and chain.controls.seeds == seeds
    if not restored and source.file is not None:
        source.file.check_fits(spec, source.identity.get("config_digest"), source.file_path)
        chain.use_controls(source.file)
        restored = True
    if not restored:
        if processes.world <= 1:
            built = source.build(seeds, spec)
            chain.use_controls(dataclasses.replace(built, features=processes.broadcast(built.features)))
        else:
            chain.use_controls(_build_split(source, seeds, spec, processes))
    if run is not None and processes.is_writer and (not restored or not run.controls_path.exists()):
        chain.controls.save(run.controls_path, **source.identity)


def _build_split(source: ControlsSource, seeds: tuple[int, ...], spec: ProbeSpec, processes: Processes) -> ControlSet:
    """Rank ``rank`` builds ``seeds[rank::world]``; ``processes.all_gather`` assembles every control on every rank."""
    rank, world = processes.rank, processes.world
    mine = seeds[rank::world]
    payload: dict[str, Any] = {"error": None, "set": None}
    if mine:
        try:
            built = source.build(mine, spec)
            payload["set"] = dataclasses.replace(built, features=built.features.to("cpu").contiguous())
        except Exception as exc:  # every rank still joins the gather below, then raises
            payload["error"] = f"rank {rank}: {type(exc).__name__}: {exc}"
    parts = processes.all_gather(payload)
    errors = [part["error"] for part in parts if part["error"] is not None]
    if errors:
        raise InputError("building the controls failed on " + "; ".join(errors))
    features: list[torch.Tensor | None] = [None] * len(seeds)
    first: ControlSet | None = None
    for r, part in enumerate(parts):
        built = part["set"]
        if built is None:
            continue
        first = first or built
        for j, feature in enumerate(built.features):
            features[r + j * world] = feature
    assert first is not None and all(f is not None for f in features)
    schemes = [part["set"].init_scheme for part in parts if part["set"] is not None]

    return dataclasses.replace(
        first, features=torch.stack(features), seeds=seeds,
        description=f"{len(seeds)} fresh inits (seeds {seeds[0]}..{seeds[-1]}), built across {world} processes",
        init_scheme=init_scheme_of([s for s in schemes if s is not None]) if all(schemes) else None)
