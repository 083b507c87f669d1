"""The experiments' networks, described by a validated [model] section: the article's MLPs,
a residual MLP, and recurrent networks whose gradients through time gradtools records."""

from __future__ import annotations

import copy

import keras

from experiments.config import PRELU, ModelSection
from gradtools.through_time import TracedRNN, scale_to_spectral_radius

#: [model] recurrent_cell -> the Keras cell class.
CELLS = {
    "SimpleRNN": keras.layers.SimpleRNNCell,
    "LSTM": keras.layers.LSTMCell,
    "GRU": keras.layers.GRUCell,
}


def _resolve(getter, value):
    """A fresh Keras object per layer from its config value (None: no object)."""
    if value is None:
        return None
    return getter(copy.deepcopy(value))


def build_model(spec: ModelSection, input_shape: tuple[int, ...]) -> keras.Model:
    """The network ``spec.architecture`` names, for examples of ``input_shape``."""
    if spec.architecture == "rnn":
        return build_rnn(spec, input_shape)
    (input_dim,) = input_shape
    return build_mlp(spec, input_dim)


def _activation_layer(spec: ModelSection, name: str) -> keras.layers.Layer:
    if spec.activation == PRELU:
        return keras.layers.PReLU(name=name)
    return keras.layers.Activation(keras.activations.get(spec.activation), name=name)


def _hidden_dense(spec: ModelSection, units: int, index: int, activation=None) -> keras.layers.Dense:
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=_resolve(keras.initializers.get, spec.kernel_initializer),
        kernel_regularizer=_resolve(keras.regularizers.get, spec.kernel_regularizer),
        activity_regularizer=_resolve(keras.regularizers.get, spec.activity_regularizer),
        name=f"hidden_{index}",
    )


def _output_layer(spec: ModelSection) -> keras.layers.Dense:
    return keras.layers.Dense(
        spec.output_units,
        activation=keras.activations.get(spec.output_activation),
        kernel_initializer=_resolve(keras.initializers.get, spec.output_kernel_initializer),
        name="output",
    )


def build_mlp(spec: ModelSection, input_dim: int) -> keras.Model:
    """Input → [BatchNorm] → hidden layers → Dense(output_units).

    Each hidden layer is Dense (``kernel_initializer``, regularizers) → [BatchNorm] →
    activation (``activation``, or a learnable PReLU); the output layer gets
    ``output_activation`` and ``output_kernel_initializer`` (the article's exploding net keeps
    Keras's default there, its vanishing net uses the hidden one). ``batch_norm = "input"``
    normalizes right after the input (the article's vanBN); ``"before_activation"`` puts
    BatchNormalization between each hidden layer's linear part and its activation.
    ``architecture = "residual_mlp"`` adds each hidden layer's input to its output, from the
    second hidden layer on (the first changes the width), so every layer has a path to the
    loss that skips the activations after it.
    """
    inputs = keras.Input((input_dim,), name="features")
    h = inputs
    if spec.batch_norm == "input":
        h = keras.layers.BatchNormalization(name="input_batch_norm")(h)
    residual = spec.architecture == "residual_mlp"
    separate_activation = spec.batch_norm == "before_activation" or spec.activation == PRELU
    for index, units in enumerate(spec.hidden_layer_units, start=1):
        if separate_activation:
            z = _hidden_dense(spec, units, index)(h)
            if spec.batch_norm == "before_activation":
                z = keras.layers.BatchNormalization(name=f"batch_norm_{index}")(z)
            z = _activation_layer(spec, f"activation_{index}")(z)
        else:  # the activity regularizer sees the activated output, as in the article
            z = _hidden_dense(spec, units, index, keras.activations.get(spec.activation))(h)
        h = keras.layers.Add(name=f"skip_{index}")([h, z]) if residual and index > 1 else z
    outputs = _output_layer(spec)(h)
    return keras.Model(inputs, outputs, name=spec.architecture)


def build_rnn(spec: ModelSection, input_shape: tuple[int, int]) -> keras.Model:
    """Input (T, features) → recurrent layers (``recurrent_cell`` with ``hidden_units``
    units each; all but the last return every step) → Dense(output_units) on the last state.

    Every recurrent layer is a :class:`gradtools.through_time.TracedRNN`, so
    ``gradtools.fit`` records ‖∂L/∂h_t‖ for each time step; ``truncate_bptt`` limits how far
    back its gradient flows, ``recurrent_spectral_radius`` rescales a SimpleRNN's initial
    recurrent kernel (the sources' 0.9 vs 1.1).
    """
    inputs = keras.Input(input_shape, name="sequences")
    h = inputs
    layers = spec.hidden_layer_units
    truncate = spec.truncate_bptt
    recurrent = []
    for index, units in enumerate(layers, start=1):
        cell = CELLS[spec.recurrent_cell](
            units,
            activation=keras.activations.get(spec.activation),
            kernel_initializer=_resolve(keras.initializers.get, spec.kernel_initializer),
            recurrent_initializer=_resolve(keras.initializers.get, spec.recurrent_initializer),
            kernel_regularizer=_resolve(keras.regularizers.get, spec.kernel_regularizer),
            recurrent_regularizer=_resolve(keras.regularizers.get, spec.kernel_regularizer),
        )
        layer = TracedRNN(cell, truncate_bptt=truncate, return_sequences=index < len(layers),
                          name=f"recurrent_{index}")
        h = layer(h)
        recurrent.append(layer)
    outputs = _output_layer(spec)(h)
    model = keras.Model(inputs, outputs, name="rnn")
    if spec.recurrent_spectral_radius is not None:
        for layer in recurrent:
            kernel = layer.inner_cell.recurrent_kernel
            kernel.assign(scale_to_spectral_radius(kernel.numpy(), spec.recurrent_spectral_radius))
    return model
