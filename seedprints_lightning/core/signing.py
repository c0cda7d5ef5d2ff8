"""Ed25519 signatures of custody-ledger records (optional extra: ``pip install 'seedprints-lightning[sign]'``).

The hash chain of ``custody.jsonl`` shows that no record was edited, removed or reordered *unless
the whole chain after it was re-hashed*: anyone who can write the run directory can rewrite a
record and recompute every later ``prev_sha256``. A signature by a key the writer of the run
holds (and the editor does not) closes that gap.

What is signed
--------------
A record's **canonical line without its signature**: the record dict minus the ``signature``
field, serialised exactly as :class:`~seedprints_lightning.core.ledger.CustodyLedger` writes a line
(``json.dumps(sort_keys=True, separators=(",", ":"), allow_nan=False)``, UTF-8). Since every
record holds ``prev_sha256`` (the previous line's hash, or the reference file's for the first),
``features_sha256``, ``reference_sha256`` and ``controls_sha256``, one signature covers the
record's verdicts, its probe's features file, the run's reference and controls, and (through
``prev_sha256``) every earlier line.

Where the signature lives
-------------------------
Inside the same record, in one extra field::

    "signature": {"alg": "ed25519", "key_id": "<sha256 hex of the public key (DER SubjectPublicKeyInfo)>",
                  "sig": "<base64 of the 64-byte signature>"}

and the line written to the ledger is the canonical line of the record *with* that field. So
the existing hash chain is unchanged in form (``prev_sha256`` = sha256 of the previous line as
written) and now also covers the previous record's signature: removing or replacing a
signature changes its line and breaks the next record's ``prev_sha256``, which ``verify_chain``
already reports without any key. ``verify_chain`` accepts the field (fields beyond those it
checks are allowed). The consequence: a ledger can only be signed as it is written (signing an
existing ledger afterwards would change every line and so every later ``prev_sha256``: it means
rewriting the chain). Cutting records from the END is not shown by signatures either (as for
the hash chain, the checkpoint's ledger head is what shows it).

No cryptography is implemented here: keys, signing and verification are the ``cryptography``
package's Ed25519 (imported lazily, so the package works without it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import InputError
from .records import canonical_json

__all__ = [
    "ENV_SIGNING_KEY",
    "SIGNATURE_FIELD",
    "RecordSigner",
    "SigningUnavailableError",
    "check_signed_ledger",
    "check_signer",
    "key_id_of",
    "load_public_key",
    "load_signing_key",
    "sign_ledger_line",
    "signed_payload",
    "verify_record",
]

#: Environment variable holding the PATH of the PEM Ed25519 private key (never the key itself).
ENV_SIGNING_KEY = "SEEDPRINTS_SIGNING_KEY"
#: The record field that holds the signature (left out of what is signed).
SIGNATURE_FIELD = "signature"
_ALG = "ed25519"


class SigningUnavailableError(InputError, ImportError):
    """The optional ``cryptography`` package is not installed."""


def _crypto() -> tuple[Any, Any, Any]:
    """``(serialization, ed25519 module, InvalidSignature)`` from ``cryptography``, imported on first use."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise SigningUnavailableError(
            "signing custody records needs the 'cryptography' package: pip install 'seedprints-lightning[sign]'"
        ) from exc
    return serialization, ed25519, InvalidSignature


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------


def _read_pem(source: str | os.PathLike | bytes, what: str) -> tuple[bytes, str]:
    """``(PEM bytes, name for messages)``: ``source`` is PEM text/bytes or a file path."""
    if isinstance(source, bytes):
        return source, f"the {what} given"
    if isinstance(source, str) and source.lstrip().startswith("-----BEGIN"):
        return source.encode("ascii", "replace"), f"the {what} given"
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"the {what} must be a PEM file path or PEM text, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise InputError(f"cannot read {what} file {path}: {exc.strerror}") from None


def load_signing_key(path_or_pem: str | os.PathLike | bytes | None = None) -> RecordSigner:
    """A :class:`RecordSigner` from an unencrypted PEM Ed25519 private key (PKCS#8, as openssl genpkey writes it).

    ``path_or_pem`` is the key file's path or its PEM text; ``None`` reads the path from the
    ``SEEDPRINTS_SIGNING_KEY`` environment variable. Raises :class:`InputError` naming the file
    (never showing its content) for a missing file, a file that is no PEM private key, an
    encrypted key, or a key of another type (RSA, EC, ...); a path read from the environment
    variable is named as coming from it, so the user knows which setting to fix.
    """
    _crypto()
    if path_or_pem is not None:
        return _load_signing_key(path_or_pem)
    env = os.environ.get(ENV_SIGNING_KEY)
    if not env:
        raise InputError(f"no signing key: pass one, or set {ENV_SIGNING_KEY} to the path of a PEM Ed25519 "
                         "private key file")
    try:
        return _load_signing_key(env)
    except SigningUnavailableError:
        raise
    except InputError as exc:
        shown = "PEM text, not a path" if "-----BEGIN" in env else repr(env)  # never echo key material
        raise InputError(f"${ENV_SIGNING_KEY} (the environment variable naming the run's signing key) is "
                         f"{shown}: {exc}. Set {ENV_SIGNING_KEY} to the path of a PEM Ed25519 private key file, or "
                         "unset it to write an unsigned ledger") from None


def _load_signing_key(path_or_pem: str | os.PathLike | bytes) -> RecordSigner:
    serialization, ed25519, _ = _crypto()
    data, name = _read_pem(path_or_pem, "signing key")
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise InputError(f"{name} is a public key; signing needs the PEM Ed25519 PRIVATE key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise InputError(f"{name} is an encrypted private key; seedprints needs an unencrypted PEM Ed25519 key "
                         "(keep it in a file only the training job can read)") from None
    except Exception as exc:  # noqa: BLE001 - cryptography raises several types for bad input
        raise InputError(f"{name} is not a PEM private key ({type(exc).__name__}); expected an Ed25519 key as written "
                         "by `openssl genpkey -algorithm ed25519`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InputError(f"{name} holds a {type(key).__name__.replace('PrivateKey', '').lstrip('_') or 'non-Ed25519'} "
                         "private key; seedprints signs with Ed25519 keys only (openssl genpkey -algorithm ed25519)")
    return RecordSigner(key)


def load_public_key(path: str | os.PathLike | bytes) -> Any:
    """An ``Ed25519PublicKey`` from a PEM public key file (or PEM text); :class:`InputError` otherwise."""
    serialization, ed25519, _ = _crypto()
    data, name = _read_pem(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise InputError(f"{name} is a PRIVATE key: give the public key (RecordSigner.public_key_pem, or "
                         "`openssl pkey -in KEY -pubout`), and keep the private key out of audits")
    try:
        key = serialization.load_pem_public_key(data)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{name} is not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise InputError(f"{name} is a {type(key).__name__} public key; seedprints verifies Ed25519 signatures only")
    return key


def key_id_of(public_key: Any) -> str:
    """sha256 hex of the public key's DER SubjectPublicKeyInfo: the ``key_id`` stored with each signature."""
    serialization, ed25519, _ = _crypto()
    if isinstance(public_key, RecordSigner):
        return public_key.key_id
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise InputError(f"expected an Ed25519 public key (load_public_key(path)), got {type(public_key).__name__}")
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


class RecordSigner:
    """Signs ledger lines with an Ed25519 private key it holds and never shows.

    ``repr`` shows the ``key_id`` only; pickling and copying raise ``TypeError``, so a signer
    never travels into a checkpoint (a face keeps it out of its state and takes it again on
    resume from ``signing_key=`` or :data:`ENV_SIGNING_KEY`).
    """

    __slots__ = ("__key", "_key_id", "_public_pem")

    def __init__(self, private_key: Any) -> None:
        serialization, ed25519, _ = _crypto()
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise InputError(f"RecordSigner needs an Ed25519 private key (load_signing_key(path)), got "
                             f"{type(private_key).__name__}")
        self.__key = private_key
        public = private_key.public_key()
        self._public_pem = public.public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
        self._key_id = key_id_of(public)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key_pem(self) -> str:
        return self._public_pem

    @property
    def public_key(self) -> Any:
        return self.__key.public_key()

    def sign(self, line: str) -> str:
        """The base64 Ed25519 signature of ``line``'s UTF-8 bytes."""
        if not isinstance(line, str):
            raise InputError(f"RecordSigner.sign needs the record's line as str, got {type(line).__name__}")
        return base64.b64encode(self.__key.sign(line.encode("utf-8"))).decode("ascii")

    def __repr__(self) -> str:
        return f"RecordSigner(alg='{_ALG}', key_id='{self._key_id}')"

    __str__ = __repr__

    def _refuse(self, *_: Any) -> Any:
        raise TypeError("a RecordSigner holds a private key and cannot be pickled or copied (keep it out of "
                        "checkpoints; load it again with load_signing_key)")

    __reduce_ex__ = __reduce__ = __getstate__ = __copy__ = __deepcopy__ = _refuse


# --------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------


def check_signer(signer: Any) -> None:
    """Raise :class:`InputError` unless ``signer`` is a :class:`RecordSigner` or ``None`` (no signing).

    Args:
        signer: what a face or the ledger writer was given as ``signer``.
    """
    if signer is not None and not isinstance(signer, RecordSigner):
        raise InputError(f"signer must be a RecordSigner (seedprints_lightning.core.signing.load_signing_key(path)) or "
                         f"None, got {type(signer).__name__}")


def signed_payload(record: dict[str, Any]) -> str:
    """The line a signature covers: the record's canonical JSON line without its ``signature`` field."""
    if not isinstance(record, dict):
        raise InputError(f"a ledger record is a dict, got {type(record).__name__}")
    return canonical_json({k: v for k, v in record.items() if k != SIGNATURE_FIELD})


def sign_ledger_line(signer: RecordSigner, record: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` with its ``signature`` field; write ``canonical_json(result)`` as the ledger line.

    The record must not be signed already (re-signing would hide which key signed first).
    """
    if not isinstance(signer, RecordSigner):
        raise InputError(f"signer must be a RecordSigner (load_signing_key(...)), got {type(signer).__name__}")
    if SIGNATURE_FIELD in record:
        raise InputError(f"the record already has a {SIGNATURE_FIELD!r} field")
    signature = {"alg": _ALG, "key_id": signer.key_id, "sig": signer.sign(signed_payload(record))}
    return {**record, SIGNATURE_FIELD: signature}


def verify_record(public_key: Any, line_without_signature: str, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``public_key``'s Ed25519 signature of ``line_without_signature``."""
    _, ed25519, invalid = _crypto()
    if isinstance(public_key, RecordSigner):
        public_key = public_key.public_key
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise InputError(f"expected an Ed25519 public key (load_public_key(path)), got {type(public_key).__name__}")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return False
    try:
        public_key.verify(raw, line_without_signature.encode("utf-8"))
    except invalid:
        return False
    return True


def check_signed_ledger(lines: Iterable[str | bytes], public_key: Any) -> list[tuple[int, str]]:
    """Every line that ``public_key`` does not vouch for, as ``(line number from 0, problem)``.

    Problems: a line that is no JSON object, an unsigned record, a malformed signature field, a
    record signed by another key (its ``key_id`` names it), and a signature that does not match
    (the record was edited after it was signed, whether or not the chain was re-hashed after
    it). An empty list means every record was signed by this key as it stands. The hash chain
    itself is ``verify_chain``'s (run both).
    """
    expected = key_id_of(public_key)
    problems: list[tuple[int, str]] = []
    for line_no, raw in enumerate(lines):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        text = text.rstrip("\r\n")
        try:
            record = json.loads(text)
        except ValueError:
            problems.append((line_no, "is not valid JSON, so it cannot be a signed record"))
            continue
        if not isinstance(record, dict):
            problems.append((line_no, "is not a ledger record (a JSON object)"))
            continue
        signature = record.get(SIGNATURE_FIELD)
        if signature is None:
            problems.append((line_no, "is not signed: no 'signature' field (written without a signing key, or "
                                      "the signature was removed)"))
            continue
        if (not isinstance(signature, dict) or signature.get("alg") != _ALG
                or not isinstance(signature.get("key_id"), str) or not isinstance(signature.get("sig"), str)):
            problems.append((line_no, "has a malformed 'signature' field (expected alg 'ed25519', key_id, sig)"))
            continue
        if signature["key_id"] != expected:
            problems.append((line_no, f"is signed by another key (key_id {signature['key_id'][:16]}..., expected "
                                      f"{expected[:16]}...)"))
            continue
        if not verify_record(public_key, signed_payload(record), signature["sig"]):
            problems.append((line_no, "has a signature that does not match its content: the record was edited "
                                      "after it was signed"))
    return problems
