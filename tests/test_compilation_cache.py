"""The persistent compilation cache: where it lives, how it is turned off, that a process
finds a program another process compiled (also after tracing other functions first), and
that a run's numbers are byte-identical whether its program was compiled, loaded from the
cache, or the cache was off, and whatever the number of TensorFlow's threads."""

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from conftest import REPO_ROOT, run_cli

from gradtools import compilation_cache


def test_the_cache_lives_in_the_users_cache_directory_one_folder_per_tensorflow_and_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADTOOLS_XLA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    directory = compilation_cache.cache_directory()
    assert directory.parent == tmp_path / "xdg" / "gradtools" / "xla"
    assert directory.name.startswith(f"tf-{version('tensorflow')}-cpu-")
    monkeypatch.setenv("GRADTOOLS_XLA_CACHE", str(tmp_path / "mine"))
    assert compilation_cache.cache_directory().parent == tmp_path / "mine"
    monkeypatch.setenv("GRADTOOLS_XLA_CACHE", "off")
    assert compilation_cache.cache_directory() is None


def test_numbers_are_identical_compiled_loaded_or_uncached(tmp_path):
    args = ["run", "vanishing/shallow", "--set", "training.epochs=2", "--quiet"]
    cache = tmp_path / "cache"
    cold = run_cli([*args, "--out", "cold"], cwd=tmp_path, env=_env(cache))
    entries = list(cache.rglob("*.pb"))
    # TensorFlow numbers traced functions per process: this one traced three others first
    warm = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "traced_first.py"), *args, "--out", "warm"],
                          cwd=tmp_path, env={**_env(cache), "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=300)
    # uncached, and with one thread per core (the others: this suite's share, as workers get)
    off = run_cli([*args, "--out", "off"], cwd=tmp_path, env=_env("off", threads=os.cpu_count() or 1))
    for result in (cold, warm, off):
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", "no log noise from loading a cached program"
    assert entries, "the first run compiled its program into the cache"
    assert sorted(cache.rglob("*.pb")) == sorted(entries), "the second run loaded it, compiled nothing new"
    tables = [next((tmp_path / out).rglob("metrics.csv")).read_bytes() for out in ("cold", "warm", "off")]
    assert tables[0] == tables[1] == tables[2]


def _env(cache, threads=None):
    """This suite's environment with another cache (TF_XLA_FLAGS would name the suite's) and,
    when given, another number of TensorFlow's threads."""
    env = {name: value for name, value in os.environ.items() if name != "TF_XLA_FLAGS"}
    return {**env, "GRADTOOLS_XLA_CACHE": str(cache),
            **({"TF_NUM_INTRAOP_THREADS": str(threads)} if threads else {})}


def test_only_a_failed_write_of_a_cache_entry_is_reported_as_one(monkeypatch, tmp_path):
    """TensorFlow's error names the entry it could not write (the message seen under a file
    size limit); another error that happens to mention the cache's folder is left alone."""
    import errno

    entry = "xla_compile_cache__1578286834590517526__18275711628463352770__XLA_CPU_JIT.pbvm-a93a7f.tmp"
    monkeypatch.setenv("GRADTOOLS_XLA_CACHE", str(tmp_path))
    ours = compilation_cache.cache_directory()
    monkeypatch.setenv("TF_XLA_FLAGS", f"--tf_xla_persistent_cache_directory={ours}")
    failure = compilation_cache.write_failure(RuntimeError(f"{ours}/{entry}; No space left on device [Op:x]"))
    assert failure.errno == errno.ENOSPC and failure.filename == str(ours)
    assert "GRADTOOLS_XLA_CACHE=off" in failure.strerror
    assert compilation_cache.write_failure(RuntimeError(f"indices[3] = 9 is not in [0, 4) near {ours}")) is None

    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_persistent_cache_directory=.")  # the user's own flag
    assert compilation_cache.write_failure(RuntimeError("./model.keras: index out of range")) is None
    theirs = compilation_cache.write_failure(RuntimeError(f"./{entry}; File too large"))
    assert theirs.errno == errno.EFBIG and "take --tf_xla_persistent_cache_directory out of TF_XLA_FLAGS" in str(theirs)


def test_a_damaged_entry_is_set_aside_with_one_warning_and_compiled_anew(tmp_path):
    """An entry cut short, then one overwritten with other bytes: each run completes with the
    numbers of the first run and one warning line, the entry moved to *.damaged (they were an
    OutOfRangeError traceback, and 'could not write … free some space', at every later run)."""
    import random

    args = ["run", "vanishing/shallow", "--set", "training.epochs=1", "--quiet"]
    cache = tmp_path / "cache"
    first = run_cli([*args, "--out", "first"], cwd=tmp_path, env=_env(cache))
    assert first.returncode == 0, first.stderr
    (entry,) = cache.rglob("*.pb")
    damages = {"cut": entry.read_bytes()[:100], "other bytes": random.Random(0).randbytes(5000)}
    for number, (damage, data) in enumerate(damages.items()):
        for stale in cache.rglob("*.pb"):
            stale.unlink()
        entry.write_bytes(data)
        again = run_cli([*args, "--out", f"again{number}"], cwd=tmp_path, env=_env(cache))
        assert again.returncode == 0, (damage, again.stderr)
        warnings = [line for line in again.stderr.splitlines() if line.strip()]
        assert len(warnings) == 1 and "damaged entries of the compilation cache set aside" in warnings[0], warnings
        assert entry.with_name(entry.name + ".damaged").read_bytes() == data
        tables = [next((tmp_path / out).rglob("metrics.csv")).read_bytes() for out in ("first", f"again{number}")]
        assert tables[0] == tables[1], damage


def test_xla_flags_of_the_users_are_read_as_xla_reads_them(monkeypatch, tmp_path):
    """TF_XLA_FLAGS empty, or naming the cache with a space, was an IndexError traceback; a
    flag XLA does not know ended the command with exit 1 and nothing printed (XLA's own
    message fell into the muted start-up output)."""
    flag = "--tf_xla_persistent_cache_directory"
    for flags, directory, others in [("", None, False), (f"{flag}=", None, False), (f"{flag}=/c", "/c", False),
                                     (f"{flag} /c", None, True), (f"--xla_cpu_fast_math=false {flag}=/c", "/c", True)]:
        monkeypatch.setenv("TF_XLA_FLAGS", flags)
        assert compilation_cache.directory_in_use() == (None if directory is None else Path(directory)), flags
        assert compilation_cache.other_xla_flags() is others, flags
    env = {**_env(tmp_path / "cache"), "TF_XLA_FLAGS": "--no_such_xla_flag=1"}
    done = run_cli(["run", "vanishing/shallow", "--set", "training.epochs=1", "--quiet", "--out", "out"],
                   cwd=tmp_path, env=env)
    assert done.returncode != 0
    assert "Unknown flag in TF_XLA_FLAGS: --no_such_xla_flag=1" in done.stderr, done.stderr[-2000:]


def test_a_tensorflow_without_the_counter_it_renames_trains_as_usual_after_one_warning(monkeypatch):
    """The one place that replaces TensorFlow's private trace counter (``ops.uid``) falls
    back to TensorFlow's own names, with one warning, when that counter is gone."""
    import warnings

    import keras
    import numpy as np

    import gradtools
    from gradtools import programs

    monkeypatch.setattr(compilation_cache, "_COUNTER", "a_counter_a_later_tensorflow_renamed")
    monkeypatch.setattr(compilation_cache, "_warned_uid", [])
    programs.clear()
    x = np.random.default_rng(0).normal(size=(40, 3)).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
            history = gradtools.fit(model, x, x[:, :1], loss="mse", optimizer="sgd", epochs=1, batch_size=8,
                                    figures=False)
            assert history.status == "completed" and len(history.metrics) == 5
            programs.clear()
    assert sum("no ops.uid" in str(w.message) for w in caught) == 1
