"""How the layers of a run compare, from its metrics table: the classic first-to-last gradient
ratio and each layer's sensitivity (what the diagnosis judges by)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradtools.columns import layer_column, layer_name, layer_numbers


def finite_median(values) -> float:
    """The median of the finite values (NaN when there is none)."""
    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    return float(np.median(finite)) if finite.size else float("nan")


def first_to_last_ratio(rows: pd.DataFrame) -> float:
    """Median finite ``grad_abs_mean`` of the first numbered layer over the last layer's, over
    ``rows`` (NaN when the last layer's median is 0 or undefined): the classic view of how
    much gradient reaches the first layer. It depends on each layer's shape and role; the
    diagnosis does not use it (see :mod:`gradtools.diagnosis`)."""
    layers = layer_numbers(rows)
    top = finite_median(rows[layer_column(layers[0], "grad_abs_mean")])
    bottom = finite_median(rows[layer_column(layers[-1], "grad_abs_mean")])
    return top / bottom if np.isfinite(bottom) and bottom > 0 else float("nan")


def sensitivity_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """‖g‖·‖W‖ / |loss| of every numbered layer (columns ``layer_k``) at every row: the
    first-order relative change of the loss if the layer's weights moved by their own size in
    the steepest direction (NaN where undefined)."""
    loss = metrics["loss"].abs()
    table = pd.DataFrame({layer_name(k): metrics[layer_column(k, "grad_norm")]
                          * metrics[layer_column(k, "weight_norm")] / loss for k in layer_numbers(metrics)})
    return table.replace([np.inf, -np.inf], np.nan)
