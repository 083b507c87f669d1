"""A persistent XLA compilation cache: a compiled epoch is kept on disk and reused by any later
process that compiles the same program.

TensorFlow keys an entry by the program and by the names it gave the traced functions, and it
numbers those from one counter of the whole process: the same program traced after other
functions got other names and missed the entry.
:func:`named_after` numbers a program's functions from its key instead, while it is traced.
Within one process, :mod:`gradtools.programs` reuses the compiled program itself.

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

import contextlib
import errno
import hashlib
import itertools
import os
import platform
import re
import warnings
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
    named = directory_in_use()
    if named is not None:
        return named
    directory = cache_directory()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable cache only costs the compilation
    flags = os.environ.get("TF_XLA_FLAGS", "")
    os.environ["TF_XLA_FLAGS"] = f"{flags} {_FLAG}={directory}".strip()
    return directory


def directory_in_use() -> Path | None:
    """The cache directory ``TF_XLA_FLAGS`` names (TensorFlow reads it when XLA starts, as
    ``--flag=DIR``); None when it names none, or an empty one."""
    found = re.search(re.escape(_FLAG) + r"=(\S*)", os.environ.get("TF_XLA_FLAGS", ""))
    return Path(found.group(1)) if found and found.group(1) else None


def other_xla_flags() -> bool:
    """``TF_XLA_FLAGS`` holds flags of the user's besides the cache's (XLA ends the process
    with a message of its own on one it does not know)."""
    flags = re.sub(re.escape(_FLAG) + r"=\S*", "", os.environ.get("TF_XLA_FLAGS", ""))
    return bool(flags.strip())


#: TensorFlow's words for an entry it could not load: cut short, empty, not a proto, another key.
_READ_FAILURES = ("Read less bytes than requested", "Serialized cache key does not match",
                  "Serialized HLO does not match", "No binary found in serialized entry", "Can't parse ")


def read_failure(error: Exception) -> bool:
    """TensorFlow's error is about a cache entry it could not load (XLA fails the program then,
    rather than compile it anew)."""
    return directory_in_use() is not None and any(words in str(error) for words in _READ_FAILURES)


def set_aside_damaged() -> list[Path]:
    """Rename every entry of the cache in use that is not a whole entry to ``<name>.damaged``
    (the next compilation writes a good one); the names set aside."""
    directory = directory_in_use()
    damaged = [path for path in sorted(directory.glob("*.pb")) if not _whole_entry(path)] if directory else []
    for path in damaged:
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".damaged"))
    return damaged


def _whole_entry(path: Path) -> bool:
    """An ``XlaSerializedCacheEntry`` in protobuf's binary form, read to its end: its key
    (field 1) holds the signature and cluster fingerprints (fields 1 and 2) that the file is
    named after, and its executable (field 3) is not empty."""
    try:
        data = path.read_bytes()
        fields = _fields(data)
        key = _fields(fields[1][0])
        _, signature, cluster, _ = path.name.split("__", 3)
        return (key.get(1) == [int(signature)] and key.get(2) == [int(cluster)]
                and bool(fields.get(3)) and len(fields[3][0]) > 0)
    except (OSError, ValueError, KeyError, IndexError):
        return False


def _fields(data: bytes) -> dict[int, list]:
    """The fields of a protobuf message (varints as ints, length-delimited as bytes); a
    ValueError when the bytes are not one whole message."""
    fields, at = {}, 0
    while at < len(data):
        tag, at = _varint(data, at)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            value, at = _varint(data, at)
        elif kind == 2:
            size, at = _varint(data, at)
            value, at = data[at:at + size], at + size
            if at > len(data):
                raise ValueError("cut short")
        elif kind in (1, 5):
            at += 8 if kind == 1 else 4
            value = None
        else:
            raise ValueError(f"wire type {kind}")
        if number == 0 or at > len(data):
            raise ValueError("not a message")
        fields.setdefault(number, []).append(value)
    return fields


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("cut short")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def write_failure(error: Exception) -> OSError | None:
    """For TensorFlow's error when a compiled program could not be written to the cache (a
    full disk, a file size limit), the ``OSError`` to report instead, else None. XLA fails the
    compilation itself then, and again at every retry in the process: the run cannot go on."""
    directory = directory_in_use()
    text = str(error)
    if directory is None or f"{directory}{os.sep}xla_compile_cache" not in text or read_failure(error):
        return None
    code = next((c for c in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS)
                 if os.strerror(c) in text), errno.EIO)
    turn_off = (f"{ENVIRONMENT}=off" if directory == cache_directory()
                else f"take {_FLAG} out of TF_XLA_FLAGS")
    return OSError(code, f"{os.strerror(code)}, writing a compiled program to the compilation cache "
                         f"(free some space, or turn the cache off: {turn_off})", str(directory))


#: How many times this process traced each program (one traced again after the process
#: dropped it must not reuse the names of the first trace).
_traces: dict[str, int] = {}
#: A trace's numbers: one of 2**42 blocks of 2**20 above 2**40, far above the process's own
#: counter (which counts from 1), below 2**63 (TensorFlow also uses them as tensor ids, in C).
_FIRST_NUMBER, _BLOCKS, _BLOCK = 2**40, 2**42, 2**20


#: TensorFlow's private counter that numbers traced functions (``tensorflow.python.framework.ops``).
_COUNTER = "uid"
#: Whether its absence was warned about (once per process).
_warned_uid: list[bool] = []


@contextlib.contextmanager
def named_after(program_key: str | None):
    """While the block traces a program, number its functions (``__inference_run_epoch_<n>``,
    ``while_body_<n>``, …) from ``program_key`` rather than from TensorFlow's counter of the
    process (``ops.uid``), so every process gives the program the same names and finds its
    cache entry. A second trace of a key in one process gets other numbers; None (a model
    without a key) changes nothing. The numbers do not change what is computed."""
    from tensorflow.python.framework import ops

    if program_key is None:
        yield
        return
    if not callable(getattr(ops, _COUNTER, None)):  # TensorFlow changed: compile as it names things
        if not _warned_uid:
            _warned_uid.append(True)
            warnings.warn("gradtools: this TensorFlow has no ops.uid to name a traced program after its key; "
                          "programs are compiled without the persistent cache's hits across processes",
                          RuntimeWarning, stacklevel=3)
        yield
        return
    occurrence = _traces.get(program_key, 0)
    _traces[program_key] = occurrence + 1
    digest = hashlib.sha256(f"{program_key}#{occurrence}".encode()).hexdigest()
    numbers = itertools.count(_FIRST_NUMBER + int(digest, 16) % _BLOCKS * _BLOCK)
    process_counter = getattr(ops, _COUNTER)
    setattr(ops, _COUNTER, lambda: next(numbers))
    try:
        yield
    finally:
        setattr(ops, _COUNTER, process_counter)
