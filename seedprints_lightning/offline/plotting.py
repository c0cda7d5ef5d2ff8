"""Drift curves: read what ``SeedPrintsCallback`` logged to TensorBoard, and draw it.

:func:`read_drift_curves` turns a log directory into one typed :class:`DriftCurves` per run
(a run is every directory holding ``events.out.tfevents.*`` files, named by its path relative
to the log directory). :func:`plot_drift` draws them to a PNG; :func:`plot_audit` draws the
rows of :func:`~seedprints_lightning.offline.audit.audit_checkpoints`. :func:`draw_drift` and
:func:`draw_audit` return their figures unsaved (each artist's ``gid`` names what it shows).

The z axis is **symlog** (linear for ``|z| < 1``, logarithmic beyond): z spans from about
-3 (unrelated pairs) to several hundred (a fresh run against its own init), and symlog shows
both ends without clipping negative values. The ``log10 p`` panel is symlog as well.

Figures are built with :class:`matplotlib.figure.Figure` and saved through the Agg canvas,
never through ``pyplot``: nothing here needs a display or changes the global backend.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import InputError
from ..core.stats import log10_normal_sf
from ..core.verdict import METRIC_NAMES, tag

if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditRow

__all__ = [
    "TAG_PREFIX",
    "TAGS",
    "DriftCurves",
    "NoDriftDataError",
    "Series",
    "draw_audit",
    "draw_drift",
    "find_run_dirs",
    "plot_audit",
    "plot_drift",
    "read_drift_curves",
]

TAG_PREFIX = tag("")
#: DriftCurves field -> TensorBoard tag written by SeedPrintsCallback
#: (:data:`~seedprints_lightning.core.verdict.METRIC_TAGS`).
TAGS: dict[str, str] = {name: tag(name) for name in METRIC_NAMES}
_EVENT_PATTERN = "events.out.tfevents.*"
_Z_LINTHRESH = 1.0


class NoDriftDataError(InputError):
    """A log directory holds no ``seedprints/z`` scalars (or no event files at all)."""


@dataclass(frozen=True)
class Series:
    """One scalar tag of one run: ``values[i]`` was logged at ``steps[i]`` (ascending, unique)."""

    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))

    def __post_init__(self) -> None:
        if self.steps.shape != self.values.shape or self.steps.ndim != 1:
            raise InputError(f"Series needs two 1-D arrays of one length, got {self.steps.shape} and "
                             f"{self.values.shape}")

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @classmethod
    def from_mapping(cls, by_step: Mapping[int, float]) -> Series:
        steps = np.array(sorted(by_step), dtype=np.int64)
        return cls(steps, np.array([by_step[int(s)] for s in steps], dtype=np.float64))


@dataclass(frozen=True)
class DriftCurves:
    """Everything one run logged under ``seedprints/``: one :class:`Series` per tag.

    Tags the run did not log are empty series (``len(...) == 0``).
    """

    run: str
    path: Path
    z: Series
    log10_p: Series = field(default_factory=Series)
    tau_mean: Series = field(default_factory=Series)
    identity_dims: Series = field(default_factory=Series)
    threshold: Series = field(default_factory=Series)
    birth_detectable: Series = field(default_factory=Series)
    link_z: Series = field(default_factory=Series)
    link_log10_p: Series = field(default_factory=Series)
    link_tau_mean: Series = field(default_factory=Series)
    link_threshold: Series = field(default_factory=Series)
    link_span: Series = field(default_factory=Series)
    related: Series = field(default_factory=Series)
    undetermined: Series = field(default_factory=Series)
    control_z_max: Series = field(default_factory=Series)
    control_z_mean: Series = field(default_factory=Series)
    probe_seconds: Series = field(default_factory=Series)

    def unrelated_points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, z)`` where the run logged ``related == 0``: on the custody link's curve when it was
        logged (the link drives the verdict by default), else on the birth curve (logs of version 0.1)."""
        flagged = self.related.steps[self.related.values == 0]
        series = self.link_z if len(self.link_z) else self.z
        mask = np.isin(series.steps, flagged)
        return series.steps[mask], series.values[mask]

    def undetermined_steps(self) -> np.ndarray:
        """Steps whose probe was undetermined (``undetermined == 1``, or ``related == -1``): no z was measured."""
        flagged = set(self.undetermined.steps[self.undetermined.values == 1].tolist())
        flagged |= set(self.related.steps[self.related.values == -1].tolist())
        return np.array(sorted(flagged), dtype=np.int64)

    def faded_points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, z)`` of the birth curve where the birth test was not detectable."""
        faded = self.birth_detectable.steps[self.birth_detectable.values == 0]
        mask = np.isin(self.z.steps, faded)
        return self.z.steps[mask], self.z.values[mask]


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def find_run_dirs(logdir: str | Path) -> dict[str, Path]:
    """Every directory under ``logdir`` (itself included) holding event files, by run name.

    The name is the path relative to ``logdir`` (POSIX separators); event files directly in
    ``logdir`` form a run named after ``logdir`` itself.
    """
    root = Path(logdir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"log directory {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory (give the TensorBoard log directory)")
    dirs = sorted({p.parent for p in root.rglob(_EVENT_PATTERN) if p.is_file()})
    runs: dict[str, Path] = {}
    for directory in dirs:
        rel = directory.relative_to(root).as_posix()
        runs[root.resolve().name if rel == "." else rel] = directory
    return runs


def _event_file_order(path: Path) -> tuple[int, str]:
    # events.out.tfevents.<unix time>.<host>...: write order is the timestamp, then the name.
    match = re.match(r"events\.out\.tfevents\.(\d+)", path.name)
    return (int(match.group(1)) if match else 0, path.name)


def _read_run(run: str, directory: Path) -> DriftCurves | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {name: {} for name in TAGS}
    files = sorted((p for p in directory.glob(_EVENT_PATTERN) if p.is_file()), key=_event_file_order)
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        for name, metric_tag in TAGS.items():
            if metric_tag in available:
                for event in accumulator.Scalars(metric_tag):  # in file order: a later event wins
                    merged[name][int(event.step)] = float(event.value)
    if not merged["z"]:
        return None
    series = {name: Series.from_mapping(values) for name, values in merged.items()}
    return DriftCurves(run=run, path=directory, **series)


def read_drift_curves(logdir: str | Path) -> dict[str, DriftCurves]:
    """Read the ``seedprints/*`` scalars of every run under ``logdir``.

    Several event files of one run (a resumed run) are merged by step in write order, the
    later value winning. Runs without ``seedprints/z`` (e.g. one that logged only the loss)
    are left out; if none is left, :class:`NoDriftDataError` says so.
    """
    runs = find_run_dirs(logdir)
    if not runs:
        raise NoDriftDataError(f"no TensorBoard event files (events.out.tfevents.*) under {logdir}")
    curves = {}
    for run, directory in runs.items():
        read = _read_run(run, directory)
        if read is not None:
            curves[run] = read
    if not curves:
        raise NoDriftDataError(f"no seedprints/z scalars under {logdir}; was SeedPrintsCallback in the Trainer?")
    return curves


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def _new_figure(panels: int) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2 + 2.6 * (panels - 1)), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False, height_ratios=[3] + [2] * (panels - 1))[:, 0]
    return fig, list(axes)


def _save(fig: Any, out_path: str | Path) -> Path:
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return out


def _symlog(ax: Any) -> None:
    ax.set_yscale("symlog", linthresh=_Z_LINTHRESH)
    ax.grid(True, which="major", alpha=0.3)


def plot_drift(
    curves: Mapping[str, DriftCurves] | Sequence[DriftCurves],
    out_path: str | Path,
    *,
    title: str | None = None,
    log10_p_panel: bool | None = None,
) -> Path:
    """Draw the drift curves of one or more runs into a PNG at ``out_path``; return the path.

    The figure is :func:`draw_drift`'s.
    """
    return _save(draw_drift(curves, title=title, log10_p_panel=log10_p_panel), out_path)


def draw_drift(
    curves: Mapping[str, DriftCurves] | Sequence[DriftCurves],
    *,
    title: str | None = None,
    log10_p_panel: bool | None = None,
) -> Any:
    """The drift figure of :func:`plot_drift`, as a :class:`matplotlib.figure.Figure` (not saved).

    Per run (one colour each, named in the legend), symlog y axes:

    * top panel, the birth test: z per step, the negative-control band from ``control_z_mean`` to
      ``control_z_max`` (shaded), its threshold (dashed), hollow circles where the birth test was
      not detectable;
    * second panel (when any run logged it), the custody link: ``link_z`` and ``link_threshold``
      (dashed), and a red cross at every probe the callback logged ``related = 0``;
    * a grey vertical line, on every panel, at each undetermined probe (no z was measured there);
    * a ``log10 p`` panel of the birth test when ``log10_p_panel`` is True.

    Every drawn artist of a run carries a ``gid`` naming what it shows, ``"<what>:<run>"`` with
    ``<what>`` one of ``z``, ``control_band``, ``threshold``, ``link_z``, ``link_threshold``,
    ``faded``, ``unrelated``, ``undetermined``, ``log10_p``, ``log10_p_threshold``.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    runs = list(curves.values()) if isinstance(curves, Mapping) else list(curves)
    if not runs:
        raise NoDriftDataError("no runs to plot")
    show_link = any(len(c.link_z) for c in runs)
    show_p = bool(log10_p_panel)
    fig, axes = _new_figure(1 + show_link + show_p)
    ax = axes[0]
    lax = axes[1] if show_link else ax
    colours = [f"C{i % 10}" for i in range(len(runs))]
    handles: list[Any] = []
    any_band = any_threshold = any_unrelated = any_faded = any_undetermined = False
    for curve, colour in zip(runs, colours):
        (line,) = ax.plot(curve.z.steps, curve.z.values, "-", marker=".", color=colour, label=curve.run, zorder=3,
                          gid=f"z:{curve.run}")
        handles.append(line)
        if len(curve.control_z_mean) and len(curve.control_z_max):
            common, i_mean, i_max = np.intersect1d(curve.control_z_mean.steps, curve.control_z_max.steps,
                                                   return_indices=True)
            if len(common):
                ax.fill_between(common, curve.control_z_mean.values[i_mean], curve.control_z_max.values[i_max],
                                color=colour, alpha=0.18, linewidth=0, zorder=1, gid=f"control_band:{curve.run}")
                any_band = True
        for axis, threshold, name in ((ax, curve.threshold, "threshold"),
                                      (lax, curve.link_threshold, "link_threshold")):
            if len(threshold):
                axis.plot(threshold.steps, threshold.values, "--", color=colour, linewidth=1.2,
                          drawstyle="steps-post", zorder=2, gid=f"{name}:{curve.run}")
                any_threshold = True
        if show_link and len(curve.link_z):
            lax.plot(curve.link_z.steps, curve.link_z.values, "-", marker=".", color=colour, zorder=3,
                     gid=f"link_z:{curve.run}")
        steps, z = curve.faded_points()
        if len(steps):
            ax.plot(steps, z, "o", markerfacecolor="none", color=colour, markersize=8, zorder=4,
                    gid=f"faded:{curve.run}")
            any_faded = True
        steps, z = curve.unrelated_points()
        if len(steps):
            (lax if len(curve.link_z) else ax).plot(steps, z, "x", color="red", markersize=8, markeredgewidth=2,
                                                    zorder=5, gid=f"unrelated:{curve.run}")
            any_unrelated = True
        for step in curve.undetermined_steps():
            for axis in {id(ax): ax, id(lax): lax}.values():
                axis.axvline(int(step), color="grey", linestyle=":", linewidth=1.5, zorder=0,
                             gid=f"undetermined:{curve.run}")
            any_undetermined = True
    if any_band:
        handles.append(Patch(color="grey", alpha=0.3, label="negative controls (mean..max z)"))
    if any_threshold:
        handles.append(Line2D([], [], linestyle="--", color="grey", label="threshold"))
    if any_faded:
        handles.append(Line2D([], [], linestyle="", marker="o", markerfacecolor="none", color="grey",
                              label="birth test not detectable"))
    if any_unrelated:
        handles.append(Line2D([], [], linestyle="", marker="x", color="red", markeredgewidth=2,
                              label="identity not shown (verdict)"))
    if any_undetermined:
        handles.append(Line2D([], [], linestyle=":", color="grey", label="undetermined (not measurable)"))
    _symlog(ax)
    ax.set_ylabel("birth test z (symlog)")
    ax.legend(handles=handles, loc="best", fontsize="small")
    ax.set_title(title or "SeedPrints lineage drift")
    if show_link:
        _symlog(lax)
        lax.set_ylabel("custody link z (symlog)")

    if show_p:
        pax = axes[-1]
        for curve, colour in zip(runs, colours):
            if len(curve.log10_p):
                pax.plot(curve.log10_p.steps, curve.log10_p.values, "-", marker=".", color=colour,
                         gid=f"log10_p:{curve.run}")
            if len(curve.threshold):
                limit = np.array([log10_normal_sf(t) for t in curve.threshold.values])
                pax.plot(curve.threshold.steps, limit, "--", color=colour, linewidth=1.2, drawstyle="steps-post",
                         gid=f"log10_p_threshold:{curve.run}")
        _symlog(pax)
        pax.set_ylabel("birth log10 p (one-sided, symlog)")
    axes[-1].set_xlabel("global step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_audit(
    rows: Sequence[AuditRow],
    out_path: str | Path,
    *,
    threshold: float | None = None,
    title: str | None = None,
) -> Path:
    """Draw z against step for audited checkpoints (index order where steps are unknown) into a PNG.

    The figure is :func:`draw_audit`'s.
    """
    return _save(draw_audit(rows, threshold=threshold, title=title), out_path)


def draw_audit(
    rows: Sequence[AuditRow],
    *,
    threshold: float | None = None,
    title: str | None = None,
) -> Any:
    """The audit figure of :func:`plot_audit`, as a :class:`matplotlib.figure.Figure` (not saved).

    Artists carry a ``gid``: ``z`` (every row), ``unrelated`` (red crosses at rows not shown
    related), ``threshold`` (each row's own threshold, or the fixed ``threshold`` given).
    """
    if not rows:
        raise InputError("no audit rows to plot")
    known = all(row.step is not None for row in rows)
    x = np.array([row.step if known else i for i, row in enumerate(rows)], dtype=np.float64)
    z = np.array([row.z for row in rows], dtype=np.float64)
    order = np.argsort(x, kind="stable")
    fig, (ax,) = _new_figure(1)
    ax.plot(x[order], z[order], "-", marker="o", color="C0", label="z vs reference", zorder=3, gid="z")
    not_related = np.array([row.related is not True for row in rows])
    if not_related.any():
        ax.plot(x[not_related], z[not_related], "x", color="red", markersize=9, markeredgewidth=2,
                label="not related", zorder=4, gid="unrelated")
    if threshold is not None:
        ax.axhline(threshold, linestyle="--", color="grey", label=f"threshold z = {threshold:.2f}", gid="threshold")
    else:
        thresholds = np.array([getattr(row, "threshold", np.nan) for row in rows], dtype=np.float64)
        if np.isfinite(thresholds).all():
            ax.plot(x[order], thresholds[order], "--", color="grey", label="threshold (analytic + controls)",
                    gid="threshold")
    _symlog(ax)
    ax.set_ylabel("lineage z (symlog)")
    if known:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.set_xticks(x, [Path(row.name).name for row in rows], rotation=30, ha="right", fontsize="small")
    ax.set_xlabel("global step" if known else "checkpoint (in the order given: not every step is known)")
    ax.set_title(title or "SeedPrints audit: checkpoints against the reference")
    ax.legend(loc="best", fontsize="small")
    return fig


def rename(curves: DriftCurves, run: str) -> DriftCurves:
    """A copy of ``curves`` under another run name."""
    return dataclasses.replace(curves, run=run)
