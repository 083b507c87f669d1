"""What every logger that sends a run to a service shares: a failure in the middle of a run
warns once and training goes on, and non-finite values, which such services cannot store, are
left out with one warning (``metrics.csv`` keeps them) while the step they first appeared at
is recorded."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping

import pandas as pd

from gradtools.columns import INDEX_COLUMNS
from gradtools.loggers.base import RunLogger


def _in_brief(error: Exception) -> str:
    """An error's message in one line: TensorFlow's graph errors carry the Python stack of the
    node that failed, and the op's own words come after it."""
    noise = ("Graph execution error", "Detected at node", "File ", "[[", "Cf. ")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(noise)] or lines[:1]
    return " ".join(kept[:2])[:300]


class RemoteRunLogger(RunLogger):
    #: The service's name, in warnings.
    service = "the backend"

    def __init__(self) -> None:
        self._broken: str | None = None
        self._first_nonfinite_step: int | None = None

    def _guard(self, what: str, action: Callable[[], object]) -> None:
        """Run ``action``; the first failure is warned about and every later call skipped."""
        if self._broken:
            return
        try:
            action()
        except Exception as error:  # noqa: BLE001 - a logging backend must not stop training
            self._broken = f"{type(error).__name__}: {_in_brief(error)}"
            warnings.warn(f"{self.service} failed while logging {what} ({self._broken}); the local "
                          f"run directory is complete, {self.service} misses everything from here on",
                          RuntimeWarning, stacklevel=3)

    def finite_series(self, rows: pd.DataFrame) -> Iterator[tuple[str, list[int], list[float]]]:
        """``(column, steps, values)`` of each measured column's finite values; the first
        non-finite value met is passed to :meth:`on_first_nonfinite` and warned about once."""
        steps = rows["step"].astype(int)
        for column in rows.columns:
            if column in INDEX_COLUMNS:
                continue
            values = rows[column].astype(float)
            finite = values.map(math.isfinite)
            if not finite.all() and self._first_nonfinite_step is None:
                self._first_nonfinite_step = int(steps[~finite].iloc[0])
                self.on_first_nonfinite(self._first_nonfinite_step)
                warnings.warn(f"non-finite values from step {self._first_nonfinite_step} on ({column} "
                              f"first) are not sent to {self.service}, which cannot store them; "
                              "metrics.csv keeps them", RuntimeWarning, stacklevel=3)
            if finite.any():
                yield column, steps[finite].tolist(), values[finite].tolist()

    def finite_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """The finite ones of an epoch's numbers; one warning per epoch names a left-out one."""
        finite = {name: float(value) for name, value in metrics.items() if math.isfinite(value)}
        if len(finite) < len(metrics):
            skipped = next(name for name in metrics if name not in finite)
            warnings.warn(f"epoch {epoch}: non-finite {skipped} (and any others) not sent to "
                          f"{self.service}; state_gradients.csv keeps them", RuntimeWarning, stacklevel=3)
        return finite

    def on_first_nonfinite(self, step: int) -> None:
        """Record where values first stopped being finite (a field, a tag)."""
