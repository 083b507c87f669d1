"""One training step, in the shape of the keras-io custom-loop guide, with the step's
statistics computed beside it by :func:`gradtools.stats.statistics_row`.

The step itself is the usual five lines: forward pass under a ``GradientTape``, the loss with
``model.losses`` added, the gradients, the update. What gradtools adds sits around them: a
snapshot of the monitored weights before the update (for the update ratio), the optional
clipping, the loss scale under mixed precision, and the row of statistics.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from gradtools import through_time
from gradtools.clipping import clip_by_global_norm, clip_by_value
from gradtools.columns import metric_columns
from gradtools.layers import LayerLayout, layer_layout
from gradtools.stats import all_finite, statistics_row


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


def with_loss_scaling(optimizer):
    """Under the ``mixed_float16`` policy, the optimizer wrapped in a LossScaleOptimizer, as
    ``model.compile`` does; otherwise the optimizer itself."""
    if (keras.config.dtype_policy().name == "mixed_float16"
            and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def unscaled(tensors, scale):
    """``tensors`` divided by the loss scale (unchanged when there is none)."""
    if scale is None:
        return tensors
    return [None if t is None else t / tf.cast(scale, t.dtype) for t in tensors]


class TrainStep:
    """``step(x_batch, y_batch)`` → (row of statistics, finite flag, the kernels' gradients
    when ``keep_gradients``, ‖∂L/∂h_t‖ of each traced recurrent layer)."""

    def __init__(self, model: keras.Model, loss_fn, optimizer, *, clip_value=None,
                 clip_global_norm=None, keep_gradients: bool = False):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.variables = list(model.trainable_weights)
        self.layout: LayerLayout = layer_layout(self.variables)
        self.traced = through_time.traced_layers(model)
        self.clip_value, self.clip_global_norm = clip_value, clip_global_norm
        self.keep_gradients = keep_gradients
        self.loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self.clips = clip_value is not None or clip_global_norm is not None
        self.columns = metric_columns(len(self.layout.paths), self.layout.recurrent_layers,
                                      clipped=self.clips, loss_scaled=self.loss_scaled)
        optimizer.build(self.variables)

    def __call__(self, x_batch, y_batch):
        with tf.GradientTape() as tape:
            predictions = self.model(x_batch, training=True)
            loss = self.loss_fn(y_batch, predictions)
            if self.model.losses:
                loss = loss + tf.add_n(self.model.losses)
            scaled_loss = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, self.variables)
        scale = self._loss_scale()
        before = [tf.identity(self.variables[i]) for i in self.layout.monitored]
        applied = self._clip(gradients, scale)
        self.optimizer.apply(applied, self.variables)
        return self.record(loss, gradients, applied, before, scale)

    def record(self, loss, gradients, applied, before, scale):
        """The step's statistics, of the unscaled gradients (a skipped loss-scaler step is not
        a divergence: under loss scaling only a non-finite loss is)."""
        gradients = unscaled(gradients, scale)
        finite_gradients = all_finite(loss, gradients)
        monitored = self.layout.monitored
        row = statistics_row(
            loss, gradients, monitored, before, [self.variables[i] for i in monitored],
            clipped_gradients=unscaled(applied, scale) if self.clips else None, loss_scale=scale,
            skipped=tf.logical_not(finite_gradients) if self.loss_scaled else None)
        finite = tf.reduce_all(tf.math.is_finite(tf.cast(loss, tf.float32))) if self.loss_scaled else finite_gradients
        kernels = ([tf.convert_to_tensor(gradients[i]) for i in self.layout.kernel_positions]
                   if self.keep_gradients else [])
        state_norms = unscaled([layer.state_gradient_norms.value() for layer in self.traced], scale)
        return row, finite, kernels, state_norms

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
