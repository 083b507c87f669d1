"""One training step, in the shape of the keras-io custom-loop guide, with the step's
statistics computed beside it by :func:`gradtools.stats.step_row`.

The step itself is the usual five lines: forward pass under a ``GradientTape``, the loss with
``model.losses`` added, the gradients, the update. What gradtools adds sits around them: a
snapshot of the monitored weights before the update (for the update ratio), the optional
clipping, the loss scale under mixed precision, and the row of statistics.
"""

from __future__ import annotations

import re

import keras
import tensorflow as tf
from keras.src.backend.common.masking import get_keras_mask, set_keras_mask  # no public API sets one

from gradtools import optimizer_state as optimizer_state_columns
from gradtools import through_time
from gradtools.clipping import clip_by_global_norm, clip_by_value
from gradtools.columns import VALUE_COLUMNS_START, metric_columns
from gradtools.layers import LayerLayout, layer_layout
from gradtools.stats import probability_outputs, saturated_output_counts, step_row, unscaled


class _LossFromFunction(keras.losses.Loss):
    """A Keras loss function (per-sample) as a mean-reduced loss, like ``compile`` makes it."""

    def __init__(self, fn, dtype=None):
        # a name Keras accepts as a scope: a lambda's "<lambda>" is not one
        name = re.sub(r"\W+", "_", getattr(fn, "__name__", "")).strip("_") or "loss"
        super().__init__(name=name, dtype=dtype)
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


def counting_only(predictions, real_rows):
    """``predictions`` whose Keras mask also leaves out the rows where ``real_rows`` is False:
    a Keras loss then reduces over the real rows alone (its mean divides by their count), as
    on a batch of those rows. The model's own mask, if any, is kept."""
    own = get_keras_mask(predictions)
    rank = len(own.shape) if own is not None else len(predictions.shape) - 1  # the loss values'
    rows = tf.reshape(real_rows, [-1] + [1] * (rank - 1))
    # On the predictions themselves, not a copy: Keras's cross-entropies find the logits of a
    # sigmoid or softmax output through the tensor (its ``_keras_logits``, or the op that made
    # it), and a copy would leave them the clipped probabilities (a gradient of exactly 0 on a
    # saturated output, where model.fit's is huge).
    set_keras_mask(predictions, rows if own is None else tf.logical_and(tf.cast(own, tf.bool), rows))
    return predictions


#: Layers whose training-mode output for one example depends on the other examples of the
#: batch (batch statistics), or on a function of the user's (which might).
_ROW_MIXING = (keras.layers.BatchNormalization, keras.layers.Lambda)


def padding_is_exact(model: keras.Model, loss_fn) -> bool:
    """Whether a batch filled up with extra rows, masked out of the loss by
    :func:`counting_only`, trains exactly as the smaller batch alone would. That holds when
    each example's output depends on that example alone (the model and its layers are
    Keras's or gradtools's own, without batch normalization: a class of the user's might mix
    the rows), the model has one output with a batch and a feature axis, and the loss is a
    reducing Keras loss, which honours masks. An activity regularizer sums its penalty over
    every row, the filling's too, so a model with one is not padded."""
    layers = model._flatten_layers(include_self=True, recursive=True)
    outputs = getattr(model, "outputs", None) or []
    return (all(_ours_or_keras(type(layer)) and not isinstance(layer, _ROW_MIXING)
                and getattr(layer, "activity_regularizer", None) is None for layer in layers)
            and len(outputs) == 1 and len(outputs[0].shape) >= 2
            and _ours_or_keras(loss_fn.fn if isinstance(loss_fn, _LossFromFunction) else type(loss_fn))
            and getattr(loss_fn, "reduction", None) not in (None, "none"))


def _ours_or_keras(thing) -> bool:
    return getattr(thing, "__module__", "").startswith(("keras.", "gradtools."))


def with_loss_scaling(optimizer):
    """Under the ``mixed_float16`` policy, the optimizer wrapped in a LossScaleOptimizer, as
    ``model.compile`` does; otherwise the optimizer itself."""
    if (keras.config.dtype_policy().name == "mixed_float16"
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


class TrainStep:
    """``step(x_batch, y_batch)`` → (row of statistics, finite flag, the kernels' gradients
    when ``keep_gradients``, ‖∂L/∂h_t‖ of each traced recurrent layer). A ``guard``
    (:class:`gradtools.SpikeGuard`, attached to the optimizer) is told each step's loss."""

    def __init__(self, model: keras.Model, loss_fn, optimizer, *, clip_value=None,
                 clip_global_norm=None, keep_gradients: bool = False, guard=None,
                 optimizer_state: bool = False):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.variables = list(model.trainable_weights)
        self.layout: LayerLayout = layer_layout(self.variables)
        self.traced = through_time.traced_layers(model)
        self.clip_value, self.clip_global_norm = clip_value, clip_global_norm
        self.keep_gradients = keep_gradients
        self.guard = guard
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.clips = clip_value is not None or clip_global_norm is not None
        self.optimizer_stats = optimizer_state_columns.statistics(optimizer) if optimizer_state else ()
        #: Whether some outputs are probabilities (:func:`gradtools.stats.probability_outputs`):
        #: known once the step is traced; its row has a slot for
        #: :data:`gradtools.columns.OUTPUT_COLUMN` either way (NaN without), so that ``n_values``
        #: is known before.
        self.has_probabilities = False
        self.n_values = len(self._columns(True)) - VALUE_COLUMNS_START
        optimizer.build(self.variables)

    @property
    def columns(self) -> list[str]:
        """The columns of its rows, with :data:`gradtools.columns.OUTPUT_COLUMN` once traced
        on probability outputs."""
        return self._columns(self.has_probabilities)

    def _columns(self, output_saturated: bool) -> list[str]:
        return metric_columns(len(self.layout.paths), self.layout.recurrent_layers, clipped=self.clips,
                              loss_scaled=self.loss_scaled, optimizer_stats=self.optimizer_stats,
                              output_saturated=output_saturated)

    def __call__(self, x_batch, y_batch, real_rows=None):
        """One step; ``real_rows`` (bool, [batch]) leaves the other rows out of the loss."""
        with tf.GradientTape() as tape:
            predictions = self.model(x_batch, training=True)
            if real_rows is not None:
                predictions = counting_only(predictions, real_rows)
            probabilities = probability_outputs(predictions)
            loss = self.loss_fn(y_batch, predictions)
            if self.model.losses:
                loss = loss + tf.add_n(self.model.losses)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.variables)
        scale = self._loss_scale()
        before = [tf.identity(self.variables[i]) for i in self.layout.monitored]
        applied = self._clip(gradients, scale)
        if self.guard is not None:  # it judges the gradients before clipping, as in model.fit
            self.guard.note_step(loss, unscaled(gradients, scale) if self.clips else None)
        self.optimizer.apply(applied, self.variables)
        self.has_probabilities = bool(probabilities)
        counts = saturated_output_counts(probabilities, real_rows) if probabilities else None
        return self.record(loss, gradients, applied, before, scale, counts)

    def record(self, loss, gradients, applied, before, scale, output_counts=None):
        """The step's row and finite flag (:func:`gradtools.stats.step_row`), the kernels'
        gradients when kept, and the traced layers' ‖∂L/∂h_t‖, all divided by the loss scale."""
        gradients = unscaled(gradients, scale)
        monitored = self.layout.monitored
        row, finite = step_row(loss, gradients, monitored, before, [self.variables[i] for i in monitored],
                               clipped_gradients=unscaled(applied, scale) if self.clips else None,
                               loss_scale=scale, optimizer_state=self._optimizer_state_row(gradients, before),
                               output_counts=output_counts)
        if output_counts is None:
            row = tf.concat([row, [float("nan")]], axis=0)
        if self.guard is not None:  # a non-finite step the guard did not apply is no divergence
            finite = tf.logical_or(finite, self.guard.left_out_nonfinite())
        kernels = ([tf.convert_to_tensor(gradients[i]) for i in self.layout.kernel_positions]
                   if self.keep_gradients else [])
        state_norms = unscaled([layer.state_gradient_norms.value() for layer in self.traced], scale)
        return row, finite, kernels, state_norms

    def _optimizer_state_row(self, gradients, before):
        """The layers' :mod:`gradtools.optimizer_state` columns after the update, or None."""
        if not self.optimizer_stats:
            return None
        return optimizer_state_columns.layers_row(self.optimizer, self.layout, self.variables, gradients, before)

    @property
    def guard_stops(self) -> bool:
        """A guard that stops training on a spike: the epoch's loop ends there."""
        return self.guard is not None and self.guard.action == "stop"

    def _loss_scale(self):
        """The scale this step's loss was multiplied by, read before ``apply`` changes it."""
        return tf.identity(self.optimizer.dynamic_scale.value) if self.loss_scaled else None

    def _clip(self, gradients, scale):
        """By value, then by global norm; on loss-scaled gradients the thresholds are scaled
        too, which clips the unscaled gradients exactly as asked."""
        factor = 1.0 if scale is None else scale
        if self.clip_value is not None:
            gradients = clip_by_value(gradients, self.clip_value, factor)
        if self.clip_global_norm is not None:
            gradients = clip_by_global_norm(gradients, self.clip_global_norm, factor)
        return gradients
