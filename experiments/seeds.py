"""One experiment over several seeds: a run directory each, a summary table and a band figure."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.config import load_config
from experiments.parallel import run_jobs
from experiments.runner import ARTICLE_SAMPLE_BATCH, Run, run_experiment
from gradtools.plots import plot_seed_band
from gradtools.summary import summarize


@dataclass
class SeedGroup:
    runs: list[Run]
    summary: pd.DataFrame
    summary_path: Path
    figure_path: Path


def summary_row(run: Run) -> dict:
    """The numbers of one run that a group table and the claims use."""
    summary = summarize(run.history)
    row = {"seed": run.config.seed, "run_dir": str(run.run_dir), "status": summary.status,
           "first_nonfinite_step": summary.first_nonfinite_step,
           "epochs_completed": summary.epochs_completed}
    if summary.first_layer is not None:
        row.update(final_loss=summary.final_loss, last_epoch_loss=summary.last_epoch_loss,
                   first_to_last_grad_ratio=summary.first_to_last_ratio,
                   max_abs_layer_1_grad_mean=summary.max_abs_first_grad_mean)
    return row


def run_seeds(reference: str, seeds: list[int], out: str | Path = "runs", overrides=(),
              loggers=list, workers: int = 1, run_figures: bool = False, **run_options) -> SeedGroup:
    """Run ``reference`` once per seed (in ``workers`` processes, each starting TensorFlow
    once; with backends such as Neptune, in this process); write
    ``<out>/<group>/<name>/seeds-<time>.csv`` and ``.png`` (the seeds' band) next to the run
    directories. Each run draws its own figures only with ``run_figures``."""
    configs = [load_config(reference, [*overrides, f"training.seed={seed}"]) for seed in seeds]
    if run_options.get("backends") and run_options["backends"].names:
        runs = [run_experiment(config, out, loggers=loggers(), figures=run_figures, **run_options)
                for config in configs]
    else:
        runs = run_jobs([(reference, [*overrides, f"training.seed={seed}"]) for seed in seeds], out,
                        workers=workers, loggers=loggers, figures=run_figures)
    summary = pd.DataFrame([summary_row(run) for run in runs])
    stem = Path(out) / configs[0].group / configs[0].name / f"seeds-{time.strftime('%Y%m%d-%H%M%S')}"
    summary_path, figure_path = stem.with_suffix(".csv"), stem.with_suffix(".png")
    summary.to_csv(summary_path, index=False)
    finished = [run.history.metrics for run in runs if not run.history.metrics.empty]
    plot_seed_band(finished, configs[0].run_name, ARTICLE_SAMPLE_BATCH).savefig(figure_path, dpi=100)
    return SeedGroup(runs, summary, summary_path, figure_path)
