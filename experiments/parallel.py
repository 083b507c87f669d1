"""Many runs at once: worker processes across the machine's cores.

Each worker starts TensorFlow once and runs its share of the jobs; every run writes its own
run directory, which the parent then reads back. Results are identical to running the jobs
one by one (each run seeds itself and turns on op determinism).

Ctrl-C (or SIGTERM) reaches the parent only: workers ignore the terminal's SIGINT. The parent
cancels the queued jobs, asks the running ones to stop (SIGTERM, which a worker turns into
KeyboardInterrupt: its run is closed as ``interrupted``), waits a few seconds for them, then
ends any that are left, and raises KeyboardInterrupt. Finished runs are kept.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from experiments import worker
from experiments.config import load_config
from experiments.runner import Run, run_experiment
from gradtools.history import History

#: A job: a config reference and its --set overrides.
Job = tuple[str, list[str]]

#: Seconds the running workers get to close their runs after Ctrl-C before they are ended.
STOP_GRACE_SECONDS = 5.0


def default_workers() -> int:
    """Both cores of the reference machine (measured to pay: see the README), at most."""
    return max(1, min(2, os.cpu_count() or 1))


class _Interrupts:
    """Ctrl-C and SIGTERM noted as they come and raised by :meth:`check` where the loop
    can stop cleanly (raised at once, a KeyboardInterrupt can land inside a library's
    callback, which only prints it)."""

    def __init__(self):
        self.signum: int | None = None
        self.handlers = {}

    def note(self, signum, frame):
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            handler = self.handlers.get(self.signum)
            if callable(handler):
                handler(self.signum, None)  # the command's own: KeyboardInterrupt, or Terminated
            raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[_Interrupts]:
    interrupts = _Interrupts()
    for signum in (signal.SIGINT, signal.SIGTERM):
        interrupts.handlers[signum] = signal.signal(signum, interrupts.note)
    try:
        yield interrupts
    finally:
        for signum, handler in interrupts.handlers.items():
            signal.signal(signum, handler)


#: How often a multi-run loop looks for a finished job or a Ctrl-C.
POLL_SECONDS = 0.2


def map_in_workers(function: Callable[[Any], Any], arguments: list[Any], workers: int,
                   on_result: Callable[[int, Any], None]) -> None:
    """``function(arguments[i])`` in ``workers`` spawned processes; ``on_result(i, result)`` in
    this process as each finishes. Interruptible as the module says."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: TF is not fork-safe
    with deferred_interrupts() as interrupts:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=worker.start)
        try:
            pending = {pool.submit(function, argument): i for i, argument in enumerate(arguments)}
            while pending:
                done, _ = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                interrupts.check()
                for future in done:
                    on_result(pending.pop(future), future.result())
        except BaseException:
            _stop(pool)
            raise
        pool.shutdown()


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued, ask the workers to stop, end the ones that do not."""
    processes = list((pool._processes or {}).values())  # noqa: SLF001 - no public handle on them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


def program_key(config) -> str:
    """What a run compiles, as text: its config without the values that enter the compiled
    epoch as inputs (the seed, the initializers' parameters). Runs with one key share one
    compiled program (:mod:`gradtools.compilation_cache`)."""
    tables = config.to_dict()
    tables["training"].pop("seed", None)
    for name in ("kernel_initializer", "output_kernel_initializer", "recurrent_initializer"):
        if isinstance(tables["model"].get(name), dict):
            tables["model"][name] = tables["model"][name].get("class_name")
    return json.dumps(tables, sort_keys=True, default=str)


def program_order(keys: list[str]) -> list[int]:
    """Indices in the order to run them: the first run of each program, then the others, so
    every program is compiled once and the rest load it."""
    firsts = {key: index for index, key in reversed(list(enumerate(keys)))}
    leading = sorted(firsts.values())
    return leading + [i for i in range(len(keys)) if i not in set(leading)]


def run_jobs(jobs: list[Job], out: str | Path, workers: int = 1, loggers=list,
             figures: bool = True) -> list[Run]:
    """Run every job, in this process (``workers`` = 1, with ``loggers``) or in ``workers``
    spawned processes (quiet), each program's first run first; returns the runs in the order of
    ``jobs``, each read back from its run directory, so the numbers are the same either way.
    ``figures=False``: no per-run figures (seed replicas, claims)."""
    configs = [load_config(reference, overrides) for reference, overrides in jobs]
    order = program_order([program_key(config) for config in configs])
    run_dirs: list = [None] * len(jobs)

    def keep(index: int, run_dir) -> None:
        run_dirs[order[index]] = run_dir

    if workers <= 1 or len(jobs) <= 1:
        for position, index in enumerate(order):
            keep(position, run_experiment(configs[index], out, loggers=loggers(), figures=figures).run_dir)
    else:
        arguments = [(*jobs[index], str(out), figures) for index in order]
        map_in_workers(worker.run_job, arguments, workers, keep)
    return [Run(config, Path(run_dir), History.from_run_dir(run_dir)) for config, run_dir in zip(configs, run_dirs)]
