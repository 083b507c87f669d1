"""``GradientMonitor``: per-layer gradient statistics inside plain ``model.fit``.

Keras's TensorBoard callback stopped writing gradients in TF 2; this callback records, for
the gradients ``fit`` actually applies, the statistics and column names of ``gradtools.fit``.

How: for the duration of ``fit`` it wraps two methods on the instances (restored at the end):
``model.compute_loss``, to keep the step's loss, and ``model.optimizer.apply``, which Keras's
``train_step`` calls with the tape's gradients before the optimizer clips them. Inside the
compiled train function each step's row goes into a buffer variable; the callback reads the
buffer once per epoch (or when it is about to fill), so nothing but that table leaves the graph.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from gradtools.clipping import clip_by_global_norm, clip_by_norm, clip_by_value
from gradtools.history import History
from gradtools.stats import (
    CLIPPED_COLUMN,
    all_finite,
    global_gradient_norm,
    layer_gradient_stats,
    metric_columns,
)
from gradtools.training import recurrent_kernel_positions, statistics_order

_DEFAULT_CAPACITY = 4096


def _optimizer_clipping(optimizer):
    """The optimizer's own clipping as a function of the gradients, or None."""
    if getattr(optimizer, "clipnorm", None):
        return lambda g: clip_by_norm(g, optimizer.clipnorm)
    if getattr(optimizer, "global_clipnorm", None):
        return lambda g: clip_by_global_norm(g, optimizer.global_clipnorm)
    if getattr(optimizer, "clipvalue", None):
        return lambda g: clip_by_value(g, optimizer.clipvalue)
    return None


class GradientMonitor(keras.callbacks.Callback):
    """Records gradient statistics of every ``log_every``-th step of ``model.fit``.

    ``monitor.metrics`` is a DataFrame with the columns of ``gradtools.fit`` (``step``,
    ``epoch``, ``batch``, ``loss``, ``grad_global_norm``, ``layer_k/…``, and
    ``layer_k/recurrent_…`` for the recurrent kernel of an RNN layer), plus
    ``grad_global_norm_clipped`` when the optimizer clips (``clipnorm``, ``clipvalue`` or
    ``global_clipnorm``). ``loss`` is the batch loss ``fit`` differentiates (regularization
    included). ``status`` and ``first_nonfinite_step`` are as in ``gradtools.fit``; with
    ``stop_on_nonfinite`` training stops after the first non-finite loss or gradient (like
    ``keras.callbacks.TerminateOnNaN``, but recorded). ``loggers`` get every row, like
    ``gradtools.fit``'s (e.g. a ``LocalRunLogger`` writes a run directory).
    """

    def __init__(self, log_every: int = 1, loggers=(), stop_on_nonfinite: bool = False):
        super().__init__()
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
        self.log_every = log_every
        self.loggers = list(loggers)
        self.stop_on_nonfinite = stop_on_nonfinite
        self.status = "completed"
        self.first_nonfinite_step: int | None = None
        self.epochs_completed = 0
        self.layer_paths: list[str] = []
        self._frames: list[pd.DataFrame] = []
        self._restore = []

    @property
    def metrics(self) -> pd.DataFrame:
        if not self._frames:
            return pd.DataFrame(columns=self._columns if hasattr(self, "_columns") else [])
        return pd.concat(self._frames, ignore_index=True)

    def history(self) -> History:
        return History(metrics=self.metrics, status=self.status,
                       first_nonfinite_step=self.first_nonfinite_step,
                       epochs_completed=self.epochs_completed, layer_paths=self.layer_paths)

    # --- installing the probes --------------------------------------------------------------

    def on_train_begin(self, logs=None):
        model, optimizer = self.model, self.model.optimizer
        self._buffers_ready = False
        self._clipping = _optimizer_clipping(optimizer)
        self._steps_per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        # Room for an epoch (read at its end) or, when its length is unknown, a flush before full.
        self._capacity = (self.params.get("steps") or _DEFAULT_CAPACITY) + self._steps_per_call
        self._pending_steps = 0
        self._first_step_of_epoch = int(optimizer.iterations.numpy()) + 1
        with tf.init_scope():
            self._loss = tf.Variable(float("nan"), trainable=False)
            self._nonfinite = tf.Variable(False, trainable=False)
        monitor = self

        original_compute_loss = model.compute_loss

        def compute_loss(*args, **kwargs):
            loss = original_compute_loss(*args, **kwargs)
            monitor._loss.assign(tf.cast(loss, tf.float32))
            return loss

        original_apply = optimizer.apply

        def apply(grads, trainable_variables=None):
            grads = list(grads)
            targets = list(trainable_variables if trainable_variables is not None
                           else optimizer._trainable_variables)
            # Subclassed models are built by their first step: set up when the step is traced.
            kernel_positions = [i for i, v in enumerate(targets) if v.name == "kernel"]
            recurrent = recurrent_kernel_positions(targets, [targets[i] for i in kernel_positions])
            monitor._prepare_buffers([targets[i].path for i in kernel_positions], recurrent)
            monitored = statistics_order(kernel_positions, recurrent)
            step = tf.cast(optimizer.iterations, tf.int64) + 1
            before = [tf.identity(targets[i]) for i in monitored]
            result = original_apply(grads, trainable_variables)
            monitor._record(step, grads, targets, monitored, before)
            return result

        model.compute_loss = compute_loss
        optimizer.apply = apply
        self._restore = [(model, "compute_loss"), (optimizer, "apply")]
        model.make_train_function(force=True)  # trace again, with the probes

    def _prepare_buffers(self, layer_paths: list[str], recurrent_layers=()) -> None:
        """Create the buffer variables (once, eagerly, even when called while tracing)."""
        if self._buffers_ready:
            return
        if not layer_paths:
            raise ValueError("GradientMonitor: the model has no trainable variable named 'kernel' "
                             "(Dense, Conv, RNN layers have one); layers are numbered by kernels")
        self.layer_paths = layer_paths
        self._columns = (metric_columns(len(layer_paths), recurrent_layers)
                         + ([CLIPPED_COLUMN] if self._clipping else []))
        n_values = len(self._columns) - 3
        with tf.init_scope():
            self._rows = tf.Variable(tf.zeros([self._capacity, n_values]), trainable=False)
            self._row_steps = tf.Variable(tf.zeros([self._capacity], tf.int64), trainable=False)
            self._row_finite = tf.Variable(tf.zeros([self._capacity], tf.bool), trainable=False)
            self._count = tf.Variable(0, dtype=tf.int32, trainable=False)
        self._buffers_ready = True
        for logger in self.loggers:
            logger.start(epochs=self.params.get("epochs") or 0,
                         steps_per_epoch=self.params.get("steps") or 0, layer_paths=layer_paths)

    def _record(self, step, grads, variables, monitored, before):
        """In-graph: the step's row into the buffer (when logged), the non-finite flag.
        ``monitored``: positions of the kernels (and recurrent kernels) in column order."""
        loss = self._loss.read_value()
        finite = all_finite(loss, grads)
        head = [loss, global_gradient_norm(grads)]
        row = tf.concat(
            [tf.stack(head)]
            + [layer_gradient_stats(grads[i], w0, variables[i]) for i, w0 in zip(monitored, before)]
            + ([tf.reshape(global_gradient_norm(self._clipping(grads)), [1])] if self._clipping else []),
            axis=0,
        )
        log_now = tf.logical_or(tf.equal((step - 1) % self.log_every, 0), tf.logical_not(finite))
        index = tf.minimum(self._count, self._capacity - 1)

        def write():
            self._rows[index].assign(row)
            self._row_steps[index].assign(step)
            self._row_finite[index].assign(finite)
            self._count.assign_add(1)
            return tf.constant(True)

        tf.cond(log_now, write, lambda: tf.constant(False))
        self._nonfinite.assign(tf.logical_or(self._nonfinite, tf.logical_not(finite)))

    # --- reading the buffer -------------------------------------------------------------------

    def _flush(self, epoch: int) -> None:
        if not self._buffers_ready:
            return
        count = int(self._count.numpy())
        self._count.assign(0)
        self._pending_steps = 0
        if count == 0:
            return
        if count > self._capacity:
            raise RuntimeError("GradientMonitor's buffer overflowed; this is a bug, please report it")
        values = self._rows.numpy()[:count]
        steps = self._row_steps.numpy()[:count]
        finite = self._row_finite.numpy()[:count]
        frame = pd.DataFrame(values, columns=self._columns[3:])
        frame.insert(0, "batch", steps - self._first_step_of_epoch)
        frame.insert(0, "epoch", np.int64(epoch))
        frame.insert(0, "step", steps)
        self._frames.append(frame)
        if not finite.all() and self.first_nonfinite_step is None:
            self.first_nonfinite_step = int(steps[np.argmin(finite)])
            self.status = "diverged"
        for logger in self.loggers:
            logger.log_rows(frame)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._first_step_of_epoch = int(self.model.optimizer.iterations.numpy()) + 1

    def on_train_batch_end(self, batch, logs=None):
        self._pending_steps += self._steps_per_call
        if self._pending_steps + self._steps_per_call > self._capacity:
            self._flush(self._epoch)
        if self.stop_on_nonfinite and bool(self._nonfinite.numpy()):
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self._flush(epoch)
        if self.status != "diverged":
            self.epochs_completed = epoch + 1
        for logger in self.loggers:
            logger.log_epoch_end(epoch, self.model, None)
        if self.stop_on_nonfinite and self.status == "diverged":
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        for owner, name in self._restore:
            if name in vars(owner):
                delattr(owner, name)
        self._restore = []
        self.model.make_train_function(force=True)  # later fits run without the probes
        if bool(self._nonfinite.numpy()) and self.status != "diverged":
            self.status = "diverged"
        history = self.history()
        for logger in self.loggers:
            logger.finish(history)
