"""A persistent XLA compilation cache: a compiled epoch is kept on disk and reused when a
later process compiles the same program after the same traces.

TensorFlow keys an entry by the program and by the names it gave the traced functions, which
count up through a process. A command run again (``make run-experiment``, a sweep, ``claims``,
a worker given the same runs) traces in the same order and loads its entries; a process that
traced other functions first compiles anew (measured: three small jit-compiled functions traced
before a one-epoch run of the article's net made it miss: 1.39 s instead of 0.60 s). Within one
process, :func:`gradtools.training.compiled_program` reuses the compiled program itself.

TensorFlow reads ``TF_XLA_FLAGS`` once, when XLA starts, so :func:`enable` must run before the
first compilation (the command-line entry points call it before importing TensorFlow). The
cache lives in ``$GRADTOOLS_XLA_CACHE`` if set, else ``$XDG_CACHE_HOME/gradtools/xla`` (by
default ``~/.cache/gradtools/xla``), in one folder per TensorFlow version and CPU: an entry is
machine code for the CPU that compiled it, and another TensorFlow or CPU never loads it.
``GRADTOOLS_XLA_CACHE=off`` turns the cache off.

A program is what a run compiles: the model, the loss, the optimizer's kind, the batch and
data shapes. Values that vary between runs (the seed, the learning rate, the initial weights)
are inputs of the compiled epoch, not part of it, so runs that differ only in them share one
entry; their numbers are the same whether the entry was compiled or loaded.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

ENVIRONMENT = "GRADTOOLS_XLA_CACHE"
OFF = ("off", "0", "false", "no", "")
_FLAG = "--tf_xla_persistent_cache_directory"


def _cpu_fingerprint() -> str:
    """What makes compiled code runnable here: the architecture, the CPU model and features."""
    description = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    description.append(line.strip())
                if line.strip() == "":
                    break  # the first processor describes them all
    except OSError:
        description.append(platform.processor())
    return hashlib.sha256("\n".join(description).encode()).hexdigest()[:12]


def _tensorflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tensorflow")
    except PackageNotFoundError:
        return "unknown"


def cache_directory() -> Path | None:
    """Where compiled programs are kept, or None when the cache is turned off."""
    chosen = os.environ.get(ENVIRONMENT)
    if chosen is not None and chosen.strip().lower() in OFF:
        return None
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base = Path(chosen) if chosen else user_cache / "gradtools" / "xla"
    return base / f"tf-{_tensorflow_version()}-cpu-{_cpu_fingerprint()}"


def enable() -> Path | None:
    """Turn the cache on for this process and the processes it starts (through
    ``TF_XLA_FLAGS``), unless it is off or ``TF_XLA_FLAGS`` already names a directory.
    Returns the directory in use, or None."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if _FLAG in flags:
        return Path(flags.split(_FLAG + "=", 1)[1].split()[0])
    directory = cache_directory()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache only costs the compilation
    os.environ["TF_XLA_FLAGS"] = f"{flags} {_FLAG}={directory}".strip()
    return directory
