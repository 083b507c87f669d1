"""The article's networks: MLPs described by a validated [model] section."""

from __future__ import annotations

import copy
from typing import Any

import keras


def _resolve(getter, value):
    """A fresh Keras object per layer from its config value ("none" means no object)."""
    if value == "none":
        return None
    return getter(copy.deepcopy(value))


def build_mlp(spec: dict[str, Any], input_dim: int) -> keras.Sequential:
    """Input → [BatchNorm] → Dense(hidden_units…) → Dense(output_units).

    The hidden layers get ``activation``, ``kernel_initializer`` and the regularizers; the
    output layer gets ``output_activation`` and ``output_kernel_initializer`` (the article's
    exploding net keeps Keras's default there, its vanishing net uses the hidden one).
    ``batch_norm = "input"`` normalizes right after the input (the article's vanBN);
    ``"before_activation"`` puts BatchNormalization between each hidden layer's linear part
    and its activation.
    """
    layers: list[keras.layers.Layer] = [keras.Input((input_dim,), name="features")]
    if spec["batch_norm"] == "input":
        layers.append(keras.layers.BatchNormalization(name="input_batch_norm"))
    before_activation = spec["batch_norm"] == "before_activation"
    for index, units in enumerate(spec["hidden_units"], start=1):
        layers.append(
            keras.layers.Dense(
                units,
                activation=None if before_activation else keras.activations.get(spec["activation"]),
                kernel_initializer=_resolve(keras.initializers.get, spec["kernel_initializer"]),
                kernel_regularizer=_resolve(keras.regularizers.get, spec["kernel_regularizer"]),
                activity_regularizer=_resolve(keras.regularizers.get, spec["activity_regularizer"]),
                name=f"hidden_{index}",
            )
        )
        if before_activation:
            layers.append(keras.layers.BatchNormalization(name=f"batch_norm_{index}"))
            layers.append(keras.layers.Activation(spec["activation"], name=f"activation_{index}"))
    layers.append(
        keras.layers.Dense(
            spec["output_units"],
            activation=keras.activations.get(spec["output_activation"]),
            kernel_initializer=_resolve(keras.initializers.get, spec["output_kernel_initializer"]),
            name="output",
        )
    )
    return keras.Sequential(layers, name="mlp")
