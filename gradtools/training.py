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

from gradtools import through_time
from gradtools.clipping import clip_by_global_norm, clip_by_value
from gradtools.columns import metric_columns
from gradtools.history import COMPLETED, DIVERGED, FAILED, INTERRUPTED, RUNNING, History
from gradtools.layers import layer_blocks, layer_layout
from gradtools.loggers.base import RunLogger, end_run, end_run_after_error
from gradtools.plots import run_figures
from gradtools.stats import all_finite, statistics_row
from gradtools.validation import require_integer

#: Seeds are 32-bit: NumPy's and TensorFlow's generators take no more.
MAX_SEED = 2**32 - 1


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


def _traced_layer_numbers(traced, paths) -> list[int]:
    return [list(paths).index(layer.inner_cell.kernel.path) + 1 for layer in traced]


def with_loss_scaling(optimizer):
    """Under the ``mixed_float16`` policy, the optimizer wrapped in a LossScaleOptimizer, as
    ``model.compile`` does; otherwise the optimizer itself."""
    if (keras.config.dtype_policy().name == "mixed_float16"
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _as_tensor(values):
    tensor = tf.convert_to_tensor(values)
    if tensor.dtype.is_floating:
        tensor = tf.cast(tensor, keras.backend.floatx())
    return tensor


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
    figures=True,
) -> History:
    """Train ``model`` on ``(x, y)`` and record per-layer gradient statistics.

    Args:
        model: any built (or buildable) Keras 3 model.
        x, y: arrays held in memory; batches are slices of a per-epoch permutation.
        loss: a Keras loss name (``"binary_crossentropy"``), config dict, instance or function.
            ``model.losses`` (regularizers) are added to it before differentiating.
        optimizer: a Keras optimizer name, config dict or instance. Its own clipping options
            apply to the update; the statistics describe the gradients before clipping.
        epochs, batch_size: as in ``model.fit``; the last batch of an epoch may be smaller,
            and a batch size larger than the data trains on one batch of all of it.
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
        figures: when the run ends, draw :func:`gradtools.plots.run_figures` once and hand
            them to every logger (``log_figure``); a function of the History returning
            ``{name: Figure}`` draws those instead; False draws none.

    Returns:
        a :class:`gradtools.History`. A non-finite loss or gradient ends the run with status
        ``"diverged"`` and ``first_nonfinite_step`` set; it never raises. Ctrl-C and errors
        are passed on to every logger (status ``"interrupted"`` / ``"failed"``) and re-raised.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every)):
        require_integer(name, value)
    if seed is not None:
        require_integer("seed", seed, 0, MAX_SEED)
    loss_fn = resolve_loss(loss)
    optimizer = with_loss_scaling(keras.optimizers.get(optimizer))
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if seed is not None:
        keras.utils.set_random_seed(int(seed))
        tf.config.experimental.enable_op_determinism()
    shuffle_seed = int(seed) if seed is not None else int(np.random.default_rng().integers(2**31))

    x, y = _as_tensor(x), _as_tensor(y)
    n_examples = int(x.shape[0])
    if int(y.shape[0]) != n_examples:
        raise ValueError(f"x has {n_examples} examples but y has {int(y.shape[0])}")
    if n_examples == 0:
        raise ValueError("x and y hold no examples")
    batch_size = min(batch_size, n_examples)  # like model.fit: one batch of everything
    if not model.built:
        model(x[:1])
    variables = list(model.trainable_weights)
    _require_one_device(variables)
    layout = layer_layout(variables)
    kernels = [variables[i] for i in layout.kernel_positions]
    monitored = layout.monitored
    traced = through_time.traced_layers(model)
    traced_numbers = _traced_layer_numbers(traced, layout.paths)
    optimizer.build(variables)
    n_batches = math.ceil(n_examples / batch_size)
    clips = clip_value is not None or clip_global_norm is not None
    columns = metric_columns(len(kernels), layout.recurrent_layers, clipped=clips,
                             loss_scaled=loss_scaled)
    n_values = len(columns) - 3  # step, epoch and batch are filled in on the Python side

    # Loggers that draw histograms get the kernel gradients of each epoch's last step.
    keep_gradients = any(getattr(logger, "wants_gradients", False) for logger in loggers)

    # One step: the forward and backward pass, the update, and the step's statistics (cheap
    # next to the update, so always computed; the Python side keeps the logged rows).
    def train_step(x_batch, y_batch):
        with tf.GradientTape() as tape:
            predictions = model(x_batch, training=True)
            loss_value = loss_fn(y_batch, predictions)
            if model.losses:
                loss_value = loss_value + tf.add_n(model.losses)
            scaled_loss = optimizer.scale_loss(loss_value)
        gradients = tape.gradient(scaled_loss, variables)
        # Under loss scaling, the statistics describe the unscaled gradients (the scale may
        # change in apply, so it is read first); clipping acts on the scaled ones.
        scale = tf.identity(optimizer.dynamic_scale.value) if loss_scaled else None
        unscaled = _unscale(gradients, scale)
        state_norms = _unscale([layer.state_gradient_norms.value() for layer in traced], scale)
        before = [tf.identity(variables[i]) for i in monitored]
        applied = _clip(gradients, clip_value, clip_global_norm, scale)
        optimizer.apply(applied, variables)
        finite_gradients = all_finite(loss_value, unscaled)
        row = statistics_row(
            loss_value, unscaled, monitored, before, [variables[i] for i in monitored],
            clipped_gradients=_unscale(applied, scale) if clips else None,
            loss_scale=scale, skipped=tf.logical_not(finite_gradients) if loss_scaled else None)
        kernel_gradients = (
            [tf.convert_to_tensor(unscaled[i]) for i in layout.kernel_positions] if keep_gradients else []
        )
        # A step the loss scaler skips (float16 overflow) is not a divergence; a non-finite loss is.
        finite = (tf.reduce_all(tf.math.is_finite(tf.cast(loss_value, tf.float32)))
                  if loss_scaled else finite_gradients)
        return row, finite, kernel_gradients, state_norms

    n_full, remainder = divmod(n_examples, batch_size)
    feature_shape, target_shape = list(x.shape[1:]), list(y.shape[1:])
    time_steps = [layer.time_steps for layer in traced]

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

    blocks = layer_blocks(model, layout.paths)
    for logger in loggers:
        logger.start(epochs=epochs, steps_per_epoch=n_batches, layer_paths=list(layout.paths),
                     layer_blocks=blocks)
    frames: list[pd.DataFrame] = []
    state_rows: list[dict[str, float]] = []
    status, first_nonfinite_step, epochs_completed = COMPLETED, None, 0
    started = time.perf_counter()

    def history() -> History:
        metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        return History(
            metrics=metrics,
            status=status,
            first_nonfinite_step=first_nonfinite_step,
            epochs_completed=epochs_completed,
            wall_seconds=time.perf_counter() - started,
            layer_paths=list(layout.paths),
            layer_blocks=blocks,
            state_gradients=pd.DataFrame(state_rows) if traced else None,
        )

    try:
        for epoch in range(epochs):
            radii = through_time.spectral_radii(traced)
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
            epoch_values = through_time.epoch_row(traced, traced_numbers, radii,
                                                  [m.numpy() for m in state_means])
            if traced:
                state_rows.append({"epoch": epoch, **epoch_values})
            for logger in loggers:
                logger.log_rows(frame)
                if traced:
                    logger.log_epoch_metrics(epoch, epoch_values)
                logger.log_epoch_end(epoch, model, kernel_gradients)
            if not finite_flags.all():
                status = DIVERGED
                if first_nonfinite_step is None:
                    first_nonfinite_step = int(steps[np.argmin(finite_flags)])
            stopping = not finite_flags.all() and stop_on_nonfinite
            if not stopping:
                epochs_completed += 1
            # The last epoch's progress is the final status, so nothing after it can lose it.
            final = stopping or epoch + 1 == epochs
            progress = status if status == DIVERGED else (COMPLETED if final else RUNNING)
            for logger in loggers:
                logger.log_progress(epochs_completed=epochs_completed, status=progress)
            if stopping:
                break
    except KeyboardInterrupt:
        status = INTERRUPTED
        end_run_after_error(loggers, history(), _figure_maker(figures))
        raise
    except Exception as error:
        status = FAILED
        if jit_compile and not frames:
            error.add_note("gradtools.fit compiles each epoch with XLA; if XLA cannot compile "
                           "an op of this model, call it with jit_compile=False")
        end_run_after_error(loggers, history(), _figure_maker(figures))
        raise
    result = history()
    end_run(loggers, result, _figure_maker(figures))
    return result


def _require_one_device(variables) -> None:
    distributed = any(isinstance(getattr(v, "value", v), tf.distribute.DistributedValues)
                      for v in variables)
    if distributed or tf.distribute.get_strategy().num_replicas_in_sync > 1:
        raise ValueError("gradtools.fit trains on one device; under a distribution strategy, "
                         "train with model.fit and record with gradtools.GradientMonitor")


def _unscale(tensors, scale):
    """``tensors`` divided by the loss scale (unchanged when there is none)."""
    if scale is None:
        return tensors
    return [None if t is None else t / tf.cast(scale, t.dtype) for t in tensors]


def _clip(gradients, clip_value, clip_global_norm, scale):
    """gradtools.fit's clipping, by value then by global norm; on loss-scaled gradients the
    thresholds are scaled too, which clips the unscaled gradients exactly as asked."""
    factor = 1.0 if scale is None else scale
    if clip_value is not None:
        gradients = clip_by_value(gradients, clip_value, factor)
    if clip_global_norm is not None:
        gradients = clip_by_global_norm(gradients, clip_global_norm, factor)
    return gradients


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


def _epoch_frame(columns, epoch, n_batches, batch_index, values) -> pd.DataFrame:
    frame = pd.DataFrame(values, columns=columns[3:])
    frame.insert(0, "batch", batch_index.astype(np.int64))
    frame.insert(0, "epoch", np.int64(epoch))
    frame.insert(0, "step", epoch * n_batches + batch_index.astype(np.int64) + 1)
    return frame


def _figure_maker(figures):
    """``fit``'s ``figures`` argument as a function of the History (or None)."""
    if figures is True:
        return run_figures
    return figures or None
