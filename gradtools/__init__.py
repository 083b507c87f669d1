"""gradtools: see, measure and fix vanishing and exploding gradients in Keras 3 models.

Exports are loaded on first use, so ``import gradtools`` does not start TensorFlow, and it
changes nothing process-wide: the command-line entry points start TensorFlow quietly, with
their own process settings, before they use it (:mod:`gradtools.tf_startup`).
"""

import importlib

__version__ = "0.1.0"

#: Public name -> module that defines it.
_EXPORTS = {
    "History": "gradtools.history",
    "fit": "gradtools.training",
    "GradientMonitor": "gradtools.monitor",
    "SpikeGuard": "gradtools.spike_guard",
    "check_gradients": "gradtools.gradcheck",
    "suggest_clip_norm": "gradtools.clip_suggestion",
    "compare_runs": "gradtools.compare",
    "diagnose": "gradtools.diagnosis",
    "Diagnosis": "gradtools.diagnosis",
    "preflight": "gradtools.preflight",
    "Preflight": "gradtools.preflight",
    "UnsupportedBackend": "gradtools.backend",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in {"loggers", "plots", "stats", "summary", "clipping"}:
        return importlib.import_module(f"gradtools.{name}")
    raise AttributeError(f"module 'gradtools' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
