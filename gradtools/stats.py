"""Per-layer gradient and weight statistics, computed in-graph as pure functions of tensors.

:func:`step_row` makes the row of one step, in the column order of
:func:`gradtools.columns.metric_columns`, for both ``gradtools.fit`` and ``GradientMonitor``.
"""

from __future__ import annotations

import tensorflow as tf


def layer_gradient_stats(gradients, weights_before, weights_after) -> tf.Tensor:
    """The statistics of several layers' kernels at one step, a float32 [layers, 7] table.

    With g the gradient of the loss with respect to a kernel (as the tape computed it,
    before any clipping), W0 the kernel before the update and W1 after it, n = size(g):

    - grad_mean     = Σ g / n            (signed, so positive and negative entries cancel)
    - grad_abs_mean = Σ |g| / n
    - grad_norm     = ‖g‖₂ = sqrt(Σ g²)
    - grad_max_abs  = max |g|
    - weight_mean   = Σ W1 / n
    - weight_norm   = ‖W1‖₂
    - update_ratio  = ‖W1 − W0‖₂ / ‖W0‖₂  (NaN-free: 0/0 is reported as 0)

    Each kernel gets one sum over its entries of the seven terms stacked (one pass, one
    reduction), and the divisions and square roots are done once for the whole table: the
    compiled step is smaller, and compiles faster, than with a norm and a mean per statistic
    and layer. For the same reason there is one ``Abs`` per kernel and one ``Sqrt`` in all: XLA
    compiles each such op through a pipeline of its own.
    """
    sums, sizes = [], []
    for gradient, before, after in zip(gradients, weights_before, weights_after):
        g = tf.reshape(tf.cast(tf.convert_to_tensor(gradient), tf.float32), [-1])
        w0 = tf.reshape(tf.cast(before, tf.float32), [-1])
        w1 = tf.reshape(tf.cast(after, tf.float32), [-1])
        change = w1 - w0
        abs_g = tf.abs(g)
        terms = tf.stack([g, abs_g, g * g, w1, w1 * w1, change * change, w0 * w0])
        sums.append(tf.concat([tf.reduce_sum(terms, axis=1), [tf.reduce_max(abs_g)]], axis=0))
        sizes.append(float(before.shape.num_elements()))  # a gradient's own shape may be unknown
    sum_g, sum_abs_g, sum_g2, sum_w1, sum_w1_2, sum_change2, sum_w0_2, max_abs_g = tf.unstack(
        tf.stack(sums), axis=1)
    n = tf.constant(sizes)
    norm_g, norm_w1, norm_change, norm_w0 = tf.unstack(tf.sqrt(tf.stack([sum_g2, sum_w1_2, sum_change2, sum_w0_2])))
    return tf.stack([sum_g / n, sum_abs_g / n, norm_g, max_abs_g, sum_w1 / n, norm_w1,
                     tf.math.divide_no_nan(norm_change, norm_w0)], axis=1)


def global_gradient_norm(gradients) -> tf.Tensor:
    """‖g‖₂ over every gradient tensor of the step (kernels, biases, all trainable variables),
    in float32: the norm that Keras's ``global_clipnorm`` and ``tf.clip_by_global_norm`` use."""
    return tf.linalg.global_norm([tf.cast(tf.convert_to_tensor(g), tf.float32)
                                  for g in gradients if g is not None])


def statistics_row(loss, gradients, monitored, weights_before, weights_after, *,
                   clipped_gradients=None, loss_scale=None, skipped=None) -> tf.Tensor:
    """One step's values in column order, after ``step, epoch, batch``: the loss, the global
    norm of ``gradients`` (every gradient of the step), :func:`layer_gradient_stats` of the
    gradients at positions ``monitored`` (see :attr:`gradtools.layers.LayerLayout.monitored`)
    with the matching ``weights_before`` / ``weights_after``, then the optional columns: the
    global norm of ``clipped_gradients``, the ``loss_scale`` and the ``skipped`` flag."""
    unreached = [getattr(after, "path", f"variable {i}")
                 for i, after in zip(monitored, weights_after) if gradients[i] is None]
    if unreached:  # zeros would read as dead units and a "vanishing" verdict
        raise ValueError(f"no gradient reaches {', '.join(unreached)}: the loss does not depend on it "
                         "(a layer the model never calls, or an output given no loss?); remove that layer, or set its "
                         "trainable = False while it does not learn")
    head = tf.stack([tf.cast(loss, tf.float32), global_gradient_norm(gradients)])
    layers = [tf.reshape(layer_gradient_stats([gradients[i] for i in monitored], weights_before,
                                              weights_after), [-1])] if monitored else []
    tail = []
    if clipped_gradients is not None:
        tail.append(global_gradient_norm(clipped_gradients))
    if loss_scale is not None:
        tail += [tf.cast(loss_scale, tf.float32), tf.cast(skipped, tf.float32)]
    return tf.concat([head, *layers] + ([tf.stack(tail)] if tail else []), axis=0)


def all_finite(loss, gradients) -> tf.Tensor:
    """True when the loss and every entry of every gradient are finite.

    One check per gradient: one check over the gradients laid end to end would compile faster
    (one ``IsFinite`` op), but copying them costs every step of a large model more than that
    saves once."""
    checks = [tf.reduce_all(tf.math.is_finite(tf.cast(loss, tf.float32)))]
    checks += [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(g))) for g in gradients if g is not None]
    return tf.reduce_all(tf.stack(checks))


def unscaled(tensors, scale):
    """``tensors`` divided by the loss scale (unchanged when there is none)."""
    if scale is None:
        return tensors
    return [None if t is None else t / tf.cast(scale, t.dtype) for t in tensors]


def step_row(loss, gradients, monitored, weights_before, weights_after, *, clipped_gradients=None,
             loss_scale=None):
    """One step's row (:func:`statistics_row`) and whether the step was finite, from its loss
    and its gradients already divided by the ``loss_scale`` (:func:`unscaled`), and, when the
    update clips, the gradients it applied (unscaled too).

    Under a loss scale a step whose gradients overflowed is one the loss scaler skips (column
    ``skipped``, and it halves the scale): not a divergence. Only a non-finite loss is."""
    finite_gradients = all_finite(loss, gradients)
    scaled = loss_scale is not None
    row = statistics_row(loss, gradients, monitored, weights_before, weights_after,
                         clipped_gradients=clipped_gradients, loss_scale=loss_scale,
                         skipped=tf.logical_not(finite_gradients) if scaled else None)
    finite = tf.reduce_all(tf.math.is_finite(tf.cast(loss, tf.float32))) if scaled else finite_gradients
    return row, finite
