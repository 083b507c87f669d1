"""Many runs at once: worker processes across the machine's cores.

Each worker starts TensorFlow once and runs its share of the jobs; every run writes its own
run directory, which the parent then reads back. Results are identical to running the jobs
one by one (each run seeds itself and turns on op determinism).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from experiments import worker
from experiments.config import load_config
from experiments.runner import Run, run_experiment
from gradtools.history import History

#: A job: a config reference and its --set overrides.
Job = tuple[str, list[str]]


def default_workers() -> int:
    """Both cores of the reference machine (measured to pay: see the README), at most."""
    return max(1, min(2, os.cpu_count() or 1))


def run_jobs(jobs: list[Job], out: str | Path, workers: int = 1, loggers=list) -> list[Run]:
    """Run every job, in this process (``workers`` = 1, with ``loggers``) or in ``workers``
    spawned processes (quiet); returns the runs in the order of ``jobs``, each read back from
    its run directory, so the numbers are the same either way."""
    if workers <= 1 or len(jobs) <= 1:
        run_dirs = [run_experiment(load_config(reference, overrides), out, loggers=loggers()).run_dir
                    for reference, overrides in jobs]
    else:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: TF is not fork-safe
        with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                 initializer=worker.start) as pool:
            run_dirs = list(pool.map(worker.run_job, [(ref, list(ov), str(out)) for ref, ov in jobs]))
    return [Run(load_config(ref, ov), Path(run_dir), History.from_run_dir(run_dir))
            for (ref, ov), run_dir in zip(jobs, run_dirs)]
