"""Numbers that sum a run up: final loss and how the first layer's gradient compares to the last's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradtools.plots import layer_numbers


@dataclass(frozen=True)
class RunSummary:
    final_loss: float
    last_epoch_loss: float
    first_layer: int
    last_layer: int
    first_grad_abs_mean: float
    last_grad_abs_mean: float
    max_abs_first_grad_mean: float

    @property
    def first_to_last_ratio(self) -> float:
        """Median |gradient| of layer 1 over the median of the last layer (NaN if undefined)."""
        if not np.isfinite(self.last_grad_abs_mean) or self.last_grad_abs_mean == 0:
            return float("nan")
        return self.first_grad_abs_mean / self.last_grad_abs_mean


def _finite_median(values: pd.Series) -> float:
    finite = values[np.isfinite(values.to_numpy(dtype=float))]
    return float(finite.median()) if len(finite) else float("nan")


def summarize(metrics: pd.DataFrame) -> RunSummary:
    """Medians over every logged finite step, so one spike does not decide the verdict."""
    layers = layer_numbers(metrics)
    first, last = layers[0], layers[-1]
    last_epoch = metrics[metrics["epoch"] == metrics["epoch"].max()]
    return RunSummary(
        final_loss=float(metrics["loss"].iloc[-1]),
        last_epoch_loss=float(last_epoch["loss"].mean()),
        first_layer=first,
        last_layer=last,
        first_grad_abs_mean=_finite_median(metrics[f"layer_{first}/grad_abs_mean"]),
        last_grad_abs_mean=_finite_median(metrics[f"layer_{last}/grad_abs_mean"]),
        max_abs_first_grad_mean=float(np.nanmax(np.abs(metrics[f"layer_{first}/grad_mean"]))),
    )
