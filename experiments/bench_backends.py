"""``make bench``'s rows (g): ``GradientMonitor``'s overhead on each Keras backend, on a model of
more than 10 M weights. Run once per backend, in a process of its own (Keras fixes its backend
when it is imported): ``KERAS_BACKEND=jax python -m experiments.bench_backends``. Prints one JSON
line: the per-epoch wall times (median of the epochs after the first) of plain ``model.fit``,
of ``model.fit`` with the monitor logging every step, and of plain ``model.fit`` again (how far
two equal runs differ)."""

from __future__ import annotations

import json
import statistics
import time

import keras
import numpy as np

import gradtools

#: A 1024 → 3 × 2048 → 10 ReLU classifier: 10.5 M weights.
WIDTHS = (2048, 2048, 2048)
INPUTS, CLASSES, ROWS, BATCH = 1024, 10, 1280, 64


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((INPUTS,)), *[keras.layers.Dense(w, activation="relu") for w in WIDTHS],
                              keras.layers.Dense(CLASSES)])
    model.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class _EpochClock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._started)


def epoch_seconds(epochs: int, monitored: bool) -> tuple[float, int]:
    """Median wall time of an epoch after the first, and the model's number of weights."""
    model = _model()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, INPUTS)).astype("float32")
    y = rng.integers(0, CLASSES, ROWS)
    clock = _EpochClock()
    callbacks = [gradtools.GradientMonitor(figures=False), clock] if monitored else [clock]
    model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callbacks)
    return statistics.median(clock.times[1:]), model.count_params()


def main(epochs: int = 5) -> None:
    plain, weights = epoch_seconds(epochs, monitored=False)
    monitored, _ = epoch_seconds(epochs, monitored=True)
    again, _ = epoch_seconds(epochs, monitored=False)
    print(json.dumps({"backend": keras.backend.backend(), "weights": weights, "steps": ROWS // BATCH,
                      "plain": plain, "monitored": monitored, "plain_again": again}))


if __name__ == "__main__":
    main()
