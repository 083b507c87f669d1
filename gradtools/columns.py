"""The names of a metrics table's columns: one name per statistic, used as a ``metrics.csv``
column, a Neptune series and a TensorBoard tag.

``layer_<k>/<statistic>`` for the k-th numbered layer (1-based, see :mod:`gradtools.layers`),
plus the step-level columns in :data:`STEP_COLUMNS`. A recurrent layer (one with a variable
named ``recurrent_kernel`` beside its ``kernel``) also has ``layer_<k>/recurrent_<statistic>``.
:mod:`gradtools.stats` computes the values; this module needs no TensorFlow, so the tools that
only read run directories start fast.
"""

from __future__ import annotations

#: The columns that say which step a row is (filled in on the Python side; the compiled step
#: computes the rest of its row: :data:`VALUE_COLUMNS_START` on).
INDEX_COLUMNS = ("step", "epoch", "batch")
VALUE_COLUMNS_START = len(INDEX_COLUMNS)
#: Columns that describe a step rather than a layer, in the order they appear.
STEP_COLUMNS = (*INDEX_COLUMNS, "loss", "grad_global_norm")

#: Per-layer statistics, in the order of the columns :func:`gradtools.stats.layer_gradient_stats` returns.
LAYER_STATS = (
    "grad_mean",
    "grad_abs_mean",
    "grad_norm",
    "grad_max_abs",
    "weight_mean",
    "weight_norm",
    "update_ratio",
)


#: Extra column when gradients are clipped before the update: the global norm after clipping.
CLIPPED_COLUMN = "grad_global_norm_clipped"


#: Extra columns under a loss-scaling optimizer (mixed precision): the loss scale the step's
#: gradients were computed with, and 1 when the optimizer skipped the step because they
#: overflowed (it then halves the scale); 0 otherwise.
LOSS_SCALE_COLUMNS = ("loss_scale", "skipped")


#: Extra column when outputs are probabilities made by Keras's sigmoid or softmax (they carry
#: their logits, on TensorFlow): the fraction of their predictions whose every probability is
#: within ε of 0 or 1 (``gradtools.stats.saturated_output_counts``).
OUTPUT_COLUMN = "output_saturated"


#: Per-layer instruments of the optimizer's state, with ``optimizer_state=True``
#: (:mod:`gradtools.optimizer_state`, which computes them); not judged by ``diagnose``.
OPTIMIZER_STATE_COLUMNS = ("update_cosine", "adam_m_norm", "adam_v_norm", "eps_dominated")


#: Prefix of a recurrent layer's statistics of its recurrent kernel (``layer_k/recurrent_…``).
RECURRENT_PREFIX = "recurrent_"


def layer_name(k: int) -> str:
    """The name of the k-th numbered layer (1-based) in every table, series and tag: ``layer_k``."""
    return f"layer_{k}"


def layer_column(k: int, statistic: str) -> str:
    """The column of a statistic of the k-th numbered layer: ``layer_k/<statistic>``."""
    return f"{layer_name(k)}/{statistic}"


def layer_columns(n_layers: int, recurrent_layers=()) -> list[str]:
    """Column names ``layer_k/<stat>`` for layers 1..n_layers, in :data:`LAYER_STATS` order;
    a layer in ``recurrent_layers`` (1-based) also gets ``layer_k/recurrent_<stat>``, the
    same statistics of its recurrent kernel, right after its own."""
    columns = []
    for k in range(1, n_layers + 1):
        columns += [layer_column(k, stat) for stat in LAYER_STATS]
        if k in recurrent_layers:
            columns += [layer_column(k, RECURRENT_PREFIX + stat) for stat in LAYER_STATS]
    return columns


def metric_columns(n_layers: int, recurrent_layers=(), *, clipped: bool = False,
                   loss_scaled: bool = False, optimizer_stats=(), output_saturated: bool = False) -> list[str]:
    """All columns of a metrics table for a model with ``n_layers`` numbered layers; with
    ``clipped``, :data:`CLIPPED_COLUMN`; with ``loss_scaled``, :data:`LOSS_SCALE_COLUMNS`; each
    layer's ``optimizer_stats`` (:mod:`gradtools.optimizer_state`), layer after layer; with
    ``output_saturated``, :data:`OUTPUT_COLUMN`."""
    return (list(STEP_COLUMNS) + layer_columns(n_layers, recurrent_layers)
            + ([CLIPPED_COLUMN] if clipped else []) + (list(LOSS_SCALE_COLUMNS) if loss_scaled else [])
            + [layer_column(k, stat) for k in range(1, n_layers + 1) for stat in optimizer_stats]
            + ([OUTPUT_COLUMN] if output_saturated else []))


def layer_numbers(table) -> list[int]:
    """The layer numbers k that have ``layer_k/…`` columns in ``table``, in order."""
    return sorted({int(c.split("/")[0].split("_")[1]) for c in table.columns if c.startswith("layer_")})
