"""The live chain apart from its audit: core.chain (live), core.verify (audit), core.records (schema).

The dependency runs one way (verify -> chain, never back at import time), every name that left
core.chain in 0.8 still imports from it (a 0.7 import) and from the 0.4 shim, and the package's
lazy export points at the new module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "seedprints_lightning" / "core"
#: Every name core.chain gave in 0.7 that moved, and the module (under core) that now defines it.
MOVED = {"ChainAudit": "verify", "ChainProblem": "verify", "PROBLEM_KINDS": "verify", "verify_chain": "verify",
         "ledger_head_of": "verify", "resolve_reference": "reference", "LedgerText": "records",
         "is_torn_line": "records"}


def _module_level_imports(path: Path) -> set[str]:
    """The sibling modules ``path`` imports at module level (``from .x import ...``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def _imports_inside_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{node.lineno}" for func in ast.walk(tree)
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_the_live_chain_does_not_import_its_audit():
    chain = _module_level_imports(CORE / "chain.py")
    assert not chain & {"verify", "records", "reference"}, chain
    assert "chain" in _module_level_imports(CORE / "verify.py")
    assert not _module_level_imports(CORE / "records.py") & {"chain", "verify", "reference"}


def test_no_import_hides_inside_a_function_of_the_split_modules():
    hidden = [where for name in ("chain.py", "verify.py", "records.py", "reference.py")
              for where in _imports_inside_functions(CORE / name)]
    # chain.py's only one is the module __getattr__ of the moved names (importlib, not an import statement).
    assert hidden == [], hidden


@pytest.mark.parametrize("name", sorted(MOVED))
def test_a_moved_name_still_imports_from_core_chain_as_the_same_object(name):
    import importlib

    from seedprints_lightning.core import chain

    new = importlib.import_module(f"seedprints_lightning.core.{MOVED[name]}")
    assert getattr(chain, name) is getattr(new, name)
    assert name in dir(chain)
    if callable(getattr(new, name)):  # defined there, not re-exported from elsewhere
        assert getattr(new, name).__module__ == new.__name__


def test_an_unknown_name_of_core_chain_is_still_an_attribute_error():
    from seedprints_lightning.core import chain

    with pytest.raises(AttributeError, match="no attribute 'verify_chains'"):
        chain.verify_chains  # noqa: B018


def test_the_0_4_path_and_the_package_export_reach_the_new_module():
    import seedprints_lightning
    from seedprints_lightning.core import reference, verify

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from seedprints_lightning.chain import ChainAudit, ChainProblem, resolve_reference, verify_chain
    assert (verify_chain, ChainAudit, ChainProblem) == (verify.verify_chain, verify.ChainAudit, verify.ChainProblem)
    assert resolve_reference is reference.resolve_reference
    assert seedprints_lightning.verify_chain is verify.verify_chain


@pytest.mark.slow
@pytest.mark.parametrize("first", ["verify", "chain", "records", "reference"])
def test_any_import_order_works(first):
    """A cycle at import time shows only in a fresh interpreter, depending on which module comes first."""
    code = (f"import seedprints_lightning.core.{first}\n"
            "from seedprints_lightning.core.chain import verify_chain, CustodyChain\n"
            "from seedprints_lightning.core.verify import verify_chain as v\n"
            "assert v is verify_chain\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
