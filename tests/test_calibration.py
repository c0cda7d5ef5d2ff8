"""The calibration benchmark's machinery at a tiny size (CI: well under a minute on 2 CPU cores).

It trains three tiny LLaMA-style runs for a few steps on the stdlib prose corpus and checks
the DIRECTION of the measurements at the package's defaults (probe kind, identity ratio,
controls and margin, as recommended in docs/benchmarks.md):

* own lineage (seed s at step t vs seed s at init): related, bare and by the full verdict,
  with z at least ``OWN_Z_MARGIN`` above the analytic threshold;
* cross lineage (seed s' at step t vs seed s at init): the full verdict says unrelated, and
  every cross z stays at least ``SEPARATION`` below the smallest own z.

The figures themselves (rates, worst cases) come from the full benchmark run, not from here.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from seedprints_lightning.core.probes import DEFAULT_LENGTH, DEFAULT_PROBE_KIND
from seedprints_lightning.core.stats import DEFAULT_IDENTITY_RATIO, z_threshold
from seedprints_lightning.core.verdict import DEFAULT_BIRTH_Z_MARGIN as DEFAULT_CONTROL_MARGIN

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py"

ALPHA = 0.01
NUM_CONTROLS = 2
OWN_Z_MARGIN = 10.0  # own z must beat z_alpha (2.33) by this much at 10 training steps
SEPARATION = 10.0  # and beat the largest cross z by this much


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("seedprints_calibration_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_benchmark()


@pytest.fixture(scope="module")
def report(bench):
    cfg = bench.CalibrationConfig(
        models=(bench.ModelSize("llama", 32, 2),),
        seeds=(1, 2, 3), extra_init_seeds=(11,), steps=(0, 10),
        batch_size=4, seq_len=32, probe_kinds=(DEFAULT_PROBE_KIND,),
        num_samples=200, length=DEFAULT_LENGTH, ratios=(DEFAULT_IDENTITY_RATIO,),
        n_scaling=(), num_controls=(NUM_CONTROLS,), margins=(DEFAULT_CONTROL_MARGIN,),
        domain_steps=0, modifications=("noise1",), corpus_max_bytes=256 * 1024,
        threads=1, verbose=False, alpha=ALPHA,
    )
    return bench.run_calibration(cfg)


def test_report_has_every_relation(report):
    relations = {r.relation for r in report.records}
    assert relations == {"own", "cross", "peers", "init"}
    assert len(report.select(relation="init")) == math.comb(4, 2)  # 3 trained + 1 extra init seed
    assert len(report.select(relation="cross")) == 3 * 2  # ordered pairs at step 10
    assert all(len(r.controls) == NUM_CONTROLS for r in report.records)
    assert report.select(relation="own", variant="noise1")


def test_own_lineage_related_at_defaults(report):
    own = report.select(relation="own", variant=("plain", "noise1"))
    assert own
    for r in own:
        assert r.reference.related, r.reference.summary()
        assert r.z > z_threshold(ALPHA) + OWN_Z_MARGIN, r.reference.summary()
        assert r.verdict(NUM_CONTROLS, DEFAULT_CONTROL_MARGIN, ALPHA), r.reference.summary()


def test_cross_lineage_unrelated_at_defaults(report):
    own_min = min(r.z for r in report.select(relation="own"))
    cross = report.select(relation="cross", variant=("plain", "noise1"))
    assert cross
    for r in cross:
        assert not r.verdict(NUM_CONTROLS, DEFAULT_CONTROL_MARGIN, ALPHA), r.reference.summary()
        assert r.z < own_min - SEPARATION


def test_markdown_renders(report):
    text = report.markdown()
    assert "Bare lineage test" in text and "full verdict" in text
    assert "| llama-h32-L2 |" in text
