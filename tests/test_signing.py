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
    from conftest import make_tiny_lm

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
    data = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    for step in (1, 2, 3):
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(model, step)
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
