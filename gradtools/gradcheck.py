"""Gradient checking: the tape's gradients against central finite differences, in float64.

The standard check when backpropagation is written by hand (a custom layer, a
``tf.custom_gradient``): a wrong backward pass shows as a large relative error in its layer.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras.src.models.functional import Functional  # what clone_model copies (no public name)

from gradtools.columns import layer_name
from gradtools.layers import is_kernel
from gradtools.steps import resolve_loss


def _float64_layer(layer):
    config = layer.get_config()
    if "dtype" in config and keras.backend.is_float_dtype(keras.dtype_policies.get(config["dtype"]).variable_dtype):
        config["dtype"] = "float64"
    return layer.__class__.from_config(config)


def _float64_copy(model: keras.Model, x) -> keras.Model:
    """The model rebuilt in float64 with the same weights. Layers built inside other layers
    take the default dtype policy, so it is float64 while the copy is made; nested Sequential
    and functional models are cloned layer by layer. A subclassed model is rebuilt from its
    ``get_config``. A copy with any float32 weight left is refused: its finite differences
    would be float32 noise, and a correct model would be flagged."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        if isinstance(model, (keras.Sequential, Functional)):
            copy = keras.models.clone_model(model, clone_function=_float64_layer, recursive=True)
        else:
            copy = model.__class__.from_config(model.get_config())
            copy(x, training=False)
        copy.set_weights([w.astype(np.float64) if np.issubdtype(w.dtype, np.floating) else w
                          for w in model.get_weights()])
    except Exception as error:  # Keras raises many kinds here, each its own message
        first_sentence = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        raise ValueError(f"check_gradients could not copy the model {model.name!r} in float64 "
                         f"({type(error).__name__}: {first_sentence}); it copies Sequential and functional "
                         "models, and subclassed models whose get_config() returns their constructor's "
                         "arguments") from error
    finally:
        keras.config.set_dtype_policy(previous)
    left = [v.path for v in copy.trainable_weights if v.dtype != "float64"]
    if left:
        raise ValueError(f"check_gradients could not make {', '.join(left)} float64 (its layer sets "
                         "its own dtype); float32 finite differences would flag a correct model")
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
    x64 = tf.constant(np.asarray(x, dtype=np.float64))
    copy = _float64_copy(model, x64)
    loss_fn = resolve_loss(loss, dtype="float64")
    y64 = tf.constant(np.asarray(y, dtype=np.float64))

    def total_loss():
        value = loss_fn(y64, copy(x64, training=False))
        return value + tf.add_n(copy.losses) if copy.losses else value

    kernels = [v for v in copy.trainable_weights if is_kernel(v)]
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
        rows.append({"layer": layer_name(k), "path": kernel.path, "max_relative_error": worst,
                     "entries_checked": len(chosen), "ok": worst < tolerance})
    return pd.DataFrame(rows)
