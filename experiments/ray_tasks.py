"""Ray as an executor of :func:`experiments.parallel.run_many`: each program's items in one Ray
task, on this machine or on a cluster, streamed back to the driver one by one as they finish."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import worker
from experiments.config import ConfigError, error_first_line
from experiments.interrupts import POLL_SECONDS, deferred_interrupts


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A ConfigError unless something answers at the ``host:port`` of ``address`` (a
    ``ray://`` address too): Ray itself retries an address nothing answers at for minutes.
    ``auto`` and other addresses without a port are left to Ray."""
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address if "://" in address else f"ray://{address}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise ConfigError("--ray-address", "--ray-address", address,
                          f"no Ray cluster answers there ({error.strerror or error}); start one "
                          "(ray start --head) or leave the option out to start Ray here") from None


def start_ray(workers: int, ray_address: str | None = None) -> None:
    """``ray.init()`` as a sweep does it: with ``workers`` CPUs on this machine, or joining the
    cluster at ``ray_address`` (this checkout's two packages are shipped to its workers)."""
    import logging

    import ray

    # Ray would otherwise report usage statistics to its servers: nothing here needs a network.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                   configure_logging=False)
    # Errors only, as logging_level asks, also from the line ray.init logs before it applies it:
    # every local start warned that token authentication (Ray's default) is on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if ray_address:
        root = Path(__file__).resolve().parent.parent
        where = {"address": ray_address,
                 "runtime_env": {"py_modules": [str(root / "gradtools"), str(root / "experiments")]}}
    else:
        where = {"num_cpus": workers}
    # ray.init installs its own SIGTERM handling (an exit 15 with no word, or absl's stack dump,
    # exit 134); the command's own (closed run directories, exit 143, one line) comes back after
    sigterm = signal.getsignal(signal.SIGTERM)
    # Ray gives a local node 30 s to register, a limit it does not let one change; on a machine
    # busy with other work (a test suite on every core) that may not be enough: one more try.
    for attempt in range(1 if ray_address else 2):
        try:
            ray.init(**where, **options)
            signal.signal(signal.SIGTERM, sigterm)
            return
        except Exception as error:  # noqa: BLE001 — Ray raises RuntimeError, ConnectionError, its own errors
            ray.shutdown()
            first_line = error_first_line(error)
            if not ray_address and attempt == 0 and "timed out during startup" in first_line:
                continue
            if ray_address:
                raise ConfigError("--ray-address", "--ray-address", ray_address,
                                  f"Ray could not join that cluster: {first_line}") from None
            raise ConfigError("--executor", "--executor", "ray", f"Ray could not start here: {first_line}") from None


def each_of_group(each: Callable[[Any], Any], items: list, threads: int | None = None):
    """Yields ``each(item)`` for the items of one program, one after the other (the program is
    traced and compiled once); as a Ray task, a generator streams each result to the driver
    when it is done. ``threads``: see :func:`experiments.worker.limit_threads` (a Ray task runs
    without :func:`experiments.worker.start`)."""
    worker.limit_threads(threads)
    try:
        for item in items:
            yield each(item)
    finally:
        worker.clear_models()


def run_on_ray(each: Callable[[Any], Any], items: list, groups: list[list[int]],
               on_result: Callable[[int, Any], None], workers: int, ray_address: str | None) -> None:
    """A Ray task per group of ``items``; ``on_result(index, each(items[index]))`` here as each
    item is done. Ray is started here (``workers`` CPUs) or joins ``ray_address``, unless it
    runs already. Ctrl-C cancels the tasks: their unfinished items run again next time."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor", "--executor", "ray",
                          "needs Ray: pip install 'gradtools[distributed]' (in a checkout: "
                          "pip install -e '.[distributed]')") from None
    started_here = not ray.is_initialized()
    if started_here:
        start_ray(workers, ray_address)
    try:
        remote = ray.remote(num_cpus=1)(each_of_group)
        threads = worker.threads_per_worker(workers) if not ray_address else None
        streams = {remote.remote(each, [items[i] for i in group], threads=threads): iter(group)
                   for group in groups}  # a Ray generator per group
        try:
            with deferred_interrupts() as interrupts:
                while streams:
                    ready, _ = ray.wait(list(streams), num_returns=1, timeout=POLL_SECONDS)
                    interrupts.check()
                    for stream in ready:
                        _receive(ray, stream, streams, on_result)
        except KeyboardInterrupt:
            for stream in streams:
                ray.cancel(stream, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


def _receive(ray, stream, streams: dict, on_result) -> None:
    """The next item of a ready Ray generator to ``on_result``; the generator leaves
    ``streams`` when it is done."""
    try:
        ref = next(stream)
    except StopIteration:
        del streams[stream]
        return
    on_result(next(streams[stream]), ray.get(ref))
