"""Per-layer gradient and weight statistics, computed in-graph as pure functions of tensors.

Every statistic has one name, used as a ``metrics.csv`` column, a Neptune series and a
TensorBoard tag: ``layer_<k>/<statistic>`` for the k-th numbered layer (1-based, see
:mod:`gradtools.layers`), plus the step-level columns in :data:`STEP_COLUMNS`. A recurrent
layer (one with a variable named ``recurrent_kernel`` beside its ``kernel``) also has
``layer_<k>/recurrent_<statistic>``. :func:`statistics_row` makes the row of one step for
both ``gradtools.fit`` and ``GradientMonitor``.
"""

from __future__ import annotations

import tensorflow as tf

#: Columns that describe a step rather than a layer, in the order they appear.
STEP_COLUMNS = ("step", "epoch", "batch", "loss", "grad_global_norm")

#: Per-layer statistics, in the order :func:`layer_gradient_stats` returns them.
LAYER_STATS = (
    "grad_mean",
    "grad_abs_mean",
    "grad_norm",
    "grad_max_abs",
    "weight_mean",
    "weight_norm",
    "update_ratio",
)


#: Extra column when gradients are clipped before the update: the global norm after clipping.
CLIPPED_COLUMN = "grad_global_norm_clipped"


#: Extra columns under a loss-scaling optimizer (mixed precision): the loss scale the step's
#: gradients were computed with, and 1 when the optimizer skipped the step because they
#: overflowed (it then halves the scale); 0 otherwise.
LOSS_SCALE_COLUMNS = ("loss_scale", "skipped")


#: Prefix of a recurrent layer's statistics of its recurrent kernel (``layer_k/recurrent_…``).
RECURRENT_PREFIX = "recurrent_"


def layer_columns(n_layers: int, recurrent_layers=()) -> list[str]:
    """Column names ``layer_k/<stat>`` for layers 1..n_layers, in :data:`LAYER_STATS` order;
    a layer in ``recurrent_layers`` (1-based) also gets ``layer_k/recurrent_<stat>``, the
    same statistics of its recurrent kernel, right after its own."""
    columns = []
    for k in range(1, n_layers + 1):
        columns += [f"layer_{k}/{stat}" for stat in LAYER_STATS]
        if k in recurrent_layers:
            columns += [f"layer_{k}/{RECURRENT_PREFIX}{stat}" for stat in LAYER_STATS]
    return columns


def metric_columns(n_layers: int, recurrent_layers=(), *, clipped: bool = False,
                   loss_scaled: bool = False) -> list[str]:
    """All columns of a metrics table for a model with ``n_layers`` numbered layers; with
    ``clipped``, :data:`CLIPPED_COLUMN`; with ``loss_scaled``, :data:`LOSS_SCALE_COLUMNS`."""
    return (list(STEP_COLUMNS) + layer_columns(n_layers, recurrent_layers)
            + ([CLIPPED_COLUMN] if clipped else []) + (list(LOSS_SCALE_COLUMNS) if loss_scaled else []))


def layer_gradient_stats(gradient, weight_before, weight_after) -> tf.Tensor:
    """The statistics of one layer's kernel at one step, as a float32 vector.

    With g the gradient of the loss with respect to the kernel (as the tape computed it,
    before any clipping), W0 the kernel before the update and W1 after it, n = size(g):

    - grad_mean     = Σ g / n            (the article's statistic; signed, so it can cancel)
    - grad_abs_mean = Σ |g| / n
    - grad_norm     = ‖g‖₂ = sqrt(Σ g²)
    - grad_max_abs  = max |g|
    - weight_mean   = Σ W1 / n
    - weight_norm   = ‖W1‖₂
    - update_ratio  = ‖W1 − W0‖₂ / ‖W0‖₂  (NaN-free: 0/0 is reported as 0)
    """
    g = tf.cast(tf.convert_to_tensor(gradient), tf.float32)
    w0 = tf.cast(weight_before, tf.float32)
    w1 = tf.cast(weight_after, tf.float32)
    abs_g = tf.abs(g)
    return tf.stack(
        [
            tf.reduce_mean(g),
            tf.reduce_mean(abs_g),
            tf.norm(g),
            tf.reduce_max(abs_g),
            tf.reduce_mean(w1),
            tf.norm(w1),
            tf.math.divide_no_nan(tf.norm(w1 - w0), tf.norm(w0)),
        ]
    )


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
    head = tf.stack([tf.cast(loss, tf.float32), global_gradient_norm(gradients)])
    layers = [layer_gradient_stats(gradients[i], before, after)
              for i, before, after in zip(monitored, weights_before, weights_after)]
    tail = []
    if clipped_gradients is not None:
        tail.append(global_gradient_norm(clipped_gradients))
    if loss_scale is not None:
        tail += [tf.cast(loss_scale, tf.float32), tf.cast(skipped, tf.float32)]
    return tf.concat([head, *layers] + ([tf.stack(tail)] if tail else []), axis=0)


def all_finite(loss, gradients) -> tf.Tensor:
    """True when the loss and every entry of every gradient are finite."""
    checks = [tf.reduce_all(tf.math.is_finite(tf.cast(loss, tf.float32)))]
    checks += [
        tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(g)))
        for g in gradients
        if g is not None
    ]
    return tf.reduce_all(tf.stack(checks))
