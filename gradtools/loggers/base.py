"""The interface every logger implements; the training loop knows only this."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure

    from gradtools.history import History


class RunLogger:
    """Receives one run's parameters, metric rows, figures and final status.

    Subclasses implement :meth:`log_metrics`; the other hooks default to doing nothing.
    Metric names are the ``metrics.csv`` column names (``loss``, ``layer_1/grad_abs_mean``…).
    """

    #: Set to True to receive each epoch's last kernel gradients in :meth:`log_epoch_end`.
    wants_gradients: bool = False

    def start(self, *, epochs: int, steps_per_epoch: int, layer_paths: list[str],
              layer_blocks: list[str] | None = None) -> None:
        """Called by ``fit`` before the first step, with the kernel path behind each numbered
        layer and the block (top-level layer) each belongs to (see :mod:`gradtools.layers`)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's configuration (nested mappings of plain values)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """One row of statistics recorded at ``step`` (1 for the first update)."""
        raise NotImplementedError

    def log_rows(self, rows: "pd.DataFrame") -> None:
        """Rows of a metrics table (one epoch's, from ``fit``); by default one call a row."""
        names = [c for c in rows.columns if c != "step"]
        for step, values in zip(rows["step"].tolist(), rows[names].itertuples(index=False)):
            self.log_metrics(dict(zip(names, values)), int(step))

    def log_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Numbers recorded once per epoch (0-based), such as the gradients through time
        ``layer_k/state_grad_norm/t<t>`` of a traced recurrent layer."""

    def log_epoch_end(self, epoch: int, model: "keras.Model",
                      kernel_gradients: "list[np.ndarray] | None" = None) -> None:
        """After each epoch, with the model as it is then. ``kernel_gradients`` (layer order)
        are the gradients of the epoch's last step when :attr:`wants_gradients` is set."""

    def log_progress(self, *, epochs_completed: int, status: str) -> None:
        """After each epoch's rows: how many epochs completed so far, and the status so far
        (``running``, or ``diverged`` once a step was non-finite)."""

    def log_figure(self, name: str, figure: "Figure") -> None:
        """A matplotlib figure under ``name`` (e.g. ``mean_gradient``)."""

    def finish(self, history: "History") -> None:
        """The run is over: ``history.status`` says how it ended."""


def is_finite_number(value: Any) -> bool:
    """True for a real number that is neither NaN nor ±Inf."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
