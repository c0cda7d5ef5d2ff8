"""atomic_write: the one way this package writes a file (fingerprints, controls, ledger, corpus)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from seedprints_lightning.core.files import atomic_write, file_sha256, save_safetensors


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path) -> None:
    target = tmp_path / "sub" / "out.bin"
    assert atomic_write(target, lambda tmp: tmp.write_bytes(b"first")) == target
    atomic_write(target, lambda tmp: tmp.write_bytes(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_failed_safetensors_write_leaves_nothing(tmp_path) -> None:
    target = tmp_path / "f.safetensors"
    with pytest.raises(Exception):  # safetensors refuses non-string metadata values
        save_safetensors(target, {"x": torch.zeros(2)}, {"key": 3})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_file_sha256_is_the_sha_of_the_bytes(tmp_path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 5000  # more than one 1 MiB read block
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
