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
