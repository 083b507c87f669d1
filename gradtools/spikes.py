"""The spike guard's judgement and actions, in-graph: one call per train step.

Each step's loss and global gradient norm are compared with the last ``window`` finite
steps (the numbered layers' gradient norms, :mod:`gradtools.layers`, with theirs, to name the
layer of an event). Norms, and a loss that has been positive throughout, are judged on a log scale (a
spike multiplies them). On that scale a value is a spike when it lies above

    level + min(max(threshold · σ, log(min_ratio)), log(max_ratio))

- ``level`` is the median of the window, ``σ`` its median absolute deviation × 1.4826 (σ for
  normal data): a robust "threshold σ" that the spikes in the window hardly move;
- ``log(min_ratio)`` keeps a nearly constant series, whose σ is tiny, from calling a small
  rise a spike;
- ``log(max_ratio)``: a value ``max_ratio`` times the level is a spike however spread the
  window is. Training moves the gradient norm by decades (it falls as a classifier
  converges); a window that spans such a fall has a σ so wide that a bad batch 10⁵ times the
  level would pass.

A loss that is not always positive is judged on its own scale, with ``(ratio − 1) · |level|``
in the place of ``log(ratio)``. A step whose loss or gradient is not finite is always a
spike. The layer named by an event is the one whose gradient norm rose most over its own
level; on a non-finite step, the non-finite layer nearest the output (where backpropagation
reaches first).

:class:`GuardState` holds the state as variables, so one compiled program runs a whole fit:
the window, the counters, the events not yet read by Python, and what the actions need (the
learning rate's cool-down, the snapshot to roll back to, the BatchNormalization statistics
from before the step).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from gradtools.layers import layer_layout
from gradtools.spike_events import ACTIONS  # noqa: F401 - the actions, beside what does them
from gradtools.stats import global_gradient_norm

#: What an event says was done at its step.
TAKEN = ("warned", "skipped", "clipped", "lowered_lr", "rolled_back", "stopped", "applied")
#: The quantity that spiked.
QUANTITIES = ("loss", "grad_global_norm", "nonfinite")
#: σ of normal data per unit of median absolute deviation.
MAD_TO_SIGMA = 1.4826
#: Where a log scale is floored (a norm of exactly 0).
TINY = 1e-30
#: Events a step can leave for Python before they are read (more are counted, not kept).
EVENT_CAPACITY = 1024

_LOSS, _GRAD_NORM, _NONFINITE = range(3)
_WARNED, _SKIPPED, _CLIPPED, _LOWERED, _ROLLED_BACK, _STOPPED, _APPLIED = range(7)
#: The columns of the in-graph event table, after its step.
_VALUE, _THRESHOLD, _MEDIAN, _QUANTITY, _LAYER, _JUMP, _TAKEN = range(7)


@dataclass(frozen=True)
class GuardSettings:
    """What :class:`gradtools.SpikeGuard` was given (validated there)."""

    action: str
    window: int
    threshold: float
    min_ratio: float
    max_ratio: float
    warmup: int
    lr_factor: float
    lr_steps: int
    snapshot_every: int


class GuardState:
    """The guard's variables for one run of one model, and the in-graph step
    :meth:`guarded_apply`. Built eagerly (``tf.init_scope``) even when first needed while a
    train function is traced."""

    def __init__(self, settings: GuardSettings, model: keras.Model, optimizer, variables, stopped: tf.Variable,
                 counts_steps: bool = True):
        self.settings = settings
        layout = layer_layout(list(variables))
        self.kernel_positions = layout.kernel_positions
        self.paths = layout.paths
        quantities = 2 + len(self.paths)
        self.stopped = stopped  # made before tracing: a loop's condition reads it before any step
        self.counts_steps = counts_steps  # under a loss scaler, the outer apply counts every step
        self.learning_rate = learning_rate_variable(optimizer) if settings.action == "lower_lr" else None
        with tf.init_scope():
            self.window = tf.Variable(tf.zeros([settings.window, quantities]), trainable=False)
            self.seen = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            self.steps = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            self.events = tf.Variable(tf.zeros([EVENT_CAPACITY, 7]), trainable=False)
            self.event_steps = tf.Variable(tf.zeros([EVENT_CAPACITY], tf.int64), trainable=False)
            self.event_count = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            self.cooldown = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            self.nonfinite_before = tf.Variable(False, trainable=False)
            self.nonfinite_left_out = tf.Variable(False, trainable=False)
            self.batch_statistics = _batch_statistics(model)
            self.statistics_before = [tf.Variable(v, trainable=False) for v in self.batch_statistics]
            self.restorable = _restorable(model, optimizer) if settings.action == "rollback" else []
            self.snapshot = [tf.Variable(v, trainable=False) for v in self.restorable]

    # --- the step ---------------------------------------------------------------------------

    def guarded_apply(self, loss, gradients, apply_update, judged=None) -> None:
        """In-graph, for one step: judge its ``loss`` and gradients (``judged``, or the
        ``gradients`` to apply; unscaled), then call ``apply_update(gradients)`` or not, as the
        action says; record an event for a spike."""
        step = self.steps.assign_add(1) if self.counts_steps else self.steps.read_value()
        values = self._values(loss, gradients if judged is None else judged)
        spiked, limits, medians = self._judge(values)
        nonfinite = tf.logical_not(tf.reduce_all(tf.math.is_finite(values[:2])))
        spike = tf.logical_or(nonfinite, tf.reduce_any(spiked))
        taken = self._act(spike, nonfinite, spiked[_GRAD_NORM], values[_GRAD_NORM], limits[_GRAD_NORM], gradients,
                          apply_update)
        self.nonfinite_left_out.assign(tf.logical_and(nonfinite, tf.constant(self.settings.action != "warn")))
        quantity = tf.where(nonfinite, _NONFINITE, tf.where(spiked[_GRAD_NORM], _GRAD_NORM, _LOSS))
        # one event for a run of non-finite steps (under "warn", NaN weights make every later one so)
        new = tf.logical_and(spike, tf.logical_not(tf.logical_and(nonfinite, self.nonfinite_before)))
        self.nonfinite_before.assign(nonfinite)
        tf.cond(new, lambda: self._write_event(step, quantity, values, limits, medians, taken),
                lambda: tf.constant(False))
        self._remember(values, nonfinite)  # after the event: its layer is judged against the window before it

    def _values(self, loss, gradients):
        """[loss, global gradient norm, ‖g‖ of each numbered layer's kernel] in float32."""
        layer_norms = [tf.constant(0.0) if gradients[i] is None
                       else tf.norm(tf.cast(tf.convert_to_tensor(gradients[i]), tf.float32))
                       for i in self.kernel_positions]
        return tf.stack([tf.cast(tf.reshape(loss, []), tf.float32), global_gradient_norm(gradients),
                         *layer_norms])

    def _judge(self, values):
        """Which of loss and gradient norm spiked, and their limits and levels (the layers'
        levels are worked out only for an event: :meth:`_write_event`)."""
        settings = self.settings
        limits, levels, positive, value = self._levels(values[:2], self.window[:, :2])
        spiked = tf.logical_and(self.seen >= settings.warmup, value > limits)
        return spiked, _exp_where(positive, limits), _exp_where(positive, levels)

    def _levels(self, values, window):
        """Per column of ``window`` (and its value in ``values``): the limit and the level on
        its scale, whether that scale is logarithmic (window and value all positive), and the
        value on it."""
        settings = self.settings
        count = tf.minimum(self.seen, settings.window)
        valid = tf.range(settings.window, dtype=tf.int64) < count
        positive = tf.logical_and(tf.reduce_all(tf.logical_or(~valid[:, None], window > 0), axis=0), values > 0)
        window, value = _log_where(positive, window), _log_where(positive, values)
        levels = _median(window, valid)
        spread = MAD_TO_SIGMA * _median(tf.abs(window - levels), valid)
        least = tf.where(positive, tf.math.log(settings.min_ratio), (settings.min_ratio - 1.0) * tf.abs(levels))
        most = tf.where(positive, tf.math.log(settings.max_ratio), (settings.max_ratio - 1.0) * tf.abs(levels))
        return levels + tf.minimum(tf.maximum(settings.threshold * spread, least), most), levels, positive, value

    def _remember(self, values, nonfinite) -> None:
        """A finite step's values go into the window (spikes too: the median and MAD are
        robust to a few, and a lasting change of level becomes the new normal)."""
        def add():
            self.window.scatter_nd_update([[self.seen % self.settings.window]], [values])  # XLA: no slice assign
            self.seen.assign_add(1)
            return tf.constant(True)
        finite = tf.reduce_all(tf.math.is_finite(values))
        tf.cond(tf.logical_and(finite, tf.logical_not(nonfinite)), add, lambda: tf.constant(False))

    # --- the actions ------------------------------------------------------------------------

    def _act(self, spike, nonfinite, norm_spiked, norm, norm_limit, gradients, apply_update):
        """Apply the update (or not) as the action says; what was done, as a :data:`TAKEN` code."""
        action = self.settings.action
        if action == "warn":
            self._apply(gradients, apply_update)
            return tf.constant(_WARNED)
        if action == "stop":
            stop = tf.logical_or(self.stopped, spike)
            self.stopped.assign(stop)
            self._apply_unless(stop, gradients, apply_update)
            return tf.constant(_STOPPED)
        if action == "skip":
            self._apply_unless(spike, gradients, apply_update)
            return tf.constant(_SKIPPED)
        if action == "rollback":
            return self._rollback(spike, gradients, apply_update)
        clip = tf.logical_and(norm_spiked, tf.logical_not(nonfinite))
        # the limit over the judged norm when clipping, else a factor of exactly 1 (a norm of 0 too)
        clipped, _ = tf.clip_by_global_norm(gradients, tf.where(clip, norm_limit, tf.maximum(norm, TINY)),
                                            use_norm=norm)
        if action == "lower_lr":
            return self._lower_lr(spike, nonfinite, clipped, apply_update)
        self._apply_unless(nonfinite, clipped, apply_update)
        return tf.where(nonfinite, _SKIPPED, tf.where(clip, _CLIPPED, _APPLIED))

    def _apply(self, gradients, apply_update) -> None:
        """The update, after which the layer statistics are the ones to restore next."""
        apply_update(gradients)
        _copier(self.batch_statistics, self.statistics_before)()

    def _apply_unless(self, leave_out, gradients, apply_update, instead=None) -> None:
        """The update, unless ``leave_out``: then ``instead`` (by default, the step leaves no
        trace: the BatchNormalization statistics it moved are put back)."""
        def apply():
            self._apply(gradients, apply_update)
            return tf.constant(True)

        tf.cond(leave_out, instead or _copier(self.statistics_before, self.batch_statistics), apply)

    def _lower_lr(self, spike, nonfinite, gradients, apply_update):
        """A spike multiplies the learning rate by ``lr_factor`` for ``lr_steps`` steps (a
        spike meanwhile starts the count again); the spike's own step is applied at the lower
        rate, its gradient clipped to the limit (as by ``"clip"``), unless it is not finite."""
        settings, rate = self.settings, self.learning_rate
        starting = tf.logical_and(spike, tf.equal(self.cooldown, 0))
        rate.assign(tf.where(starting, rate * settings.lr_factor, rate))
        self.cooldown.assign(tf.where(spike, tf.constant(settings.lr_steps, tf.int64), self.cooldown))
        self._apply_unless(nonfinite, gradients, apply_update)
        ending = tf.equal(self.cooldown, 1)
        self.cooldown.assign(tf.maximum(self.cooldown - 1, 0))
        rate.assign(tf.where(ending, rate / settings.lr_factor, rate))
        return tf.where(nonfinite, _SKIPPED, _LOWERED)

    def restore_learning_rate(self) -> None:
        """Eagerly, when training ends during a cool-down: the rate the user set."""
        if self.learning_rate is not None and int(self.cooldown.numpy()) > 0:
            self.learning_rate.assign(self.learning_rate / self.settings.lr_factor)
            self.cooldown.assign(0)

    def _rollback(self, spike, gradients, apply_update):
        """On a spike: weights, layer statistics and optimizer state as at the last snapshot
        (taken every ``snapshot_every`` steps without a spike), the step not applied."""
        self._apply_unless(spike, gradients, apply_update, instead=_copier(self.snapshot, self.restorable))
        due = tf.logical_and(tf.logical_not(spike), tf.equal(self.steps % self.settings.snapshot_every, 0))
        tf.cond(due, _copier(self.restorable, self.snapshot), lambda: tf.constant(False))
        return tf.constant(_ROLLED_BACK)

    # --- events -----------------------------------------------------------------------------

    def _write_event(self, step, quantity, values, limits, medians, taken):
        layer, jump = self._culprit(values[2:])
        index = [[tf.minimum(self.event_count, EVENT_CAPACITY - 1)]]
        # the loss's or the gradient norm's numbers, chosen with where: a tensor index into a
        # tensor (values[slot]) made every step of a compiled epoch several times slower
        norm = tf.not_equal(quantity, _LOSS)
        value, limit, median = (tf.where(norm, t[_GRAD_NORM], t[_LOSS]) for t in (values, limits, medians))
        row = tf.stack([value, tf.where(tf.equal(quantity, _NONFINITE), float("nan"), limit), median,
                        tf.cast(quantity, tf.float32), tf.cast(layer, tf.float32), jump, tf.cast(taken, tf.float32)])
        self.events.scatter_nd_update(index, [row])
        self.event_steps.scatter_nd_update(index, [step])
        self.event_count.assign_add(1)
        return tf.constant(True)

    def _culprit(self, norms):
        """(index of the layer, its norm / its median in the window): the non-finite layer
        nearest the output if there is one, else the layer whose norm rose most over its median."""
        if not self.paths:
            return tf.constant(-1), tf.constant(float("nan"))
        _, levels, positive, _ = self._levels(norms, self.window[:, 2:])
        typical = _exp_where(positive, levels)
        bad = tf.logical_not(tf.math.is_finite(norms))
        positions = tf.range(tf.size(norms))
        last_bad = tf.reduce_max(tf.where(bad, positions, -1))
        jumps = tf.where(bad, float("nan"), tf.math.divide_no_nan(norms, typical))
        most = tf.cast(tf.argmax(tf.where(bad, -1.0, jumps)), tf.int32)
        layer = tf.where(last_bad >= 0, last_bad, most)
        return layer, tf.gather(jumps, layer)

    def take_events(self):
        """Eagerly: (steps, rows, how many were dropped) of the events since the last call."""
        count = int(self.event_count.numpy())
        if count == 0:
            return [], [], 0
        kept = min(count, EVENT_CAPACITY)
        steps, rows = self.event_steps.numpy()[:kept], self.events.numpy()[:kept]
        self.event_count.assign(0)
        return steps, rows, count - kept


def _copier(sources, targets):
    """A ``tf.cond`` branch: each of ``targets`` takes the value of its source."""
    def copy():
        for source, target in zip(sources, targets):
            target.assign(source)
        return tf.constant(True)
    return copy


def _median(table, rows):
    """Per column, the median of the ``rows`` (bool, one per row) of ``table`` (0 without any)."""
    count = tf.reduce_sum(tf.cast(rows, tf.int64))
    ordered = tf.sort(tf.where(rows[:, None], table, float("inf")), axis=0)
    n = tf.maximum(count, 1)
    low, high = tf.gather(ordered, (n - 1) // 2), tf.gather(ordered, n // 2)
    return tf.where(count > 0, (low + high) / 2, tf.zeros_like(low))


def _log_where(positive, values):
    return tf.where(positive, tf.math.log(tf.maximum(values, TINY)), values)


def _exp_where(positive, values):
    return tf.where(positive, tf.exp(values), values)


def _batch_statistics(model) -> list:
    """The moving mean and variance of every BatchNormalization layer: what a forward pass in
    training changes besides the optimizer's update."""
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001 (no public walk)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.built:
            found += [layer.moving_mean, layer.moving_variance]
    return found


def _restorable(model, optimizer) -> list:
    """What a rollback restores: every weight and layer statistic of the model (not the
    random generators' states) and every variable of the optimizer but its learning rate
    (a callback such as ReduceLROnPlateau may have set it since the snapshot)."""
    model_variables = [v for v in model.variables if "seed_generator" not in v.path]
    rate = getattr(optimizer, "_learning_rate", None)
    return model_variables + [v for v in optimizer.variables if v is not rate]


def learning_rate_variable(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    rate = inner.learning_rate
    if not isinstance(rate, keras.Variable):
        raise ValueError("SpikeGuard(action='lower_lr') changes the optimizer's learning rate, and this "
                         f"{type(inner).__name__}'s is a schedule ({type(inner._learning_rate).__name__}): "  # noqa: SLF001
                         "give it a number, or use action='skip' or 'clip'")
    return rate

