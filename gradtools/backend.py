"""Which Keras backend gradtools records on: TensorFlow. Anything else is refused in one line
that says what is supported, before a model is touched (Keras's other backends trace the
step in ways the monitor's TensorFlow probes cannot read: under JAX they fail deep inside
its tracing)."""

from __future__ import annotations

#: The Keras backends gradtools records gradients on.
SUPPORTED_BACKENDS = ("tensorflow",)


class UnsupportedBackend(RuntimeError):
    """Keras runs on a backend gradtools cannot record on; ``str()`` is the message for the user."""


def require_supported_backend(feature: str) -> None:
    """Raise :class:`UnsupportedBackend` naming ``feature`` unless Keras runs on a supported
    backend. (Keras is imported here, not with this module: the commands that never start
    TensorFlow import :class:`UnsupportedBackend`.)"""
    import keras

    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise UnsupportedBackend(
            f"{feature} works on Keras's TensorFlow backend only, and this process runs Keras on "
            f"{backend!r} (KERAS_BACKEND, or ~/.keras/keras.json): run it with KERAS_BACKEND=tensorflow "
            "(JAX and PyTorch are not supported yet)")
