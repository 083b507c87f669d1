"""``GradientMonitor``: per-layer gradient statistics inside plain ``model.fit``.

Keras's TensorBoard callback stopped writing gradients in TF 2; this callback records, for
the gradients ``fit`` actually applies, the statistics and column names of ``gradtools.fit``.

How: for the duration of ``fit`` it wraps two methods on the instances (restored at the end):
``model.compute_loss``, to keep the step's loss, and ``model.optimizer.apply``, which Keras's
``train_step`` calls with the tape's gradients before the optimizer clips them. Inside the
compiled train function each step's row goes into a buffer variable; the callback reads the
buffer once per epoch (or when it is about to fill), so nothing but that table leaves the graph.

- Mixed precision: under a ``LossScaleOptimizer`` (``mixed_float16``) the gradients Keras
  passes are those of the scaled loss; they are divided by the scale before any statistic, and
  a step the loss scaler skips (its gradients overflowed float16) is recorded with
  ``skipped = 1`` and the ``loss_scale``, not as a divergence.
- Distribution strategies: each replica's gradients and loss are summed across replicas, as
  Keras's optimizer sums the gradients it applies (Keras scales each replica's loss by
  1/replicas). On a batch that splits evenly these are the global batch's, as on one device;
  on a last batch that splits unevenly (7 rows as 4 + 3) they are what Keras applies: the
  mean of each replica's mean loss, not the mean over the batch.
- :class:`gradtools.through_time.TracedRNN` layers get ‖∂L/∂h_t‖ per epoch, as in ``fit``.
"""

from __future__ import annotations

import threading
import warnings

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from gradtools import optimizer_state, probes, through_time
from gradtools.backend import require_supported_backend
from gradtools.clipping import clip_by_global_norm, clip_by_norm, clip_by_value
from gradtools.columns import OUTPUT_COLUMN, VALUE_COLUMNS_START, metric_columns
from gradtools.history import DIVERGED, RUNNING, History
from gradtools.jax_steps import JaxProbes, JaxStepBuffer, require_monitorable
from gradtools.layers import layer_layout
from gradtools.recording import RunRecord
from gradtools.spike_guard import SpikeGuard
from gradtools.stats import probability_outputs, saturated_output_counts, step_row, unscaled
from gradtools.validation import require_integer

_DEFAULT_CAPACITY = 4096

#: A train_step that differentiates a loss the monitor cannot see.
NO_LOSS_SEEN = ("GradientMonitor needs each step's loss, and this model's train_step computes it "
                "without self.compute_loss(): compute it with loss = self.compute_loss(x=x, y=y, "
                "y_pred=y_pred) (as keras.io's guide to customizing fit() does), or train with gradtools.fit")
#: A train_step that never updates the weights with model.optimizer.
NO_STEP_SEEN = ("GradientMonitor recorded no step: this model's train_step never updates its weights "
                "with model.optimizer (a model with optimizers of its own, as a GAN's, is not monitored)")


def _optimizer_clipping(optimizer):
    """The optimizer's own clipping as a function of the (unscaled) gradients, or None."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if getattr(optimizer, "clipnorm", None):
        return lambda g: clip_by_norm(g, optimizer.clipnorm)
    if getattr(optimizer, "global_clipnorm", None):
        return lambda g: clip_by_global_norm(g, optimizer.global_clipnorm)
    if getattr(optimizer, "clipvalue", None):
        return lambda g: clip_by_value(g, optimizer.clipvalue)
    return None


def _loss_scale(optimizer):
    """The scale a LossScaleOptimizer multiplied this step's loss by (read before ``apply``,
    which may change it). While unbuilt (the first trace) it scaled by its initial value."""
    if not optimizer.built:
        return tf.constant(float(optimizer.initial_scale))
    return tf.identity(optimizer.dynamic_scale.value)  # read now, before apply changes it


def _summed_over_replicas(values):
    """Inside a multi-replica step: the sum over replicas of each tensor (None kept)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    present = [i for i, v in enumerate(values) if v is not None]
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [values[i] for i in present])
    result = list(values)
    for i, value in zip(present, summed):
        result[i] = value
    return result


def _is_first_replica() -> bool:
    """True on one device, and on the first replica of a strategy (traced once per replica)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return True
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    if replica is None:
        raise NotImplementedError("GradientMonitor needs a strategy whose replica id is known "
                                  "while tracing (MirroredStrategy, OneDeviceStrategy)")
    return int(replica) == 0


def _require_compiled_for(model, optimizer) -> None:
    """The optimizer knows every trainable variable: a layer unfrozen after ``compile`` is not
    (plain Keras goes on training only what it was compiled with, silently, as long as it
    reuses the step it traced; the monitor traces it again, and the optimizer would fail
    inside the step with "Unknown variable")."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(inner, "built", False):
        return
    known = {inner._var_key(v) for v in inner._trainable_variables}  # noqa: SLF001 (no public list)
    unknown = [v.path for v in model.trainable_weights if inner._var_key(v) not in known]  # noqa: SLF001
    if unknown:
        raise ValueError(f"{len(unknown)} trainable variables ({', '.join(unknown[:3])}"
                         f"{', …' if len(unknown) > 3 else ''}) became trainable after model.compile (a layer "
                         "unfrozen?): call model.compile again so that the optimizer trains them")


class _StepBuffer:
    """In-graph table of logged rows: written by the train function, read once per epoch."""

    def __init__(self, capacity: int, n_values: int, n_traced_steps: list[int]):
        self.capacity = capacity
        with tf.init_scope():
            self.rows = tf.Variable(tf.zeros([capacity, n_values]), trainable=False)
            self.steps = tf.Variable(tf.zeros([capacity], tf.int64), trainable=False)
            self.finite = tf.Variable(tf.zeros([capacity], tf.bool), trainable=False)
            self.count = tf.Variable(0, dtype=tf.int32, trainable=False)
            # Train steps so far: the optimizer's iterations skip the steps a loss scaler skips.
            self.train_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.nonfinite_seen = tf.Variable(False, trainable=False)
            self.state_sums = [tf.Variable(tf.zeros([t]), trainable=False) for t in n_traced_steps]
            self.state_counts = [tf.Variable(tf.zeros([t]), trainable=False) for t in n_traced_steps]

    def write(self, row, finite, log_every: int, state_norms) -> None:
        """One train step: its row when it is logged (every ``log_every``-th step from the
        first, and every non-finite one), the non-finite flag, the state-gradient sums."""
        step = self.train_steps.assign_add(1)
        log_now = tf.logical_or(tf.equal((step - 1) % log_every, 0), tf.logical_not(finite))
        index = tf.minimum(self.count, self.capacity - 1)

        def write_row():
            self.rows[index].assign(row)
            self.steps[index].assign(step)
            self.finite[index].assign(finite)
            self.count.assign_add(1)
            return tf.constant(True)

        tf.cond(log_now, write_row, lambda: tf.constant(False))
        self.nonfinite_seen.assign(tf.logical_or(self.nonfinite_seen, tf.logical_not(finite)))
        for sums, counts, norms in zip(self.state_sums, self.state_counts, state_norms):
            ok = tf.math.is_finite(norms)
            sums.assign_add(tf.where(ok, norms, 0.0))
            counts.assign_add(tf.cast(ok, tf.float32))

    def take_rows(self, model=None):
        """(values, steps, finite flags) written since the last call."""
        count = int(self.count.numpy())
        self.count.assign(0)
        if count > self.capacity:
            raise RuntimeError("GradientMonitor's buffer overflowed; this is a bug, please report it")
        return self.rows.numpy()[:count], self.steps.numpy()[:count], self.finite.numpy()[:count]

    def train_steps_so_far(self, model=None) -> int:
        return int(self.train_steps.numpy())

    def nonfinite_seen_so_far(self, model=None) -> bool:
        return bool(self.nonfinite_seen.numpy())

    def take_state_means(self) -> list[np.ndarray]:
        """The epoch's mean ‖∂L/∂h_t‖ of each traced layer (NaN where no finite value came)."""
        means = []
        for sums, counts in zip(self.state_sums, self.state_counts):
            with np.errstate(invalid="ignore", divide="ignore"):
                means.append(sums.numpy() / counts.numpy())
            sums.assign(tf.zeros_like(sums))
            counts.assign(tf.zeros_like(counts))
        return means


class GradientMonitor(keras.callbacks.Callback):
    """Records gradient statistics of every ``log_every``-th step of ``model.fit``.

    ``monitor.metrics`` is a DataFrame with the columns of ``gradtools.fit`` (``step``,
    ``epoch``, ``batch``, ``loss``, ``grad_global_norm``, ``layer_k/…``, and
    ``layer_k/recurrent_…`` for the recurrent kernel of an RNN layer), plus
    ``grad_global_norm_clipped`` when the optimizer clips (``clipnorm``, ``clipvalue`` or
    ``global_clipnorm``), ``loss_scale``, ``skipped`` under mixed precision, and
    ``output_saturated`` when outputs are a sigmoid's or softmax's probabilities (on
    TensorFlow: see :func:`gradtools.stats.saturated_output_counts`). ``loss`` is
    the batch loss ``fit`` differentiates (regularization included). ``status`` and
    ``first_nonfinite_step`` are as in ``gradtools.fit``; with ``stop_on_nonfinite``
    training stops after the first non-finite loss or gradient (like
    ``keras.callbacks.TerminateOnNaN``, but recorded; a step the loss scaler skips does not
    count). ``loggers`` get every row, like ``gradtools.fit``'s (e.g. a ``LocalRunLogger``
    writes a run directory), and ``figures`` as in ``gradtools.fit`` when training ends.
    ``history()`` gives what ``gradtools.diagnose`` reads. A :class:`gradtools.SpikeGuard`
    in the same ``model.fit`` hands its events to the monitor's History (``spikes``) and
    loggers. ``optimizer_state=True`` (TensorFlow) adds :mod:`gradtools.optimizer_state`'s
    columns per layer: the update against −g, and Adam's moments and ε-dominated fraction.
    """

    def __init__(self, log_every: int = 1, loggers=(), stop_on_nonfinite: bool = False,
                 figures=True, optimizer_state: bool = False):
        super().__init__()
        require_supported_backend("GradientMonitor", ("tensorflow", "jax"))
        if optimizer_state:
            require_supported_backend("GradientMonitor(optimizer_state=True)", ("tensorflow",))
        require_integer("log_every", log_every)
        self.optimizer_state = bool(optimizer_state)
        self._optimizer_stats = ()
        self.log_every = log_every
        self.loggers = list(loggers)
        self.stop_on_nonfinite = stop_on_nonfinite
        self.figures = figures
        self._run = RunRecord(None, self.loggers, figures)
        self._ended = False  # a model.fit it watched has ended: the next one is a new run
        self._restore = []
        self._buffer: _StepBuffer | None = None
        self._traced = []
        self._guards = []
        self._jax = None  # the probes of a JAX step (gradtools.jax_steps), when Keras runs on JAX
        # The step's loss tensor, from compute_loss to apply: per thread, since a strategy
        # traces each replica's step in a thread of its own.
        self._step = threading.local()

    @property
    def metrics(self) -> pd.DataFrame:
        return self._run.history().metrics

    @property
    def status(self) -> str:
        return self._run.status

    @property
    def first_nonfinite_step(self) -> int | None:
        return self._run.first_nonfinite_step

    @property
    def epochs_completed(self) -> int:
        return self._run.epochs_completed

    @property
    def layer_paths(self) -> list[str]:
        return self._run.paths

    @property
    def layer_blocks(self) -> list[str]:
        return self._run.blocks

    @property
    def block_downstream(self) -> dict[str, list[str]]:
        return self._run.downstream

    def history(self) -> History:
        return self._run.history()

    # --- installing the probes --------------------------------------------------------------

    def on_train_begin(self, logs=None):
        callback_list = probes.calling_callback_list()
        probes.end_runs_of_other_fits(self.model, callback_list)
        if self._ended:
            self._new_run()
        model, optimizer = self.model, self.model.optimizer
        self._run = RunRecord(model, self.loggers, self.figures)
        _require_compiled_for(model, optimizer)
        self._buffer = None
        self._loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self._clipping = _optimizer_clipping(optimizer)
        self._traced = through_time.traced_layers(model)
        if keras.backend.backend() == "jax":
            require_monitorable(model, self._traced)
            self._jax = JaxProbes(self, model, optimizer)
        self._steps_per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
        # Room for an epoch (read at its end) or, when its length is unknown, a flush before full.
        self._capacity = (self.params.get("steps") or _DEFAULT_CAPACITY) + self._steps_per_call
        self._pending_steps = 0
        self._epoch = 0
        self._applied = False  # set when a step's update by model.optimizer is traced
        self._first_epoch = True  # this fit's (it may start at initial_epoch > 0)
        self._first_step_of_epoch = 1
        if model.built and model.trainable_weights:
            self._prepare(list(model.trainable_weights))
        self._install(model, optimizer)
        self._run.status = RUNNING
        self._guards = [callback for callback in getattr(callback_list, "callbacks", [])
                        if isinstance(callback, SpikeGuard)]
        if self._guards:
            self._run.watch_spikes()
        # trace again, with the probes; a fit that raises ends the run (an error anywhere else
        # in fit, a Python data generator's, leaves status at running: the monitor cannot know)
        probes.retrace_watched(model, self._end_abruptly, callback_list)

    def _end_abruptly(self, error: BaseException) -> None:
        """What ``on_train_end`` does, for a fit that raised: the rows taken so far, the probes
        removed (the next fit traces anew), and the run closed as interrupted or failed."""
        if self._ended:
            return
        self._ended = True
        if self._jax is not None:
            self._jax.restore_purged()
        self._remove_probes()
        probes.unwatch(self.model, self._end_abruptly)
        self.model.train_function = None
        try:
            self._flush(self._epoch)
            self._take_spikes()
        except Exception:  # noqa: BLE001 - the error on its way up is the one to report
            pass
        if isinstance(self._buffer, JaxStepBuffer):
            self._buffer.remove()
        self._run.end_abruptly(error)

    def _new_run(self) -> None:
        """Each ``model.fit`` is a run of its own, as Keras's ``History`` is: the layers it
        trains may have changed (a backbone unfrozen), and its steps count from 1 again.
        Loggers closed the last run when it ended, so they cannot take a new one."""
        if self.loggers:
            raise ValueError("this GradientMonitor's loggers closed its run when the last model.fit "
                             "ended: give each model.fit a new GradientMonitor, with new loggers")
        self._ended = False

    def _install(self, model, optimizer) -> None:
        if self._jax is not None:
            self._jax.install()
            return
        monitor = self

        def wrap_compute_loss(original_compute_loss):
            def compute_loss(*args, **kwargs):
                loss = original_compute_loss(*args, **kwargs)
                monitor._step.loss = tf.cast(loss, tf.float32)
                y_pred = kwargs.get("y_pred", args[2] if len(args) > 2 else None)
                monitor._step.probabilities = probability_outputs(y_pred)
                return loss
            return compute_loss

        def wrap_apply(original_apply):
            def apply(grads, trainable_variables=None):
                grads = list(grads)
                targets = list(trainable_variables if trainable_variables is not None
                               else optimizer._trainable_variables)
                monitor._prepare(targets)  # subclassed models are built by their first step
                monitored = monitor._layout.monitored
                scale = _loss_scale(optimizer) if monitor._loss_scaled else None
                before = [tf.identity(targets[i]) for i in monitored]
                step_loss, probabilities = monitor._take_loss()
                counts = saturated_output_counts(probabilities) if probabilities else None
                result = original_apply(grads, trainable_variables)
                loss, *summed = _summed_over_replicas([step_loss, *grads] + ([counts] if probabilities else []))
                if probabilities:
                    *summed, counts = summed
                state = monitor._optimizer_state_row(targets, summed, before, scale)
                monitor._record_step(loss, summed, scale, [targets[i] for i in monitored], before, counts, state)
                return result
            return apply

        self._restore = [(model, "compute_loss", probes.wrap(model, "compute_loss", wrap_compute_loss, probes.MONITOR)),
                         (optimizer, "apply", probes.wrap(optimizer, "apply", wrap_apply, probes.MONITOR))]

    def _prepare(self, variables) -> None:
        """The layout of the numbered layers and the buffer (once, eagerly, even when called
        while the train function is traced)."""
        if self._buffer is not None:
            return
        self._layout = layer_layout(variables)
        self._optimizer_stats = optimizer_state.statistics(self.model.optimizer) if self.optimizer_state else ()
        columns = metric_columns(len(self._layout.paths), self._layout.recurrent_layers,
                                 clipped=self._clipping is not None, loss_scaled=self._loss_scaled,
                                 optimizer_stats=self._optimizer_stats)
        self._run.start(self._layout.paths, columns, self._traced, epochs=self.params.get("epochs") or 0,
                        steps_per_epoch=self.params.get("steps") or 0)
        n_values = len(columns) - VALUE_COLUMNS_START
        if self._jax is not None:  # a JAX array cannot carry its logits: no OUTPUT_COLUMN
            self._buffer = JaxStepBuffer(self.model.optimizer, self._capacity, n_values)
            return
        # Room for OUTPUT_COLUMN: whether outputs are probabilities is known when the step is traced.
        self._buffer = _StepBuffer(self._capacity, n_values + 1, [layer.time_steps for layer in self._traced])

    def _take_loss(self):
        """The loss compute_loss gave this step (in this replica's thread), and its
        probability outputs (:func:`gradtools.stats.probability_outputs`)."""
        step_loss, self._step.loss = getattr(self._step, "loss", None), None
        probabilities, self._step.probabilities = getattr(self._step, "probabilities", []), []
        if step_loss is None:  # model.fit stops here without on_train_end: undo what it would
            self._remove_probes()
            self.model.train_function = None  # traced with the probes; the next fit traces anew
            raise ValueError(NO_LOSS_SEEN)
        return step_loss, probabilities

    def _optimizer_state_row(self, targets, grads, before, scale):
        """The layers' :mod:`gradtools.optimizer_state` columns after the update (None when not
        asked for), from the kernels' gradients divided by the loss scale."""
        if not self._optimizer_stats:
            return None
        return optimizer_state.layers_row(self.model.optimizer, self._layout, targets, unscaled(grads, scale), before)

    def _record_step(self, loss, grads, scale, weights_after, weights_before, output_counts=None, state=None):
        """In-graph, from the step's loss and gradients summed over replicas: the step's row
        into the buffer (when logged), the non-finite flag and the gradients through time.
        ``state``: the optimizer-state columns. With ``output_counts`` the run has
        :data:`OUTPUT_COLUMN`; else that slot is left NaN."""
        self._applied = True
        grads = unscaled(grads, scale)
        state_norms = unscaled([layer.state_gradient_norms.value() for layer in self._traced], scale)
        row, finite = step_row(loss, grads, self._layout.monitored, weights_before, weights_after,
                               clipped_gradients=self._clipping(grads) if self._clipping else None,
                               loss_scale=scale, output_counts=output_counts, optimizer_state=state)
        if output_counts is None:
            row = tf.concat([row, [float("nan")]], axis=0)
        elif OUTPUT_COLUMN not in self._run.columns:
            self._run.columns.append(OUTPUT_COLUMN)
        for guard in self._guards:  # a non-finite step a guard did not apply is no divergence
            finite = tf.logical_or(finite, guard.left_out_nonfinite())
        if _is_first_replica():  # the others hold the same sums
            self._buffer.write(row, finite, self.log_every, state_norms)

    # --- reading the buffer -------------------------------------------------------------------

    def _flush(self, epoch: int) -> None:
        if self._buffer is None:
            return
        self._pending_steps = 0
        values, steps, finite = self._buffer.take_rows(self.model)
        self._run.add_rows(epoch, steps, steps - self._first_step_of_epoch, values, finite)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._first_step_of_epoch = (self._buffer.train_steps_so_far(self.model) + 1
                                     if self._buffer is not None else 1)
        self._radii = through_time.spectral_radii(self._traced)

    def on_train_batch_end(self, batch, logs=None):
        model = self._model  # not Callback.model, which under JAX writes the whole state back each time
        self._pending_steps += self._steps_per_call
        if self._pending_steps + self._steps_per_call > self._capacity:
            self._flush(self._epoch)
        if self.stop_on_nonfinite and self._buffer is not None and self._buffer.nonfinite_seen_so_far(model):
            model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        first_epoch, self._first_epoch = self._first_epoch, False
        if first_epoch and not self._applied:
            warnings.warn(NO_STEP_SEEN, RuntimeWarning, stacklevel=2)
        self._flush(epoch)
        self._take_spikes()
        diverged = self.status == DIVERGED
        means = self._buffer.take_state_means() if self._traced and self._buffer is not None else []
        self._run.end_epoch(epoch, self.epochs_completed if diverged else epoch + 1,
                            last=epoch + 1 == self.params.get("epochs") or (self.stop_on_nonfinite and diverged),
                            through_time_values=self._run.through_time_row(epoch, self._radii, means))
        if self.stop_on_nonfinite and diverged:
            self.model.stop_training = True

    def _take_spikes(self) -> None:
        """The spikes a SpikeGuard of the same fit caught since the last call go to the run."""
        for guard in self._guards:
            self._run.add_spikes(guard.new_events())

    def _remove_probes(self) -> None:
        for owner, name, token in self._restore:
            probes.unwrap(owner, name, token)
        self._restore = []
        if self._jax is not None:
            self._jax.remove()

    def on_train_end(self, logs=None):
        self._remove_probes()
        probes.unwatch(self.model, self._end_abruptly)
        self.model.make_train_function(force=True)  # later fits run without the probes
        if self._buffer is not None and self._buffer.nonfinite_seen_so_far(self.model) and self.status != DIVERGED:
            self._run.status = DIVERGED
        if isinstance(self._buffer, JaxStepBuffer):
            self._buffer.remove()
        self._ended = True
        self._run.end()
