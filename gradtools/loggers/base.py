"""The interface every logger implements; the training loop knows only this."""

from __future__ import annotations

import io
import json
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradtools.diagnosis import diagnose
from gradtools.history import EARLY_END_STATUSES

if TYPE_CHECKING:
    import keras
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure

    from gradtools.history import History


def plain(value: Any, lists: bool = True) -> Any:
    """``value`` as what every store takes (TOML, JSON, Neptune's fields, a run table's cells):
    dicts with str keys, bool, int, float and str; None left out (TOML has no null); lists and
    tuples kept (``lists=False``: as JSON text, ``[10, 10, 5]``); anything else its ``str``.
    The one converter to plain values."""
    if isinstance(value, Mapping):
        return {str(k): plain(v, lists) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [plain(v, lists) for v in value] if lists else json.dumps(list(value), default=str)
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"training": {"epochs": 5}}`` → ``{"training.epochs": 5}``: a run table's columns,
    each a :func:`plain` value (lists as JSON text, None left out)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in plain(params, lists=False).items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            flat.update(flat_params(value, dotted))
        else:
            flat[dotted] = value
    return flat


#: Resolution of every logged figure.
FIGURE_DPI = 100
_rendered: "weakref.WeakKeyDictionary[Figure, bytes]" = weakref.WeakKeyDictionary()


def figure_png(figure: "Figure") -> bytes:
    """The figure as PNG bytes, rendered once however many loggers take it."""
    if figure not in _rendered:
        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=FIGURE_DPI, format="png")
        _rendered[figure] = buffer.getvalue()
    return _rendered[figure]


class LoggerUnavailable(RuntimeError):
    """A logger could not reach its backend when the run was set up: raised before training,
    so nothing is lost. The message says what failed and what to check."""


class RunLogger:
    """Receives one run's parameters, metric rows, figures and final status.

    Subclasses implement :meth:`log_rows`; the other hooks default to doing nothing. Metric
    names are the ``metrics.csv`` column names (``loss``, ``layer_1/grad_abs_mean``…). Figures
    are drawn once by the training loop (:func:`end_run`) and handed to every logger.
    """

    #: Set to True to receive each epoch's last kernel gradients in :meth:`log_epoch_end`.
    wants_gradients: bool = False

    def start(self, *, epochs: int, steps_per_epoch: int, layer_paths: list[str],
              layer_blocks: list[str] | None = None) -> None:
        """Called by ``fit`` before the first step, with the kernel path behind each numbered
        layer and the block (top-level layer) each belongs to (see :mod:`gradtools.layers`)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The run's configuration (nested mappings of plain values)."""

    def log_rows(self, rows: "pd.DataFrame") -> None:
        """Rows of a metrics table (an epoch's, or fewer), with a ``step`` column."""
        raise NotImplementedError

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

    def log_spikes(self, events: "pd.DataFrame") -> None:
        """Spikes a :class:`gradtools.SpikeGuard` caught since the last call
        (:data:`gradtools.spike_events.EVENT_COLUMNS`), at the end of the epoch they came in."""

    def log_figure(self, name: str, figure: "Figure") -> None:
        """A matplotlib figure under ``name`` (e.g. ``mean_gradient``)."""

    def log_file(self, path: "str | Path") -> None:
        """A file that belongs to the run (the experiment suite sends its ``config.toml``)."""

    def finish(self, history: "History") -> None:
        """The run is over: ``history.status`` says how it ended."""


def end_run(loggers: Sequence[RunLogger], history: "History", figures=None) -> None:
    """Close a run in every logger: a run that ended early (``interrupted``, ``failed``) gets
    its status recorded first; then the figures are drawn once (``figures``: a function of the
    history returning ``{name: Figure}``, or None for none) and handed to each logger; then
    each logger finishes. The run is diagnosed once, here, and each logger finds the diagnosis
    as ``history.diagnosis``."""
    if loggers and history.diagnosis is None and not history.metrics.empty:
        history.diagnosis = diagnose(history)
    if history.status in EARLY_END_STATUSES:
        for logger in loggers:
            logger.log_progress(epochs_completed=history.epochs_completed, status=history.status)
    if figures is not None and not history.metrics.empty and loggers:
        for name, figure in figures(history).items():
            for logger in loggers:
                logger.log_figure(name, figure)
    for logger in loggers:
        logger.finish(history)


def end_run_after_error(loggers: Sequence[RunLogger], history: "History", figures=None) -> None:
    """:func:`end_run` while an error or Ctrl-C is on its way up: a logger that fails too (the
    same full disk) must not replace that error with its own."""
    try:
        end_run(loggers, history, figures)
    except Exception:  # noqa: BLE001 - the error being raised is the one to report
        for logger in loggers:
            try:
                logger.finish(history)
            except Exception:  # noqa: BLE001
                pass
