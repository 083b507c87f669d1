"""Many runs at once: worker processes across the machine's cores.

Each worker starts TensorFlow once and runs its share of the jobs; every run writes its own
run directory, which the parent then reads back. Results are identical to running the jobs
one by one (each run seeds itself and turns on op determinism).

Ctrl-C (or SIGTERM) reaches the parent only: workers ignore the terminal's SIGINT. The parent
cancels the queued jobs, asks the running ones to stop (SIGTERM, which a worker turns into
KeyboardInterrupt: its run is closed as ``interrupted``), waits a few seconds for them, then
ends any that are left, and raises KeyboardInterrupt. Finished runs are kept.

A worker that ends abruptly (killed, say by the kernel when memory runs out) stops the others
the same way and raises :class:`experiments.worker.WorkerLost`: finished runs are kept there too.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from experiments import worker
from experiments.config import load_config
from experiments.interrupts import POLL_SECONDS, deferred_interrupts
from experiments.runner import NO_BACKENDS, Backends, Run, run_experiment
from gradtools.history import History
from gradtools.programs import without_inputs

#: A job: a config reference and its --set overrides.
Job = tuple[str, list[str]]

#: Seconds the running workers get to close their runs after Ctrl-C before they are ended.
STOP_GRACE_SECONDS = 5.0


def map_in_workers(function: Callable[..., Any], arguments: list[Any], workers: int,
                   on_result: Callable[[int, Any], None],
                   on_item: Callable[[int, int, Any], None] | None = None) -> None:
    """``function(arguments[i])`` in ``workers`` spawned processes; ``on_result(i, result)`` in
    this process as each finishes. With ``on_item``, the call is ``function(arguments[i],
    report)``, and each ``report(position, result)`` it makes reaches ``on_item(i, position,
    result)`` here within a poll: the items a call finished are kept when a stop ends it.
    Interruptible as the module says."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: TF is not fork-safe
    items = _Items(context) if on_item is not None else None
    with deferred_interrupts() as interrupts:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=worker.start,
                                   initargs=(worker.threads_per_worker(workers), items and items.queue))
        try:
            pending = {pool.submit(function, argument, *_reporter(i, items)): i
                       for i, argument in enumerate(arguments)}
            while pending:
                done, _ = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                if items is not None:
                    items.take(on_item)
                interrupts.check()
                for future in done:
                    on_result(pending.pop(future), _result(future))
        except BaseException:
            _stop(pool)
            if items is not None:
                items.close(on_item)
            raise
        pool.shutdown()
        if items is not None:
            items.close(on_item)


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool:
        raise worker.WorkerLost() from None


def _reporter(call: int, items) -> tuple:
    """The ``report`` argument of call ``call`` in a worker, if items are reported."""
    return () if items is None else (functools.partial(worker.send_item, call),)


class _Items:
    """The queue the workers report finished items to, read by a thread of this process: a
    worker that dies while writing one leaves half an item in the pipe, and reading it would
    block the command's loop (and its Ctrl-C) until the pipe closes."""

    def __init__(self, context):
        self.queue = context.SimpleQueue()
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.reader = threading.Thread(target=self._read, name="gradtools-items", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            while True:
                self.ready.put(self.queue.get())
        except (EOFError, OSError):  # every writer closed; a half-written item reads as the end
            pass

    def take(self, on_item) -> None:
        """Hand every item read so far to ``on_item``."""
        while True:
            try:
                item = self.ready.get_nowait()
            except queue.Empty:
                return
            on_item(*item)

    def close(self, on_item) -> None:
        """Once the workers are gone: close this process's end for writing, read what is left
        and hand it on (an item a stopped worker left half written is dropped: it runs again)."""
        self.queue._writer.close()  # noqa: SLF001 - the workers are gone: nobody else writes
        self.reader.join(STOP_GRACE_SECONDS)
        self.take(on_item)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued, ask the workers to stop, end the ones that do not, and wait for
    the pool's manager thread to wind up (the pool's internals are private: shutdown(wait=False)
    drops its handles on them). Two ways the manager thread outlives a stop, both seen in the
    test suite under load:

    - a worker ended while sending a result (a point's files) leaves half a message in the
      result pipe, and the manager waits for the rest forever: this process holds the pipe's
      other end too. Closed once the workers are gone, the read ends (EOF), the pool counts
      as broken and the thread ends (tested in tests/test_faults.py);
    - left running at exit, it closes its wake-up pipe while the interpreter's exit hook
      writes to it: an OSError traceback on Python 3.11 (CPython gh-125451)."""
    processes = list((pool._processes or {}).values())  # noqa: SLF001
    manager, results = pool._executor_manager_thread, pool._result_queue  # noqa: SLF001
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
    if results is not None:
        results._writer.close()  # noqa: SLF001 - the workers are gone: nobody else writes
    if manager is not None:
        manager.join(STOP_GRACE_SECONDS)


def program_key(config) -> str:
    """What a run compiles, as text: its config without what the compiled epoch takes as
    inputs (:func:`gradtools.programs.without_inputs`, the library's rule: initializers, the
    seed, a learning rate that is a number) or never reaches (the experiment's name, the number
    of epochs, how often rows are logged). Runs with one key share one compiled program in a
    worker. The library's :func:`gradtools.programs.program_key` applies the same rule to a
    built model; this one groups runs before any model is built."""
    tables = config.to_dict()
    for name in ("epochs", "log_every"):
        tables["training"].pop(name, None)
    tables["experiment"] = {}
    return json.dumps(without_inputs(tables), sort_keys=True, default=str)


def program_groups(keys: list[str], workers: int = 1) -> list[list[int]]:
    """The indices of the runs of each program, programs in order of first appearance: a
    group runs in one process, which traces and compiles its program once. With fewer
    programs than ``workers``, the largest groups are split so that every worker has one."""
    by_key: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        by_key.setdefault(key, []).append(index)
    groups = list(by_key.values())
    while len(groups) < workers and max(map(len, groups), default=0) > 1:
        largest = max(groups, key=len)
        position = groups.index(largest)
        half = (len(largest) + 1) // 2
        groups[position:position + 1] = [largest[:half], largest[half:]]
    return groups


#: Where :func:`run_many` runs its items: this machine's processes, or Ray's tasks.
EXECUTORS = ("local", "ray")


def run_many(each: Callable[[Any], Any], items: list, keys: list[str], on_result: Callable[[int, Any], None],
             executor: str = "local", workers: int = 1, ray_address: str | None = None) -> None:
    """``each(item)`` for every item, and ``on_result(index, result)`` here as each is done, so
    that a Ctrl-C keeps every item finished before it: the one way the suite runs many runs
    (figures, seeds, claims, sweeps, the phase diagram). The items of one program (equal
    ``keys``) run together in one process, which traces and compiles it once.

    ``local``: in this process with one worker (its compiled programs stay for later runs),
    else spread over ``workers`` spawned processes (``each`` is then a module's function);
    ``ray``: a Ray task per program, on this machine or on the cluster at ``ray_address``
    (:mod:`experiments.ray_tasks`). Interruptible as the module says."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    groups = program_groups(keys, workers)
    if executor == "ray":
        from experiments.ray_tasks import run_on_ray

        run_on_ray(each, items, groups, on_result, workers, ray_address)
    elif workers <= 1 or len(groups) <= 1:
        for group in groups:
            for index in group:
                on_result(index, each(items[index]))
    else:
        def deliver(group_index: int, position: int, result) -> None:
            on_result(groups[group_index][position], result)

        map_in_workers(worker.run_group, [(each, [items[i] for i in group]) for group in groups], workers,
                       on_result=lambda group_index, results: None, on_item=deliver)


def run_jobs(jobs: list[Job], out: str | Path, workers: int = 1, loggers=list,
             figures: bool = True, on_run: Callable[[int, Run], None] | None = None,
             backends: Backends = NO_BACKENDS) -> list[Run]:
    """Run every job with :func:`run_many`, in this process (``workers`` = 1, with ``loggers``
    and the logger ``backends``) or in ``workers`` spawned processes (quiet, no backends), the
    runs of one program together; returns the runs in the
    order of ``jobs``, each read back from its run directory, so the numbers are the same
    either way. ``figures=False``: no per-run figures (seed replicas, claims).
    ``on_run(index, run)`` is called here as each job's run is read back, while the others
    still train."""
    configs = [load_config(reference, overrides) for reference, overrides in jobs]
    runs: list = [None] * len(jobs)

    def keep(index: int, run_dir) -> None:
        runs[index] = Run(configs[index], Path(run_dir), History.from_run_dir(run_dir))
        if on_run is not None:
            on_run(index, runs[index])

    def here(job):
        reference, overrides, _, _ = job
        return run_experiment(load_config(reference, list(overrides)), out, loggers=loggers(), figures=figures,
                              backends=backends).run_dir

    items = [(*job, str(out), figures) for job in jobs]
    run_many(worker.run_job if workers > 1 else here, items, [program_key(config) for config in configs], keep,
             workers=workers)
    return runs
