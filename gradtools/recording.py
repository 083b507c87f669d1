"""The Python side of a recorded run, one for :func:`gradtools.fit` and
:class:`gradtools.GradientMonitor` alike.

The compiled step writes rows of statistics (:func:`gradtools.stats.step_row`); whoever runs
the steps hands each epoch's rows to a :class:`RunRecord`, which keeps them as a table, keeps
the run's status and first non-finite step, tells the loggers, and at the end draws the
figures once and closes the run in every logger. What it has so far is at hand at any time as
a :class:`gradtools.History`.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from gradtools import through_time
from gradtools.columns import VALUE_COLUMNS_START
from gradtools.history import COMPLETED, DIVERGED, FAILED, INTERRUPTED, RUNNING, History
from gradtools.layers import block_downstream, layer_blocks
from gradtools.loggers.base import end_run, end_run_after_error
from gradtools.plots import run_figures
from gradtools.spike_events import empty_events


class RunRecord:
    """One run: its layers, rows, status and loggers.

    ``figures`` is ``fit``'s argument: True draws :func:`gradtools.plots.run_figures` when
    the run ends, a function of the History draws its own ``{name: Figure}``, False none."""

    def __init__(self, model, loggers=(), figures=True):
        self.model = model
        self.loggers = list(loggers)
        self.figures = run_figures if figures is True else figures or None
        self.status, self.first_nonfinite_step, self.epochs_completed = COMPLETED, None, 0
        self.paths: list[str] = []
        self.blocks: list[str] = []
        self.downstream: dict[str, list[str]] = {}
        self.columns: list[str] = []
        self.traced, self.traced_numbers = [], []
        self.frames: list[pd.DataFrame] = []
        self.state_rows: list[dict[str, float]] = []
        self.spike_frames: list[pd.DataFrame] | None = None  # a list once a spike guard watches
        self.started = time.perf_counter()
        self.ended = False

    def start(self, paths, columns, traced, *, epochs: int, steps_per_epoch: int) -> None:
        """The run's numbered layers (their kernels' ``paths``), its ``columns``, its
        :class:`gradtools.through_time.TracedRNN` layers; the loggers start the run."""
        self.paths, self.columns, self.traced = list(paths), list(columns), list(traced)
        self.blocks = layer_blocks(self.model, self.paths)
        self.downstream = block_downstream(self.model, self.blocks)
        self.traced_numbers = [self.paths.index(layer.inner_cell.kernel.path) + 1 for layer in self.traced]
        self.status = RUNNING
        for logger in self.loggers:
            logger.start(epochs=epochs, steps_per_epoch=steps_per_epoch, layer_paths=self.paths,
                         layer_blocks=self.blocks)

    def add_rows(self, epoch: int, steps, batches, values, finite) -> None:
        """Logged rows of ``epoch``: their global ``steps`` (from 1), ``batches`` within the
        epoch (from 0), the statistics in column order after ``step, epoch, batch``, and
        whether each step was finite (the first that was not makes the run diverged)."""
        if len(values) == 0:
            return
        steps = np.asarray(steps, np.int64)
        table = {"step": steps, "epoch": np.full(steps.size, epoch, np.int64),
                 "batch": np.asarray(batches, np.int64)}
        values = np.asarray(values)[:, :len(self.columns) - VALUE_COLUMNS_START]  # a slot the step leaves unused
        table.update(zip(self.columns[VALUE_COLUMNS_START:], values.T))
        frame = pd.DataFrame(table)
        self.frames.append(frame)
        finite = np.asarray(finite, bool)
        if not finite.all():
            self.status = DIVERGED
            if self.first_nonfinite_step is None:
                self.first_nonfinite_step = int(steps[np.argmin(finite)])
        for logger in self.loggers:
            logger.log_rows(frame)

    def watch_spikes(self) -> None:
        """A :class:`gradtools.SpikeGuard` watches the run: its History has a spike table."""
        if self.spike_frames is None:
            self.spike_frames = []

    def add_spikes(self, events: pd.DataFrame) -> None:
        """Spike events (:data:`gradtools.spike_guard.EVENT_COLUMNS`) for the loggers."""
        self.watch_spikes()
        if events.empty:
            return
        self.spike_frames.append(events)
        for logger in self.loggers:
            logger.log_spikes(events)

    def through_time_row(self, epoch: int, radii, state_means) -> dict[str, float]:
        """The epoch's numbers of the traced recurrent layers (none without such layers)."""
        if not self.traced:
            return {}
        values = through_time.epoch_row(self.traced, self.traced_numbers, radii, state_means)
        self.state_rows.append({"epoch": epoch, **values})
        return values

    def end_epoch(self, epoch: int, epochs_completed: int, *, last: bool, through_time_values=None,
                  kernel_gradients=None) -> None:
        """The loggers hear of the epoch's end. ``epochs_completed`` is counted before they
        do: Ctrl-C while they write the epoch closes the run with it. The last epoch's
        progress is the final status, so nothing after it can lose it."""
        self.epochs_completed = epochs_completed
        progress = DIVERGED if self.status == DIVERGED else (COMPLETED if last else RUNNING)
        for logger in self.loggers:
            if through_time_values:
                logger.log_epoch_metrics(epoch, through_time_values)
            logger.log_epoch_end(epoch, self.model, kernel_gradients)
            logger.log_progress(epochs_completed=epochs_completed, status=progress)

    def end(self) -> History:
        """The run went to its end (completed or diverged): figures, and every logger finishes."""
        self.ended = True
        if self.status == RUNNING:
            self.status = COMPLETED
        history = self.history()
        end_run(self.loggers, history, self.figures)
        return history

    def end_abruptly(self, error: BaseException, *, every_epoch_done: bool = False) -> None:
        """The run ended by ``error`` on its way up: interrupted by Ctrl-C, failed by any other
        error; a run that diverged stays diverged (that is its result), and one that trained
        every epoch before Ctrl-C completed. The loggers close it without replacing that error
        with one of their own."""
        if self.ended:
            return
        self.ended = True
        if self.status != DIVERGED:
            interrupted = isinstance(error, KeyboardInterrupt)
            self.status = (COMPLETED if every_epoch_done and interrupted
                           else INTERRUPTED if interrupted else FAILED)
        end_run_after_error(self.loggers, self.history(), self.figures)

    def history(self) -> History:
        metrics = (pd.concat(self.frames, ignore_index=True) if self.frames
                   else pd.DataFrame(columns=self.columns))
        return History(metrics=metrics, status=self.status, first_nonfinite_step=self.first_nonfinite_step,
                       epochs_completed=self.epochs_completed, wall_seconds=time.perf_counter() - self.started,
                       layer_paths=self.paths, layer_blocks=self.blocks, block_downstream=self.downstream,
                       state_gradients=pd.DataFrame(self.state_rows) if self.traced else None,
                       spikes=self._spikes())

    def _spikes(self) -> pd.DataFrame | None:
        if self.spike_frames is None:
            return None
        return (pd.concat(self.spike_frames, ignore_index=True) if self.spike_frames
                else empty_events())
