"""Per-layer gradient and weight statistics, computed in-graph as pure functions of tensors.

:func:`step_row` makes the row of one step, in the column order of
:func:`gradtools.columns.metric_columns`, for both ``gradtools.fit`` and ``GradientMonitor``.
Written with ``keras.ops``, so that the same row can be computed by every Keras backend; on
TensorFlow those are the TensorFlow ops the row was written with before, and a run's numbers
are the same to the last bit.
"""

from __future__ import annotations

import math

import keras
from keras import ops


def dense(gradient):
    """A gradient as a dense tensor (TensorFlow gives an embedding's as ``IndexedSlices``)."""
    if hasattr(gradient, "indices") and hasattr(gradient, "dense_shape"):
        import tensorflow as tf  # only TensorFlow makes IndexedSlices

        return tf.convert_to_tensor(gradient)
    return ops.convert_to_tensor(gradient)


def layer_gradient_stats(gradients, weights_before, weights_after):
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
    compiles each such op through a pipeline of its own. That is TensorFlow's form. Under JAX
    each term is summed on its own: there XLA writes the stacked [7, n] table out before
    reducing it, several times slower on a large kernel than seven sums it fuses.
    """
    sums, sizes = [], []
    stacked = keras.backend.backend() == "tensorflow"
    for gradient, before, after in zip(gradients, weights_before, weights_after):
        g = ops.reshape(ops.cast(dense(gradient), "float32"), [-1])
        w0 = ops.reshape(ops.cast(before, "float32"), [-1])
        w1 = ops.reshape(ops.cast(after, "float32"), [-1])
        change = w1 - w0
        abs_g = ops.abs(g)
        terms = [g, abs_g, g * g, w1, w1 * w1, change * change, w0 * w0]
        if stacked:
            sums.append(ops.concatenate([ops.sum(ops.stack(terms), axis=1), ops.max(abs_g, axis=0, keepdims=True)],
                                        axis=0))
        else:
            sums.append(ops.stack([*(ops.sum(term) for term in terms), ops.max(abs_g)]))
        sizes.append(float(_size(before)))  # a gradient's own shape may be unknown
    sum_g, sum_abs_g, sum_g2, sum_w1, sum_w1_2, sum_change2, sum_w0_2, max_abs_g = ops.unstack(
        ops.stack(sums), axis=1)
    n = ops.convert_to_tensor(sizes, "float32")
    norm_g, norm_w1, norm_change, norm_w0 = ops.unstack(ops.sqrt(ops.stack([sum_g2, sum_w1_2, sum_change2,
                                                                            sum_w0_2])))
    return ops.stack([sum_g / n, sum_abs_g / n, norm_g, max_abs_g, sum_w1 / n, norm_w1,
                      ops.divide_no_nan(norm_change, norm_w0)], axis=1)


def _size(variable) -> int:
    return math.prod(int(dimension) for dimension in variable.shape)


def global_gradient_norm(gradients):
    """‖g‖₂ over every gradient tensor of the step (kernels, biases, all trainable variables),
    in float32: the norm that Keras's ``global_clipnorm`` and ``tf.clip_by_global_norm`` use.
    On TensorFlow it is TensorFlow's own op (the records stay the same to the last bit as
    before the row was written with ``keras.ops``; a sum of squares in another order differs
    in the last bit of one value in ten)."""
    tensors = [ops.cast(dense(g), "float32") for g in gradients if g is not None]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.linalg.global_norm(tensors)
    return ops.sqrt(ops.sum(ops.stack([ops.sum(ops.square(t)) for t in tensors]))) if tensors else ops.zeros(())


def probability_outputs(prediction) -> list:
    """The outputs of ``prediction`` (a tensor or a structure of them) that Keras's sigmoid or
    softmax made: they carry their logits as ``_keras_logits``, which Keras's cross-entropies
    read (on TensorFlow; a JAX array cannot carry them). Empty when there is none."""
    return [t for t in keras.tree.flatten(prediction) if getattr(t, "_keras_logits", None) is not None]


def saturated_output_counts(probabilities, rows=None):
    """How many predictions of ``probabilities`` (a list of tensors, the batch first, the
    outcomes on the last axis) are saturated, and how many there are: a float32 [2] tensor
    (sums, so that replicas add up). A prediction is saturated when every one of its
    probabilities is within ε = ``keras.config.epsilon()`` of 0 or 1, where Keras's
    cross-entropies clip them: a softmax whose largest probability is above 1 − ε, a sigmoid
    beyond ±log((1 − ε)/ε) (16.1 for ε = 1e-7); a confident softmax's many probabilities below
    ε are not. ``rows`` (bool, [batch]) counts only those rows (``gradtools.fit``'s padding)."""
    epsilon = keras.config.epsilon()
    saturated, counted = [], []
    for t in probabilities:
        t = ops.cast(t if len(t.shape) > 1 else ops.expand_dims(t, -1), "float32")
        each = ops.all(ops.logical_or(t < epsilon, t > 1 - epsilon), axis=-1)  # [batch, ...]
        weight = ops.ones_like(each, "float32") if rows is None else ops.broadcast_to(
            ops.cast(ops.reshape(rows, [-1] + [1] * (len(each.shape) - 1)), "float32"), ops.shape(each))
        saturated.append(ops.sum(ops.cast(each, "float32") * weight))
        counted.append(ops.sum(weight))
    return ops.stack([ops.sum(ops.stack(saturated)), ops.sum(ops.stack(counted))])


def statistics_row(loss, gradients, monitored, weights_before, weights_after, *,
                   clipped_gradients=None, loss_scale=None, skipped=None, optimizer_state=None,
                   output_counts=None):
    """One step's values in column order, after ``step, epoch, batch``: the loss, the global
    norm of ``gradients`` (every gradient of the step), :func:`layer_gradient_stats` of the
    gradients at positions ``monitored`` (see :attr:`gradtools.layers.LayerLayout.monitored`)
    with the matching ``weights_before`` / ``weights_after``, then the optional columns: the
    global norm of ``clipped_gradients``, the ``loss_scale`` and the ``skipped`` flag, the
    ``optimizer_state`` columns (:func:`gradtools.optimizer_state.state_row`), and the
    fraction of the probability outputs' predictions beyond the loss's range, from their
    :func:`saturated_output_counts` ``output_counts``."""
    unreached = [getattr(after, "path", f"variable {i}")
                 for i, after in zip(monitored, weights_after) if gradients[i] is None]
    if unreached:  # zeros would read as dead units and a "vanishing" verdict
        raise ValueError(f"no gradient reaches {', '.join(unreached)}: the loss does not depend on it "
                         "(a layer the model never calls, or an output given no loss?); remove that layer, or set its "
                         "trainable = False while it does not learn")
    head = ops.stack([ops.cast(loss, "float32"), global_gradient_norm(gradients)])
    layers = [ops.reshape(layer_gradient_stats([gradients[i] for i in monitored], weights_before,
                                               weights_after), [-1])] if monitored else []
    tail = []
    if clipped_gradients is not None:
        tail.append(global_gradient_norm(clipped_gradients))
    if loss_scale is not None:
        tail += [ops.cast(loss_scale, "float32"), ops.cast(skipped, "float32")]
    extra = [] if optimizer_state is None else [optimizer_state]
    if output_counts is not None:
        extra.append(ops.reshape(ops.divide_no_nan(output_counts[0], output_counts[1]), [1]))
    return ops.concatenate([head, *layers] + ([ops.stack(tail)] if tail else []) + extra, axis=0)


def all_finite(loss, gradients):
    """True when the loss and every entry of every gradient are finite.

    One check per gradient: one check over the gradients laid end to end would compile faster
    (one ``IsFinite`` op), but copying them costs every step of a large model more than that
    saves once."""
    checks = [ops.all(ops.isfinite(ops.cast(loss, "float32")))]
    checks += [ops.all(ops.isfinite(dense(g))) for g in gradients if g is not None]
    return ops.all(ops.stack(checks))


def unscaled(tensors, scale):
    """``tensors`` divided by the loss scale (unchanged when there is none)."""
    if scale is None:
        return tensors
    return [None if t is None else t / ops.cast(scale, t.dtype) for t in tensors]


def step_row(loss, gradients, monitored, weights_before, weights_after, *, clipped_gradients=None,
             loss_scale=None, optimizer_state=None, output_counts=None):
    """One step's row (:func:`statistics_row`) and whether the step was finite, from its loss
    and its gradients already divided by the ``loss_scale`` (:func:`unscaled`), and, when the
    update clips, the gradients it applied (unscaled too).

    Under a loss scale a step whose gradients overflowed is one the loss scaler skips (column
    ``skipped``, and it halves the scale): not a divergence. Only a non-finite loss is."""
    finite_gradients = all_finite(loss, gradients)
    scaled = loss_scale is not None
    row = statistics_row(loss, gradients, monitored, weights_before, weights_after,
                         clipped_gradients=clipped_gradients, loss_scale=loss_scale,
                         skipped=ops.logical_not(finite_gradients) if scaled else None,
                         optimizer_state=optimizer_state, output_counts=output_counts)
    finite = ops.all(ops.isfinite(ops.cast(loss, "float32"))) if scaled else finite_gradients
    return row, finite
