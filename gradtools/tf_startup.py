"""Start TensorFlow without its start-up chatter, for command-line entry points.

TensorFlow 2.21's CUDA stub writes "Could not find cuda drivers" and absl's "All log messages
before absl::InitializeLog()" to file descriptor 2 on every CPU-only start, whatever
TF_CPP_MIN_LOG_LEVEL says; a user then sees them above every result.
"""

from __future__ import annotations

import os


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and initialize its devices with fd 2 muted, unless the user asked
    for TensorFlow's logs with ``TF_CPP_MIN_LOG_LEVEL=0``. Python errors still surface
    (they are raised, and printed after stderr is restored)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        import tensorflow  # noqa: F401

        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_logical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
