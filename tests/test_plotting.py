"""Tests of seedprints_lightning.plotting and ``seedprints plot`` on synthetic TensorBoard logs."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread
from torch.utils.tensorboard import SummaryWriter

from seedprints_lightning.cli import EXIT_FILE, EXIT_OK, EXIT_USAGE, main
from seedprints_lightning.plotting import NoDriftDataError, find_run_dirs, plot_drift, read_drift_curves

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


def test_plot_drift_writes_png(logdir, tmp_path) -> None:
    out = plot_drift(read_drift_curves(logdir), tmp_path / "sub" / "drift.png", title="two runs")
    _check_png(out)


def test_cli_plot_two_logdirs_default_output(tmp_path, capsys) -> None:
    _write_run(tmp_path / "run_a", [50.0, 20.0, 5.0, 3.0])
    _write_run(tmp_path / "run_b", [1.0, 0.5, -0.5, 0.2], related=[0, 0, 0, 0])
    assert main(["plot", str(tmp_path / "run_a"), str(tmp_path / "run_b")]) == EXIT_OK
    out = tmp_path / "run_a" / "drift.png"
    _check_png(out)
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "4 points, steps 0..300" in stdout


def test_cli_plot_output_and_title(logdir, tmp_path) -> None:
    out = tmp_path / "x.png"
    assert main(["plot", str(logdir), "-o", str(out), "--title", "T"]) == EXIT_OK
    _check_png(out)


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
