"""The layers import one way: core <- faces, core <- offline; the core has no trainer and no CLI in it.

Read from the sources (every import statement, module level or inside a function), so a lazy
import that breaks the rule is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seedprints_lightning"
#: What each layer may not import, as dotted-name prefixes.
FORBIDDEN = {
    "core": ("seedprints_lightning.faces", "seedprints_lightning.offline", "seedprints_lightning.train",
             "pytorch_lightning", "lightning", "transformers.trainer", "transformers.Trainer", "argparse"),
    "faces": ("seedprints_lightning.offline", "seedprints_lightning.train"),
    "offline": ("seedprints_lightning.faces", "seedprints_lightning.train", "pytorch_lightning", "lightning"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in ``path``, relative imports resolved against the package."""
    module_parts = ["seedprints_lightning", *path.relative_to(PACKAGE).with_suffix("").parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_parts[:-node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # "from transformers import Trainer" names transformers.Trainer
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_no_layer_above_it(layer):
    files = sorted((PACKAGE / layer).glob("*.py"))
    assert files, f"{layer}/ has no module"
    broken = [f"{path.relative_to(PACKAGE)}:{line} imports {name}"
              for path in files for line, name in _imports(path)
              if any(name == prefix or name.startswith(prefix + ".") for prefix in FORBIDDEN[layer])]
    assert not broken, "\n".join(broken)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    bad = PACKAGE / "core" / "stats.py"
    names = {name for _, name in _imports(bad)}
    assert "seedprints_lightning.core.checks" in names  # "from .checks import ..." resolved
    source = tmp_path / "seedprints_lightning" / "core" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..faces import base\n    from transformers import Trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "seedprints_lightning")
    names = {name for _, name in _imports(source)}
    assert "seedprints_lightning.faces.base" in names and "transformers.Trainer" in names


def test_the_top_level_lists_every_face():
    import seedprints_lightning

    listed = dir(seedprints_lightning)
    for face in ("SeedPrintsCallback", "SeedPrintsTrainerCallback", "SeedPrintsFabricCallback", "SeedPrintsMonitor"):
        assert face in listed
        assert getattr(seedprints_lightning, face).__module__.startswith("seedprints_lightning.faces.")


# --------------------------------------------------------------------------------------
# No module imports another module's underscore names (issue 28 item 5)
# --------------------------------------------------------------------------------------

#: Private modules, and the modules that may import them (``None``: any module of the package).
#: ``core/_kendall_cpu.py`` holds the compiled CPU Kendall kernels behind ``core.stats``' public
#: seams (``kendall_tau_b``, ``PreparedTarget``, ``prepared_pair_taus``): only its one owner imports
#: it, so the kernels can change without another module noticing; ``faces/_lightning.py`` (the
#: import compatibility of Lightning's two package names) likewise serves ``faces/lightning.py`` alone.
#: ``_version``, ``_moved`` and
#: ``_entry`` are the package's own plumbing (the version string, the helper of the 0.5 import
#: shims, the console entry point): their underscore says "not for users", not "private to one module".
PRIVATE_MODULE_IMPORTERS: dict[str, set[str] | None] = {
    "seedprints_lightning.core._kendall_cpu": {"seedprints_lightning.core.stats"},
    "seedprints_lightning.faces._lightning": {"seedprints_lightning.faces.lightning"},
    "seedprints_lightning._version": None,
    "seedprints_lightning._moved": None,
    "seedprints_lightning._entry": None,
}
def _module_name(path: Path) -> str:
    parts = [p for p in path.relative_to(PACKAGE).with_suffix("").parts if p != "__init__"]
    return ".".join(["seedprints_lightning", *parts])


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _private_imports(path: Path) -> set[str]:
    """``"importer -> home.name"`` for each underscore name (or private module not open to it) ``path`` imports."""
    importer, found = _module_name(path), set()
    for _, name in _imports(path):
        parts = name.split(".")
        if parts[0] != "seedprints_lightning":
            continue
        for i, part in enumerate(parts[1:], start=1):
            if not _is_private(part):
                continue
            if PACKAGE.joinpath(*parts[1:i]).is_dir():  # a private module of a package
                module = ".".join(parts[:i + 1])
                allowed = PRIVATE_MODULE_IMPORTERS.get(module, set())
                if allowed is not None and importer not in allowed and importer != module:
                    found.add(f"{importer} -> {module}")
            elif ".".join(parts[:i]) != importer:  # a module's underscore name, imported by another module
                found.add(f"{importer} -> {'.'.join(parts[:i + 1])}")
            break
    return found


def test_no_module_imports_another_modules_underscore_names():
    found = set().union(*(_private_imports(path) for path in sorted(PACKAGE.rglob("*.py"))))
    assert not found, "\n".join(sorted(found))


#: Modules whose function-level imports all share one reason, stated once in a comment at the module's top.
LAZY_BY_POLICY = {"offline/cli.py": "Start-up cost: each subcommand imports"}


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of each package import inside a function of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = dict(_imports(path))
    found = []
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom) and names.get(node.lineno, "").startswith(
                        "seedprints_lightning"):
                    found.append((node.lineno, names[node.lineno]))
    return sorted(set(found))


def test_every_function_level_package_import_says_why():
    """A package import inside a function hides a cycle unless it has a reason (start-up cost, an optional
    dependency, a Ctrl-C guard): a ``#`` comment on its line or the two lines above, or its module's policy."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if relative in LAZY_BY_POLICY:
            assert LAZY_BY_POLICY[relative] in text, f"{relative} lost the comment that says why it imports lazily"
            continue
        for line, name in _function_level_imports(path):
            if not any("#" in lines[i] for i in range(max(0, line - 3), line)):
                silent.append(f"{relative}:{line} imports {name} inside a function with no comment saying why")
    assert not silent, "\n".join(silent)


def test_the_private_import_checker_sees_names_and_private_modules(tmp_path, monkeypatch):
    package = tmp_path / "seedprints_lightning"
    (package / "core").mkdir(parents=True)
    (package / "core" / "_kernel.py").write_text("x = 1\n")
    (package / "core" / "a.py").write_text("_y = 1\n")
    source = package / "core" / "b.py"
    source.write_text("from .a import _y\nfrom . import a as _a\nfrom .._version import __version__\n"
                      "def f():\n    from ._kernel import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert _private_imports(source) == {"seedprints_lightning.core.b -> seedprints_lightning.core.a._y",
                                        "seedprints_lightning.core.b -> seedprints_lightning.core._kernel"}
