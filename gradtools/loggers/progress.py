"""Progress lines on the terminal for long runs."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import pandas as pd

from gradtools.history import COMPLETED
from gradtools.loggers.base import RunLogger


class ProgressLogger(RunLogger):
    """Prints ``epoch 10/100  step 940  loss 0.6931  …`` at most every ``every_seconds``,
    always after the first and the last epoch and when a run ends early."""

    def __init__(self, stream: TextIO | None = None, every_seconds: float = 2.0):
        self.stream = stream or sys.stderr
        self.every_seconds = every_seconds
        self._epochs = 0
        self._last_print = -math.inf
        self._started = time.perf_counter()
        self._last_rows: pd.DataFrame | None = None

    def start(self, *, epochs: int, steps_per_epoch: int, layer_paths: list[str],
              layer_blocks: list[str] | None = None) -> None:
        self._epochs = epochs
        self._started = time.perf_counter()
        print(f"training {len(layer_paths)} layers for {epochs} epochs of {steps_per_epoch} steps",
              file=self.stream, flush=True)

    def log_rows(self, rows: pd.DataFrame) -> None:
        self._last_rows = rows

    def log_epoch_end(self, epoch: int, model, kernel_gradients=None) -> None:
        now = time.perf_counter()
        last_epoch = epoch + 1 == self._epochs
        if epoch == 0 or last_epoch or now - self._last_print >= self.every_seconds:
            self._print(epoch)
            self._last_print = now

    def _print(self, epoch: int) -> None:
        rows = self._last_rows
        if rows is None or rows.empty:
            return
        last = rows.iloc[-1]
        print(
            f"epoch {epoch + 1}/{self._epochs}  step {int(last['step'])}  "
            f"loss {last['loss']:.4g}  grad_global_norm {last['grad_global_norm']:.3g}  "
            f"({time.perf_counter() - self._started:.1f} s)",
            file=self.stream,
            flush=True,
        )

    def finish(self, history) -> None:
        if history.status != COMPLETED:
            note = f" at step {history.first_nonfinite_step}" if history.first_nonfinite_step else ""
            print(f"run {history.status}{note} after {history.epochs_completed} full epochs",
                  file=self.stream, flush=True)
