"""Gradients through time: ‖∂L/∂h_t‖ for every time step of a recurrent layer.

A Keras RNN runs its cell inside a symbolic loop, so its hidden states h_1 … h_T are not
tensors a tape can be asked about. :class:`TracedRNN` adds a zero "probe" p_t to each new
hidden state (h_t ← h_t + p_t, which changes no value); the derivative of the loss with
respect to p_t is then exactly the total derivative ∂L/∂h_t, through every later step. The
probe's own gradient function stores ‖∂L/∂h_t‖ (the Frobenius norm over the batch and the
hidden units, t = 1 … T) in the layer's :attr:`TracedRNN.state_gradient_norms` whenever a
backward pass reaches the layer's weights: inside ``gradtools.fit``, inside ``model.fit``
(where :class:`gradtools.GradientMonitor` reads it) or in a custom loop.

``TracedRNN`` also implements truncated backpropagation through time: with
``truncate_bptt = k`` the gradient flows only k steps back from the last one.

For a linear RNN h_t = W h_{t-1} + U x_t, ∂L/∂h_t = (Wᵀ)^(T−t) ∂L/∂h_T, so the norm behaves
like r^(T−t) for the spectral radius r of W (:func:`gradtools.recurrence.geometric_prediction`):
0.9^30 ≈ 0.042 and 1.1^30 ≈ 17.45. A tanh RNN decays at least that fast (tanh' ≤ 1).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from gradtools.backend import require_supported_backend
from gradtools.recurrence import (  # noqa: F401  (re-exported: the numbers that go with the layer)
    bptt_steps_column,
    geometric_prediction,
    scale_to_spectral_radius,
    spectral_radius,
    spectral_radius_column,
    state_column,
)
from gradtools.validation import require_integer


class _TracedCell(keras.layers.Layer):
    """Wraps a recurrent cell. Its step input is [x_t, p_t, s_t]: the cell's own input, the
    probe added to the new hidden state, and s_t = 1 where the incoming state's gradient is
    stopped (truncated BPTT)."""

    def __init__(self, cell: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        self.cell = cell
        self.state_size = cell.state_size
        self.output_size = getattr(cell, "output_size", None) or _first(cell.state_size)
        self.feature_dim: int | None = None

    def get_config(self):
        """The wrapped cell's config (without it, Keras cannot describe a model that holds a
        TracedRNN: no saving, and ``gradtools.fit`` cannot tell two such models share a
        program, so it traced and compiled every run of one anew)."""
        return {**super().get_config(), "cell": keras.layers.serialize(self.cell)}

    def build(self, input_shape):
        self.feature_dim = int(input_shape[-1])
        if not self.cell.built:
            self.cell.build(input_shape)

    def call(self, inputs, states, training=False):
        d, units = self.feature_dim, self.output_size
        x, probe, stop = inputs[:, :d], inputs[:, d:d + units], inputs[:, d + units:]
        nested = isinstance(states, (list, tuple))
        states = list(states) if nested else [states]
        states = [stop * tf.stop_gradient(s) + (1.0 - stop) * s for s in states]
        output, new_states = self.cell(x, states if nested else states[0], training=training)
        new_states = list(new_states) if isinstance(new_states, (list, tuple)) else [new_states]
        hidden = output + probe
        return hidden, [hidden] + new_states[1:]


def _first(size):
    return size[0] if isinstance(size, (list, tuple)) else size


@keras.saving.register_keras_serializable(package="gradtools")
class TracedRNN(keras.layers.RNN):
    """A Keras ``RNN`` over ``cell`` whose hidden-state gradients ``gradtools.fit`` records.

    Args:
        cell: a Keras recurrent cell, e.g. ``keras.layers.SimpleRNNCell(32)``,
            ``keras.layers.LSTMCell(32)``, ``keras.layers.GRUCell(32)``.
        truncate_bptt: when set to k, the gradient flows only k steps back from the last
            step (the state entering steps 1 … T−k is treated as a constant).
        **kwargs: as for ``keras.layers.RNN`` (``return_sequences``, ``name`` …).

    Values are those of ``keras.layers.RNN(cell)``; only the backward pass can differ
    (with ``truncate_bptt``).
    """

    def __init__(self, cell, truncate_bptt: int | None = None, **kwargs):
        require_supported_backend("TracedRNN")
        if truncate_bptt is not None:
            require_integer("truncate_bptt", truncate_bptt)
        if isinstance(cell, dict):
            cell = keras.layers.deserialize(cell)
        super().__init__(_TracedCell(cell), **kwargs)
        self.truncate_bptt = truncate_bptt

    @property
    def inner_cell(self) -> keras.layers.Layer:
        return self.cell.cell

    @property
    def time_steps(self) -> int:
        """T: the number of time steps of the input (fixed when the layer is built)."""
        return int(self.state_gradient_norms.shape[0])

    @property
    def bptt_steps(self) -> int:
        """How many hidden states, counted back from h_T, the gradient reaches: T, or
        ``truncate_bptt`` + 1 (h_T and the k states before it)."""
        return self.time_steps if self.truncate_bptt is None else min(self.truncate_bptt + 1,
                                                                      self.time_steps)

    def build(self, sequences_shape, initial_state_shape=None):
        steps = sequences_shape[1]
        if steps is None:
            raise ValueError(f"{self.name}: TracedRNN needs a fixed number of time steps "
                             "(an Input shape such as (T, features)) to record ∂L/∂h_t for each")
        super().build(sequences_shape, initial_state_shape)
        # Not a Keras weight (not saved, not counted): a buffer the backward pass writes.
        with tf.init_scope():
            self.state_gradient_norms = tf.Variable(
                tf.zeros([int(steps)]), trainable=False, name="state_gradient_norms",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        shape = tf.shape(sequences)
        batch, steps = shape[0], shape[1]
        units = self.cell.output_size
        probe = _state_probe(self.inner_cell.trainable_weights[0], self.state_gradient_norms,
                             tf.stack([batch, steps, units]), sequences.dtype)
        position = tf.range(steps)
        if self.truncate_bptt is None:
            stopped = tf.zeros_like(position, dtype=sequences.dtype)
        else:
            stopped = tf.cast(position < steps - self.truncate_bptt, sequences.dtype)
        stop = tf.broadcast_to(stopped[None, :, None], tf.stack([batch, steps, 1]))
        augmented = tf.concat([sequences, probe, stop], axis=-1)
        return super().call(augmented, initial_state=initial_state, mask=mask, training=training)

    def get_config(self):
        config = super().get_config()
        config["cell"] = keras.layers.serialize(self.inner_cell)
        config["truncate_bptt"] = self.truncate_bptt
        return config


def traced_layers(model: keras.Model) -> list[TracedRNN]:
    """Every :class:`TracedRNN` in ``model``, in layer order."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, TracedRNN)]


def state_gradient_norms(probe_gradient) -> tf.Tensor:
    """‖∂L/∂h_t‖ for t = 1 … T from the probe's gradient [batch, T, units]: the Frobenius
    norm over the batch and the units, a [T] float32 vector (zeros where none flowed).
    Computed as m·‖g/m‖ with m = max|g|, so a gradient of 1e-30 is not squared to 0."""
    g = tf.cast(tf.convert_to_tensor(probe_gradient), tf.float32)
    largest = tf.reduce_max(tf.abs(g), axis=[0, 2])
    safe = tf.where(largest > 0, largest, 1.0)
    return largest * tf.sqrt(tf.reduce_sum(tf.square(g / safe[None, :, None]), axis=[0, 2]))


def _state_probe(anchor, sink: tf.Variable, shape, dtype):
    """A zero tensor of ``shape`` whose gradient is written to ``sink`` as ‖∂L/∂h_t‖.

    The probe is made from ``anchor`` (one of the cell's weights) so that it lies on the
    tape's path from the loss to the weights, and its gradient is computed; what it passes
    on to ``anchor`` is zero, so the weights' gradients are unchanged."""

    @tf.custom_gradient
    def probe(weight):
        def record(upstream):
            sink.assign(state_gradient_norms(upstream))
            return tf.zeros_like(weight)

        return tf.zeros(shape, dtype), record

    return probe(anchor)


def spectral_radii(traced) -> list[float]:
    """The spectral radius of each traced layer's recurrent kernel now (NaN when it has none
    or it is not square)."""
    return [spectral_radius(layer.inner_cell.recurrent_kernel.numpy())
            if hasattr(layer.inner_cell, "recurrent_kernel") else float("nan") for layer in traced]


def epoch_row(traced, layer_numbers, radii, state_means) -> dict[str, float]:
    """One epoch's per-time-step numbers of each traced layer: the spectral radius at the
    epoch's start, how far back the gradient may flow, and the mean ‖∂L/∂h_t‖ for t = 1 … T."""
    row: dict[str, float] = {}
    for layer, k, radius, means in zip(traced, layer_numbers, radii, state_means):
        row[spectral_radius_column(k)] = radius
        row[bptt_steps_column(k)] = layer.bptt_steps
        for t, value in enumerate(list(means), start=1):
            row[state_column(k, t)] = float(value)
    return row
