"""``make bench``: per-epoch wall time of three ways to train the article's sigmoid baseline,
measured in one process on the same data.

(a) the article's loop: eager Python, one GradientTape step per batch over
    ``tf.data ... shuffle(42).batch(32)``, statistics pulled to NumPy at batch 5;
(b) plain ``model.fit`` with no gradient logging;
(c) ``gradtools.fit`` logging every statistic of every layer at every step;
(d) ``model.fit`` with ``gradtools.GradientMonitor`` logging every step;
(e) ``model.fit`` with ``gradtools.SpikeGuard("skip")``, and (f) ``gradtools.fit`` with one:
    the guard's cost, beside a second run of (b) that shows how much two equal runs differ;
(g) per Keras backend (TensorFlow, JAX), a 10.5 M-weight MLP: ``model.fit`` with the monitor
    against plain ``model.fit`` (:mod:`experiments.bench_backends`, a process per backend).

Then the wall time of ``make figures``, and sweep throughput (points per minute) for the
local executor with 1 and 2 workers and for Ray on this machine.

With ``--from-nothing``, the long commands' wall times from nothing (an empty XLA cache, no
runs), each against its target: a 100-epoch run against plain ``model.fit`` (cold and warm
cache, compilation included; the median of three runs each), the phase diagram, the claims
over 3 seeds and the report.

Each time is the median over epochs after the first (the first includes tracing). What it
prints is also written to ``docs/bench.md`` (``--write``), with the commit and the machine: the
figures the docs quote come from there, not from a hand-kept record.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gradtools.tf_startup import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gradtools  # noqa: E402
from experiments.config import ConfigError, load_config  # noqa: E402
from experiments.datasets import make_dataset  # noqa: E402
from experiments.models import build_mlp  # noqa: E402
from experiments.provenance import provenance  # noqa: E402
from experiments.sweep import load_sweep, run_sweep  # noqa: E402
from gradtools.loggers import RunLogger  # noqa: E402
from gradtools.loggers.local import write_atomically  # noqa: E402

EXPERIMENT = "vanishing/sigmoid_baseline"


def _setup():
    config = load_config(EXPERIMENT)
    keras.utils.set_random_seed(config.seed)
    x, y = make_dataset(config.data)
    model = build_mlp(config.model, x.shape[1])
    optimizer = keras.optimizers.get(config.optimizer.keras_config())
    return x, y, model, optimizer


def _median_after_first(times: list[float]) -> float:
    return statistics.median(times[1:])


def time_article_loop(epochs: int) -> float:
    """The article's training loop, as its script writes it (eager, NumPy at batch 5)."""
    x, y, model, optimizer = _setup()
    loss_fn = keras.losses.BinaryCrossentropy()
    data = tf.data.Dataset.from_tensor_slices((x, y[:, None])).shuffle(buffer_size=42).batch(32)
    recorded = []
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        for step, (x_batch, y_batch) in enumerate(data):
            with tf.GradientTape() as tape:
                loss = loss_fn(y_batch, model(x_batch, training=True))
            grads = tape.gradient(loss, model.trainable_weights)
            optimizer.apply_gradients(zip(grads, model.trainable_weights))
            if step == 5:
                recorded.append({w.path: (np.mean(g.numpy()), np.mean(w.numpy()))
                                 for w, g in zip(model.trainable_weights, grads)
                                 if w.name == "kernel"})
        times.append(time.perf_counter() - started)
    return _median_after_first(times)


class _EpochClock(keras.callbacks.Callback, RunLogger):
    """Per-epoch wall time, as a Keras callback (for model.fit) and a gradtools logger."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._last = time.perf_counter()

    def _tick(self):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now

    def on_train_begin(self, logs=None):
        self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self._tick()

    def start(self, **_):
        self._last = time.perf_counter()

    def log_rows(self, rows):
        pass

    def log_epoch_end(self, epoch, model, kernel_gradients=None):
        self._tick()


def time_model_fit(epochs: int, callbacks=()) -> float:
    x, y, model, optimizer = _setup()
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    clock = _EpochClock()
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0, callbacks=[*callbacks, clock])
    return _median_after_first(clock.times)


def time_model_fit_with_monitor(epochs: int) -> float:
    x, y, model, optimizer = _setup()
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    clock = _EpochClock()
    monitor = gradtools.GradientMonitor(log_every=1)
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[monitor, clock])
    return _median_after_first(clock.times)


def time_gradtools_fit(epochs: int, spike_guard=None) -> float:
    x, y, model, optimizer = _setup()
    clock = _EpochClock()
    gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer=optimizer, epochs=epochs,
                  batch_size=32, seed=42, log_every=1, loggers=[clock], spike_guard=spike_guard)
    return _median_after_first(clock.times)


def time_spike_guard(epochs: int, plain: float, ours: float) -> None:
    """(e) and (f): the guard's overhead, against how far a second plain run is from the first."""
    again = time_model_fit(epochs)
    guarded = time_model_fit(epochs, callbacks=[gradtools.SpikeGuard("skip", verbose=False)])
    print(f"  (e) model.fit + SpikeGuard('skip')          {guarded * 1e3:8.1f} ms", flush=True)
    print(f"  (e)/(b) = {guarded / plain:.3f}   (SpikeGuard overhead; (b) again / (b) = {again / plain:.3f}: "
          "the noise between two equal runs)")
    # the machine's speed drifts over minutes: (f) is taken between two plain runs of its own
    before = time_gradtools_fit(epochs)
    guarded_ours = time_gradtools_fit(epochs, spike_guard=gradtools.SpikeGuard("skip", verbose=False))
    after = time_gradtools_fit(epochs)
    print(f"  (f) gradtools.fit + SpikeGuard('skip')      {guarded_ours * 1e3:8.1f} ms", flush=True)
    print(f"  (f)/(c) = {guarded_ours / ours:.3f}, and {2 * guarded_ours / (before + after):.3f} against plain runs "
          f"just before and after it ({before * 1e3:.1f} and {after * 1e3:.1f} ms): SpikeGuard overhead in the "
          "compiled epoch")


def time_backends() -> None:
    """(g): the monitor's overhead on each backend, on a model of more than 10 M weights."""
    import json  # noqa: PLC0415

    for backend in ("tensorflow", "jax"):
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        done = subprocess.run([sys.executable, "-m", "experiments.bench_backends"], env=env, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            print(f"  (g) {backend}: failed ({(done.stderr.strip().splitlines() or ['?'])[-1]})", flush=True)
            continue
        m = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  (g) {backend:10s} {m['weights'] / 1e6:.1f} M weights, {m['steps']} steps: model.fit "
              f"{m['plain'] * 1e3:.0f} ms, + GradientMonitor {m['monitored'] * 1e3:.0f} ms an epoch: "
              f"{m['monitored'] / m['plain']:.2f}x (plain again: {m['plain_again'] / m['plain']:.2f}x)", flush=True)


def time_make_figures() -> float:
    """Wall time of ``python -m experiments figures`` (every experiment config, one process)."""
    import tempfile

    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "experiments", "figures", "--quiet",
             "--out", f"{scratch}/runs", "--figures", f"{scratch}/figures"],
            check=True, cwd=repo, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
        return time.perf_counter() - started


#: The sweep behind the points-per-minute numbers: 12 points of the phase diagram's kind.
BENCH_SWEEP = """
[sweep]
name = "bench"
base = "vanishing/sigmoid_baseline"
[set]
data.n_samples = 1000
training.epochs = 5
[grid]
model.activation = ["sigmoid", "tanh", "relu"]
model.depth = [2, 8]
model.kernel_initializer.config.minval = [-1.0, -0.1]
"""


def sweep_points_per_minute(executor: str, workers: int) -> tuple[float, float]:
    """(points per minute, wall seconds) of the bench sweep, from a fresh sweep directory;
    the wall time includes starting the workers (and Ray)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "bench.toml"
        path.write_text(BENCH_SWEEP)
        sweep = load_sweep(path)
        result = run_sweep(sweep, Path(scratch) / "out", executor=executor, workers=workers, quiet=True)
        return len(sweep.points()) * 60 / result.wall_seconds, result.wall_seconds


def time_sweeps() -> None:
    print("Sweep throughput (12 points: 3 activations x 2 depths x 2 init ranges, 5 epochs of "
          "1000 examples each; wall time includes starting the workers):", flush=True)
    for executor, workers in (("local", 1), ("local", 2), ("ray", 2)):
        try:
            rate, seconds = sweep_points_per_minute(executor, workers)
        except ConfigError as error:  # Ray not installed
            print(f"  {executor}, {workers} worker(s): skipped ({error})", flush=True)
            continue
        print(f"  {executor:5s} {workers} worker{'s' * (workers > 1)}  {rate:6.1f} points/min  "
              f"({seconds:.1f} s)", flush=True)


def _command(arguments: list[str], cache: Path, scratch: Path) -> tuple[float, str]:
    """Wall time and output of ``python -m experiments <arguments>``, XLA cache in ``cache``."""
    repo = Path(__file__).resolve().parent.parent
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "experiments", *arguments], check=True, cwd=scratch,
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(repo), "GRADTOOLS_XLA_CACHE": str(cache)})
    return time.perf_counter() - started, done.stdout


def _command_seconds(arguments: list[str], cache: Path, scratch: Path) -> float:
    return _command(arguments, cache, scratch)[0]


def _training_seconds(arguments: list[str], cache: Path, scratch: Path) -> float:
    """The training time a run prints ("completed after N full epochs in T s"): compilation
    included; the process start, the figures and the diagnosis not."""
    import re

    output = _command(arguments, cache, scratch)[1]
    return float(re.search(r"full epochs in ([0-9.]+) s", output).group(1))


#: Runs of make run-experiment per measurement (its 1-2 s vary by a tenth from run to run).
REPEATS = 3


def _listed(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in seconds)


def _target(name: str, measured: float, target: float, unit: str = "s") -> None:
    verdict = "met" if measured <= target else "NOT met"
    digits = 3 if unit == "x" else 2  # a ratio near its target needs the third digit
    print(f"  {name:58s} {measured:8.{digits}f} {unit:2s} (target <= {target:g} {unit}: {verdict})", flush=True)


def time_from_nothing() -> None:
    """The long commands from an empty cache and no runs, against the targets."""
    import tempfile

    print("From nothing (empty XLA cache, no runs; wall time of each command):", flush=True)
    plain = _model_fit_seconds(100)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        cache, runs = scratch / "xla", scratch / "runs"
        arguments = ["run", EXPERIMENT, "--quiet", "--out", str(runs)]
        colds = []
        for _ in range(REPEATS):
            shutil.rmtree(cache, ignore_errors=True)
            colds.append(_training_seconds(arguments, cache, scratch))
        warms = [_training_seconds(arguments, cache, scratch) for _ in range(REPEATS)]
        cold, warm = statistics.median(colds), statistics.median(warms)
        print(f"  plain model.fit, 100 epochs (compilation included): {plain:.2f} s; make run-experiment's "
              f"training, median of {REPEATS} runs: {cold:.2f} s cold ({_listed(colds)}), "
              f"{warm:.2f} s warm ({_listed(warms)})", flush=True)
        _target("run-experiment training / model.fit, cold cache", cold / plain, 0.25, "x")
        _target("run-experiment training / model.fit, warm cache", warm / plain, 0.1, "x")
        for name, arguments, target in (
                ("python -m experiments phase-diagram", ["phase-diagram", "--quiet"], 120),
                ("python -m experiments claims --seeds 3", ["claims", "--seeds", "3", "--quiet"], 120)):
            for folder in (cache, runs):
                shutil.rmtree(folder, ignore_errors=True)
            _target(name, _command_seconds([*arguments, "--out", str(runs)], cache, scratch), target)
        for folder in (cache, runs):
            shutil.rmtree(folder, ignore_errors=True)
        report = (_command_seconds(["phase-diagram", "--quiet", "--out", str(runs)], cache, scratch)
                  + _command_seconds(["report", "--quiet", "--out", str(runs)], cache, scratch))
        _target("make report (phase-diagram, then report)", report, 300)


def _model_fit_seconds(epochs: int) -> float:
    """Plain ``model.fit`` on the same data, first call included (its compilation)."""
    x, y, model, optimizer = _setup()
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    started = time.perf_counter()
    model.fit(x, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12, help="epochs for (b) and (c) (default 12)")
    parser.add_argument("--article-epochs", type=int, default=4, help="epochs for (a) (default 4)")
    parser.add_argument("--skip-figures", action="store_true", help="do not time make figures")
    parser.add_argument("--skip-sweeps", action="store_true", help="do not time the sweep executors")
    parser.add_argument("--skip-backends", action="store_true",
                        help="do not time the monitor per Keras backend on the 10.5 M-weight MLP (g)")
    parser.add_argument("--only-from-nothing", action="store_true", help="only the --from-nothing part")
    parser.add_argument("--from-nothing", action="store_true",
                        help="also time the long commands from an empty cache against their targets "
                        "(about 10 minutes)")
    parser.add_argument("--write", default="docs/bench.md", metavar="PATH",
                        help="also write what is printed to this Markdown file (default docs/bench.md; '' for none)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m experiments.bench", *(argv if argv is not None else sys.argv[1:])])
    with _recorded(args.write, command):
        _run(args)
    return 0


def _run(args) -> None:
    if args.only_from_nothing:
        time_from_nothing()
        return
    print(f"Per-epoch wall time on {EXPERIMENT} (3000 examples, batch 32: 94 steps per epoch), "
          "median of the epochs after the first:", flush=True)
    article = time_article_loop(args.article_epochs)
    print(f"  (a) article's eager loop, NumPy at batch 5 {article * 1e3:9.1f} ms", flush=True)
    plain = time_model_fit(args.epochs)
    print(f"  (b) model.fit, no gradient logging         {plain * 1e3:9.1f} ms", flush=True)
    ours = time_gradtools_fit(args.epochs)
    print(f"  (c) gradtools.fit, every stat every step   {ours * 1e3:9.1f} ms", flush=True)
    print(f"  (c)/(b) = {ours / plain:.3f}   (required <= 0.5, target <= 0.25)")
    print(f"  (a)/(c) = {article / ours:.1f}   (required >= 50, target >= 100)")
    monitored = time_model_fit_with_monitor(args.epochs)
    print(f"  (d) model.fit + GradientMonitor, every step {monitored * 1e3:8.1f} ms", flush=True)
    print(f"  (d)/(b) = {monitored / plain:.3f}   (GradientMonitor overhead; target <= 1.3)")
    time_spike_guard(args.epochs, plain, ours)
    if not args.skip_backends:
        time_backends()
    if not args.skip_figures:
        print(f"make figures (every experiment config, its own epochs, one process): "
              f"{time_make_figures():.1f} s", flush=True)
    if not args.skip_sweeps:
        time_sweeps()
    if args.from_nothing:
        time_from_nothing()


class _Tee:
    """Standard output, copied into a list as it is written."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, text: str) -> int:
        self.text.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _recorded(path: str, command: str):
    """What the bench prints, written to ``path`` when it ends (also when interrupted: what
    was measured is kept), under the commit and the machine it was measured on."""
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.stream
        if path:
            write_atomically(Path(path), lambda target: target.write_text(_bench_page(command, "".join(tee.text))))
            print(f"written: {path}")


def _bench_page(command: str, printed: str) -> str:
    return (f"# Benchmark\n\n{provenance(command)} The machine's load varies between runs: compare the "
            f"ratios within one run.\n\n```\n{printed.rstrip()}\n```\n")


if __name__ == "__main__":
    sys.exit(main())
