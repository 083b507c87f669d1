"""A data-driven starting threshold for gradient clipping: ``suggest_clip_norm`` turns a
common piece of advice (train a few iterations and take the mean of the observed gradient
norms as a first value) into numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradtools.training import fit


@dataclass(frozen=True)
class ClipSuggestion:
    """A starting global-norm threshold and the observed norms behind it."""

    threshold: float
    mean: float
    median: float
    p90: float
    p99: float
    steps: int
    nonfinite_steps: int

    def __str__(self) -> str:
        return (f"clip_global_norm ≈ {self.threshold:.4g} (mean of {self.steps} observed global "
                f"gradient norms; median {self.median:.4g}, p90 {self.p90:.4g}, p99 {self.p99:.4g}"
                + (f"; {self.nonfinite_steps} non-finite steps left out" if self.nonfinite_steps else "")
                + ")")


def suggest_clip_norm(source, x=None, y=None, *, loss=None, optimizer="sgd", steps: int = 20,
                      batch_size: int = 32) -> ClipSuggestion:
    """The mean of the observed global gradient norms, as a first clipping threshold.

    ``source`` is a :class:`gradtools.History` or metrics DataFrame (its ``grad_global_norm``
    column), or a Keras model: then a copy of it is trained for ``steps`` steps on ``x, y``
    with ``loss`` and ``optimizer`` (the model itself is left untouched) and its norms are used.
    """
    if hasattr(source, "metrics") and isinstance(source.metrics, pd.DataFrame):
        norms = source.metrics["grad_global_norm"]
    elif isinstance(source, pd.DataFrame):
        norms = source["grad_global_norm"]
    else:
        norms = _probe_norms(source, x, y, loss=loss, optimizer=optimizer, steps=steps,
                             batch_size=batch_size)
    values = np.asarray(norms, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("no finite gradient norm to suggest a threshold from")
    return ClipSuggestion(
        threshold=float(finite.mean()), mean=float(finite.mean()), median=float(np.median(finite)),
        p90=float(np.percentile(finite, 90)), p99=float(np.percentile(finite, 99)),
        steps=int(finite.size), nonfinite_steps=int(values.size - finite.size),
    )


def _probe_norms(model, x, y, *, loss, optimizer, steps, batch_size):
    import keras


    if x is None or y is None or loss is None:
        raise ValueError("to probe a model, give x, y and loss")
    probe = keras.models.clone_model(model)
    probe.set_weights(model.get_weights())
    if isinstance(optimizer, keras.optimizers.Optimizer):  # a fresh one: it is bound to variables
        optimizer = optimizer.__class__.from_config(optimizer.get_config())
    n = min(len(x), steps * batch_size)
    history = fit(probe, x[:n], y[:n], loss=loss, optimizer=keras.optimizers.get(optimizer),
                  epochs=1, batch_size=batch_size, shuffle=False, stop_on_nonfinite=False)
    return history.metrics["grad_global_norm"]
