"""``gradtools.preflight``: before training, whether a net's gradients will vanish or explode.

A few batches go forward and backward at the model's current weights; nothing it or its
optimizer holds changes (one optimizer step is taken to measure the first update, then every
variable gets its value back). Each batch gives the row a training step would give
(:func:`gradtools.stats.statistics_row`), so the verdict comes from the same rule as
:func:`gradtools.diagnose` (:data:`gradtools.diagnosis.RULES`): at initialization the depth
rules (a block far weaker than the blocks after it, or sensitivity growing by orders of
magnitude toward the input: the ordered and the chaotic phase of signal propagation,
Schoenholz et al. 2017), a gradient or a first step as large as the weights, a loss or
gradient that is already NaN, and **outputs the loss cannot use**: most of a sigmoid's or
softmax's predictions with every probability within Keras's epsilon of 0 or 1 (the cause of the
gradients that follow: from the logits they grow with the activations, from clipped
probabilities they are exactly 0), named first.

Beside the verdict, :attr:`Preflight.signal` is the signal-propagation table (Brock et al.
2021): per block in depth order, its output's mean square and variance, the fraction of
saturated units (sigmoid, tanh, softmax) and of dead ReLU units, and its gradient sensitivity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from gradtools import through_time
from gradtools.backend import require_supported_backend
from gradtools.columns import VALUE_COLUMNS_START, metric_columns
from gradtools.diagnosis import AT_INITIALIZATION, SATURATED_OUTPUT, Diagnosis, judge
from gradtools.history import COMPLETED, History
from gradtools.layers import block_downstream, layer_blocks, layer_layout
from gradtools.plots import plot_signal_propagation
from gradtools.programs import copy_values
from gradtools.stats import probability_outputs, saturated_output_counts, statistics_row
from gradtools.steps import resolve_loss
from gradtools.validation import require_integer

#: A sigmoid or softmax unit whose output is within this of 0 or 1 is saturated (σ' < 0.01).
SATURATED_WITHIN = 0.01
#: A tanh unit whose |output| is above this is saturated (tanh' < 0.02).
TANH_SATURATED = 0.99


@dataclass
class Preflight(Diagnosis):
    """The verdict at initialization, as :class:`gradtools.Diagnosis` (``verdict``,
    ``explanation``, ``evidence``, ``layers``, ``layer_table()``, ``to_dict()``), and the
    signal-propagation table ``signal`` (one row per block, in depth order)."""

    signal: pd.DataFrame = field(default_factory=pd.DataFrame)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "signal": self.signal.to_dict(orient="records")}

    def figure(self, title: str = ""):
        """The signal-propagation figure of :attr:`signal` (:func:`gradtools.plots.plot_signal_propagation`)."""
        return plot_signal_propagation(self.signal, title or f"{self.verdict} at initialization")


def preflight(model: keras.Model, x, y, loss=None, *, optimizer=None, batch_size: int = 32,
              batches: int = 4) -> Preflight:
    """Say before training whether ``model``'s gradients vanish or explode, from ``batches``
    batches of ``batch_size`` examples of ``x``, ``y`` (the first ones, in order).

    ``loss``: a Keras loss (name, config, instance or function); by default the loss the model
    was compiled with. ``optimizer``: the optimizer training will use (name, config or
    instance), by default the compiled one; with neither, the first update is not measured.
    """
    require_supported_backend("gradtools.preflight")
    require_integer("batch_size", batch_size)
    require_integer("batches", batches)
    pairs = _batches(x, y, batch_size, batches)
    if not model.built:
        model(pairs[0][0])
    loss_of = _loss_function(model, loss)
    optimizer = _optimizer(model, optimizer)
    variables = list(model.trainable_weights)
    layout = layer_layout(variables)
    blocks = layer_blocks(model, layout.paths)
    probe, probed = _probe(model, list(dict.fromkeys(blocks)))
    traced = through_time.traced_layers(model)
    radii = through_time.spectral_radii(traced)
    rows, signal, logits, state_norms = [], [], [], []
    with _values_kept(model, optimizer):
        for xb, yb in pairs:
            row, outputs, prediction = _one_batch(model, probe, loss_of, optimizer, variables, layout, xb, yb)
            rows.append(row)
            signal.append(_block_signal(probed, outputs))
            logits.append(_logit_scale(prediction))
            state_norms.append([layer.state_gradient_norms.numpy() for layer in traced])
    history = _history(model, layout, blocks, rows, output_saturated=bool(probability_outputs(prediction)))
    if traced:  # ‖∂L/∂h_t‖ of each TracedRNN, averaged over the batches
        means = [np.mean([norms[i] for norms in state_norms], axis=0) for i in range(len(traced))]
        numbers = [list(layout.paths).index(layer.inner_cell.kernel.path) + 1 for layer in traced]
        history.state_gradients = pd.DataFrame([{"epoch": 0, **through_time.epoch_row(traced, numbers, radii, means)}])
    found = judge(history, AT_INITIALIZATION)
    return _verdict(found, _signal_table(signal, found), logits)


def _batches(x, y, batch_size: int, batches: int) -> list:
    n = len(tf.nest.flatten(x)[0])
    if n == 0:
        raise ValueError("x holds no examples")
    return [(tf.nest.map_structure(lambda a, s=start: a[s:s + batch_size], x),
             tf.nest.map_structure(lambda a, s=start: a[s:s + batch_size], y))
            for start in range(0, min(n, batch_size * batches), batch_size)]


def _loss_function(model, loss):
    """``loss_of(x, y, prediction)``: the given loss plus ``model.losses``, or the model's own
    ``compute_loss`` (its compiled loss, weights and regularizers)."""
    if loss is not None:
        loss_fn = resolve_loss(loss)

        def given(x, y, prediction):
            value = loss_fn(y, prediction)
            return value + tf.add_n(model.losses) if model.losses else value
        return given
    if getattr(model, "compiled", False) and getattr(model, "loss", None) is not None:
        return lambda x, y, prediction: model.compute_loss(x=x, y=y, y_pred=prediction, training=True)
    raise ValueError("preflight needs a loss: pass loss=, or compile the model with one")


def _optimizer(model, optimizer):
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None
    optimizer = keras.optimizers.get(optimizer)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer  # the update of the unscaled gradients
    if not optimizer.built:
        optimizer.build(model.trainable_weights)
    return optimizer


class _values_kept:
    """Every variable of the model and the optimizer gets back the value it had on entry."""

    def __init__(self, model, optimizer):
        self.variables = [*model.variables, *(optimizer.variables if optimizer is not None else [])]

    def __enter__(self):
        self.values = [v.numpy() for v in self.variables]

    def __exit__(self, *exc):
        copy_values(self.values, self.variables)


def _probe(model, blocks: list[str]):
    """A model returning each block's output beside the prediction, and the (name, layer) of
    the blocks it returns; (None, []) when Keras has no graph to cut (a subclassed model)."""
    layers = {layer.name: layer for layer in model._flatten_layers(include_self=False)}  # noqa: SLF001
    probed, outputs = [], []
    for name in blocks:
        layer = layers.get(name)
        try:
            output = layer.output
        except (AttributeError, ValueError):  # not called once on the model's inputs
            continue
        probed.append((name, layer))
        outputs.append(tf.nest.flatten(output)[0])
    if not probed or not getattr(model, "inputs", None):
        return None, []
    try:
        return keras.Model(_input_structure(model), [outputs, model.outputs]), probed
    except (AttributeError, ValueError, TypeError, KeyError):
        return None, []


def _input_structure(model):
    """The model's inputs as it takes them (one tensor, a list or a dict): a Sequential model
    loaded from a file has ``inputs`` but no ``input``."""
    try:
        return model.input
    except AttributeError:
        return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def _one_batch(model, probe, loss_of, optimizer, variables, layout, xb, yb):
    """The batch's row of statistics (the first update measured, then undone), the blocks'
    outputs and the prediction."""
    with tf.GradientTape() as tape:
        if probe is not None:
            outputs, predictions = probe(xb, training=True)
            prediction = predictions[0] if len(predictions) == 1 else predictions
        else:
            outputs, prediction = [], model(xb, training=True)
        loss = loss_of(xb, yb, prediction)
    gradients = tape.gradient(loss, variables)
    before = [tf.identity(variables[i]) for i in layout.monitored]
    if optimizer is not None:
        optimizer.apply(gradients, variables)
    after = [variables[i] for i in layout.monitored]
    probabilities = probability_outputs(prediction)
    counts = saturated_output_counts(probabilities) if probabilities else None
    row = statistics_row(loss, gradients, layout.monitored, before, after, output_counts=counts)
    return row.numpy(), outputs, prediction


def _history(model, layout, blocks, rows, output_saturated: bool) -> History:
    """The batches' rows as a one-epoch run (without an optimizer every update ratio is 0)."""
    columns = metric_columns(len(layout.paths), layout.recurrent_layers, output_saturated=output_saturated)
    table = pd.DataFrame(np.stack(rows), columns=columns[VALUE_COLUMNS_START:])
    table.insert(0, "batch", np.arange(len(rows)))
    table.insert(0, "epoch", 0)
    table.insert(0, "step", np.arange(1, len(rows) + 1))
    return History(metrics=table, status=COMPLETED, epochs_completed=1, layer_paths=list(layout.paths),
                   layer_blocks=blocks, block_downstream=block_downstream(model, blocks))


def _block_signal(probed, outputs) -> list[dict]:
    rows = []
    for (name, layer), output in zip(probed, outputs):
        values = np.asarray(keras.ops.convert_to_numpy(output), dtype=np.float64)
        rows.append({"block": name, "activation": _activation_name(layer),
                     "mean_square": float(np.mean(values ** 2)), "variance": float(np.var(values)),
                     "saturated": _saturated(values, _activation_name(layer)),
                     "dead": _dead(values) if _activation_name(layer) == "relu" else None})
    return rows


def _activation_name(layer) -> str | None:
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None)
    return name if isinstance(name, str) else None


def _saturated(values, activation: str | None) -> float | None:
    if activation in ("sigmoid", "softmax"):
        return float(np.mean((values < SATURATED_WITHIN) | (values > 1 - SATURATED_WITHIN)))
    if activation == "tanh":
        return float(np.mean(np.abs(values) > TANH_SATURATED))
    return None


def _dead(values) -> float:
    """The fraction of units (every position but the batch's) at 0 for every example."""
    units = values.reshape(values.shape[0], -1)
    return float(np.mean(np.all(units <= 0, axis=0)))


def _logit_scale(prediction) -> float | None:
    """The median |logit| behind the sigmoid or softmax outputs of ``prediction`` (Keras keeps
    the logits on each such tensor), or None without such outputs."""
    logits = [np.abs(keras.ops.convert_to_numpy(t._keras_logits)).ravel()  # noqa: SLF001 - Keras's own tag
              for t in probability_outputs(prediction)]
    return float(np.median(np.concatenate(logits))) if logits else None


def _signal_table(signal: list[list[dict]], found: Diagnosis) -> pd.DataFrame:
    """The batches' block rows averaged, with each block's gradient sensitivity (its
    strongest kernel's median ‖g‖·‖W‖/|loss|)."""
    table = pd.DataFrame([row for rows in signal for row in rows])
    sensitivity = {}
    for finding in found.layers:
        value = finding.numbers["sensitivity_first_epoch"]
        if value is not None:
            sensitivity[finding.block] = max(value, sensitivity.get(finding.block, 0.0))
    if table.empty:
        return pd.DataFrame({"block": list(sensitivity), "sensitivity": list(sensitivity.values())})
    averaged = table.groupby("block", sort=False).agg(
        {"activation": "first", "mean_square": "mean", "variance": "mean", "saturated": "mean", "dead": "mean"})
    averaged["sensitivity"] = [sensitivity.get(block) for block in averaged.index]
    return averaged.reset_index()


def _verdict(found: Diagnosis, signal: pd.DataFrame, logits: list[float | None]) -> Preflight:
    """The diagnosis of the batches' rows, worded at initialization, with the median |logit|
    behind a sigmoid or softmax output as evidence (the size of what the output rule saw)."""
    known = [value for value in logits if value is not None]
    scale = float(np.median(known)) if known else None
    bound = math.log((1 - keras.config.epsilon()) / keras.config.epsilon())
    evidence = replace(found.evidence, output_logit_median_abs=scale, output_logit_bound=bound)
    explanation = "At initialization: " + found.explanation
    if scale is not None and (found.evidence.output_saturated or 0) > SATURATED_OUTPUT:
        explanation += f" The median |logit| is {scale:.3g}, where ±{bound:.3g} is the edge of the loss's range."
    return Preflight(found.verdict, evidence, explanation, found.remedies, found.layers, signal)
