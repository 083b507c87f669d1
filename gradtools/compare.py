"""Compare runs without a dashboard: one statistic of several run directories, overlaid."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from gradtools.history import History
from gradtools.plots import plot_comparison


class CompareError(ValueError):
    """A run directory or statistic that cannot be compared; the message lists what can."""


def expand_run_dirs(patterns: list[str]) -> list[Path]:
    """Paths and shell-style globs (also when the shell did not expand them) to run
    directories, in order, without repeats."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise CompareError(f"{pattern}: matches no path")
        for match in matches:
            path = Path(match)
            if not (path / "metrics.csv").is_file() or not (path / "run.json").is_file():
                raise CompareError(f"{path}: not a run directory (it needs metrics.csv and run.json; "
                                   "run directories look like runs/<group>/<name>/<run id>)")
            if path not in found:
                found.append(path)
    return found


def run_label(run_dir: Path) -> str:
    info = json.loads((run_dir / "run.json").read_text())
    return f"{info.get('experiment', run_dir.name)} (seed {info.get('seed')})"


def compare_runs(patterns: list[str], stat: str = "layer_1/grad_abs_mean", out: str | Path | None = None):
    """Draw ``stat`` of every run matched by ``patterns``; save to ``out`` if given.
    Returns (figure, list of run directories)."""
    run_dirs = expand_run_dirs(patterns)
    runs = {}
    for run_dir in run_dirs:
        metrics = History.from_run_dir(run_dir).metrics
        if stat not in metrics.columns:
            available = ", ".join(c for c in metrics.columns if c not in ("step", "epoch", "batch"))
            raise CompareError(f"{run_dir} has no statistic {stat!r}; available: {available}")
        label = run_label(run_dir)
        while label in runs:
            label += "'"
        runs[label] = metrics
    figure = plot_comparison(runs, stat, f"{stat} of {len(runs)} runs")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)
    return figure, run_dirs
