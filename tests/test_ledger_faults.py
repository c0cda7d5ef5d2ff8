"""The custody ledger under faults: a write that fails or is cut short never reads as tampering.

A record is appended whole or not at all (``CustodyLedger._write``): a failed write (an injected
``OSError`` midway, a real ``RLIMIT_FSIZE`` limit, a full tmpfs) is cut back before it raises, so
the chain does not advance and training can go on. A crash mid-write leaves a torn last line:
the audit tells it from an edited line (a note, exit 0), and the writer moves it to
``custody.torn-<i>.txt`` before it appends again. Blank lines are skipped with a note.
``--ledger`` outside the run directory is an input error; a signed ledger resumed without the
key says how many records are unsigned; ``$SEEDPRINTS_SIGNING_KEY`` naming a missing file names
the variable; a deleted controls or first-anchor file is one "missing" problem.

Runs are fake (no model): features [N, D] = [64, 16], each probe the previous one plus
N(0, 0.3^2) noise (own links: z about 30, far above the custody threshold), as in test_custody.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fake_runs import write_birth_files

from seedprints_lightning import InputError, ProbeSpec
from seedprints_lightning.core.chain import Anchor, CustodyChain
from seedprints_lightning.core.files import file_sha256
from seedprints_lightning.core.ledger import (
    CONTROLS_FILE,
    PARENT_ANCHOR_FILE,
    LedgerRepairWarning,
    RunDirectory,
    save_parent_anchor,
    storage_features,
)
from seedprints_lightning.core.verify import verify_chain
from seedprints_lightning.offline.cli import EXIT_OK, EXIT_TAMPERED, EXIT_USAGE, main

N, D = 64, 16
SPEC = ProbeSpec(kind="token", num_samples=N, length=8, vocab_size=64, seed=7)
WEIGHTS = "ab" * 32  # a weights digest for save records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Run:
    """A run directory and the chain writing its ledger, fed with made-up drifting features."""

    dir: Path
    chain: CustodyChain
    generator: torch.Generator
    last: torch.Tensor

    @property
    def ledger_path(self) -> Path:
        return self.dir / "custody.jsonl"

    def probe(self, step: int, features: torch.Tensor | None = None) -> None:
        features = self.last + 0.3 * torch.randn(N, D, generator=self.generator) if features is None else features
        self.chain.observe(step, features)
        self.last = features

    def save(self, step: int) -> None:
        self.chain.record_save(step, WEIGHTS, checkpoint=f"step{step}.ckpt")

    def record(self, kind: str, step: int) -> None:
        self.save(step) if kind == "save" else self.probe(step)

    def resume(self, signer=None) -> str | None:
        """What a face does on resume from the chain's own state (a checkpoint of now): a new chain object."""
        state = self.chain.state_dict()
        ledger = self.chain.cursor.ledger
        if ledger is not None:
            ledger.close()
        self.chain = CustodyChain(controls=self.chain.controls, anchor=self.chain.initial_anchor)
        self.chain.load_state_dict(state)
        run = RunDirectory(self.dir)
        ledger, warning = run.open_ledger(
            self.chain.cursor.next_index, self.chain.cursor.last_sha256,
            reference_sha256=file_sha256(run.reference_path),
            controls_sha256=file_sha256(run.controls_path) if run.controls_path.exists() else None,
            initial_anchor_sha256=file_sha256(run.parent_anchor_path) if run.parent_anchor_path.exists() else None,
            signer=signer)
        self.chain.attach_ledger(ledger)
        return warning


def make_run(root: Path, *, controls: bool = True, signer=None, steps=(1, 2, 3), child: bool = False,
             seed: int = 0) -> Run:
    g = torch.Generator().manual_seed(seed)
    run_dir = RunDirectory(root / "seedprints")
    reference, control_set = write_birth_files(run_dir, SPEC, (N, D), g, controls=controls)
    anchor, last = None, reference.features
    if child:  # a child run: its chain starts at its parent's last held probe (parent_anchor.safetensors)
        last = reference.features + 0.3 * torch.randn(N, D, generator=g)
        save_parent_anchor(run_dir.path, last, 500)
        anchor = Anchor(storage_features(last), 500)
    chain = CustodyChain(reference, controls=control_set, anchor=anchor, reference_source="step0")
    ledger, _ = run_dir.open_ledger(
        0, None, reference_sha256=file_sha256(run_dir.reference_path),
        controls_sha256=file_sha256(run_dir.controls_path) if controls else None,
        initial_anchor_sha256=file_sha256(run_dir.parent_anchor_path) if child else None, signer=signer)
    chain.attach_ledger(ledger)
    run = Run(run_dir.path, chain, g, last)
    for step in steps:
        run.probe(step)
    return run


def _signer():
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from seedprints_lightning.core.signing import RecordSigner

    return RecordSigner(ed25519.Ed25519PrivateKey.generate())


def _audit(capsys, *argv) -> tuple[int, str]:
    code = main(["audit", "--chain", *map(str, argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out + captured.err


def _audit_json(capsys, run_dir: Path) -> tuple[int, dict]:
    code = main(["audit", "--chain", str(run_dir), "--json"])
    return code, json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------------------
# 1. A write that fails midway: cut back before it raises, for every kind of record
# --------------------------------------------------------------------------------------


def _inject(monkeypatch, ledger_path: Path, how: str) -> dict:
    """Make the next write to the ledger fail: ``"write"`` after half its bytes (ENOSPC), ``"fsync"`` once (EIO).

    Only the ledger's own file descriptor is touched (matched by inode), and only once: what a
    full disk or an I/O error does to the writer, after which space is freed and training goes on.
    """
    inode = ledger_path.stat().st_ino
    real_write, real_fsync = os.write, os.fsync
    state = {"armed": True, "written": 0}

    def ours(fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == inode
        except OSError:
            return False

    def write(fd, data):
        if state["armed"] and how == "write" and ours(fd):
            if state["written"]:
                state["armed"] = False
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            part = bytes(data[:max(1, len(data) // 2)])
            state["written"] = real_write(fd, part)
            return state["written"]
        return real_write(fd, data)

    def fsync(fd):
        if state["armed"] and how == "fsync" and ours(fd):
            state["armed"] = False
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_fsync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    return state


@pytest.mark.parametrize("how", ["write", "fsync"])
@pytest.mark.parametrize("kind", ["probe", "save", "signed probe", "signed save"])
def test_a_failed_write_is_cut_back_and_the_chain_goes_on(tmp_path, monkeypatch, capsys, kind, how) -> None:
    run = make_run(tmp_path, signer=_signer() if kind.startswith("signed") else None)
    before = run.ledger_path.read_bytes()
    cursor = run.chain.cursor
    probe_files = sorted((run.dir / "probes").iterdir())
    state = _inject(monkeypatch, run.ledger_path, how)
    with pytest.raises(OSError) as caught:
        run.record(kind.split()[-1], 4)
    assert caught.value.errno == (errno.ENOSPC if how == "write" else errno.EIO)
    assert not state["armed"]  # the fault did fire, inside the writer
    if how == "write":
        assert state["written"] > 0  # some bytes of the line reached the file before the failure
    # Whole or not at all: the file is as it was, the chain did not advance, no orphan probe file.
    assert run.ledger_path.read_bytes() == before
    assert run.chain.cursor.next_index == cursor.next_index and run.chain.cursor.last_sha256 == cursor.last_sha256
    assert sorted((run.dir / "probes").iterdir()) == probe_files
    monkeypatch.undo()  # space is freed: training goes on
    run.record(kind.split()[-1], 5)
    run.probe(6)
    audit = verify_chain(run.dir)
    assert audit.ok and len(audit.records) == 5 and not audit.notes, [p.message for p in audit.problems]
    if kind.startswith("signed"):
        assert len(audit.signed_by) == 1 and audit.unsigned == ()
    assert _audit(capsys, run.dir)[0] == EXIT_OK


# --------------------------------------------------------------------------------------
# Real faults in a child process: a file-size limit (EFBIG) and a full tmpfs (ENOSPC)
# --------------------------------------------------------------------------------------


def fault_scenario(root: str, mode: str) -> dict:
    """Run in a child process: a record write hits a real limit, then the limit is lifted and the run goes on.

    ``mode`` ``"rlimit"``: ``RLIMIT_FSIZE`` a little above the ledger's size, with SIGXFSZ
    ignored so the write gets EFBIG (a probe record: its small features file fits under the limit,
    its ledger line does not). ``"tmpfs"``: ``root`` is a small tmpfs, filled up to the last byte
    of the ledger's last page, so a save record's line gets ENOSPC after the bytes that fit.
    """
    import resource
    import signal

    torch.set_num_threads(1)
    run = make_run(Path(root), steps=(1, 2, 3))
    if mode == "tmpfs":  # a last page with some room, less than a line: the write must tear
        step = 10
        while not 100 < 4096 - run.ledger_path.stat().st_size % 4096 < 400:
            run.save(step)
            step += 1
        filler = Path(root) / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
    size = run.ledger_path.stat().st_size
    cursor = run.chain.cursor
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if mode == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 200, hard))
    failure = None
    try:
        run.record("probe" if mode == "rlimit" else "save", 1000)
    except OSError as exc:
        failure = errno.errorcode.get(exc.errno, str(exc.errno))
    after = run.ledger_path.stat().st_size
    advanced = run.chain.cursor != cursor
    if mode == "rlimit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    else:
        (Path(root) / "filler").unlink()
    run.probe(1001)
    run.save(1002)
    audit = verify_chain(run.dir)
    return {"failure": failure, "size_before": size, "size_after": after, "advanced": advanced,
            "ok": audit.ok, "records": len(audit.records), "notes": audit.notes,
            "problems": [p.message for p in audit.problems], "run": str(run.dir)}


_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_ledger_faults import fault_scenario
    print("RESULT " + json.dumps(fault_scenario({root!r}, {mode!r})))
""")


def _child(command: list[str], root: Path, mode: str) -> subprocess.CompletedProcess:
    code = _CHILD.format(tests=str(Path(__file__).parent), root=str(root), mode=mode)
    return subprocess.run([*command, sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _result(done: subprocess.CompletedProcess) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_a_file_size_limit_efbig_is_cut_back(tmp_path, capsys) -> None:
    result = _result(_child([], tmp_path, "rlimit"))
    assert result["failure"] == "EFBIG", result
    assert result["size_after"] == result["size_before"] and not result["advanced"], result
    assert result["ok"] and result["records"] == 5 and not result["notes"], result
    assert _audit(capsys, result["run"])[0] == EXIT_OK


def _unshare() -> list[str] | None:
    """A private mount namespace for the child (root, or an unprivileged user namespace), or None."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return None
    command = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    probe = subprocess.run([*command, "true"], capture_output=True)
    return command if probe.returncode == 0 else None


@pytest.mark.slow
def test_a_full_tmpfs_enospc_is_cut_back(tmp_path, capsys) -> None:
    command = _unshare()
    if command is None:
        pytest.skip("cannot mount a tmpfs here (no mount namespace: needs root or unprivileged user namespaces, "
                    "i.e. CAP_SYS_ADMIN); the injected OSError tests cover the writer everywhere")
    root = tmp_path / "small"
    root.mkdir()
    script = f"mount -t tmpfs -o size=256k tmpfs {root} && exec \"$@\""
    done = subprocess.run([*command, "sh", "-c", script, "sh", sys.executable, "-c",
                           _CHILD.format(tests=str(Path(__file__).parent), root=str(root), mode="tmpfs")],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "mount" in done.stderr and "RESULT" not in done.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    result = _result(done)
    assert result["failure"] == "ENOSPC", result
    assert result["size_after"] == result["size_before"] and not result["advanced"], result
    assert result["ok"] and not result["notes"] and not result["problems"], result


# --------------------------------------------------------------------------------------
# A crash mid-write: a torn last line is a note, and the writer moves it aside on resume
# --------------------------------------------------------------------------------------


def _tear(run: Run, size: int = 533) -> bytes:
    """What SIGKILL during a write leaves: the first ``size`` bytes of a record line, no line end."""
    fragment = run.ledger_path.read_bytes().splitlines()[-1][:size]
    with open(run.ledger_path, "ab") as handle:
        handle.write(fragment)
    return fragment


def test_a_torn_last_line_is_a_note_not_tampering_and_a_resume_moves_it_aside(tmp_path, capsys) -> None:
    run = make_run(tmp_path)
    head = (run.chain.cursor.next_index, run.chain.cursor.last_sha256)  # a checkpoint saved before the crash
    fragment = _tear(run)
    run.chain.cursor.ledger.close()  # the process died: the OS released its lock
    assert RunDirectory(run.dir).record_count() == 3  # the torn line is no record (a resume counts alike)
    code, out = _audit(capsys, run.dir)
    assert code == EXIT_OK, out
    assert "NOTE       line 4 of custody.jsonl is torn: 533 bytes" in out and "no sign of tampering" in out
    assert "PROBLEM" not in out and "3 records, every link held" in out
    code, data = _audit_json(capsys, run.dir)
    assert code == EXIT_OK and data["torn_line"] == 4 and data["records"] == 3 and data["problems"] == []
    assert verify_chain(run.dir, expected_head=head).ok  # the checkpoint before the crash still verifies
    # A checkpoint that chained PAST the torn line: that record was whole once (written before the chain moves on).
    late = verify_chain(run.dir, expected_head=(4, "0" * 64))
    assert late.tampered and any("removed from the end" in p.message and "torn" in p.message for p in late.problems)

    warning = run.resume()
    torn = run.dir / "custody.torn-0.txt"
    assert torn.read_bytes() == fragment  # kept, byte for byte
    assert warning is not None and "torn line" in warning and str(torn) in warning
    assert run.ledger_path.read_bytes().endswith(b"}\n")
    run.probe(4)
    run.save(5)
    code, out = _audit(capsys, run.dir)
    assert code == EXIT_OK and "5 records, every link held" in out, out
    assert "NOTE       custody.torn-0.txt (533 bytes) is a torn last line" in out

    # A second crash and resume: a new side file, the first one is not overwritten.
    second = _tear(run, 200)
    warning = run.resume()
    assert torn.read_bytes() == fragment and (run.dir / "custody.torn-1.txt").read_bytes() == second
    run.probe(6)
    audit = verify_chain(run.dir)
    assert audit.ok and len(audit.records) == 6 and audit.torn_files == ["custody.torn-0.txt", "custody.torn-1.txt"]


@pytest.mark.parametrize("holding", [True, False])
def test_an_append_never_starts_on_a_torn_line(tmp_path, holding) -> None:
    # holding: the writer still holds the lock (its own cut-back failed); else it closed the ledger
    # (between runs of one process) and another writer crashed there mid-write.
    run = make_run(tmp_path)
    if not holding:
        run.chain.cursor.ledger.close()
    fragment = _tear(run, 300)
    with pytest.warns(LedgerRepairWarning, match="torn line"):
        run.probe(4)
    assert (run.dir / "custody.torn-0.txt").read_bytes() == fragment
    audit = verify_chain(run.dir)
    assert audit.ok and len(audit.records) == 4 and audit.torn_line is None, [p.message for p in audit.problems]


def test_a_whole_record_without_its_line_end_gets_it(tmp_path) -> None:
    run = make_run(tmp_path)
    run.ledger_path.write_bytes(run.ledger_path.read_bytes()[:-1])  # a write cut right before its "\n"
    assert verify_chain(run.dir).ok
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: no evidence moved
        run.probe(4)
    assert not list(run.dir.glob("custody.torn-*"))
    audit = verify_chain(run.dir)
    assert audit.ok and len(audit.records) == 4


# --------------------------------------------------------------------------------------
# 2. Blank lines: skipped, with one note naming them
# --------------------------------------------------------------------------------------


def test_blank_lines_are_skipped_with_a_note(tmp_path, capsys) -> None:
    run = make_run(tmp_path)
    run.chain.cursor.ledger.close()
    lines = run.ledger_path.read_text().splitlines()
    run.ledger_path.write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2] + "\n\n")  # middle and trailing
    code, out = _audit(capsys, run.dir)
    assert code == EXIT_OK, out
    assert out.count("NOTE") == 1 and "lines 2, 5 of custody.jsonl are blank: skipped" in out
    assert "PROBLEM" not in out and "3 records, every link held" in out
    assert "record 1 (line 3" not in out  # no message about line numbers gone wrong
    code, data = _audit_json(capsys, run.dir)
    assert code == EXIT_OK and data["blank_lines"] == [2, 5]
    # The writer counts records alike: a resume at the head finds it and the chain goes on.
    assert run.resume() is None
    run.probe(4)
    audit = verify_chain(run.dir)
    assert audit.ok and len(audit.records) == 4 and audit.blank_lines == [2, 5]
    # An edited record is still named by its own line.
    text = run.ledger_path.read_text().replace('"event":"interval"', '"event":"edited"', 1)
    run.ledger_path.write_text(text)
    messages = [p.message for p in verify_chain(run.dir).problems]
    assert messages == ["record 1 (line 3 of custody.jsonl): prev_sha256 does not match the hash of the previous "
                        "record: a record before it was edited, removed or reordered"], messages


# --------------------------------------------------------------------------------------
# 3. --ledger outside the run directory, or not a ledger: an input error (exit 2)
# --------------------------------------------------------------------------------------


def test_a_ledger_outside_the_run_or_not_a_ledger_is_an_input_error(tmp_path, capsys) -> None:
    run = make_run(tmp_path)
    outside = tmp_path / "elsewhere.jsonl"
    shutil.copy(run.ledger_path, outside)
    for ledger in ("/etc/passwd", str(outside), "../elsewhere.jsonl"):
        code, out = _audit(capsys, run.dir, "--ledger", ledger)
        assert code == EXIT_USAGE, (ledger, out)
        assert "is not a file of the run directory" in out and "Leave --ledger out" in out and "tampered" not in out
        with pytest.raises(InputError, match="not a file of the run directory"):
            verify_chain(run.dir, ledger=ledger)
    code, out = _audit(capsys, run.dir, "--ledger", "reference.safetensors")
    assert code == EXIT_USAGE and "is not a custody ledger" in out and "custody.jsonl" in out, out
    code, out = _audit(capsys, run.dir, "--ledger", "custody.abandoned-7.jsonl")
    assert code != EXIT_TAMPERED and "does not exist" in out and "custody.jsonl" in out, out
    assert _audit(capsys, run.dir, "--ledger", "custody.jsonl")[0] == EXIT_OK


# --------------------------------------------------------------------------------------
# 4. Signed at first, resumed without the key: the audit says how many records are unsigned
# --------------------------------------------------------------------------------------


def test_a_signed_ledger_resumed_without_the_key_says_which_records_are_unsigned(tmp_path, capsys) -> None:
    signer = _signer()
    run = make_run(tmp_path, signer=signer, steps=(1, 2, 3, 4))
    run.resume(signer=None)
    for step in (5, 6, 7):
        run.probe(step)
    run.save(8)
    run.probe(9)
    audit = verify_chain(run.dir)
    assert audit.ok and audit.signed_by == (signer.key_id,) and audit.unsigned == (4, 5, 6, 7, 8)
    code, out = _audit(capsys, run.dir)
    assert code == EXIT_OK
    assert f"records 0-3 signed by key {signer.key_id}" in out
    assert "5 of 9 records are unsigned (records 4-8" in out and "signatures not checked" in out
    code, data = _audit_json(capsys, run.dir)
    assert data["unsigned_records"] == [4, 5, 6, 7, 8]
    # With the owner's key, each unsigned record is not vouched for: tampering, as before.
    (tmp_path / "pub.pem").write_text(signer.public_key_pem)
    assert _audit(capsys, run.dir, "--public-key", tmp_path / "pub.pem")[0] == EXIT_TAMPERED


# --------------------------------------------------------------------------------------
# 5. $SEEDPRINTS_SIGNING_KEY naming a missing file: the error names the variable
# --------------------------------------------------------------------------------------


def test_a_missing_key_file_from_the_environment_names_the_variable(tmp_path, monkeypatch) -> None:
    pytest.importorskip("cryptography")
    from seedprints_lightning import SeedPrintsMonitor
    from seedprints_lightning.core.signing import ENV_SIGNING_KEY, load_signing_key

    missing = tmp_path / "gone.pem"
    monkeypatch.setenv(ENV_SIGNING_KEY, str(missing))
    with pytest.raises(InputError, match=rf"\${ENV_SIGNING_KEY}.*gone\.pem.*does not exist") as caught:
        load_signing_key()
    assert "unset it" in str(caught.value)
    with pytest.raises(InputError, match=rf"\${ENV_SIGNING_KEY}.*gone\.pem"):
        SeedPrintsMonitor(save_dir=tmp_path / "run")  # checked when the face is made, before any step
    # A path passed as signing_key= is the user's own argument: named as it is, without the variable.
    with pytest.raises(InputError, match="gone.pem does not exist") as caught:
        SeedPrintsMonitor(save_dir=tmp_path / "run", signing_key=missing)
    assert ENV_SIGNING_KEY not in str(caught.value)
    # Key material in the variable is never echoed back.
    monkeypatch.setenv(ENV_SIGNING_KEY, "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InputError) as caught:
        load_signing_key()
    assert "not a key" not in str(caught.value) and "PEM text, not a path" in str(caught.value)


# --------------------------------------------------------------------------------------
# 6. A deleted controls or first-anchor file: one "missing" problem naming it
# --------------------------------------------------------------------------------------


def test_a_deleted_controls_file_is_one_missing_problem(tmp_path, capsys) -> None:
    run = make_run(tmp_path, steps=(1, 2, 3))
    run.probe(4, torch.randn(N, D, generator=run.generator))  # another model: a recorded broken link
    before = verify_chain(run.dir)
    assert [(p.index, p.kind) for p in before.problems] == [(3, "broken_link")]
    (run.dir / CONTROLS_FILE).unlink()
    audit = verify_chain(run.dir)
    kinds = sorted((p.kind, p.index) for p in audit.problems)
    assert kinds == [("broken_link", 3), ("missing", None)], [p.message for p in audit.problems]
    missing = next(p for p in audit.problems if p.kind == "missing")
    assert f"{CONTROLS_FILE} is missing" in missing.message and "records 0-3 were made with it" in missing.message
    assert not any("other controls" in p.message for p in audit.problems)
    assert "(as recorded" in next(p for p in audit.problems if p.kind == "broken_link").message
    code, out = _audit(capsys, run.dir)
    assert code == EXIT_TAMPERED and out.count(CONTROLS_FILE) >= 1 and "hash mismatch" not in out


def test_a_deleted_first_anchor_file_is_one_missing_problem(tmp_path) -> None:
    run = make_run(tmp_path, child=True, steps=(501, 502, 503, 504))
    assert verify_chain(run.dir).ok
    (run.dir / PARENT_ANCHOR_FILE).unlink()
    audit = verify_chain(run.dir)
    assert [p.kind for p in audit.problems] == ["missing"], [p.message for p in audit.problems]
    message = audit.problems[0].message
    assert f"{PARENT_ANCHOR_FILE} is missing" in message and "records 0-3 were made with it" in message
    assert not any("another first anchor" in p.message for p in audit.problems)
