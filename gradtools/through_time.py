"""Gradients through time: ‖∂L/∂h_t‖ for every time step of a recurrent layer.

A Keras RNN runs its cell inside a symbolic loop, so its hidden states h_1 … h_T are not
tensors a tape can be asked about. :class:`TracedRNN` adds a zero "probe" p_t to each new
hidden state (h_t ← h_t + p_t, which changes no value); the derivative of the loss with
respect to p_t is then exactly the total derivative ∂L/∂h_t, through every later step.
:func:`gradtools.fit` watches the probes of every ``TracedRNN`` in the model and records,
per epoch, the mean over the epoch's steps of ‖∂L/∂h_t‖ (the Frobenius norm over the batch
and the hidden units) for t = 1 … T.

``TracedRNN`` also implements truncated backpropagation through time: with
``truncate_bptt = k`` the gradient flows only k steps back from the last one.

For a linear RNN h_t = W h_{t-1} + U x_t, ∂L/∂h_t = (Wᵀ)^(T−t) ∂L/∂h_T, so the norm behaves
like r^(T−t) for the spectral radius r of W (:func:`gradtools.recurrence.geometric_prediction`): the sources'
0.9^30 ≈ 0.042 and 1.1^30 ≈ 17.45. A tanh RNN decays at least that fast (tanh' ≤ 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import tensorflow as tf

from gradtools.recurrence import (  # noqa: F401  (re-exported: the numbers that go with the layer)
    geometric_prediction,
    scale_to_spectral_radius,
    spectral_radius,
    spectral_radius_column,
    state_column,
)

class _Recording:
    """The tape and the probes created while one forward pass was traced."""

    def __init__(self, tape: tf.GradientTape):
        self.tape = tape
        self.probes: dict[int, tf.Tensor] = {}  # id(layer) -> probe [batch, T, units]

    def add(self, layer: "TracedRNN", probe) -> None:
        self.tape.watch(probe)
        self.probes[id(layer)] = probe


_recordings: list[_Recording] = []


@contextlib.contextmanager
def recording(tape: tf.GradientTape) -> Iterator[_Recording]:
    """While active, every :class:`TracedRNN` call registers its probe on ``tape``."""
    record = _Recording(tape)
    _recordings.append(record)
    try:
        yield record
    finally:
        _recordings.remove(record)


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
        if truncate_bptt is not None and (isinstance(truncate_bptt, bool)
                                          or not isinstance(truncate_bptt, int) or truncate_bptt < 1):
            raise ValueError(f"truncate_bptt must be an integer >= 1 or None, got {truncate_bptt!r}")
        if isinstance(cell, dict):
            cell = keras.layers.deserialize(cell)
        super().__init__(_TracedCell(cell), **kwargs)
        self.truncate_bptt = truncate_bptt

    @property
    def inner_cell(self) -> keras.layers.Layer:
        return self.cell.cell

    def call(self, sequences, initial_state=None, mask=None, training=False):
        shape = tf.shape(sequences)
        batch, steps = shape[0], shape[1]
        units = self.cell.output_size
        probe = tf.zeros(tf.stack([batch, steps, units]), dtype=sequences.dtype)
        if _recordings:
            _recordings[-1].add(self, probe)
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
    norm over the batch and the units, a [T] float32 vector (zeros where none flowed)."""
    if probe_gradient is None:
        raise ValueError("no gradient reached the hidden states")
    g = tf.cast(tf.convert_to_tensor(probe_gradient), tf.float32)
    return tf.sqrt(tf.reduce_sum(tf.square(g), axis=[0, 2]))
