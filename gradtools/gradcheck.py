"""Gradient checking: the tape's gradients against central finite differences, in float64.

The standard check when backpropagation is written by hand (a custom layer, a
``tf.custom_gradient``): a wrong backward pass shows as a large relative error in its layer.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from gradtools.steps import resolve_loss


def _float64_copy(model: keras.Model) -> keras.Model:
    def clone_layer(layer):
        config = layer.get_config()
        config["dtype"] = "float64"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone_layer)
    copy.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return copy


def check_gradients(model: keras.Model, x, y, loss, *, epsilon: float = 1e-6,
                    entries_per_layer: int = 25, seed: int = 0, tolerance: float = 1e-5) -> pd.DataFrame:
    """Compare ∂L/∂W from the tape with (L(W + ε·eᵢ) − L(W − ε·eᵢ)) / 2ε for up to
    ``entries_per_layer`` entries of each kernel, on a float64 copy of the model (the model
    itself is not changed), in inference mode (no dropout noise).

    Relative error of an entry: |g_tape − g_numeric| / max(|g_tape| + |g_numeric|, 1e-12).
    Returns one row per layer (``layer_k``, in ``gradtools.fit``'s numbering): ``path``,
    ``max_relative_error``, ``entries_checked`` and ``ok`` (error below ``tolerance``).
    Use a small batch: each checked entry costs two forward passes.
    """
    copy = _float64_copy(model)
    loss_fn = resolve_loss(loss, dtype="float64")
    x64 = tf.constant(np.asarray(x, dtype=np.float64))
    y64 = tf.constant(np.asarray(y, dtype=np.float64))

    def total_loss():
        value = loss_fn(y64, copy(x64, training=False))
        return value + tf.add_n(copy.losses) if copy.losses else value

    kernels = [v for v in copy.trainable_weights if v.name == "kernel"]
    with tf.GradientTape() as tape:
        value = total_loss()
    analytic = tape.gradient(value, kernels)
    rng = np.random.default_rng(seed)
    rows = []
    for k, (kernel, gradient) in enumerate(zip(kernels, analytic), start=1):
        gradient = np.zeros(kernel.shape) if gradient is None else tf.convert_to_tensor(gradient).numpy()
        original = kernel.numpy()
        flat_size = original.size
        chosen = rng.choice(flat_size, size=min(entries_per_layer, flat_size), replace=False)
        worst = 0.0
        for flat_index in chosen:
            index = np.unravel_index(flat_index, original.shape)
            shifted = original.copy()
            shifted[index] += epsilon
            kernel.assign(shifted)
            plus = float(total_loss())
            shifted[index] -= 2 * epsilon
            kernel.assign(shifted)
            minus = float(total_loss())
            kernel.assign(original)
            numeric = (plus - minus) / (2 * epsilon)
            error = abs(gradient[index] - numeric) / max(abs(gradient[index]) + abs(numeric), 1e-12)
            worst = max(worst, error)
        rows.append({"layer": f"layer_{k}", "path": kernel.path, "max_relative_error": worst,
                     "entries_checked": len(chosen), "ok": worst < tolerance})
    return pd.DataFrame(rows)
