"""Entry points of worker processes. This module imports nothing heavy at the top, so a
spawned worker starts TensorFlow quietly (``start``) before anything else imports it."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

#: True in a worker process of a pool (after :func:`start`), not where jobs run in the command's own.
_pool_worker = False
#: True while this worker runs a job: a stop request then interrupts the run, else ends the worker.
_in_job = False
#: In a pool worker: the queue each finished item goes to (see :func:`send_item`).
_finished_items = None
EXIT_STOPPED = 143


class WorkerLost(RuntimeError):
    """A worker process ended abruptly. ``str()`` is the message to show the user."""

    def __init__(self):
        super().__init__("a worker process ended abruptly (killed, or out of memory: fewer "
                         "--workers need less); what finished is kept: run the command again to go on")


def _stop_requested(signum, frame):
    if not _in_job:
        os._exit(EXIT_STOPPED)  # between jobs (or still starting): nothing to close
    raise KeyboardInterrupt


def start(threads: int | None = None, finished_items=None) -> None:
    """A worker ignores the terminal's Ctrl-C (its parent decides) and takes SIGTERM, the
    parent's request to stop, as a KeyboardInterrupt: the run in progress closes as
    ``interrupted`` and the worker ends quietly. ``threads``: see :func:`limit_threads`;
    ``finished_items``: the parent's queue for :func:`send_item`."""
    global _pool_worker, _finished_items
    _pool_worker, _finished_items = True, finished_items
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_requested)
    end_with_parent()
    limit_threads(threads)
    quiet_tensorflow()


def end_with_parent() -> None:
    """SIGTERM to this process when the process that started it ends, however it ends (kill -9
    included: a worker would otherwise wait for ever to hand its results to nobody; a server
    would keep its port). Linux's PR_SET_PDEATHSIG; elsewhere nothing. A parent already gone
    (this process handed to init) ends it at once."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def default_workers() -> int:
    """Both cores of the reference machine, at most (two workers pay there: `make bench`'s
    sweep rows)."""
    return max(1, min(2, os.cpu_count() or 1))


def threads_per_worker(workers: int) -> int:
    """The cores each of ``workers`` processes has to itself."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def command_threads(arguments: list[str]) -> int | None:
    """TensorFlow threads for a command's own process: one for the suite's nets, which are
    too small to gain from more (a second thread made the sigmoid baseline's epochs slower,
    and an LSTM's cost more CPU for the same wall time); None (every core) for the gallery's
    real-sized models."""
    return None if arguments[:1] == ["gallery"] else 1


def limit_threads(threads: int | None) -> None:
    """Let TensorFlow's operations use at most ``threads`` threads in this process (None:
    its default, every core), unless TF_NUM_INTRAOP_THREADS says otherwise. Workers that
    share the cores each spin up a thread per core otherwise, and burn CPU the other worker
    then lacks for no gain in wall time. The numbers do not change. Only before TensorFlow
    starts."""
    if threads is not None and "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))


@contextlib.contextmanager
def job_in_progress():
    """Marks a job in progress; in a pool worker, a stop request ends the worker once the run
    is closed (in the command's own process, Ctrl-C goes on up as usual)."""
    global _in_job
    _in_job = True
    try:
        yield
    except KeyboardInterrupt:
        if _pool_worker:
            os._exit(EXIT_STOPPED)  # the run directory is closed; no traceback for the terminal
        raise
    finally:
        _in_job = False


def send_item(call: int, position: int, result) -> None:
    """Hand the parent the result of item ``position`` of call ``call`` as soon as it is
    done, so that a stop keeps it (the call's own result only comes when all its items are)."""
    _finished_items.put((call, position, result))


def quiet_tensorflow() -> None:
    from gradtools.tf_startup import import_tensorflow_quietly

    import_tensorflow_quietly()


def run_job(job: tuple[str, list[str], str, bool]) -> str:
    """Run a (config reference, overrides, out, figures) job; return its run directory."""
    from experiments.config import load_config
    from experiments.runner import run_experiment

    reference, overrides, out, figures = job
    with job_in_progress():
        return str(run_experiment(load_config(reference, list(overrides)), out, figures=figures).run_dir)


def run_group(argument: tuple, report) -> None:
    """In a worker: ``each(item)`` for the items of one program, one after the other (it is
    traced and compiled once), each result handed to ``report(position, result)`` as it is
    done; then the models and programs are dropped."""
    each, items = argument
    try:
        for position, item in enumerate(items):
            report(position, each(item))
    finally:
        clear_models()


def clear_models() -> None:
    """Drop the finished points' models and compiled functions, or a worker that runs many
    points grows by tens of MB per point."""
    import gc

    import keras

    from gradtools import programs

    programs.clear()
    keras.backend.clear_session()
    gc.collect()
