"""Which Keras backends gradtools records on. Anything else is refused in one line that says
what is supported, before a model is touched (a backend's step is traced in ways that probes
written for another cannot read: the TensorFlow probes fail deep inside JAX's tracing).

``GradientMonitor`` records on TensorFlow and JAX (:mod:`gradtools.jax_steps`); ``gradtools.fit``,
``SpikeGuard`` and ``preflight`` on TensorFlow only. PyTorch is not supported yet.
"""

from __future__ import annotations

#: The Keras backends every part of gradtools records gradients on.
SUPPORTED_BACKENDS = ("tensorflow",)
_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}


class UnsupportedBackend(RuntimeError):
    """Keras runs on a backend gradtools cannot record on; ``str()`` is the message for the user."""


def require_supported_backend(feature: str, backends=SUPPORTED_BACKENDS) -> None:
    """Raise :class:`UnsupportedBackend` naming ``feature`` unless Keras runs on one of
    ``backends``. (Keras is imported here, not with this module: the commands that never start
    TensorFlow import :class:`UnsupportedBackend`.)"""
    import keras

    backend = keras.backend.backend()
    if backend in backends:
        return
    names = " and ".join(_NAMES[b] for b in backends)
    unsupported = " and ".join(name for b, name in _NAMES.items() if b not in backends)
    raise UnsupportedBackend(
        f"{feature} works on Keras's {names} backend{'s' if len(backends) > 1 else ''}"
        f"{'' if len(backends) > 1 else ' only'}, and this process runs Keras on {backend!r} (KERAS_BACKEND, "
        f"or ~/.keras/keras.json): run it with KERAS_BACKEND={' or '.join(backends)} ({unsupported} "
        f"{'are' if ' and ' in unsupported else 'is'} not supported yet)")
