"""Start TensorFlow for a command-line entry point (``python -m gradtools preflight``, the
experiment suite's commands and workers): with the persistent compilation cache on
(:mod:`gradtools.compilation_cache`) and without its start-up chatter. It changes settings of
the whole process, so only entry points import it, never the library's modules
(tests/test_structure.py).

TensorFlow 2.21's CUDA stub writes "Could not find cuda drivers" and absl's "All log messages
before absl::InitializeLog()" to file descriptor 2 on every CPU-only start, whatever
TF_CPP_MIN_LOG_LEVEL says; a user then sees them above every result. Loading a cached program
logs, at error level, that the cache entry is not text and which CPU features it was compiled
for; so while the cache is on, TensorFlow's C++ log shows fatal errors only (its errors reach
Python as exceptions). ``TF_CPP_MIN_LOG_LEVEL=0`` shows everything.

Such a process also collects Python's cyclic garbage less often (:func:`collect_garbage_less_often`).
"""

from __future__ import annotations

import gc
import os

from gradtools import compilation_cache

#: Python's collector thresholds for such a process (Python's own: 700, 10, 10).
GC_THRESHOLDS = (10_000, 10, 10)
_frozen = False


def collect_garbage_less_often() -> None:
    """Collect cyclic garbage after 10 000 new container objects rather than 700. Importing
    TensorFlow and Keras makes about a million such objects, and each full collection went
    through all of them again: the collector was a good part of a short run's CPU
    (``perf record``), for no memory saved."""
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_what_exists() -> None:
    """Full collections no longer look through the objects that exist now (``gc.freeze``:
    the modules, classes and functions of the imports). Once per process: a later freeze
    would keep for good whatever garbage still waits, a finished sweep point's model."""
    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True


def import_tensorflow_quietly(cpu_devices: int = 1) -> None:
    """Turn the compilation cache on, then import TensorFlow and initialize its devices with
    fd 2 muted, unless the user asked for TensorFlow's logs with ``TF_CPP_MIN_LOG_LEVEL=0``.
    ``cpu_devices`` > 1 splits the CPU into that many logical devices (for a MirroredStrategy
    on one machine), which can only be done before the devices are initialized.
    Python errors still surface (they are raised, and printed after stderr is restored).
    The garbage collector runs less often from the import on, and then skips what it made
    (:func:`collect_garbage_less_often`, :func:`freeze_what_exists`)."""
    collect_garbage_less_often()
    _import_tensorflow_quietly(cpu_devices)
    freeze_what_exists()


def _import_tensorflow_quietly(cpu_devices: int) -> None:
    cached = compilation_cache.enable() is not None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if cached else "2")
    # XLA flags of the user's: a flag XLA does not know ends the process with XLA's own message
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" or compilation_cache.other_xla_flags():
        _split_cpu(cpu_devices)
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        _split_cpu(cpu_devices).config.list_logical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _split_cpu(cpu_devices: int):
    """TensorFlow, imported, with its CPU split into ``cpu_devices`` logical devices."""
    import tensorflow as tf

    if cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    return tf
