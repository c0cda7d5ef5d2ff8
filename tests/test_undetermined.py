"""A model whose lineage cannot be measured is never vouched for.

A diverged run (weights NaN) or a swap to a model with degenerate hidden states makes every
probe undetermined. Undetermined probes count towards ``patience`` by default, are logged as
their own value (``related = -1``, ``undetermined = 1``, no z at all), and a ledger that ends in
them is not "intact": ``audit --chain`` exits 6 and names the last held link.

Sizes: the conftest tiny LLaMA (hidden 32), token probes n = 200, L = 8, 2 controls, lr 3e-3,
probed at every step of the dense start. NaN weights give NaN hidden states, so the outcome is
exact (no statistical margin); the healthy stretches stand at link z 60-90 against thresholds
of 5-8 (test_monitor.py), a margin of more than 10 in z.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_lm, tokens_at

from seedprints_lightning import ProbeSpec, verify_chain
from seedprints_lightning.core.errors import IdentityWarning, InputError
from seedprints_lightning.core.verdict import tag
from seedprints_lightning.faces.monitor import SeedPrintsMonitor
from seedprints_lightning.offline.cli import EXIT_OK, EXIT_UNDETERMINED
from seedprints_lightning.offline.cli import main as seedprints_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ProbeSpec(num_samples=200, length=8)


def _train_step(model, optimizer, step: int) -> None:  # skips the update where the loss is not finite
    batch = tokens_at(step)
    loss = model(input_ids=batch, labels=batch).loss
    if torch.isfinite(loss):
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()


def _run(tmp_path, *, nan_at: int, heal_at: int | None = None, last: int = 8, **kwargs):
    """Steps 1..last; weights filled with NaN after step ``nan_at``, restored after ``heal_at``."""
    model = make_tiny_lm(0).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=3e-3)
    monitor = SeedPrintsMonitor(every_n_steps=4, probe=SPEC, num_controls=2, save_dir=tmp_path / "seedprints",
                                log_dir=tmp_path / "tb", **kwargs)
    monitor.start(model)
    saved = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, last + 1):
            _train_step(model, optimizer, step)
            if step == nan_at:
                saved = {k: v.clone() for k, v in model.state_dict().items()}
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))
            if step == heal_at:
                model.load_state_dict(saved)
            monitor.step(model, step)
            if monitor.should_stop:
                break
        monitor.end(model)
    return monitor, [w for w in caught if issubclass(w.category, IdentityWarning)]


def test_a_diverged_model_counts_towards_patience_and_stops_the_run(tmp_path):
    monitor, warned = _run(tmp_path, nan_at=4, patience=2, on_identity_lost="stop")
    steps = [(h["step"], h["related"]) for h in monitor.history]
    # Steps 1-3 hold; 4 and 5 cannot be measured: the second one reaches patience.
    assert steps[:3] == [(1, True), (2, True), (3, True)]
    assert steps[3:] == [(4, None), (5, None)], steps
    assert monitor.should_stop
    messages = " ".join(str(w.message) for w in warned)
    assert "could not be measured" in messages and "Stopping the run" in messages


def test_count_undetermined_false_only_reports(tmp_path):
    monitor, warned = _run(tmp_path, nan_at=4, patience=2, on_identity_lost="stop", count_undetermined=False)
    assert not monitor.should_stop
    assert [h["related"] for h in monitor.history[3:]] == [None] * (len(monitor.history) - 3)
    assert len(monitor.history) > 5
    assert sum("undetermined" in str(w.message) for w in warned) == 1  # reported once


def test_undetermined_probes_are_logged_as_their_own_value_never_as_unrelated(tmp_path):
    monitor, _ = _run(tmp_path, nan_at=4, patience=2, on_identity_lost="warn", last=6)
    held, dead = monitor.history[2], monitor.history[3]
    assert held["related"] is True and held["undetermined"] == 0.0 and held["link_z"] > 10
    assert dead["related"] is None and dead["undetermined"] == 1.0
    assert dead["link_z"] is None and dead["z"] is None  # no figure was measured: none is logged
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    related = {e.step: e.value for e in events.Scalars(tag("related"))}
    undetermined = {e.step: e.value for e in events.Scalars(tag("undetermined"))}
    assert related[3] == 1.0 and related[4] == -1.0 and related[6] == -1.0
    assert undetermined[3] == 0.0 and undetermined[4] == 1.0
    assert 4 not in {e.step for e in events.Scalars(tag("link_z"))}  # a gap, not a fake 0
    assert 3 in {e.step for e in events.Scalars(tag("link_z"))}


def test_audit_of_a_chain_that_ends_undetermined_exits_6_and_never_says_descends(tmp_path, capsys):
    _run(tmp_path, nan_at=4, patience=99, on_identity_lost="warn")
    audit = verify_chain(tmp_path / "seedprints")
    assert not audit.ok and not audit.tampered and not audit.broken_links
    assert [p.index for p in audit.undetermined] == [3]
    assert audit.last_held_probe().step == 3
    code = seedprints_main(["audit", "--chain", str(tmp_path / "seedprints")])
    out = capsys.readouterr().out
    assert code == EXIT_UNDETERMINED
    assert "descends" not in out
    assert "holds up to record 2 (step 3)" in out
    assert "[undetermined] records 3-" in out


def test_a_stretch_bridged_by_a_held_link_is_a_note_and_the_chain_is_intact(tmp_path, capsys):
    monitor, _ = _run(tmp_path, nan_at=4, heal_at=6, patience=99, on_identity_lost="warn", last=8)
    assert [h["related"] for h in monitor.history] == [True, True, True, None, None, True, True, True]
    audit = verify_chain(tmp_path / "seedprints")
    assert audit.ok, audit.problems
    assert len(audit.notes) == 1 and "records 3-4 (steps 4-5)" in audit.notes[0]
    assert seedprints_main(["audit", "--chain", str(tmp_path / "seedprints")]) == EXIT_OK
    assert "NOTE" in capsys.readouterr().out


def test_count_undetermined_is_checked_at_construction(tmp_path):
    with pytest.raises(InputError, match="count_undetermined"):
        SeedPrintsMonitor(count_undetermined="yes", save_dir=tmp_path)


def test_lightning_callback_metrics_drop_a_figure_the_probe_could_not_measure():
    from types import SimpleNamespace

    from seedprints_lightning.faces._lightning import log_metrics

    trainer = SimpleNamespace(loggers=[], callback_metrics={tag("link_z"): torch.tensor(80.0)})
    log_metrics(trainer, {tag("related"): -1.0, tag("undetermined"): 1.0}, step=5)
    assert tag("link_z") not in trainer.callback_metrics  # a stale 80 would overstate
    assert float(trainer.callback_metrics[tag("related")]) == -1.0


def test_the_drift_plot_marks_undetermined_probes_not_as_unrelated(tmp_path):
    from seedprints_lightning.offline.plotting import draw_drift, read_drift_curves

    _run(tmp_path, nan_at=4, patience=99, on_identity_lost="warn", last=6)
    (curve,) = read_drift_curves(tmp_path / "tb").values()
    assert curve.undetermined_steps().tolist() == [4, 5, 6]
    assert len(curve.unrelated_points()[0]) == 0  # undetermined is no red cross
    fig = draw_drift([curve])
    marked = sorted({int(line.get_xdata()[0]) for ax in fig.axes for line in ax.get_lines()
                     if (line.get_gid() or "").startswith("undetermined:")})
    assert marked == [4, 5, 6]
