"""``GradientMonitor`` on Keras's JAX backend: the step's row from the gradients the optimizer
applies, threaded through JAX's stateless train step as optimizer state.

Under JAX, ``model.fit`` jits a pure ``train_step(state, data) -> (logs, state)``; a variable
assigned inside it keeps its new value only if it is part of ``state``. So the monitor's
buffer is made of ``keras.Variable``\\ s appended, for the length of ``fit``, to
``model.optimizer.variables`` (the list ``fit`` threads through every step and writes back
at the end of each epoch), and three wrappers, installed on the instances, meet in one step:

- ``optimizer.stateless_apply(optimizer_variables, grads, trainable_variables)`` (which JAX's
  ``train_step`` calls with ``jax.value_and_grad``'s gradients, before the optimizer clips or
  unscales them) keeps the gradients, the loss scale and the weights before and after the update;
- the loss tracker's ``update_state`` keeps the step's loss (what ``compute_loss`` returned:
  inside ``value_and_grad`` the loss is a tracer of the inner trace and cannot leave it);
- ``model.train_step`` computes the row (:func:`gradtools.stats.step_row`, the same
  ``keras.ops`` as on TensorFlow) and writes it into the buffer's arrays of the returned state.

Nothing is computed twice: no second forward or backward pass, and only the buffer leaves the
device, once an epoch.
"""

from __future__ import annotations

import threading

import keras
import numpy as np
from keras import ops

from gradtools import probes
from gradtools.stats import step_row, unscaled

#: A train_step that does not give Keras's loss tracker its loss.
NO_LOSS_SEEN = ("GradientMonitor on JAX takes each step's loss where Keras's own train_step reports it (the "
                "model's loss tracker), and this model's train_step does not: train it with Keras's train_step, "
                "or on Keras's TensorFlow backend (KERAS_BACKEND=tensorflow)")
#: JAX runs that the monitor does not record yet, and what to say about them.
_REFUSED = ("GradientMonitor on JAX does not support {what} yet: train on one device without it, "
            "or on Keras's TensorFlow backend (KERAS_BACKEND=tensorflow)")


def require_monitorable(model, traced_layers) -> None:
    """Refuse, in one line, the JAX runs the monitor cannot record."""
    if traced_layers:
        raise ValueError(_REFUSED.format(what="gradients through time (gradtools.through_time.TracedRNN)"))
    if keras.distribution.distribution() is not None:
        raise ValueError(_REFUSED.format(what="keras.distribution (a distributed model.fit)"))
    if getattr(keras.config, "is_nnx_enabled", lambda: False)():
        raise ValueError(_REFUSED.format(what="Flax NNX models (keras.config.is_nnx_enabled())"))
    if model.built and not model.trainable_weights:
        raise ValueError("GradientMonitor has nothing to record: the model has no trainable weights")
    if not model.built:
        raise ValueError("GradientMonitor on JAX needs a built model: call the model on a batch, or give its "
                         "first layer an input shape, before model.fit")


class JaxStepBuffer:
    """The monitor's table of logged rows as optimizer state: written by the jitted step,
    read once per epoch (after ``fit`` writes the state back)."""

    def __init__(self, optimizer, capacity: int, n_values: int):
        self.capacity = capacity
        self._optimizer = optimizer

        def variable(shape, dtype, name):
            return keras.Variable(np.zeros(shape, dtype), trainable=False, name=f"gradtools_monitor_{name}")

        # One row more than kept: a step not logged, or one past a full table, is written there.
        self.rows = variable((capacity + 1, n_values), "float32", "rows")
        self.steps = variable((capacity + 1,), "int32", "steps")
        self.finite = variable((capacity + 1,), "bool", "finite")
        self.count = variable((), "int32", "count")
        # Train steps so far: the optimizer's iterations skip the steps a loss scaler skips.
        self.train_steps = variable((), "int32", "train_steps")
        self.nonfinite_seen = variable((), "bool", "nonfinite_seen")
        self._variables = [self.rows, self.steps, self.finite, self.count, self.train_steps, self.nonfinite_seen]
        # Appended to the innermost optimizer's list, so that they come last in optimizer.variables (a
        # LossScaleOptimizer's are its own, then its inner optimizer's): a state taken with them still
        # lines up with the optimizer's variables once they are removed.
        self._owner = optimizer
        while hasattr(self._owner, "inner_optimizer"):
            self._owner = self._owner.inner_optimizer
        self._owner._variables.extend(self._variables)  # noqa: SLF001 - the list fit threads through the step
        # A checkpoint written or read during fit (ModelCheckpoint, BackupAndRestore) holds the
        # optimizer's own variables only.
        chain = [optimizer] + ([self._owner] if self._owner is not optimizer else [])
        self._tokens = [(o, name, probes.wrap(o, name, self._without_buffer, probes.MONITOR))
                        for o in chain for name in ("save_own_variables", "load_own_variables")]

    def remove(self) -> None:
        """Give the optimizer back its own variables (when ``fit`` ends)."""
        mine = {id(v) for v in self._variables}
        self._owner._variables[:] = [v for v in self._owner._variables if id(v) not in mine]  # noqa: SLF001
        for owner, name, token in self._tokens:
            probes.unwrap(owner, name, token)
        self._tokens = []

    def _without_buffer(self, original):
        def own_variables_only(store):
            variables = self._owner._variables  # noqa: SLF001
            kept = list(variables)
            variables[:] = [v for v in kept if all(v is not mine for mine in self._variables)]
            try:
                return original(store)
            finally:
                variables[:] = kept
        return own_variables_only

    def positions(self) -> list[int]:
        """Where the buffer's variables are in ``optimizer.variables`` (the state's order)."""
        ids = [id(v) for v in self._optimizer.variables]
        return [ids.index(id(v)) for v in self._variables]

    def write(self, values, row, finite, log_every: int):
        """The buffer's next values (in the order of :meth:`positions`) after one train step:
        its row kept when logged (every ``log_every``-th step from the first, and every
        non-finite one), the non-finite flag."""
        rows, steps, flags, count, train_steps, nonfinite_seen = values
        step = train_steps + 1
        log_now = ops.logical_or(ops.equal((step - 1) % log_every, 0), ops.logical_not(finite))
        index = ops.where(log_now, ops.minimum(count, self.capacity), self.capacity)
        rows = ops.slice_update(rows, [index, 0], ops.expand_dims(ops.cast(row, "float32"), 0))
        steps = ops.slice_update(steps, [index], ops.expand_dims(step, 0))
        flags = ops.slice_update(flags, [index], ops.expand_dims(finite, 0))
        count = count + ops.cast(log_now, "int32")
        return [rows, steps, flags, count, step, ops.logical_or(nonfinite_seen, ops.logical_not(finite))]

    def take_rows(self, model):
        """(values, steps, finite flags) written since the last call."""
        model.jax_state_sync()  # a no-op at an epoch's end, when fit has just done it
        count = int(self.count.numpy())
        self.count.assign(0)
        if count > self.capacity:
            raise RuntimeError("GradientMonitor's buffer overflowed; this is a bug, please report it")
        return (self.rows.numpy()[:count], self.steps.numpy()[:count].astype(np.int64),
                self.finite.numpy()[:count])

    def train_steps_so_far(self, model) -> int:
        return int(np.asarray(self._current(model, self.train_steps)))

    def nonfinite_seen_so_far(self, model) -> bool:
        return bool(np.asarray(self._current(model, self.nonfinite_seen)))

    def _current(self, model, variable):
        """A variable's value in the state ``fit`` holds now (without writing the state back)."""
        state = getattr(model, "_jax_state", None)
        if state and not model._jax_state_synced:  # noqa: SLF001 - the trainer's own flag
            mine = [id(v) for v in self._variables].index(id(variable))  # Variable == is elementwise
            return state["optimizer_variables"][self.positions()[mine]]
        return variable.numpy()


class JaxProbes:
    """The wrappers that give the monitor each jitted step's loss, gradients and update."""

    def __init__(self, monitor, model, optimizer):
        self._monitor = monitor
        self._model = model
        self._optimizer = optimizer
        self._step = threading.local()
        self._loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        inner = optimizer.inner_optimizer if self._loss_scaled else optimizer
        self._clipping = inner._clip_gradients if (inner.clipnorm or inner.global_clipnorm or inner.clipvalue) else None  # noqa: SLF001
        self._tokens = []

    @property
    def clips(self) -> bool:
        return self._clipping is not None

    def install(self) -> None:
        model, optimizer = self._model, self._optimizer
        # fit purges the variables' values while it holds them as state: kept here for an error
        # in the first step's tracing, after which fit has no state to write back
        self._values = [(v, v.value) for v in [*model.trainable_variables, *model.non_trainable_variables,
                                                 *optimizer.variables, *model.metrics_variables]]
        tracker = self._model._loss_tracker  # noqa: SLF001 - the Mean that fit's train_step gives the loss to
        wrapped = [(self._model, "train_step", self._wrap_train_step),
                   (self._optimizer, "stateless_apply", self._wrap_stateless_apply),
                   (tracker, "update_state", self._wrap_loss)]
        self._tokens = [(owner, name, probes.wrap(owner, name, wrapper, probes.MONITOR))
                        for owner, name, wrapper in wrapped]

    def remove(self) -> None:
        for owner, name, token in self._tokens:
            probes.unwrap(owner, name, token)
        self._tokens = []

    def restore_purged(self) -> None:
        """After a fit that raised before any step returned its state (the monitor's own refusal
        while the step was traced, say): each variable fit purged gets its value back."""
        if getattr(self._model, "_jax_state", None) is not None:
            return  # fit writes back the state it holds
        for variable, value in getattr(self, "_values", []):
            if variable._value is None and not value.is_deleted():  # noqa: SLF001 - the trainer purges _value
                variable._value = value  # noqa: SLF001

    def _wrap_loss(self, original_update_state):
        def update_state(values, *args, **kwargs):
            self._step.loss = ops.cast(values, "float32")
            return original_update_state(values, *args, **kwargs)
        return update_state

    def _wrap_stateless_apply(self, original_stateless_apply):
        def stateless_apply(optimizer_variables, grads, trainable_variables):
            result = original_stateless_apply(optimizer_variables, grads, trainable_variables)
            scale = None
            if self._loss_scaled:  # the scale this step's loss was multiplied by, before apply changes it
                scale = optimizer_variables[self._position(self._optimizer.dynamic_scale)]
            self._step.applied = (list(grads), list(trainable_variables), list(result[0]), scale)
            return result
        return stateless_apply

    def _position(self, variable) -> int:
        return [id(v) for v in self._optimizer.variables].index(id(variable))

    def _wrap_train_step(self, original_train_step):
        def train_step(state, data):
            self._step.loss, self._step.applied = None, None
            logs, (trainable, non_trainable, optimizer_variables, metrics) = original_train_step(state, data)
            if self._step.applied is None:  # this train_step never called model.optimizer
                return logs, (trainable, non_trainable, optimizer_variables, metrics)
            optimizer_variables = self._record(list(optimizer_variables))
            return logs, (trainable, non_trainable, optimizer_variables, metrics)
        return train_step

    def _record(self, optimizer_variables):
        """The optimizer's state with this step's row written into the monitor's buffer."""
        monitor = self._monitor
        if self._step.loss is None:
            raise ValueError(NO_LOSS_SEEN)
        grads, before, after, scale = self._step.applied
        monitor._applied = True  # noqa: SLF001
        grads = unscaled(grads, scale)
        monitored = monitor._layout.monitored  # noqa: SLF001
        row, finite = step_row(self._step.loss, grads, monitored, [before[i] for i in monitored],
                               [after[i] for i in monitored],
                               clipped_gradients=self._clipping(grads) if self._clipping else None, loss_scale=scale)
        buffer = monitor._buffer  # noqa: SLF001
        positions = buffer.positions()
        written = buffer.write([optimizer_variables[p] for p in positions], row, finite, monitor.log_every)
        for position, value in zip(positions, written):
            optimizer_variables[position] = value
        return optimizer_variables
