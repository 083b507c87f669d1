"""Optimizer-state instruments: per layer, what the optimizer did with the gradient.

Opt-in (``GradientMonitor(optimizer_state=True)``, ``gradtools.fit(..., optimizer_state=True)``),
computed in-graph after the update, for each numbered layer's kernel:

- ``update_cosine``: cos(ΔW, −g), the cosine between the applied update and the negative
  gradient (1 for plain SGD; Molybog et al. 2023: Adam's updates that decorrelate from the
  gradient come before instability). Every optimizer.
- ``adam_m_norm``, ``adam_v_norm``: ‖m‖ and ‖v‖, Adam's first and second moments after the
  step (Adam, AdamW, Nadam: optimizers with ``_momentums`` and ``_velocities``).
- ``eps_dominated``: the fraction of coordinates whose denominator's square root is below ε,
  where the step is set by ε rather than by the gradient (Everett et al. 2024). Keras's Adam
  divides by √v + ε (v without bias correction; with ``amsgrad``, the running maximum), its
  Nadam by √v̂ + ε with v̂ = v / (1 − β₂ᵗ).

TensorFlow only, like :class:`gradtools.SpikeGuard`. The cosine is against the gradient
before clipping (a clip by value turns the update); with ``gradient_accumulation_steps`` or an
EMA that overwrites the weights, a step without an update has a cosine of 0. These columns are
instruments: :func:`gradtools.diagnose` does not judge them.
"""

from __future__ import annotations

import keras
from keras import ops

from gradtools.columns import OPTIMIZER_STATE_COLUMNS
from gradtools.stats import dense

#: Every optimizer's column, then the Adam family's.
UPDATE_COLUMNS, MOMENT_COLUMNS = OPTIMIZER_STATE_COLUMNS[:1], OPTIMIZER_STATE_COLUMNS[1:]


def inner(optimizer):
    """The optimizer that updates the weights (a LossScaleOptimizer's inner one)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def has_moments(optimizer) -> bool:
    """Whether the optimizer keeps Adam's moments (:data:`MOMENT_COLUMNS` apply)."""
    optimizer = inner(optimizer)
    return isinstance(optimizer, (keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.Nadam))


def statistics(optimizer) -> tuple[str, ...]:
    """The per-layer columns this optimizer's state gives."""
    return UPDATE_COLUMNS + (MOMENT_COLUMNS if has_moments(optimizer) else ())


def _denominator_moment(optimizer, index: int):
    """The second moment whose square root (+ ε) the update divides by."""
    if isinstance(optimizer, keras.optimizers.Nadam):
        power = ops.power(ops.cast(optimizer.beta_2, "float32"), ops.cast(optimizer.iterations, "float32"))
        return ops.cast(optimizer._velocities[index], "float32") / (1 - power)  # noqa: SLF001 - no public accessor
    if getattr(optimizer, "amsgrad", False):
        return ops.cast(optimizer._velocity_hats[index], "float32")  # noqa: SLF001
    return ops.cast(optimizer._velocities[index], "float32")  # noqa: SLF001


def layers_row(optimizer, layout, variables, gradients, monitored_before):
    """:func:`state_row` of the numbered layers' kernels, from the step's trainable
    ``variables`` and ``gradients`` (in the optimizer's order) and the monitored variables'
    values before the update (``layout.monitored`` order: :mod:`gradtools.layers`)."""
    kernels = layout.kernel_positions
    before_of = dict(zip(layout.monitored, monitored_before))
    return state_row(optimizer, [variables[i] for i in kernels], [gradients[i] for i in kernels],
                     [before_of[i] for i in kernels])


def state_row(optimizer, variables, gradients, weights_before):
    """The layers' :func:`statistics`, layer after layer, as one float32 vector, for the
    kernels ``variables`` (after the update), their ``gradients`` (unscaled, before clipping)
    and ``weights_before`` the update; called after ``optimizer.apply``. A kernel without a
    gradient gets NaN (the row's own check then names it)."""
    optimizer = inner(optimizer)
    moments = has_moments(optimizer)
    values = []
    for variable, gradient, before in zip(variables, gradients, weights_before):
        if gradient is None:
            values += [ops.convert_to_tensor(float("nan"))] * len(statistics(optimizer))
            continue
        g = ops.reshape(ops.cast(dense(gradient), "float32"), [-1])
        change = ops.reshape(ops.cast(variable, "float32") - ops.cast(before, "float32"), [-1])
        values.append(_cosine(-change, g))
        if moments:
            index = optimizer._get_variable_index(variable)  # noqa: SLF001 - how Keras's optimizers find it
            m = ops.reshape(ops.cast(optimizer._momentums[index], "float32"), [-1])  # noqa: SLF001
            v = ops.reshape(ops.cast(optimizer._velocities[index], "float32"), [-1])  # noqa: SLF001
            below = ops.sqrt(_denominator_moment(optimizer, index)) < optimizer.epsilon
            values += [_norm(m), _norm(v), ops.mean(ops.cast(below, "float32"))]
    return ops.stack(values)


def _norm(x):
    """‖x‖₂ without overflow or underflow: max|x| · ‖x / max|x|‖ (v grows like g⁴)."""
    largest = ops.max(ops.abs(x))
    return largest * ops.sqrt(ops.sum(ops.square(ops.divide_no_nan(x, largest))))


def _cosine(a, b):
    """cos(a, b), each scaled by its largest entry first (a vanishing layer's g² underflows);
    0 when either is 0."""
    a = ops.divide_no_nan(a, ops.max(ops.abs(a)))
    b = ops.divide_no_nan(b, ops.max(ops.abs(b)))
    return ops.divide_no_nan(ops.sum(a * b), ops.sqrt(ops.sum(a * a)) * ops.sqrt(ops.sum(b * b)))
