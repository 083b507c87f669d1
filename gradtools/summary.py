"""Numbers that sum a run up, each computed in one place: the first-to-last layer gradient
ratio, the per-layer sensitivity table, one row per epoch, the final losses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from gradtools.columns import layer_column, layer_name, layer_numbers


def _finite_median(values) -> float:
    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    return float(np.median(finite)) if finite.size else float("nan")


def first_to_last_ratio(rows: pd.DataFrame) -> float:
    """Median finite ``grad_abs_mean`` of the first numbered layer over the last layer's, over
    ``rows`` (NaN when the last layer's median is 0 or undefined): the classic view of how
    much gradient reaches the first layer. It depends on each layer's shape and role; the
    diagnosis does not use it (see :mod:`gradtools.diagnosis`)."""
    layers = layer_numbers(rows)
    top = _finite_median(rows[layer_column(layers[0], "grad_abs_mean")])
    bottom = _finite_median(rows[layer_column(layers[-1], "grad_abs_mean")])
    return top / bottom if np.isfinite(bottom) and bottom > 0 else float("nan")


def sensitivity_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """‖g‖·‖W‖ / |loss| of every numbered layer (columns ``layer_k``) at every row: the
    first-order relative change of the loss if the layer's weights moved by their own size in
    the steepest direction (NaN where undefined)."""
    loss = metrics["loss"].abs()
    table = pd.DataFrame({layer_name(k): metrics[layer_column(k, "grad_norm")]
                          * metrics[layer_column(k, "weight_norm")] / loss for k in layer_numbers(metrics)})
    return table.replace([np.inf, -np.inf], np.nan)


def sample_per_epoch(metrics: pd.DataFrame, batch: int) -> pd.DataFrame:
    """One row per epoch: ``batch`` if it was logged in that epoch, else the first logged
    batch after it, else the epoch's last logged row."""
    picked = []
    for _, rows in metrics.groupby("epoch", sort=True):
        at_or_after = rows[rows["batch"] >= batch]
        picked.append(at_or_after.iloc[0] if len(at_or_after) else rows.iloc[-1])
    return pd.DataFrame(picked).reset_index(drop=True)


@dataclass(frozen=True)
class RunSummary:
    final_loss: float
    last_epoch_loss: float
    first_layer: int
    last_layer: int
    first_grad_abs_mean: float
    last_grad_abs_mean: float
    max_abs_first_grad_mean: float
    first_to_last_ratio: float


def summarize(metrics: pd.DataFrame) -> RunSummary:
    """Medians over every logged finite step, so one spike does not decide."""
    layers = layer_numbers(metrics)
    first, last = layers[0], layers[-1]
    last_epoch = metrics[metrics["epoch"] == metrics["epoch"].max()]
    return RunSummary(
        final_loss=float(metrics["loss"].iloc[-1]),
        last_epoch_loss=float(last_epoch["loss"].mean()),
        first_layer=first,
        last_layer=last,
        first_grad_abs_mean=_finite_median(metrics[layer_column(first, "grad_abs_mean")]),
        last_grad_abs_mean=_finite_median(metrics[layer_column(last, "grad_abs_mean")]),
        max_abs_first_grad_mean=float(metrics[layer_column(first, "grad_mean")].abs().max()),  # NaN if all are
        first_to_last_ratio=first_to_last_ratio(metrics),
    )
