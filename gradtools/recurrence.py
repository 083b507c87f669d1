"""The numbers of a recurrence, without TensorFlow: names of the per-epoch columns, the
spectral radius of a recurrent kernel and the geometric prediction r^(T−t) it implies.

An unrolled RNN multiplies the gradient by the recurrent matrix once per step back, so for
a linear RNN ‖∂L/∂h_t‖ ≈ ‖∂L/∂h_T‖ · r^(T−t): 0.9^30 ≈ 0.042 (vanishing), 1.1^30 ≈ 17.45
(exploding).
"""

from __future__ import annotations

import numpy as np

from gradtools.columns import layer_column

#: Per-epoch column names, beside the per-step ``metrics.csv`` columns.
STATE_GRAD_STAT = "state_grad_norm"
SPECTRAL_RADIUS_STAT = "recurrent_spectral_radius"
BPTT_STEPS_STAT = "bptt_steps"


def state_column(layer: int, t: int) -> str:
    """``layer_<k>/state_grad_norm/t<t>``: the mean ‖∂L/∂h_t‖ of layer k in an epoch."""
    return layer_column(layer, f"{STATE_GRAD_STAT}/t{t:03d}")


def spectral_radius_column(layer: int) -> str:
    return layer_column(layer, SPECTRAL_RADIUS_STAT)


def bptt_steps_column(layer: int) -> str:
    """``layer_<k>/bptt_steps``: how many hidden states, counted back from the last, the
    gradient may reach (T, or the layer's ``truncate_bptt`` + 1)."""
    return layer_column(layer, BPTT_STEPS_STAT)


def state_gradient_layers(state_gradients) -> list[int]:
    """The layer numbers k with ``layer_k/state_grad_norm/…`` columns."""
    return sorted({int(c.split("/")[0].split("_")[1]) for c in state_gradients.columns
                   if f"/{STATE_GRAD_STAT}/" in c})


def state_gradient_curve(state_gradients, layer: int, epoch: int) -> np.ndarray:
    """‖∂L/∂h_t‖, t = 1 … T, of ``layer`` in ``epoch`` (a row of the per-epoch table)."""
    row = state_gradients[state_gradients["epoch"] == epoch].iloc[0]
    columns = [c for c in state_gradients.columns if c.startswith(layer_column(layer, f"{STATE_GRAD_STAT}/"))]
    return row[columns].to_numpy(dtype=float)


def spectral_radius(matrix) -> float:
    """max |eigenvalue| of a square matrix; NaN for a non-square one (LSTM/GRU stack their
    gates' recurrent kernels side by side, so theirs has no spectral radius)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not np.isfinite(matrix).all():
        return float("nan")
    return float(np.max(np.abs(np.linalg.eigvals(matrix))))


def geometric_prediction(radius: float, last_norm: float, steps: int) -> np.ndarray:
    """‖∂L/∂h_T‖ · r^(T−t) for t = 1 … T: the linear-RNN picture of vanishing (r < 1) and
    exploding (r > 1) gradients through time."""
    t = np.arange(1, steps + 1)
    return last_norm * np.power(float(radius), steps - t)


def scale_to_spectral_radius(matrix, radius: float) -> np.ndarray:
    """``matrix`` rescaled so that its spectral radius is ``radius``."""
    current = spectral_radius(matrix)
    if not np.isfinite(current) or current == 0:
        raise ValueError("the matrix must be square, finite and non-zero to be rescaled")
    return np.asarray(matrix) * (radius / current)
