"""The figures of a set of experiments, from fresh runs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from experiments.parallel import Job, run_jobs
from experiments.runner import NO_BACKENDS, Backends, Run
from gradtools.history import FIGURES_DIR
from gradtools.plots import plot_comparison

COMPARED_STAT = "layer_1/grad_abs_mean"
#: Groups compared by another column, and by its median over an epoch rather than its mean:
#: the spike guard's variants differ in their loss, between the spikes.
COMPARED_STATS = {"spikes": ("loss", "median")}


def group_comparison(runs: list[Run], group: str):
    """Layer-1 gradient magnitude of every variant of a group, on a log scale (the loss's
    median over an epoch, for spikes/)."""
    stat, center = COMPARED_STATS.get(group, (COMPARED_STAT, "mean"))
    return plot_comparison({run.config.name: run.history.metrics for run in runs}, stat,
                           f"{group}: {stat} of every variant", center=center)


def write_article_figures(jobs: list[Job], runs_out: Path, figures_out: Path,
                          loggers: Callable[[], list] = list, backends: Backends = NO_BACKENDS) -> list[Path]:
    """Run each (config reference, overrides) job (:func:`experiments.parallel.run_jobs`), copy
    its figures to ``<group>_<name>[_<figure>].png`` as soon as it is done, then draw one
    comparison figure per group. Returns the figure paths."""
    figures_out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    runs = run_jobs(jobs, runs_out, loggers=loggers, backends=backends,
                    on_run=lambda index, run: written.extend(copy_run_figures(run, figures_out)))
    by_group: dict[str, list[Run]] = {}
    for run in runs:
        by_group.setdefault(run.config.group, []).append(run)
    for group, group_runs in by_group.items():
        target = figures_out / f"{group}_comparison.png"
        group_comparison(group_runs, group).savefig(target, dpi=100)
        written.append(target)
    return written


def copy_run_figures(run: Run, figures_out: Path) -> list[Path]:
    """The run's mean-gradient figure as ``<group>_<name>.png``, and its state-gradient and
    spike figures, when it drew them, as ``<group>_<name>_<figure>.png``."""
    config = run.config
    targets = [figures_out / f"{config.group}_{config.name}.png"]
    shutil.copyfile(run.run_dir / FIGURES_DIR / "mean_gradient.png", targets[0])
    for extra in ("state_gradients", "spikes"):
        drawn = run.run_dir / FIGURES_DIR / f"{extra}.png"
        if drawn.is_file():
            targets.append(figures_out / f"{config.group}_{config.name}_{extra}.png")
            shutil.copyfile(drawn, targets[-1])
    return targets
