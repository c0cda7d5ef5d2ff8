"""Tests of the offline corpus, the byte tokenizer, flat token files and TextDataModule."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from seedprints_lightning.core.errors import InputError
from seedprints_lightning.train import (
    DOCUMENT_SEPARATOR_ID,
    ByteTokenizer,
    TextDataModule,
    build_corpus,
    default_cache_dir,
    read_memmap,
    tokenize_directory,
    write_memmap,
)

SMALL = 40_000  # bytes per corpus: a dozen modules, built in well under a second


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SEEDPRINTS_CACHE", str(root))
    return root


def _read_all(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.txt"))}


def _text_dir(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


# ----------------------------------------------------------------------------- corpus


def test_default_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEEDPRINTS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "seedprints_lightning"
    monkeypatch.setenv("SEEDPRINTS_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_corpus_is_deterministic_nonempty_and_capped(tmp_path: Path, cache: Path) -> None:
    first = build_corpus("prose", max_bytes=SMALL)
    assert first.is_relative_to(cache)
    second = build_corpus("prose", cache_dir=tmp_path / "elsewhere", max_bytes=SMALL)
    files = _read_all(first)
    assert files, "corpus is empty"
    assert list(files) == sorted(files)
    assert files == _read_all(second)
    total = sum(len(data) for data in files.values())
    assert SMALL * 0.8 < total <= SMALL
    assert not list(cache.rglob(".tmp-*")), "a temporary build directory was left behind"


def test_corpus_is_reused_and_repaired(cache: Path) -> None:
    corpus = build_corpus("code", max_bytes=SMALL)
    files = _read_all(corpus)
    victim = sorted(corpus.glob("*.txt"))[0]
    mtime = victim.stat().st_mtime_ns
    assert build_corpus("code", max_bytes=SMALL) == corpus
    assert victim.stat().st_mtime_ns == mtime  # served from cache, not rebuilt
    victim.unlink()
    assert _read_all(build_corpus("code", max_bytes=SMALL)) == files


def test_prose_and_code_differ_and_prose_is_mostly_english(cache: Path) -> None:
    prose = b"".join(_read_all(build_corpus("prose", max_bytes=SMALL)).values()).decode()
    code = b"".join(_read_all(build_corpus("code", max_bytes=SMALL)).values()).decode()
    assert prose != code

    def code_line_fraction(text: str) -> float:
        lines = [line for line in text.splitlines() if line.strip()]
        pattern = re.compile(r"^\s*(def |class |import |from \w+ import |return\b|@\w+|\w+ = )")
        return sum(bool(pattern.match(line)) for line in lines) / len(lines)

    def word_fraction(text: str) -> float:
        return sum(ch.isalpha() or ch == " " for ch in text) / len(text)

    assert code_line_fraction(prose) < 0.03
    assert code_line_fraction(code) > 0.2
    assert word_fraction(prose) > 0.85 > word_fraction(code)
    assert '"""' not in code.split("\n", 3)[0]  # module docstrings are stripped from code
    assert "\x00" not in prose and "\x00" not in code


def test_code_corpus_stays_valid_python(cache: Path) -> None:
    import ast

    files = list(_read_all(build_corpus("code", max_bytes=SMALL)).values())
    assert len(files) > 2
    for data in files[:-1]:  # the last file is the one cut at the size cap
        ast.parse(data.decode())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"domain": "poetry"}, "domain must be 'prose' or 'code', got 'poetry'"),
        ({"max_bytes": 0}, r"max_bytes must be an integer >= 1 \(or None for the default\), got 0"),
        ({"stdlib_dir": "/nonexistent/python3/lib"}, "standard library directory .* does not exist"),
    ],
)
def test_corpus_errors(cache: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build_corpus(**kwargs)


def test_corpus_errors_on_stdlib_without_sources(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "broken.py").write_text("def (:\n")
    with pytest.raises(InputError, match="no usable Python modules"):
        build_corpus(stdlib_dir=tmp_path / "lib")


# -------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Plain ASCII, accents (héllo), symbols ✓ and emoji 🌍.\n\ttab"
    ids = tok.encode(text)
    assert tok.vocab_size == len(tok) == 256
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text
    assert tok.decode(torch.tensor(ids)) == text
    array = tok.encode_array(text, dtype="uint32")
    assert array.dtype == np.uint32 and array.tolist() == ids
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is replaced, not fatal
    with pytest.raises(InputError, match="outside the byte vocabulary"):
        tok.decode([256])
    with pytest.raises(InputError, match="takes a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_tokenize_directory_sorted_separated_recursive(tmp_path: Path) -> None:
    root = _text_dir(
        tmp_path / "data",
        {"b.txt": "bee", "a.md": "ay", "sub/c.py": "see", "empty.rst": "", "skip.bin": "x", ".hidden.txt": "h"},
    )
    (root / "binary.txt").write_bytes(b"ab\x00cd")
    tokens = tokenize_directory(root)
    assert tokens.dtype == np.uint16
    sep = chr(DOCUMENT_SEPARATOR_ID)
    assert ByteTokenizer().decode(tokens) == f"ay{sep}bee{sep}see{sep}"


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("missing", {}, "does not exist"),
    ("file.txt", {}, "is a file, not a directory"),
    (".", {"dtype": "float32"}, "unknown token dtype"),
])
def test_tokenize_directory_errors(tmp_path: Path, name: str, kwargs: dict, message: str) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match=message):
        tokenize_directory(tmp_path / name, **kwargs)


@pytest.mark.parametrize(("dtype", "high"), [("uint16", 65_535), ("uint32", 2**32 - 1)])
def test_memmap_round_trip(tmp_path: Path, dtype: str, high: int) -> None:
    tokens = np.array([0, 1, 255, 256, high], dtype=np.int64)
    path = write_memmap(tokens, tmp_path / "sub" / "train.bin", dtype=dtype)
    assert path.stat().st_size == tokens.size * np.dtype(dtype).itemsize
    loaded = read_memmap(path, dtype)
    assert isinstance(loaded, np.memmap)
    assert loaded.tolist() == tokens.tolist()
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"


def test_memmap_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not fit uint16"):
        write_memmap([70_000], tmp_path / "x.bin", dtype="uint16")
    with pytest.raises(InputError, match="negative"):
        write_memmap([-1], tmp_path / "x.bin")
    assert write_memmap([70_000], tmp_path / "auto.bin").stat().st_size == 4  # picks uint32
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(InputError, match="not a multiple of 2"):
        read_memmap(tmp_path / "odd.bin", "uint16")
    with pytest.raises(InputError, match="does not exist"):
        read_memmap(tmp_path / "none.bin")


# ---------------------------------------------------------------------- data module


def _batches(dm: TextDataModule, n: int = 3, epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    dm.setup("fit")
    dm.set_epoch(epoch)
    loader = dm.train_dataloader()
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _equal(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("input_ids", "labels"))


def test_data_module_batches_are_shifted_windows(cache: Path) -> None:
    dm = TextDataModule(corpus="prose", corpus_max_bytes=SMALL, seq_len=16, batch_size=4, val_fraction=0.1)
    batch = _batches(dm, 1)[0]
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert 0 < dm.num_val_tokens < dm.num_train_tokens
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape == (4, 16)


def test_data_module_order_depends_only_on_seed_and_epoch(cache: Path) -> None:
    def make(seed: int) -> TextDataModule:
        return TextDataModule(corpus_max_bytes=SMALL, seq_len=16, batch_size=4, seed=seed)

    torch.manual_seed(0)
    a = _batches(make(1))
    torch.manual_seed(12345)  # the global seed must not matter
    b = _batches(make(1))
    assert _equal(a, b)
    assert not _equal(a, _batches(make(2)))
    assert not _equal(a, _batches(make(1), epoch=1))
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    _batches(make(3))
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_data_module_epoch_covers_distinct_windows(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    dm = TextDataModule(
        data_dir=str(_text_dir(tmp_path / "d", {"a.txt": text})), seq_len=10, batch_size=7, val_fraction=0.0
    )
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    starts = list(sampler)
    assert len(starts) == len(set(starts)) == len(sampler) == 99  # one window given up for phase freedom
    assert len({s % 10 for s in starts}) == 1  # one phase per epoch, windows do not overlap


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_data_module_reads_memmap(tmp_path: Path, dtype: str) -> None:
    tokens = np.arange(600) % 256
    path = write_memmap(tokens, tmp_path / "t.bin", dtype=dtype)
    dm = TextDataModule(memmap_path=str(path), memmap_dtype=dtype, seq_len=8, batch_size=2, val_fraction=0.1)
    batch = _batches(dm, 1)[0]
    first = batch["input_ids"][0]
    start = int(first[0])
    assert first.tolist() == [(start + i) % 256 for i in range(8)]
    assert dm.num_train_tokens == 540 and dm.num_val_tokens == 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data_dir": "a", "memmap_path": "b"}, "both data_dir and memmap_path"),
        ({"data_dir": "a", "corpus": "prose"}, "only used when neither"),
        ({"corpus": "poetry"}, "corpus must be 'prose' or 'code', got 'poetry'"),
        ({"memmap_dtype": "int8"}, "memmap_dtype must be 'uint16' or 'uint32', got 'int8'"),
        ({"seq_len": 0}, "seq_len must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, "batch_size must be an integer >= 1, got 2.0"),
        ({"val_fraction": 1.0}, r"val_fraction must be a number in \[0, 1\)"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ],
)
def test_data_module_constructor_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TextDataModule(**kwargs)


def test_data_module_source_errors(tmp_path: Path) -> None:
    def setup(**kwargs: object) -> None:
        TextDataModule(**{"seq_len": 8, "val_fraction": 0.0, **kwargs}).setup("fit")  # type: ignore[arg-type]

    with pytest.raises(InputError, match="does not exist"):
        setup(data_dir=str(tmp_path / "missing"))
    with pytest.raises(InputError, match="does not exist"):
        setup(memmap_path=str(tmp_path / "missing.bin"))
    _text_dir(tmp_path / "other", {"data.csv": "a,b"})
    with pytest.raises(InputError, match="no text files"):
        setup(data_dir=str(tmp_path / "other"))
    _text_dir(tmp_path / "empty", {"a.txt": "", "b/c.md": ""})
    with pytest.raises(InputError, match="all 2 text file.* are empty"):
        setup(data_dir=str(tmp_path / "empty"))
    _text_dir(tmp_path / "binary", {"a.txt": b"\x00\x01"})
    with pytest.raises(InputError, match="no readable text files"):
        setup(data_dir=str(tmp_path / "binary"))
    _text_dir(tmp_path / "short", {"a.txt": "tiny"})
    with pytest.raises(InputError, match="shorter than one window"):
        setup(data_dir=str(tmp_path / "short"))
    with pytest.raises(InputError, match="validation split.*shorter than one window"):
        data_dir = str(_text_dir(tmp_path / "ok", {"a.txt": "x" * 100}))
        TextDataModule(data_dir=data_dir, seq_len=8, val_fraction=0.05).setup()
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(InputError, match="not a multiple of 2"):
        setup(memmap_path=str(tmp_path / "odd.bin"))
    write_memmap(np.array([1, 2, 300, 4] * 10), tmp_path / "big.bin", dtype="uint16")
    with pytest.raises(InputError, match="token id 300 \\(max found\\).*vocab_size=256"):
        setup(memmap_path=str(tmp_path / "big.bin"))
