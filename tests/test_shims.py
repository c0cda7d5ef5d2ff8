"""The module paths that 0.5 moved still import until 0.9: with a DeprecationWarning, and the same objects.

pyproject's filterwarnings ignores DeprecationWarning, so each test catches it with pytest.warns.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from seedprints_lightning._moved import ELSEWHERE, MOVED, REMOVED_IN

PACKAGE = Path(__file__).resolve().parents[1] / "seedprints_lightning"
#: The modules of 0.4 (``git show f79604f:seedprints_lightning``), but the private ones and those still there.
MODULES_OF_0_4 = {"audit", "callback", "chain", "checks", "cli", "controls", "custody", "errors", "fabric", "files",
                  "fingerprint", "hf", "integration", "monitor", "plotting", "probes", "schedule", "sources",
                  "stats", "verdict"}


def _import_fresh(name: str):
    sys.modules.pop(name, None)  # an import that Python cached would not run the shim (nor warn) again
    __import__(name)  # a statement's import (importlib.import_module would add a frame of its own)
    return sys.modules[name]


def test_every_moved_module_of_0_4_has_a_shim():
    assert set(MOVED) == MODULES_OF_0_4
    assert {path.stem for path in PACKAGE.glob("*.py")} >= MODULES_OF_0_4


@pytest.mark.parametrize("old", sorted(MOVED))
def test_the_old_path_warns_and_gives_the_new_modules_objects(old):
    new_name = f"seedprints_lightning.{MOVED[old]}"
    new = importlib.import_module(new_name)
    with pytest.warns(DeprecationWarning) as caught:
        shim = _import_fresh(f"seedprints_lightning.{old}")
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(new_name in m and f"removed in {REMOVED_IN}" in m for m in messages), messages
    # the warning points at the importing line (here, in this file), not at the shim
    assert any(Path(w.filename).name == "test_shims.py" for w in caught), [w.filename for w in caught]
    public = [name for name in vars(new) if not name.startswith("__")]
    assert public, f"{new_name} has no names"
    assert all(getattr(shim, name) is getattr(new, name) for name in public)
    for name, (where, new_attr) in ELSEWHERE.get(old, {}).items():
        target = importlib.import_module(f"seedprints_lightning.{where}")
        assert getattr(shim, name) is getattr(target, new_attr)
    assert set(getattr(new, "__all__", ())) <= set(shim.__all__)


def test_names_of_0_4_that_moved_elsewhere_are_there():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from seedprints_lightning.integration import ControlsSource, close_chain, open_chain
        from seedprints_lightning.monitor import ACTIONS, MonitorSettings, SeedPrintsMonitor, act_on_identity_lost
    from seedprints_lightning.core import opening
    from seedprints_lightning.faces import base, monitor, settings

    assert (open_chain, close_chain, ControlsSource) == (opening.open_chain, opening.close_chain,
                                                         opening.ControlsSource)
    assert MonitorSettings is settings.FaceSettings and ACTIONS == ("warn", "stop", "raise")
    assert act_on_identity_lost is base.act_on_identity_lost and SeedPrintsMonitor is monitor.SeedPrintsMonitor


@pytest.mark.slow
def test_a_script_sees_the_warning_under_pythons_default_filters(tmp_path):
    """Python shows a DeprecationWarning by default only when it is attributed to __main__: the shim's is."""
    script = tmp_path / "old_script.py"
    script.write_text("from seedprints_lightning.callback import SeedPrintsCallback\n"
                      "print(SeedPrintsCallback.__name__)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SeedPrintsCallback"
    assert "old_script.py:1: DeprecationWarning: seedprints_lightning.callback moved to " \
           "seedprints_lightning.faces.lightning" in done.stderr
