"""The figures of a set of experiments, from fresh runs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from experiments.config import ExperimentConfig
from experiments.runner import NO_BACKENDS, Backends, Run, run_experiment
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


def write_article_figures(configs: list[ExperimentConfig], runs_out: Path, figures_out: Path,
                          loggers: Callable[[], list] = list, backends: Backends = NO_BACKENDS) -> list[Path]:
    """Run each config, copy its mean-gradient figure to ``<group>_<name>.png`` and draw one
    comparison figure per group. Returns the figure paths."""
    figures_out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    by_group: dict[str, list[Run]] = {}
    for config in configs:
        run = run_experiment(config, runs_out, loggers=loggers(), backends=backends)
        by_group.setdefault(config.group, []).append(run)
        target = figures_out / f"{config.group}_{config.name}.png"
        shutil.copyfile(run.run_dir / FIGURES_DIR / "mean_gradient.png", target)
        written.append(target)
        for extra in ("state_gradients", "spikes"):
            drawn = run.run_dir / FIGURES_DIR / f"{extra}.png"
            if drawn.is_file():
                target = figures_out / f"{config.group}_{config.name}_{extra}.png"
                shutil.copyfile(drawn, target)
                written.append(target)
    for group, runs in by_group.items():
        target = figures_out / f"{group}_comparison.png"
        group_comparison(runs, group).savefig(target, dpi=100)
        written.append(target)
    return written
