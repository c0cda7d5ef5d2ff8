"""A real text corpus that exists offline on every machine: the installed Python standard library.

Tests, the demo and benchmarks need natural text without a network connection or a data set
checked into the repository. Every Python installation ships a few megabytes of carefully
written English (docstrings and comments) interleaved with code, so the corpus is cut from
there, in two domains:

* ``"prose"``: the docstrings and comments of each module, in source order, with doctest
  examples and commented-out code left out. Mostly English sentences.
* ``"code"``: each module's source with its docstrings removed (comments stay: they are part
  of how code is written).

Having two domains from one source lets experiments switch a run's data distribution (a
"continued pretraining on code" scenario) with nothing to download.

The corpus is built on first use and cached outside the repository (see
:func:`default_cache_dir`). Building is deterministic: the modules are visited in sorted
order and the extraction depends only on the source text and the Python version's ``ast``
and ``tokenize`` modules, so the same Python installation always yields the same bytes.
The build happens in a temporary directory that is renamed into place at the end, so a
killed or concurrent build never leaves a partial corpus where a reader could find it.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import tokenize
import unicodedata
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..core.checks import check_choice, check_int
from ..core.errors import InputError

__all__ = ["CORPUS_DOMAINS", "DEFAULT_MAX_BYTES", "build_corpus", "default_cache_dir"]

CORPUS_DOMAINS: tuple[str, ...] = ("prose", "code")

#: Cap on a corpus's total size when ``max_bytes`` is not given: enough text to train the
#: small models of the tests and demo for thousands of steps, quick to build (a few seconds).
DEFAULT_MAX_BYTES = 4 * 2**20

# Bump when the extraction changes, so caches built by older code are not reused.
_FORMAT_VERSION = 1
_MANIFEST = ".manifest.json"
# Temporary build directories left by a killed build are removed after this long; a live
# build finishes in seconds, so this never races with one.
_STALE_TMP_SECONDS = 3600.0

# Directories that hold test suites, third-party packages, generated tables or data rather
# than library code. Tests are most of the standard library's bytes and are repetitive;
# ``encodings`` and ``pydoc_data`` are huge string tables that are neither prose nor code.
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
)

# Hidden entries, test modules, and files generated at build time whose contents depend on the
# machine that built Python (_sysconfigdata*, the config-* directory's python-config.py): leaving
# those out keeps the corpus identical across installs of the same Python version.
_EXCLUDED_PREFIXES = (".", "test_", "_sysconfigdata", "config-")

# Comments that are tool directives, not prose.
_DIRECTIVE = re.compile(
    r"^(?:!|-\*-|vim?:|(?:type|noqa|pragma|fmt|pylint|mypy|isort|pyright)\b|coding[:=]|XXX\s*$)",
    re.IGNORECASE,
)
# Characters of ordinary English sentences; a comment made mostly of other characters is
# commented-out code or ASCII art.
_PROSE_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:'\"-?!()"
)
_MIN_PROSE_FRACTION = 0.9
_CODE_LINE = re.compile(
    r"^\s*(?:"
    r"(?:if|elif|else|for|while|with|try|except|finally|def|class)\b.*:\s*$"  # block header
    r"|(?:import\s+[\w.]+|from\s+[\w.]+\s+import\b.*)\s*$"  # import statement
    r"|[\w.\[\]]+\s*[-+*/|&]?=\s*\S"  # assignment
    r"|[\w.]+\(.*\)\s*$"  # bare call
    r")"
)


def default_cache_dir() -> Path:
    """Return the cache root: ``$SEEDPRINTS_CACHE``, else ``$XDG_CACHE_HOME/seedprints_lightning``,
    else ``~/.cache/seedprints_lightning``."""
    explicit = os.environ.get("SEEDPRINTS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "seedprints_lightning"
    return Path.home() / ".cache" / "seedprints_lightning"


def build_corpus(
    domain: str = "prose",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    max_bytes: int | None = None,
    stdlib_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Return a directory of ``.txt`` files cut from the standard library, building it if needed.

    Args:
        domain: ``"prose"`` (docstrings and comments) or ``"code"`` (source without docstrings).
        cache_dir: Cache root; ``None`` means :func:`default_cache_dir`. The corpus lives in a
            subdirectory named after the domain, Python version, standard library location,
            size cap and extraction format, so different settings never share files.
        max_bytes: Cap on the corpus's total size in bytes (``None`` means
            :data:`DEFAULT_MAX_BYTES`). Modules are taken in sorted order until the cap; the
            module that crosses it is cut at a line boundary.
        stdlib_dir: Standard library to read; ``None`` means the running interpreter's
            (``sysconfig.get_paths()["stdlib"]``).

    Returns:
        The corpus directory. It contains one ``<dotted.module.path>.txt`` file per module
        that had any text for the domain, plus a hidden manifest; its contents never change
        once it exists.

    Raises:
        InputError: On an unknown domain, a non-positive cap, a missing standard library, a
            standard library with no usable modules, or a cache directory that cannot be
            written.
    """
    check_choice("domain", domain, CORPUS_DOMAINS)
    if max_bytes is None:
        max_bytes = DEFAULT_MAX_BYTES
    max_bytes = check_int("max_bytes", max_bytes, low=1, hint="or None for the default")

    stdlib = _resolve_stdlib(stdlib_dir)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    parent = root / "corpus"
    stdlib_tag = hashlib.sha256(str(stdlib).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    version = "{}{}.{}.{}".format(sys.implementation.name, *sys.version_info[:3])
    target = parent / f"stdlib-{domain}-{version}-{stdlib_tag}-{max_bytes}-v{_FORMAT_VERSION}"

    if target.is_dir():
        if _is_complete(target):
            return target
        # Someone edited or partly deleted the cached corpus; move it out of the way (an
        # atomic rename, so readers see either the old directory or none) and rebuild.
        _discard(target, parent)

    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(parent)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    except OSError as err:
        raise InputError(
            f"cannot write the corpus cache under {parent} ({err}): set SEEDPRINTS_CACHE or pass "
            "cache_dir= to a writable directory"
        ) from err

    try:
        manifest = _write_corpus(domain, stdlib, tmp, max_bytes)
        manifest.update(domain=domain, python=version, stdlib=str(stdlib), max_bytes=max_bytes)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            # A concurrent build renamed its own copy into place first; its bytes are the
            # same as ours, so keep it and drop this one.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_stdlib(stdlib_dir: str | os.PathLike[str] | None) -> Path:
    if stdlib_dir is None:
        raw = sysconfig.get_paths().get("stdlib")
        if not raw:
            raise InputError(
                "this Python reports no standard library location (sysconfig 'stdlib' path is "
                "empty): pass stdlib_dir= or use data_dir/memmap_path instead of the built-in corpus"
            )
        stdlib = Path(raw)
    else:
        stdlib = Path(stdlib_dir).expanduser()
    if not stdlib.is_dir():
        raise InputError(
            f"standard library directory {stdlib} does not exist (some minimal Python installs ship "
            "only compiled modules): pass stdlib_dir= to a directory of Python sources, or use "
            "data_dir/memmap_path instead of the built-in corpus"
        )
    return stdlib.resolve()


def _iter_modules(stdlib: Path) -> Iterator[tuple[str, Path]]:
    """Yield (relative posix path, path) of library modules, in sorted order."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        # Pruning in place keeps os.walk from descending into excluded trees at all.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(_EXCLUDED_PREFIXES)]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_EXCLUDED_PREFIXES):
                path = Path(dirpath) / name
                found.append((path.relative_to(stdlib).as_posix(), path))
    # Sorting the full relative paths (not walk order, which depends on the file system)
    # is what makes the output identical on every machine.
    found.sort(key=lambda item: item[0])
    return iter(found)


def _write_corpus(domain: str, stdlib: Path, out: Path, max_bytes: int) -> dict[str, object]:
    extract = _prose_of if domain == "prose" else _code_of
    files: dict[str, int] = {}
    total = 0
    skipped = 0
    for rel, path in _iter_modules(stdlib):
        source = _read_source(path)
        text = extract(source) if source is not None else None
        if text is None:
            skipped += 1
            continue
        data = text.encode("utf-8", "replace")
        if not data.strip():
            continue
        room = max_bytes - total
        truncated = len(data) > room
        if truncated:
            # Cut at a line boundary so the last file does not end mid-word.
            cut = data.rfind(b"\n", 0, room)
            data = data[: cut + 1] if cut >= 0 else b""
        if data:
            name = rel[: -len(".py")].replace("/", ".") + ".txt"
            (out / name).write_bytes(data)
            files[name] = len(data)
            total += len(data)
        if truncated or total >= max_bytes:
            break
    if not files:
        raise InputError(
            f"no usable Python modules found under {stdlib} ({skipped} failed to parse): pass "
            "stdlib_dir= to a directory of Python sources, or use data_dir/memmap_path instead"
        )
    return {"format": _FORMAT_VERSION, "files": files, "total_bytes": total}


def _read_source(path: Path) -> str | None:
    try:
        # tokenize.open honours PEP 263 coding declarations and normalises newlines.
        with tokenize.open(path) as handle:
            return handle.read()
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None


def _parse(source: str) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            # Old modules trigger SyntaxWarning (invalid escapes); irrelevant here.
            warnings.simplefilter("ignore")
            return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _docstring_nodes(tree: ast.Module) -> Iterator[tuple[ast.AST, ast.Expr]]:
    """Yield (owner, docstring statement) for the module, every class and every function."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                yield node, first


def _clean_text(text: str) -> str:
    # Docstrings are evaluated strings, so escapes can put control characters (even NUL,
    # which the tokenizer uses as a document separator) into them.
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


def _strip_doctests(doc: str) -> str:
    """Drop interactive examples (``>>>`` lines, their continuations and expected output)."""
    kept: list[str] = []
    in_example = False
    for line in doc.split("\n"):
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_example = True
        elif in_example and not stripped:
            in_example = False
            kept.append(line)
        elif not in_example:
            kept.append(line)
    return "\n".join(kept)


def _looks_like_prose(text: str) -> bool:
    letters = sum(ch.isalpha() for ch in text)
    if letters < 3:
        return False
    if any(_CODE_LINE.match(line) for line in text.split("\n")):
        return False
    return sum(ch in _PROSE_CHARS for ch in text) >= _MIN_PROSE_FRACTION * len(text)


def _prose_of(source: str) -> str | None:
    tree = _parse(source)
    if tree is None:
        return None
    blocks: list[tuple[int, str]] = []
    for _, stmt in _docstring_nodes(tree):
        doc = ast.get_docstring(_wrap(stmt), clean=True) or ""
        doc = _clean_text(_strip_doctests(doc)).strip()
        if doc:
            blocks.append((stmt.lineno, doc))

    # Consecutive full-line comments form one paragraph; an inline comment stands alone.
    paragraph: list[str] = []
    start = last = -2

    def flush() -> None:
        if paragraph:
            text = "\n".join(paragraph)
            if _looks_like_prose(text):
                blocks.append((start, text))
            paragraph.clear()

    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        tokens = []
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        body = tok.string.lstrip("#").strip()
        line = tok.start[0]
        full_line = not tok.line[: tok.start[1]].strip()
        if not body or _DIRECTIVE.match(body) or (line == 1 and tok.string.startswith("#!")):
            flush()
            continue
        if not (full_line and line == last + 1 and paragraph):
            flush()
            start = line
        paragraph.append(_clean_text(body))
        last = line
        if not full_line:
            flush()
    flush()

    # Blocks come out in source order, the order a reader meets them.
    blocks.sort(key=lambda item: item[0])
    return "".join(text + "\n\n" for _, text in blocks)


def _wrap(stmt: ast.Expr) -> ast.Module:
    # ast.get_docstring wants the owner; a module wrapping the statement gives identical
    # cleaning for every kind of owner.
    return ast.Module(body=[stmt], type_ignores=[])


def _code_of(source: str) -> str | None:
    tree = _parse(source)
    if tree is None:
        return None
    # ast offsets are line numbers and UTF-8 byte columns, so edit encoded lines.
    lines = [line.encode("utf-8") for line in source.splitlines(keepends=True)]
    edits = sorted(
        ((stmt, len(owner.body) == 1) for owner, stmt in _docstring_nodes(tree)),
        key=lambda item: (item[0].lineno, item[0].col_offset),
        reverse=True,  # edit bottom-up so earlier offsets stay valid
    )
    for stmt, only_statement in edits:
        first, last = stmt.lineno - 1, (stmt.end_lineno or stmt.lineno) - 1
        col, end_col = stmt.col_offset, stmt.end_col_offset or 0
        before, after = lines[first][:col], lines[last][end_col:]
        # A body must keep one statement for the code to stay valid Python.
        filler = b"pass" if only_statement else b""
        if not before.strip() and not after.strip():
            lines[first : last + 1] = [before + filler + b"\n"] if filler else []
        else:
            lines[first : last + 1] = [before + filler + after]
    return b"".join(lines).decode("utf-8")


def _is_complete(target: Path) -> bool:
    """Check a cached corpus against its manifest (cheap: sizes only)."""
    try:
        manifest = json.loads((target / _MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != _FORMAT_VERSION or not files:
            return False
        present = {p.name for p in target.iterdir() if p.name != _MANIFEST}
        if present != set(files):
            return False
        return all((target / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _discard(target: Path, parent: Path) -> None:
    aside = parent / f".stale-{target.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(target, aside)
    except OSError:
        return  # another process already moved it
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_builds(parent: Path) -> None:
    now = time.time()
    for entry in parent.iterdir():
        if entry.name.startswith((".tmp-", ".stale-")):
            try:
                if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                continue
