"""Tests of seedprints_lightning.offline.plotting and ``seedprints plot`` on synthetic TensorBoard logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from seedprints_lightning.core.stats import LineageResult
from seedprints_lightning.offline.audit import AuditRow
from seedprints_lightning.offline.cli import EXIT_FILE, EXIT_OK, EXIT_USAGE, main
from seedprints_lightning.offline.plotting import (
    DriftCurves,
    NoDriftDataError,
    Series,
    draw_audit,
    draw_drift,
    find_run_dirs,
    plot_audit,
    plot_drift,
    read_drift_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = [0, 100, 200, 300]


def _write_run(directory, z_values, *, related=None, extra_tags=True, steps=STEPS) -> None:
    writer = SummaryWriter(str(directory))
    for i, (step, z) in enumerate(zip(steps, z_values)):
        writer.add_scalar("seedprints/z", z, step)
        writer.add_scalar("train/loss", 3.0 - i, step)
        if extra_tags:
            writer.add_scalar("seedprints/log10_p", -z, step)
            writer.add_scalar("seedprints/control_z_mean", 0.5, step)
            writer.add_scalar("seedprints/control_z_max", 2.0 + i, step)
            writer.add_scalar("seedprints/threshold", 4.0, step)
            writer.add_scalar("seedprints/related", float(related[i] if related else z > 4.0), step)
    writer.close()


@pytest.fixture()
def logdir(tmp_path):
    _write_run(tmp_path / "lightning_logs" / "version_0", [80.0, 40.0, 20.0, 10.0])
    _write_run(tmp_path / "lightning_logs" / "version_1", [60.0, 8.0, 2.0, -1.5])
    _write_run(tmp_path / "loss_only", [1.0], extra_tags=False)  # has z: a run too
    return tmp_path


def _check_png(path) -> tuple[int, ...]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert float(np.std(image[..., :3])) > 0.01  # not a blank canvas
    return image.shape


def test_reader_finds_runs_and_values(logdir) -> None:
    curves = read_drift_curves(logdir)
    assert set(curves) == {"lightning_logs/version_0", "lightning_logs/version_1", "loss_only"}
    run = curves["lightning_logs/version_1"]
    assert run.z.steps.tolist() == STEPS
    np.testing.assert_allclose(run.z.values, [60.0, 8.0, 2.0, -1.5])
    np.testing.assert_allclose(run.control_z_max.values, [2.0, 3.0, 4.0, 5.0])
    assert run.related.values.tolist() == [1.0, 1.0, 0.0, 0.0]
    steps, z = run.unrelated_points()
    assert steps.tolist() == [200, 300] and z.tolist() == [2.0, -1.5]
    only = curves["loss_only"]
    assert only.z.steps.tolist() == [0] and len(only.threshold) == 0 and len(only.log10_p) == 0


def test_reader_merges_event_files_later_wins(tmp_path) -> None:
    run = tmp_path / "resumed"
    _write_run(tmp_path / "a", [5.0, 6.0, 7.0], steps=[0, 10, 20], extra_tags=False)
    _write_run(tmp_path / "b", [70.0, 30.0], steps=[20, 30], extra_tags=False)
    run.mkdir()
    # Name them as TensorBoard does: events.out.tfevents.<unix time>...; b was written later.
    (next((tmp_path / "a").iterdir())).rename(run / "events.out.tfevents.1700000000.host.1.0")
    (next((tmp_path / "b").iterdir())).rename(run / "events.out.tfevents.1700000500.host.2.0")
    curves = read_drift_curves(run)
    assert list(curves) == ["resumed"]  # event files directly in LOGDIR: the run is named after it
    assert curves["resumed"].z.steps.tolist() == [0, 10, 20, 30]
    assert curves["resumed"].z.values.tolist() == [5.0, 6.0, 70.0, 30.0]


def _lines(fig) -> dict:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


def _assert_draws(fig, curves: dict[str, DriftCurves]) -> None:
    """``fig`` draws each run's logged series: z and threshold on the birth panel, crosses exactly at related == 0."""
    lines = _lines(fig)
    assert {gid.split(":", 1)[1] for gid in lines} == set(curves)
    for run, curve in curves.items():
        assert _xy(lines[f"z:{run}"]) == (curve.z.steps.tolist(), curve.z.values.tolist())
        if len(curve.threshold):
            assert _xy(lines[f"threshold:{run}"]) == (curve.threshold.steps.tolist(), curve.threshold.values.tolist())
        steps, z = curve.unrelated_points()
        if len(steps):
            assert _xy(lines[f"unrelated:{run}"]) == (steps.tolist(), z.tolist())
        else:
            assert f"unrelated:{run}" not in lines


def test_plot_drift_writes_png(logdir, tmp_path, drawn_figures) -> None:
    curves = read_drift_curves(logdir)
    out = plot_drift(curves, tmp_path / "sub" / "drift.png", title="two runs")
    _check_png(out)
    ((name, fig),) = drawn_figures  # the figure saved to the PNG
    assert name == "draw_drift" and fig.axes[0].get_title() == "two runs"
    _assert_draws(fig, curves)
    lines = _lines(fig)
    assert _xy(lines["z:lightning_logs/version_1"]) == (STEPS, [60.0, 8.0, 2.0, -1.5])
    # version_1 logged related = 0 at its last two probes: crosses there, none on version_0.
    assert _xy(lines["unrelated:lightning_logs/version_1"]) == ([200, 300], [2.0, -1.5])
    assert "unrelated:lightning_logs/version_0" not in lines


def test_cli_plot_two_logdirs_default_output(tmp_path, capsys, drawn_figures) -> None:
    _write_run(tmp_path / "run_a", [50.0, 20.0, 5.0, 3.0])
    _write_run(tmp_path / "run_b", [1.0, 0.5, -0.5, 0.2], related=[0, 0, 0, 0])
    assert main(["plot", str(tmp_path / "run_a"), str(tmp_path / "run_b")]) == EXIT_OK
    out = tmp_path / "run_a" / "drift.png"
    _check_png(out)
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "4 points, steps 0..300" in stdout
    ((_, fig),) = drawn_figures
    lines = _lines(fig)
    # One curve per log directory, named after it; run_b failed every probe: a cross at each.
    (z_a,) = [gid for gid in lines if gid.startswith("z:") and "run_a" in gid]
    (z_b,) = [gid for gid in lines if gid.startswith("z:") and "run_b" in gid]
    run_b = [1.0, 0.5, -0.5, pytest.approx(0.2)]  # logged as float32
    assert _xy(lines[z_a]) == (STEPS, [50.0, 20.0, 5.0, 3.0]) and _xy(lines[z_b]) == (STEPS, run_b)
    assert _xy(lines["unrelated:" + z_b[2:]]) == (STEPS, run_b)
    assert _xy(lines["unrelated:" + z_a[2:]]) == ([300], [3.0])  # its only z below 4: logged related 0
    assert lines[z_a].get_color() != lines[z_b].get_color()


def test_cli_plot_output_and_title(logdir, tmp_path, drawn_figures) -> None:
    out = tmp_path / "x.png"
    assert main(["plot", str(logdir), "-o", str(out), "--title", "T"]) == EXIT_OK
    _check_png(out)
    ((_, fig),) = drawn_figures
    assert fig.axes[0].get_title() == "T"
    _assert_draws(fig, read_drift_curves(logdir))


def test_no_seedprints_tags_is_a_clear_error(tmp_path, capsys) -> None:
    writer = SummaryWriter(str(tmp_path / "plain"))
    writer.add_scalar("train/loss", 1.0, 0)
    writer.close()
    with pytest.raises(NoDriftDataError, match="no seedprints/z scalars under .*SeedPrintsCallback"):
        read_drift_curves(tmp_path)
    assert main(["plot", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no seedprints/z scalars under" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "drift.png").exists()


def test_missing_or_empty_logdir(tmp_path, capsys) -> None:
    assert main(["plot", str(tmp_path / "nope")]) == EXIT_FILE
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert find_run_dirs(tmp_path) == {}
    assert main(["plot", str(tmp_path)]) == EXIT_USAGE
    assert "no TensorBoard event files" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# What is drawn (the Figure before it is saved)
# --------------------------------------------------------------------------------------

LINK_STEPS = [1, 3, 7, 15, 31]


def _series(steps, values) -> Series:
    return Series(np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))


def _curves(run: str = "run", *, link: bool = True) -> DriftCurves:
    """A run whose birth test fades (not detectable at 15, 31) and whose link breaks at 7 and 31."""
    s = LINK_STEPS
    extra = {}
    if link:
        extra = dict(link_z=_series(s, [90.0, 85.0, 3.0, 70.0, 1.5]),
                     link_threshold=_series(s, [15.0, 15.5, 16.0, 16.5, 14.0]))
    return DriftCurves(
        run=run, path=Path(run), z=_series(s, [99.0, 60.0, 20.0, 4.0, 2.0]),
        log10_p=_series(s, [-300.0, -100.0, -20.0, -3.0, -1.0]),
        threshold=_series(s, [6.5, 6.6, 6.7, 6.8, 6.9]),
        birth_detectable=_series(s, [1, 1, 1, 0, 0]),
        related=_series(s, [1, 1, 0, 1, 0]),
        control_z_mean=_series(s, [0.1, 0.2, 0.3, 0.4, 0.5]),
        control_z_max=_series(s, [3.5, 3.6, 3.7, 3.8, 3.9]),
        **extra,
    )


def _by_gid(ax) -> dict:
    return {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}


def _xy(line) -> tuple[list, list]:
    x, y = line.get_data()
    return np.asarray(x, dtype=float).tolist(), np.asarray(y, dtype=float).tolist()


def test_draw_drift_birth_and_link_panels() -> None:
    curve = _curves()
    fig = draw_drift([curve], title="T")
    birth, link = fig.axes
    assert birth.get_ylabel().startswith("birth test z") and link.get_ylabel().startswith("custody link z")
    assert birth.get_title() == "T" and birth.get_yscale() == "symlog" and link.get_yscale() == "symlog"

    lines = _by_gid(birth)
    assert set(lines) == {"z:run", "threshold:run", "faded:run"}  # the crosses are on the link panel
    assert _xy(lines["z:run"]) == (LINK_STEPS, [99.0, 60.0, 20.0, 4.0, 2.0])
    assert lines["z:run"].get_label() == "run" and lines["z:run"].get_linestyle() == "-"
    assert _xy(lines["threshold:run"]) == (LINK_STEPS, [6.5, 6.6, 6.7, 6.8, 6.9])
    assert lines["threshold:run"].get_linestyle() == "--"
    # Hollow circles exactly where birth_detectable == 0, on the birth curve.
    faded = lines["faded:run"]
    assert _xy(faded) == ([15, 31], [4.0, 2.0])
    assert faded.get_marker() == "o" and faded.get_markerfacecolor() == "none" and faded.get_linestyle() == "None"
    # The control band spans control_z_mean..control_z_max at every step.
    band = next(c for c in birth.collections if c.get_gid() == "control_band:run")
    vertices = np.concatenate([p.vertices for p in band.get_paths()])
    assert vertices[:, 1].min() == pytest.approx(0.1) and vertices[:, 1].max() == pytest.approx(3.9)
    assert sorted(set(vertices[:, 0].tolist())) == LINK_STEPS

    lines = _by_gid(link)
    assert set(lines) == {"link_z:run", "link_threshold:run", "unrelated:run"}
    assert _xy(lines["link_z:run"]) == (LINK_STEPS, curve.link_z.values.tolist())
    assert _xy(lines["link_threshold:run"]) == (LINK_STEPS, curve.link_threshold.values.tolist())
    # Red crosses exactly at the steps logged related == 0, at the link's z there.
    crosses = lines["unrelated:run"]
    assert _xy(crosses) == ([7, 31], [3.0, 1.5])
    assert crosses.get_marker() == "x" and crosses.get_linestyle() == "None"
    assert to_rgba(crosses.get_color()) == to_rgba("red")

    legend = [t.get_text() for t in birth.get_legend().get_texts()]
    assert legend[0] == "run" and "threshold" in legend
    assert "birth test not detectable" in legend and "identity not shown (verdict)" in legend
    assert birth.get_shared_x_axes().joined(birth, link)


def test_draw_drift_without_link_marks_the_birth_curve() -> None:
    """Logs without link_z (older logs): one panel, the crosses on the birth curve."""
    fig = draw_drift({"old": _curves("old", link=False)})
    (birth,) = fig.axes
    lines = _by_gid(birth)
    assert "link_z:old" not in lines and "link_threshold:old" not in lines
    assert _xy(lines["unrelated:old"]) == ([7, 31], [20.0, 2.0])


def test_draw_drift_nothing_flagged_draws_no_markers() -> None:
    s = LINK_STEPS
    curve = DriftCurves(run="ok", path=Path("ok"), z=_series(s, [9.0] * 5), related=_series(s, [1] * 5),
                        birth_detectable=_series(s, [1] * 5), link_z=_series(s, [50.0] * 5))
    fig = draw_drift([curve])
    gids = {line.get_gid() for ax in fig.axes for line in ax.get_lines()}
    assert gids == {"z:ok", "link_z:ok"}
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["ok"]


def test_draw_drift_two_runs_and_log10_p_panel() -> None:
    a, b = _curves("a"), _curves("b", link=False)
    fig = draw_drift([a, b], log10_p_panel=True)
    birth, link, pax = fig.axes
    assert pax.get_ylabel().startswith("birth log10 p")
    birth_lines, link_lines, p_lines = _by_gid(birth), _by_gid(link), _by_gid(pax)
    assert birth_lines["z:a"].get_color() != birth_lines["z:b"].get_color()
    assert "link_z:a" in link_lines and "link_z:b" not in link_lines
    assert _xy(link_lines["unrelated:a"]) == ([7, 31], [3.0, 1.5])
    assert _xy(birth_lines["unrelated:b"]) == ([7, 31], [20.0, 2.0])  # b has no link curve
    assert _xy(p_lines["log10_p:a"]) == (LINK_STEPS, a.log10_p.values.tolist())
    from seedprints_lightning.core.stats import log10_normal_sf
    assert _xy(p_lines["log10_p_threshold:a"])[1] == pytest.approx([log10_normal_sf(t) for t in a.threshold.values])
    assert draw_drift([a]).axes.__len__() == 2  # no log10 p panel unless asked


def test_plot_drift_saves_the_drawn_figure(tmp_path, drawn_figures) -> None:
    out = plot_drift([_curves()], tmp_path / "d.png")
    _check_png(out)
    ((_, fig),) = drawn_figures
    _assert_draws(fig, {"run": _curves()})
    assert _xy(_lines(fig)["unrelated:run"]) == ([7, 31], [3.0, 1.5])  # on the link curve
    with pytest.raises(NoDriftDataError):
        draw_drift([])


def _row(name: str, step, z: float, related, threshold: float) -> AuditRow:
    result = LineageResult(z=z, log10_p=-1.0, p_value=0.1, tau_mean=0.1, k=32, n=200, related=related, alpha=0.01)
    return AuditRow(name=name, kind="checkpoint", step=step, z=z, log10_p=-1.0, tau_mean=0.1, k=32, related=related,
                    threshold=threshold, result=result)


def test_draw_audit_per_row_thresholds_and_crosses() -> None:
    # Given out of step order: lines are drawn in step order, crosses at the rows not shown related.
    rows = [_row("c", 300, 1.0, False, 7.0), _row("a", 100, 50.0, True, 6.0), _row("b", 200, 3.0, None, 6.5)]
    fig = draw_audit(rows, title="audit")
    (ax,) = fig.axes
    lines = _by_gid(ax)
    assert set(lines) == {"z", "threshold", "unrelated"}
    assert _xy(lines["z"]) == ([100, 200, 300], [50.0, 3.0, 1.0])
    assert _xy(lines["threshold"]) == ([100, 200, 300], [6.0, 6.5, 7.0])
    assert lines["threshold"].get_linestyle() == "--"
    crosses = lines["unrelated"]
    assert sorted(zip(*_xy(crosses))) == [(200, 3.0), (300, 1.0)]  # undetermined counts as not shown
    assert crosses.get_marker() == "x" and to_rgba(crosses.get_color()) == to_rgba("red")
    assert ax.get_title() == "audit" and ax.get_xlabel() == "global step"


def test_draw_audit_fixed_threshold_and_unknown_steps() -> None:
    rows = [_row("/x/first.ckpt", None, 40.0, True, 6.0), _row("/x/second", 5, 60.0, True, 6.0)]
    fig = draw_audit(rows, threshold=3.0)
    (ax,) = fig.axes
    lines = _by_gid(ax)
    assert "unrelated" not in lines
    assert _xy(lines["z"]) == ([0, 1], [40.0, 60.0])  # index order: not every step is known
    assert _xy(lines["threshold"])[1] == [3.0, 3.0]  # the axhline
    assert [t.get_text() for t in ax.get_xticklabels()] == ["first.ckpt", "second"]
    with pytest.raises(ValueError, match="no audit rows"):
        draw_audit([])


def test_plot_audit_writes_png(tmp_path, drawn_figures) -> None:
    _check_png(plot_audit([_row("a", 1, 9.0, True, 6.0), _row("b", 2, 1.0, False, 6.0)], tmp_path / "a.png"))
    ((name, fig),) = drawn_figures
    lines = _lines(fig)
    assert name == "draw_audit" and _xy(lines["z"]) == ([1, 2], [9.0, 1.0])
    assert _xy(lines["threshold"]) == ([1, 2], [6.0, 6.0]) and _xy(lines["unrelated"]) == ([2], [1.0])


def test_reader_reads_every_logged_tag_and_plot_draws_it(tmp_path) -> None:
    """Every tag of METRIC_TAGS the callback logs comes back in its DriftCurves field."""
    from seedprints_lightning.core.verdict import METRIC_NAMES, tag

    writer = SummaryWriter(str(tmp_path / "run"))
    for i, step in enumerate(LINK_STEPS):
        for j, name in enumerate(METRIC_NAMES):
            writer.add_scalar(tag(name), float(10 * j + i), step)
    writer.close()
    curve = read_drift_curves(tmp_path)["run"]
    for j, name in enumerate(METRIC_NAMES):
        series = getattr(curve, name)
        assert series.steps.tolist() == LINK_STEPS, name
        assert series.values.tolist() == [float(10 * j + i) for i in range(5)], name
    fig = draw_drift([curve])
    assert _xy(_by_gid(fig.axes[1])["link_z:run"]) == (LINK_STEPS, curve.link_z.values.tolist())
