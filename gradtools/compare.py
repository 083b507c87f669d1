"""Compare runs without a dashboard: one statistic of several run directories, overlaid."""

from __future__ import annotations

import glob
import json
import warnings
from pathlib import Path

from matplotlib.figure import Figure

from gradtools.columns import INDEX_COLUMNS
from gradtools.history import INFO_FILE, METRICS_FILE, DamagedRunWarning, History, RunDirectoryError
from gradtools.loggers.local import write_atomically
from gradtools.plots import plot_comparison
from gradtools.validation import nearest_existing


class CompareError(ValueError):
    """A run directory or statistic that cannot be compared; the message lists what can."""


def expand_run_dirs(patterns: list[str]) -> list[tuple[Path, bool]]:
    """Paths and shell-style globs (also when the shell did not expand them) to run
    directories, in order, without repeats; each with whether a glob found it."""
    found: dict[Path, bool] = {}
    for pattern in patterns:
        # a glob's files are not runs (next to the runs of `--seeds`: its summary table and figure)
        matches = sorted(m for m in glob.glob(pattern) if Path(m).is_dir()) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise CompareError(f"{pattern}: matches no directory")
        for match in matches:
            path = Path(match)
            if not (path / METRICS_FILE).is_file() or not (path / INFO_FILE).is_file():
                raise CompareError(f"{path}: not a run directory (it needs metrics.csv and run.json; "
                                   "run directories look like runs/<group>/<name>/<run id>)")
            found.setdefault(path, glob.has_magic(pattern))
    return list(found.items())


def run_label(run_dir: Path, history: History) -> str:
    info = json.loads((run_dir / INFO_FILE).read_text())
    label = f"{info.get('experiment', run_dir.name)} (seed {info.get('seed')})"
    return label + (" [unfinished]" if history.unfinished else "")


def _readable(run_dir: Path, from_glob: bool, stat: str) -> History | None:
    """The run, or None (with a warning) for a run a glob found that cannot be compared; a run
    named on its own that cannot be compared is an error."""
    try:
        history = History.from_run_dir(run_dir)
        if history.metrics.empty:
            raise RunDirectoryError(f"{run_dir}: no logged steps (metrics.csv has no rows)")
    except RunDirectoryError as error:
        if not from_glob:
            raise CompareError(str(error)) from None
        warnings.warn(f"skipped {error}", DamagedRunWarning, stacklevel=2)
        return None
    if stat not in history.metrics.columns:
        available = ", ".join(c for c in history.metrics.columns if c not in INDEX_COLUMNS)
        raise CompareError(f"{run_dir} has no statistic {stat!r}; available: {available}")
    return history


def figure_path(out: str | Path) -> Path:
    """Where a comparison figure goes: ``out`` itself, ``out/comparison.png`` for a
    directory, with ``.png`` added when ``out`` has no suffix."""
    out = Path(out)
    if out.is_dir():
        return out / "comparison.png"
    return out if out.suffix else out.with_suffix(".png")


def _check_figure_target(out: str | Path) -> None:
    """The figure's folder is a directory, or can be made, and its suffix a format matplotlib
    writes: bad input, said before any run is read."""
    target = figure_path(out)
    existing = nearest_existing(target.parent)
    if not existing.is_dir():
        raise CompareError(f"{out}: {existing} is a file, not a directory; give a figure file or a directory")
    formats = Figure().canvas.get_supported_filetypes()
    if target.suffix[1:].lower() not in formats:
        raise CompareError(f"{out}: matplotlib writes no {target.suffix!r} figures; give a file ending in "
                           + ", ".join(f".{name}" for name in sorted(formats)))


def compare_runs(patterns: list[str], stat: str = "layer_1/grad_abs_mean", out: str | Path | None = None):
    """Draw ``stat`` of every run matched by ``patterns``; save to ``out`` (see
    :func:`figure_path`) if given. Returns (figure, the run directories drawn)."""
    if out is not None:
        _check_figure_target(out)
    runs, run_dirs = {}, []
    for run_dir, from_glob in expand_run_dirs(patterns):
        history = _readable(run_dir, from_glob, stat)
        if history is None:
            continue
        label = run_label(run_dir, history)
        while label in runs:
            label += "'"
        runs[label] = history.metrics
        run_dirs.append(run_dir)
    if not runs:
        raise CompareError(f"no run with logged steps among {', '.join(patterns)}")
    figure = plot_comparison(runs, stat, f"{stat} of {len(runs)} runs")
    if out is not None:
        save_comparison(figure, out)
    return figure, run_dirs


def save_comparison(figure, out: str | Path) -> Path:
    """Write a comparison figure to ``out`` (see :func:`figure_path`); returns its path."""
    target = figure_path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    # whole or not at all (a full disk, Ctrl-C); the partial file keeps the format's suffix
    write_atomically(target, lambda partial: figure.savefig(partial, dpi=100, format=target.suffix.lstrip(".")))
    return target
