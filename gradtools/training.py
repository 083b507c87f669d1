"""``gradtools.fit``: a compiled GradientTape training loop that records gradient statistics.

One call of an XLA-compiled ``tf.function`` runs a whole epoch; the per-layer statistics of
every step are computed in the graph and only that small table comes back to Python per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from gradtools.history import History
from gradtools.loggers.base import RunLogger
from gradtools.clipping import clip_by_global_norm, clip_by_value
from gradtools import through_time
from gradtools.stats import (
    CLIPPED_COLUMN,
    all_finite,
    global_gradient_norm,
    layer_gradient_stats,
    metric_columns,
)


class _LossFromFunction(keras.losses.Loss):
    """A Keras loss function (per-sample) as a mean-reduced loss, like ``compile`` makes it."""

    def __init__(self, fn, dtype=None):
        super().__init__(name=getattr(fn, "__name__", "loss"), dtype=dtype)
        self.fn = fn

    def call(self, y_true, y_pred):
        # (N,) targets against (N, 1) predictions, as model.fit accepts them.
        if len(y_true.shape) == len(y_pred.shape) - 1 and y_pred.shape[-1] == 1:
            y_true = tf.expand_dims(y_true, -1)
        return self.fn(y_true, y_pred)


def resolve_loss(loss, dtype: str | None = None) -> keras.losses.Loss:
    """A loss given as a Keras name, config dict, ``Loss`` instance or function; computed in
    ``dtype`` when given (Keras losses compute in floatx otherwise)."""
    resolved = keras.losses.get(loss)
    if resolved is None:
        raise ValueError("loss must be given: a Keras loss name, config or callable")
    if not isinstance(resolved, keras.losses.Loss):
        return _LossFromFunction(resolved, dtype=dtype)
    if dtype is not None:
        resolved = resolved.__class__.from_config({**resolved.get_config(), "dtype": dtype})
    return resolved


def kernel_variables(model: keras.Model) -> list[keras.Variable]:
    """The numbered layers: trainable variables named ``kernel``, in ``trainable_weights`` order."""
    return [v for v in model.trainable_weights if v.name == "kernel"]


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0]


def recurrent_kernel_positions(variables, kernels) -> dict[int, int]:
    """Layer number k (1-based) -> position in ``variables`` of the ``recurrent_kernel`` that
    sits beside the k-th kernel (same layer), for the recurrent layers."""
    by_parent = {_parent(v.path): i for i, v in enumerate(variables) if v.name == "recurrent_kernel"}
    return {k: by_parent[_parent(kernel.path)]
            for k, kernel in enumerate(kernels, start=1) if _parent(kernel.path) in by_parent}


def statistics_order(kernel_positions, recurrent_positions) -> list[int]:
    """Positions of the variables whose statistics make a row, in column order: each kernel,
    then its layer's recurrent kernel if it has one (see ``stats.layer_columns``)."""
    ordered = []
    for k, i in enumerate(kernel_positions, start=1):
        ordered += [i, recurrent_positions[k]] if k in recurrent_positions else [i]
    return ordered


def _traced_layer_numbers(traced, kernels) -> list[int]:
    paths = [kernel.path for kernel in kernels]
    return [paths.index(layer.inner_cell.kernel.path) + 1 for layer in traced]


def _as_tensor(values):
    tensor = tf.convert_to_tensor(values)
    if tensor.dtype.is_floating:
        tensor = tf.cast(tensor, keras.backend.floatx())
    return tensor


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def fit(
    model: keras.Model,
    x,
    y,
    *,
    loss,
    optimizer,
    epochs: int,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int | None = None,
    log_every: int = 1,
    stop_on_nonfinite: bool = True,
    loggers: Sequence[RunLogger] = (),
    jit_compile: bool = True,
    clip_value: float | None = None,
    clip_global_norm: float | None = None,
) -> History:
    """Train ``model`` on ``(x, y)`` and record per-layer gradient statistics.

    Args:
        model: any built (or buildable) Keras 3 model.
        x, y: arrays held in memory; batches are slices of a per-epoch permutation.
        loss: a Keras loss name (``"binary_crossentropy"``), config dict, instance or function.
            ``model.losses`` (regularizers) are added to it before differentiating.
        optimizer: a Keras optimizer name, config dict or instance. Its own clipping options
            apply to the update; the statistics describe the gradients before clipping.
        epochs, batch_size: as in ``model.fit``; the last batch of an epoch may be smaller.
        shuffle: reshuffle the examples every epoch (a full permutation, seeded by ``seed``).
        seed: when given, seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``)
            and turns on op determinism, so the same seed gives identical numbers.
        log_every: record statistics at steps 1, 1 + log_every, 1 + 2·log_every, …;
            a step with a non-finite loss or gradient is always recorded.
        stop_on_nonfinite: stop after the first step whose loss or gradients are not finite.
            Recurrent layers get ``layer_k/recurrent_<stat>`` columns for their recurrent
            kernel; a :class:`gradtools.through_time.TracedRNN` also gets, once per epoch,
            ‖∂L/∂h_t‖ for every time step (``History.state_gradients``).
        loggers: :class:`gradtools.loggers.RunLogger` instances that receive every row.
        clip_value, clip_global_norm: clip the gradients before the update
            (:func:`gradtools.clipping.clip_by_value`, then
            :func:`gradtools.clipping.clip_by_global_norm`); the statistics still describe
            the gradients before clipping, and the column ``grad_global_norm_clipped`` is added.
        jit_compile: compile each epoch with XLA (the default, several times faster on small
            models); pass False for a model with ops XLA cannot compile.

    Returns:
        a :class:`gradtools.History`. A non-finite loss or gradient ends the run with status
        ``"diverged"`` and ``first_nonfinite_step`` set; it never raises. Ctrl-C and errors
        are passed on to every logger (status ``"interrupted"`` / ``"failed"``) and re-raised.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every)):
        _require_positive_int(name, value)
    loss_fn = resolve_loss(loss)
    optimizer = keras.optimizers.get(optimizer)
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
        tf.config.experimental.enable_op_determinism()
    shuffle_seed = int(seed) if seed is not None else int(np.random.default_rng().integers(2**31))

    x, y = _as_tensor(x), _as_tensor(y)
    n_examples = int(x.shape[0])
    if int(y.shape[0]) != n_examples:
        raise ValueError(f"x has {n_examples} examples but y has {int(y.shape[0])}")
    if not model.built:
        model(x[:1])
    variables = list(model.trainable_weights)
    kernels = kernel_variables(model)
    if not kernels:
        raise ValueError(
            "the model has no trainable variable named 'kernel' (Dense, Conv, RNN layers have one); "
            "gradtools numbers layers by their kernels"
        )
    kernel_positions = [i for i, v in enumerate(variables) if v.name == "kernel"]
    recurrent_positions = recurrent_kernel_positions(variables, kernels)
    monitored = statistics_order(kernel_positions, recurrent_positions)
    traced = through_time.traced_layers(model)
    traced_numbers = _traced_layer_numbers(traced, kernels)
    optimizer.build(variables)
    n_batches = math.ceil(n_examples / batch_size)
    clips = clip_value is not None or clip_global_norm is not None
    columns = (metric_columns(len(kernels), recurrent_positions)
               + ([CLIPPED_COLUMN] if clips else []))
    n_values = len(columns) - 3  # step, epoch and batch are filled in on the Python side

    # Loggers that draw histograms get the kernel gradients of each epoch's last step.
    keep_gradients = any(getattr(logger, "wants_gradients", False) for logger in loggers)

    # One step: the forward and backward pass, the update, and the step's statistics (cheap
    # next to the update, so always computed; the Python side keeps the logged rows).
    def train_step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            with through_time.recording(tape) as recorded:
                predictions = model(x_batch, training=True)
            loss_value = loss_fn(y_batch, predictions)
            if model.losses:
                loss_value = loss_value + tf.add_n(model.losses)
        probes = [recorded.probes[id(layer)] for layer in traced]
        gradients = tape.gradient(loss_value, variables + probes)
        gradients, probe_gradients = gradients[: len(variables)], gradients[len(variables):]
        state_norms = [through_time.state_gradient_norms(g) for g in probe_gradients]
        before = {i: tf.identity(variables[i]) for i in monitored}
        applied = gradients
        if clip_value is not None:
            applied = clip_by_value(applied, clip_value)
        if clip_global_norm is not None:
            applied = clip_by_global_norm(applied, clip_global_norm)
        optimizer.apply(applied, variables)
        layer_rows = [layer_gradient_stats(gradients[i], before[i], variables[i]) for i in monitored]
        head = tf.stack([tf.cast(loss_value, tf.float32), global_gradient_norm(gradients)])
        clipped = [tf.reshape(global_gradient_norm(applied), [1])] if clips else []
        row = tf.concat([head] + layer_rows + clipped, axis=0)
        kernel_gradients = (
            [tf.convert_to_tensor(gradients[i]) for i in kernel_positions] if keep_gradients else []
        )
        return row, all_finite(loss_value, gradients), kernel_gradients, state_norms

    n_full, remainder = divmod(n_examples, batch_size)
    feature_shape, target_shape = list(x.shape[1:]), list(y.shape[1:])
    time_steps = [_time_steps(layer, x) for layer in traced]

    # The whole epoch is one compiled call: full batches are slices of a static-shaped
    # [n_full, batch_size, ...] tensor (as XLA needs), the smaller last batch follows.
    @tf.function(jit_compile=jit_compile)
    def run_epoch(epoch):
        if shuffle:
            noise = tf.random.stateless_uniform([n_examples], seed=tf.stack([shuffle_seed, epoch]))
            order = tf.argsort(noise)
        else:
            order = tf.range(n_examples)
        x_epoch, y_epoch = tf.gather(x, order), tf.gather(y, order)
        x_full = tf.reshape(x_epoch[: n_full * batch_size], [n_full, batch_size] + feature_shape)
        y_full = tf.reshape(y_epoch[: n_full * batch_size], [n_full, batch_size] + target_shape)
        rows = tf.TensorArray(tf.float32, size=n_batches, element_shape=[n_values])
        finite_flags = tf.TensorArray(tf.bool, size=n_batches, element_shape=[])
        done = tf.constant(0)
        stopped = tf.constant(False)
        last_gradients = [tf.zeros_like(k) for k in kernels] if keep_gradients else []
        state_sums = [tf.zeros([steps], tf.float32) for steps in time_steps]
        state_counts = [tf.zeros([steps], tf.float32) for steps in time_steps]
        for b in tf.range(n_full):
            row, finite, kernel_gradients, state_norms = train_step(x_full[b], y_full[b])
            state_sums, state_counts = _accumulate(state_sums, state_counts, state_norms)
            rows = rows.write(b, row)
            finite_flags = finite_flags.write(b, finite)
            done = b + 1
            if keep_gradients:
                last_gradients = kernel_gradients
            if stop_on_nonfinite:
                stopped = tf.logical_not(finite)
                if stopped:
                    break
        if remainder:
            if tf.logical_not(stopped):
                row, finite, kernel_gradients, state_norms = train_step(
                    x_epoch[n_full * batch_size :], y_epoch[n_full * batch_size :]
                )
                state_sums, state_counts = _accumulate(state_sums, state_counts, state_norms)
                rows = rows.write(n_full, row)
                finite_flags = finite_flags.write(n_full, finite)
                done = n_full + 1
                if keep_gradients:
                    last_gradients = kernel_gradients
        state_means = [s / c for s, c in zip(state_sums, state_counts)]  # 0/0: NaN
        return rows.stack(), finite_flags.stack(), done, last_gradients, state_means

    for logger in loggers:
        logger.start(
            epochs=epochs, steps_per_epoch=n_batches, layer_paths=[v.path for v in kernels]
        )
    frames: list[pd.DataFrame] = []
    state_rows: list[dict[str, float]] = []
    status, first_nonfinite_step, epochs_completed = "completed", None, 0
    started = time.perf_counter()

    def history() -> History:
        metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        return History(
            metrics=metrics,
            status=status,
            first_nonfinite_step=first_nonfinite_step,
            epochs_completed=epochs_completed,
            wall_seconds=time.perf_counter() - started,
            layer_paths=[v.path for v in kernels],
            state_gradients=pd.DataFrame(state_rows) if traced else None,
        )

    try:
        for epoch in range(epochs):
            radii = [through_time.spectral_radius(layer.inner_cell.recurrent_kernel.numpy())
                     if hasattr(layer.inner_cell, "recurrent_kernel") else float("nan")
                     for layer in traced]
            with _quiet_first_trace(epoch == 0):
                values, finite_flags, done, last_gradients, state_means = run_epoch(
                    tf.constant(epoch, tf.int32))
            done = int(done)
            finite_flags = finite_flags.numpy()[:done]
            steps = epoch * n_batches + np.arange(1, done + 1)
            # Logged: every log_every-th step from step 1, and every non-finite step.
            logged = ((steps - 1) % log_every == 0) | ~finite_flags
            frame = _epoch_frame(columns, epoch, n_batches, np.flatnonzero(logged),
                                 values.numpy()[:done][logged])
            frames.append(frame)
            kernel_gradients = [g.numpy() for g in last_gradients] if keep_gradients else None
            epoch_values = _state_gradient_row(traced_numbers, radii, state_means)
            if traced:
                state_rows.append({"epoch": epoch, **epoch_values})
            for logger in loggers:
                logger.log_rows(frame)
                if traced:
                    logger.log_epoch_metrics(epoch, epoch_values)
                logger.log_epoch_end(epoch, model, kernel_gradients)
            if not finite_flags.all():
                status = "diverged"
                if first_nonfinite_step is None:
                    first_nonfinite_step = int(steps[np.argmin(finite_flags)])
                if stop_on_nonfinite:
                    break
            epochs_completed += 1
    except KeyboardInterrupt:
        status = "interrupted"
        _finish(loggers, history())
        raise
    except Exception as error:
        status = "failed"
        if jit_compile and not frames:
            error.add_note("gradtools.fit compiles each epoch with XLA; if XLA cannot compile "
                           "an op of this model, call it with jit_compile=False")
        _finish(loggers, history())
        raise
    result = history()
    _finish(loggers, result)
    return result


@contextlib.contextmanager
def _quiet_first_trace(active: bool):
    """Every ``fit`` call compiles its own epoch function by design; TensorFlow's warning
    about frequent retracing says nothing useful about that, so it is muted while tracing."""
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    if active:
        tf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf_logger.setLevel(level)


def _accumulate(sums, counts, norms):
    """Running sums and counts of the finite values of each step's ‖∂L/∂h_t‖ vectors (a
    diverging step must not hide the steps before it)."""
    finite = [tf.math.is_finite(n) for n in norms]
    sums = [s + tf.where(f, n, 0.0) for s, f, n in zip(sums, finite, norms)]
    counts = [c + tf.cast(f, tf.float32) for c, f in zip(counts, finite)]
    return sums, counts


def _time_steps(layer, x) -> int:
    """T of a traced layer: its input's time dimension (the model input's, when not built)."""
    try:
        steps = layer.input.shape[1]
    except (AttributeError, ValueError):
        steps = None
    steps = steps if steps is not None else x.shape[1]
    if steps is None:
        raise ValueError(f"{layer.name}: the number of time steps must be known")
    return int(steps)


def _state_gradient_row(layer_numbers, radii, state_means) -> dict[str, float]:
    """One epoch's per-time-step numbers: the spectral radius at the epoch's start and the
    mean ‖∂L/∂h_t‖ of every traced layer."""
    row: dict[str, float] = {}
    for k, radius, means in zip(layer_numbers, radii, state_means):
        row[through_time.spectral_radius_column(k)] = radius
        for t, value in enumerate(means.numpy().tolist(), start=1):
            row[through_time.state_column(k, t)] = value
    return row


def _epoch_frame(columns, epoch, n_batches, batch_index, values) -> pd.DataFrame:
    frame = pd.DataFrame(values, columns=columns[3:])
    frame.insert(0, "batch", batch_index.astype(np.int64))
    frame.insert(0, "epoch", np.int64(epoch))
    frame.insert(0, "step", epoch * n_batches + batch_index.astype(np.int64) + 1)
    return frame


def _finish(loggers: Sequence[RunLogger], history: History) -> None:
    for logger in loggers:
        logger.finish(history)

