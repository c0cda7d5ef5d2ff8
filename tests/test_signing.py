"""seedprints_lightning.core.signing: Ed25519 signatures of custody records (keys generated here, none committed)."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import sys

import pytest

pytest.importorskip("cryptography")
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402

from seedprints_lightning.core.errors import InputError  # noqa: E402
from seedprints_lightning.core.ledger import _canonical, line_sha256  # noqa: E402
from seedprints_lightning.core.signing import (  # noqa: E402
    ENV_SIGNING_KEY,
    RecordSigner,
    SigningUnavailableError,
    check_signed_ledger,
    key_id_of,
    load_public_key,
    load_signing_key,
    sign_ledger_line,
    signed_payload,
    verify_record,
)


def _pem(key, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _secret(key) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


@pytest.fixture()
def key_file(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "signing.pem"
    path.write_bytes(_pem(key))
    return path, key


def _ledger(signer: RecordSigner | None, count: int = 3) -> list[str]:
    """A hash chain of ``count`` records as CustodyLedger writes them (signed when ``signer``)."""
    lines, prev = [], "0" * 64
    for i in range(count):
        record = {"index": i, "step": 10 * i, "related": True, "link": {"z": 50.5 + i, "threshold": 7.25},
                  "prev_sha256": prev}
        if signer is not None:
            record = sign_ledger_line(signer, record)
        lines.append(_canonical(record))
        prev = line_sha256(lines[-1])
    return lines


def test_round_trip(key_file, tmp_path) -> None:
    path, key = key_file
    signer = load_signing_key(path)
    assert signer.key_id == hashlib.sha256(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    (tmp_path / "pub.pem").write_text(signer.public_key_pem)
    public = load_public_key(tmp_path / "pub.pem")
    assert key_id_of(public) == signer.key_id
    lines = _ledger(signer)
    assert check_signed_ledger(lines, public) == []
    assert check_signed_ledger([line.encode() + b"\n" for line in lines], public) == []  # bytes lines as read
    record = json.loads(lines[1])
    assert record["signature"]["alg"] == "ed25519" and record["signature"]["key_id"] == signer.key_id
    payload = signed_payload(record)
    assert "signature" not in json.loads(payload)
    assert verify_record(public, payload, record["signature"]["sig"])
    assert not verify_record(public, payload + " ", record["signature"]["sig"])
    assert not verify_record(public, payload, "not base64!")
    assert load_signing_key(path.read_bytes()).key_id == signer.key_id  # PEM bytes work too
    with pytest.raises(InputError, match="already"):
        sign_ledger_line(signer, record)


def test_another_key_unsigned_and_edited_records_fail(key_file) -> None:
    signer = load_signing_key(key_file[0])
    other = RecordSigner(ed25519.Ed25519PrivateKey.generate())
    lines = _ledger(signer)
    assert [n for n, _ in check_signed_ledger(lines, other.public_key)] == [0, 1, 2]
    assert "another key" in check_signed_ledger(lines, other.public_key)[0][1]

    unsigned = _ledger(None)
    problems = check_signed_ledger(unsigned, signer.public_key)
    assert [n for n, _ in problems] == [0, 1, 2] and all("not signed" in m for _, m in problems)

    # Edit record 1's figure and re-hash the chain after it: the hash chain is consistent again,
    # but record 1's signature no longer matches and record 2 (new prev_sha256) fails too.
    records = [json.loads(line) for line in lines]
    records[1]["link"]["z"] = 99.0
    rehashed, prev = [], None
    for record in records:
        if prev is not None:
            record["prev_sha256"] = prev
        rehashed.append(_canonical(record))
        prev = line_sha256(rehashed[-1])
    problems = check_signed_ledger(rehashed, signer.public_key)
    assert [n for n, _ in problems] == [1, 2] and all("edited" in m for _, m in problems)

    # A signature stripped or forged with our key_id; a damaged line.
    stripped = json.loads(lines[0])
    del stripped["signature"]
    forged = sign_ledger_line(other, json.loads(signed_payload(json.loads(lines[2]))))
    forged["signature"]["key_id"] = signer.key_id
    mixed = [_canonical(stripped), lines[1], _canonical(forged), "{not json", json.dumps({"signature": "x"})]
    problems = dict(check_signed_ledger(mixed, signer.public_key))
    assert sorted(problems) == [0, 2, 3, 4]
    assert "not signed" in problems[0] and "edited" in problems[2] and "JSON" in problems[3]
    assert "malformed" in problems[4]


def test_key_file_errors_name_the_file_never_the_key(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_signing_key(tmp_path / "missing.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InputError, match="bad.pem is not a PEM private key"):
        load_signing_key(bad)
    for name, key in (("rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                      ("ec.pem", ec.generate_private_key(ec.SECP256R1()))):
        (tmp_path / name).write_bytes(_pem(key))
        with pytest.raises(InputError, match=f"{name} holds a .* private key; seedprints signs with Ed25519") as info:
            load_signing_key(tmp_path / name)
        assert "BEGIN" not in str(info.value)
    secret = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "enc.pem").write_bytes(_pem(secret, password=b"pw"))
    with pytest.raises(InputError, match="enc.pem is an encrypted private key"):
        load_signing_key(tmp_path / "enc.pem")
    (tmp_path / "plain.pem").write_bytes(_pem(secret))
    signer = load_signing_key(tmp_path / "plain.pem")
    (tmp_path / "pub.pem").write_text(signer.public_key_pem)
    with pytest.raises(InputError, match="is a public key"):
        load_signing_key(tmp_path / "pub.pem")
    with pytest.raises(InputError, match="is a PRIVATE key"):
        load_public_key(tmp_path / "plain.pem")
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(InputError, match="junk.pem is not a PEM public key"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(InputError, match="does not exist"):
        load_public_key(tmp_path / "nope.pem")
    with pytest.raises(InputError, match="Ed25519 private key"):
        RecordSigner(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def test_env_var(key_file, monkeypatch) -> None:
    path, _ = key_file
    monkeypatch.delenv(ENV_SIGNING_KEY, raising=False)
    with pytest.raises(InputError, match=ENV_SIGNING_KEY):
        load_signing_key()
    monkeypatch.setenv(ENV_SIGNING_KEY, str(path))
    assert load_signing_key().key_id == load_signing_key(path).key_id
    monkeypatch.setenv(ENV_SIGNING_KEY, str(path) + ".missing")
    with pytest.raises(InputError, match="missing does not exist"):
        load_signing_key()


def test_repr_pickle_and_copy_never_expose_the_key(key_file) -> None:
    path, key = key_file
    signer = load_signing_key(path)
    secret, pem = _secret(key), path.read_text()
    for text in (repr(signer), str(signer), f"{signer}"):
        assert signer.key_id in text and "PRIVATE" not in text and secret.hex() not in text
        assert pem.splitlines()[1] not in text
    for attempt in (lambda: pickle.dumps(signer), lambda: copy.copy(signer), lambda: copy.deepcopy(signer),
                    lambda: pickle.dumps({"state": [signer]})):
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            attempt()
    assert not hasattr(signer, "__dict__")
    torch = pytest.importorskip("torch")
    import io

    with pytest.raises(TypeError):
        torch.save({"seedprints": signer}, io.BytesIO())


def test_missing_extra_names_it(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)  # import cryptography -> ImportError
    with pytest.raises(SigningUnavailableError, match=r"seedprints-lightning\[sign\]"):
        load_signing_key("whatever.pem")
    assert issubclass(SigningUnavailableError, InputError) and issubclass(SigningUnavailableError, ImportError)


def test_a_signed_ledger_still_verifies_as_a_chain(tmp_path, key_file) -> None:
    """Records signed as CustodyLedger would sign them (signature inside the written line) pass verify_chain."""
    import torch
    from conftest import make_tiny_lm, train_and_probe

    from seedprints_lightning import ProbeSpec, verify_chain
    from seedprints_lightning.core.files import file_sha256
    from seedprints_lightning.core.ledger import REFERENCE_FILE
    from seedprints_lightning.faces.monitor import SeedPrintsMonitor

    signer = load_signing_key(key_file[0])
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    run = tmp_path / "seedprints"
    monitor = SeedPrintsMonitor(every_n_steps=4, probe=ProbeSpec(num_samples=100, length=8), num_controls=1,
                                save_dir=run)
    monitor.start(model)
    train_and_probe(model, optimizer, monitor, (1, 2, 3))
    # What a signing CustodyLedger.append writes: each record signed, chained to the previous signed line.
    prev, signed = file_sha256(run / REFERENCE_FILE), []
    for line in (run / "custody.jsonl").read_text().splitlines():
        record = dict(json.loads(line), prev_sha256=prev)
        signed.append(_canonical(sign_ledger_line(signer, record)))
        prev = line_sha256(signed[-1])
    (run / "custody.jsonl").write_text("".join(line + "\n" for line in signed))
    audit = verify_chain(run)
    assert audit.ok and len(audit.records) == 3, audit.problems
    assert check_signed_ledger((run / "custody.jsonl").read_bytes().splitlines(), signer.public_key) == []
    # Stripping a signature breaks the next record's prev_sha256: the chain shows it without a key.
    first = json.loads(signed[0])
    del first["signature"]
    (run / "custody.jsonl").write_text("".join(line + "\n" for line in [_canonical(first), *signed[1:]]))
    assert [p.kind for p in verify_chain(run).problems] == ["tampered"]


# --------------------------------------------------------------------------------------
# Signed ledgers written through open_chain, verified by verify_chain and `seedprints audit --chain`
# --------------------------------------------------------------------------------------

SIGNED_SPEC_SAMPLES = 100


def _run(root, signer=None, steps=8, seed=0):
    """A hand-written loop (open_chain + CustodyChain.observe) writing ROOT/seedprints; returns (run path, chain)."""
    import torch
    from conftest import make_tiny_lm, open_test_chain, train_and_observe

    from seedprints_lightning import ProbeSpec
    from seedprints_lightning.core.ledger import RunDirectory
    from seedprints_lightning.core.opening import close_chain

    torch.set_num_threads(1)
    model = make_tiny_lm(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spec = ProbeSpec(num_samples=SIGNED_SPEC_SAMPLES, length=8).resolve(model)
    run = RunDirectory(root / "seedprints")
    chain = open_test_chain(model, run.path, spec, signer=signer)
    train_and_observe(model, optimizer, chain, spec, range(1, steps + 1), seed=seed)
    close_chain(chain)
    return run.path, chain


def _audit(capsys, *argv):
    from seedprints_lightning.offline.cli import main

    code = main(["audit", "--chain", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def signed_runs(tmp_path_factory):
    """The owner's key pair, another key, and three runs: signed by the owner, by the other key, unsigned."""
    root = tmp_path_factory.mktemp("signed")
    owner_key, other_key = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    (root / "owner.pem").write_bytes(_pem(owner_key))
    owner = load_signing_key(root / "owner.pem")
    (root / "owner.pub.pem").write_text(owner.public_key_pem)
    other = RecordSigner(other_key)
    owned, chain = _run(root / "owned", owner)
    thief, _ = _run(root / "thief", other)
    unsigned, _ = _run(root / "unsigned", None)
    return {"root": root, "owner": owner, "pub": root / "owner.pub.pem", "owned": owned, "thief": thief,
            "unsigned": unsigned, "chain": chain}


def test_the_owners_run_verifies_and_says_it_is_signed(signed_runs, capsys):
    import io

    import torch

    from seedprints_lightning import verify_chain

    run, owner = signed_runs["owned"], signed_runs["owner"]
    lines = (run / "custody.jsonl").read_bytes().splitlines()
    assert len(lines) >= 5 and all(json.loads(line)["signature"]["key_id"] == owner.key_id for line in lines)
    audit = verify_chain(run, public_key=signed_runs["pub"])
    assert audit.ok and audit.verified_key == owner.key_id and audit.signed_by == (owner.key_id,), audit.problems
    assert f"signed by key {owner.key_id}" in audit.evidence
    code, out, err = _audit(capsys, run, "--public-key", signed_runs["pub"])
    assert code == 0, out + err
    assert f"signed by key {owner.key_id}: every record's signature verified" in out
    # Without --public-key: as before, and the evidence says who signed (not checked).
    code, out, _ = _audit(capsys, run)
    assert code == 0 and f"records signed by key {owner.key_id} (signatures not checked" in out
    # The signer is in no state: the chain's state saves as before and holds no key material.
    state = signed_runs["chain"].state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert b"PRIVATE" not in buffer.getvalue() and "signer" not in state


def test_another_key_or_no_signature_is_tampering(signed_runs, capsys):
    from seedprints_lightning import verify_chain

    for name, words in (("thief", "signed by another key"), ("unsigned", "is not signed")):
        run = signed_runs[name]
        assert verify_chain(run).ok  # the hash chain alone is intact
        audit = verify_chain(run, public_key=signed_runs["owner"].public_key)
        assert not audit.ok and {p.kind for p in audit.problems} == {"tampered"}
        assert [p.index for p in audit.problems] == list(range(len(audit.records)))
        code, out, _ = _audit(capsys, run, "--public-key", signed_runs["pub"])
        assert code == 5 and "PROBLEM    [tampered] record 0 (line 1 of custody.jsonl)" in out and words in out, out


def test_an_edited_record_with_the_chain_rehashed_fails(signed_runs, tmp_path, capsys):
    import shutil

    from seedprints_lightning import verify_chain
    from seedprints_lightning.core.files import file_sha256

    run = tmp_path / "seedprints"
    shutil.copytree(signed_runs["owned"], run, ignore=shutil.ignore_patterns("custody.lock"))
    records = [json.loads(line) for line in (run / "custody.jsonl").read_text().splitlines()]
    # The forger edits record 2 (a claim in it) and re-hashes every record after it; with another key
    # of their own they may re-sign it, and the chain is consistent again.
    records[2]["event"] = "forged"
    del records[2]["signature"]
    records[2] = sign_ledger_line(RecordSigner(ed25519.Ed25519PrivateKey.generate()), records[2])
    prev = file_sha256(run / "reference.safetensors")
    lines = []
    for record in records:
        record["prev_sha256"] = prev
        lines.append(_canonical(record))
        prev = line_sha256(lines[-1])
    (run / "custody.jsonl").write_text("".join(line + "\n" for line in lines))
    assert verify_chain(run).ok  # the hash chain cannot tell
    audit = verify_chain(run, public_key=signed_runs["pub"])
    assert sorted(p.index for p in audit.problems) == list(range(2, len(records)))
    code, out, _ = _audit(capsys, run, "--public-key", signed_runs["pub"])
    assert code == 5 and "record 2 (line 3 of custody.jsonl) is signed by another key" in out
    assert "record 3 (line 4 of custody.jsonl) has a signature that does not match its content" in out


def test_public_key_errors_are_one_line(signed_runs, tmp_path, capsys):
    run = signed_runs["owned"]
    code, _, err = _audit(capsys, run, "--public-key", tmp_path / "missing.pem")
    assert code == 3 and err.count("\n") == 1 and "missing.pem: no such file" in err
    (tmp_path / "bad.pem").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    code, _, err = _audit(capsys, run, "--public-key", tmp_path / "bad.pem")
    assert code == 2 and err.count("\n") == 1 and "bad.pem is not a PEM public key" in err
    rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    (tmp_path / "rsa.pub.pem").write_bytes(rsa_public.public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    code, _, err = _audit(capsys, run, "--public-key", tmp_path / "rsa.pub.pem")
    assert code == 2 and "Ed25519 signatures only" in err
    code, _, err = _audit(capsys, run, "--public-key", signed_runs["root"] / "owner.pem")
    assert code == 2 and "is a PRIVATE key" in err and "BEGIN" not in err
    from seedprints_lightning.offline.cli import main

    assert main(["audit", "ref.safetensors", "ck.ckpt", "--public-key", str(signed_runs["pub"])]) == 2


def test_open_chain_refuses_a_signer_that_is_not_one(tmp_path):
    from seedprints_lightning.core.ledger import RunDirectory

    with pytest.raises(InputError, match="signer must be a RecordSigner"):
        RunDirectory(tmp_path).open_ledger(0, None, reference_sha256="0" * 64, signer="key.pem")


def test_the_monitor_signs_with_signing_key(tmp_path, key_file, capsys):
    """Through the face, when it takes ``signing_key=`` (the faces pass ``signer=`` to open_chain)."""
    import inspect

    import torch
    from conftest import make_tiny_lm, train_and_probe

    from seedprints_lightning import ProbeSpec
    from seedprints_lightning.faces.monitor import SeedPrintsMonitor

    if "signing_key" not in inspect.signature(SeedPrintsMonitor.__init__).parameters:
        pytest.skip("SeedPrintsMonitor takes no signing_key yet")
    path, key = key_file
    torch.set_num_threads(1)
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = SeedPrintsMonitor(every_n_steps=4, probe=ProbeSpec(num_samples=100, length=8), num_controls=1,
                                save_dir=tmp_path / "seedprints", signing_key=path)
    assert str(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption()).hex()) not in repr(monitor.__dict__)
    monitor.start(model)
    train_and_probe(model, optimizer, monitor, (1, 2, 3))
    monitor.end(model)
    (tmp_path / "pub.pem").write_text(load_signing_key(path).public_key_pem)
    code, out, _ = _audit(capsys, tmp_path / "seedprints", "--public-key", tmp_path / "pub.pem")
    assert code == 0, out
    other = tmp_path / "other.pub.pem"
    other.write_text(RecordSigner(ed25519.Ed25519PrivateKey.generate()).public_key_pem)
    assert _audit(capsys, tmp_path / "seedprints", "--public-key", other)[0] == 5


def test_save_records_are_signed_too(tmp_path, key_file):
    from seedprints_lightning.core.ledger import CustodyLedger

    signer = load_signing_key(key_file[0])
    ledger = CustodyLedger(tmp_path, signer=signer)
    ledger.rewind_to("a" * 64, 0)
    record = ledger.record_save(3, "b" * 64)
    assert record["signature"]["key_id"] == signer.key_id and "signer" not in repr(ledger).replace("signed", "")
    assert check_signed_ledger((tmp_path / "custody.jsonl").read_bytes().splitlines(), signer.public_key) == []


@pytest.mark.parametrize("face", ["SeedPrintsMonitor", "SeedPrintsCallback", "SeedPrintsTrainerCallback",
                                  "SeedPrintsFabricCallback"])
def test_every_face_refuses_a_bad_signing_key_at_construction(tmp_path, monkeypatch, face):
    import seedprints_lightning

    cls = getattr(seedprints_lightning, face)
    (tmp_path / "junk.pem").write_text("not a key")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    for path, match in ((tmp_path / "missing.pem", "missing.pem"), (tmp_path / "junk.pem", "junk.pem"),
                        (tmp_path / "rsa.pem", "rsa.pem")):
        with pytest.raises(InputError, match=match):  # before any model or training step exists
            cls(save_dir=tmp_path / "run", signing_key=path)
    monkeypatch.setenv(ENV_SIGNING_KEY, str(tmp_path / "junk.pem"))  # the environment variable is checked alike
    with pytest.raises(InputError, match="junk.pem"):
        cls(save_dir=tmp_path / "run")
