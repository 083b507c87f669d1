"""``gradtools.diagnose``: vanishing, exploding or healthy, with the numbers behind the verdict.

The rule, in order (thresholds are the constants below; the README has the table):

1. **exploding** if any loss, gradient statistic or weight statistic is NaN/Inf; or the global
   gradient norm grows to ``EXPLODING_GRAD_GROWTH``× its median over the first logged steps;
   or a layer's weight norm grows to ``EXPLODING_WEIGHT_GROWTH``× its first value.
2. **vanishing** (networks of at least ``MIN_LAYERS_FOR_VANISHING`` numbered layers) if layer
   1's median ``grad_abs_mean`` is below ``VANISHING_RATIO`` of the last layer's, over the
   whole run or over its first epoch (where vanishing gradients stall training most); or layer
   1's median ``update_ratio`` is below ``VANISHING_RATIO`` of the last layer's (early weights
   barely moving).
   For a recurrent model traced by :class:`gradtools.through_time.TracedRNN`: **vanishing**
   also if the median over epochs of ‖∂L/∂h_1‖ / ‖∂L/∂h_T‖ is below
   ``VANISHING_THROUGH_TIME`` (gradients vanishing through time, whatever the depth; 0 when
   they underflow float32). When no epoch's gradient reached every time step, the gradient was
   cut on purpose (truncated BPTT): that is reported, not judged.
3. **healthy** otherwise.

Loss stalling and loss swings between consecutive steps are reported as evidence; they do
not decide the verdict alone (mini-batch noise moves the loss by 20–50 % between steps in
healthy runs of the article's nets).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gradtools.history import History
from gradtools.plots import layer_numbers, state_gradient_curve, state_gradient_layers

EXPLODING_GRAD_GROWTH = 1e3
EXPLODING_WEIGHT_GROWTH = 1e2
VANISHING_RATIO = 0.1
MIN_LAYERS_FOR_VANISHING = 3
VANISHING_THROUGH_TIME = 1e-3
FIRST_STEPS = 10
STALLED_LOSS_IMPROVEMENT = 0.01

REMEDIES = {
    "vanishing": [
        "non-saturating activations: ReLU, Leaky ReLU, ELU, PReLU instead of sigmoid/tanh",
        "initialization scaled to the layer (Glorot/Xavier, He)",
        "batch normalization (between the linear part and the activation)",
        "residual (skip) connections, or fewer layers",
        "an adaptive optimizer (RMSprop, Adam) that rescales small gradients",
    ],
    "exploding": [
        "gradient clipping: clipnorm=1.0 or clipvalue=0.5 to start (see suggest_clip_norm)",
        "a smaller learning rate, and smaller batches",
        "proper initialization (Glorot/He) instead of large weights",
        "scale the inputs and the targets (standardize)",
        "L1/L2 weight regularization; batch or layer normalization",
    ],
    "healthy": [],
}


@dataclass
class Diagnosis:
    verdict: str
    evidence: dict[str, float | int | bool | None]
    explanation: str
    remedies: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps({"verdict": self.verdict, "evidence": self.evidence,
                           "explanation": self.explanation, "remedies": self.remedies}, indent=2)

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict}", self.explanation]
        if self.remedies:
            lines.append("what the sources suggest:")
            lines += [f"  - {remedy}" for remedy in self.remedies]
        return "\n".join(lines)


def _finite(values) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[np.isfinite(array)]


def _median_ratio(numerator, denominator) -> float | None:
    top, bottom = _finite(numerator), _finite(denominator)
    if not top.size or not bottom.size or np.median(bottom) == 0:
        return None
    return float(np.median(top) / np.median(bottom))


def _number(value):
    return None if value is None or not np.isfinite(value) else float(value)


def through_time_evidence(state_gradients: pd.DataFrame | None) -> dict:
    """‖∂L/∂h_1‖ / ‖∂L/∂h_T‖ in the first epoch and its median over epochs (the smallest over
    traced layers), and the time steps any gradient reached; {} without traced layers."""
    if state_gradients is None or state_gradients.empty:
        return {}
    first_epoch, median, reached = [], [], []
    for k in state_gradient_layers(state_gradients):
        curves = np.stack([state_gradient_curve(state_gradients, k, int(e))
                           for e in state_gradients["epoch"]])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = curves[:, 0] / curves[:, -1]
        first_epoch.append(ratios[0])
        median.append(np.nanmedian(ratios) if np.isfinite(ratios).any() else np.nan)
        reached.append(int((np.nan_to_num(curves) > 0).any(axis=0).sum()))
    return {
        "time_steps": int(curves.shape[1]),
        "state_grad_ratio_first_epoch": _number(min(first_epoch)),
        "state_grad_ratio": _number(min(median)),
        "time_steps_reached": min(reached),
    }


def evidence_of(metrics: pd.DataFrame) -> dict:
    """Every number the verdict is built on."""
    layers = layer_numbers(metrics)
    first, last = layers[0], layers[-1]
    stat_columns = [c for c in metrics.columns if c not in ("step", "epoch", "batch")]
    values = metrics[stat_columns].to_numpy(dtype=float)
    bad_rows = ~np.isfinite(values).all(axis=1)
    first_nonfinite = int(metrics["step"][bad_rows].iloc[0]) if bad_rows.any() else None

    norms = _finite(metrics["grad_global_norm"])
    early_norm = np.median(norms[:FIRST_STEPS]) if norms.size else np.nan
    grad_growth = norms.max() / early_norm if norms.size and early_norm > 0 else np.nan
    weight_growth = np.nan
    for k in layers:
        weights = _finite(metrics[f"layer_{k}/weight_norm"])
        if weights.size and weights[0] > 0:
            weight_growth = np.nanmax([weight_growth, weights.max() / weights[0]])

    first_epoch = metrics[metrics["epoch"] == metrics["epoch"].min()]
    losses = _finite(metrics["loss"])
    epoch_loss = metrics.groupby("epoch")["loss"].mean()
    improvement = (epoch_loss.iloc[0] - epoch_loss.iloc[-1]) / abs(epoch_loss.iloc[0]) \
        if len(epoch_loss) >= 2 and np.isfinite(epoch_loss.iloc[[0, -1]]).all() and epoch_loss.iloc[0] else None
    swings = np.abs(np.diff(losses)) / np.maximum(np.abs(losses[:-1]), 1e-12) if losses.size > 1 else []
    return {
        "layers": len(layers),
        "first_nonfinite_statistic_step": first_nonfinite,
        "grad_norm_growth": _number(grad_growth),
        "weight_norm_growth": _number(weight_growth),
        "first_to_last_grad_ratio": _median_ratio(metrics[f"layer_{first}/grad_abs_mean"],
                                                  metrics[f"layer_{last}/grad_abs_mean"]),
        "first_to_last_grad_ratio_first_epoch": _median_ratio(
            first_epoch[f"layer_{first}/grad_abs_mean"], first_epoch[f"layer_{last}/grad_abs_mean"]),
        "first_to_last_update_ratio": _median_ratio(metrics[f"layer_{first}/update_ratio"],
                                                    metrics[f"layer_{last}/update_ratio"]),
        "loss_improvement": _number(improvement) if improvement is not None else None,
        "median_loss_swing": _number(np.median(swings)) if len(swings) else None,
    }


def _below(value, threshold) -> bool:
    return value is not None and value < threshold


def diagnose(source) -> Diagnosis:
    """Diagnose a :class:`gradtools.History`, a metrics DataFrame or a run directory."""
    if isinstance(source, (str, Path)):
        source = History.from_run_dir(source)
    metrics = source.metrics if isinstance(source, History) else source
    if metrics.empty:
        raise ValueError("no logged steps to diagnose")
    e = evidence_of(metrics)
    e.update(through_time_evidence(source.state_gradients if isinstance(source, History) else None))
    reasons = []
    if e["first_nonfinite_statistic_step"] is not None:
        reasons.append(f"logged values (loss, gradient or weight statistics) became NaN/Inf at "
                       f"step {e['first_nonfinite_statistic_step']}")
    if (e["grad_norm_growth"] or 0) >= EXPLODING_GRAD_GROWTH:
        reasons.append(f"the global gradient norm grew {e['grad_norm_growth']:.3g}× over its "
                       f"first {FIRST_STEPS} steps (threshold {EXPLODING_GRAD_GROWTH:g}×)")
    if (e["weight_norm_growth"] or 0) >= EXPLODING_WEIGHT_GROWTH:
        reasons.append(f"a layer's weight norm grew {e['weight_norm_growth']:.3g}× "
                       f"(threshold {EXPLODING_WEIGHT_GROWTH:g}×)")
    if reasons:
        return Diagnosis("exploding", e, "Exploding gradients: " + "; ".join(reasons) + ".",
                         REMEDIES["exploding"])

    if e["layers"] >= MIN_LAYERS_FOR_VANISHING:
        for key, what in (("first_to_last_grad_ratio", "over the whole run"),
                          ("first_to_last_grad_ratio_first_epoch", "in the first epoch")):
            if _below(e[key], VANISHING_RATIO):
                reasons.append(f"layer 1's gradient magnitude is {e[key]:.3g}× the last layer's "
                               f"{what} (threshold {VANISHING_RATIO:g})")
        if _below(e["first_to_last_update_ratio"], VANISHING_RATIO):
            reasons.append(f"layer 1's weights move {e['first_to_last_update_ratio']:.3g}× as much "
                           f"as the last layer's per step (threshold {VANISHING_RATIO:g})")
    through_time = e.get("state_grad_ratio")
    truncated = through_time is not None and e["time_steps_reached"] < e["time_steps"]
    if through_time is not None and not truncated and through_time < VANISHING_THROUGH_TIME:
        reasons.append(f"through time: ‖∂L/∂h_1‖ is {through_time:.3g}× ‖∂L/∂h_T‖ (median over "
                       f"epochs, T = {e['time_steps']}; threshold {VANISHING_THROUGH_TIME:g})")
    if reasons:
        stalled = _below(e["loss_improvement"], STALLED_LOSS_IMPROVEMENT)
        tail = " The loss stalled." if stalled else ""
        recovered = (e["layers"] >= MIN_LAYERS_FOR_VANISHING
                     and (e["first_to_last_grad_ratio"] or 0) >= VANISHING_RATIO)
        if recovered:
            tail += (f" Later steps recover (whole-run ratio {e['first_to_last_grad_ratio']:.3g}): "
                     "the early layers learned late.")
        return Diagnosis("vanishing", e, "Vanishing gradients: " + "; ".join(reasons) + "." + tail,
                         REMEDIES["vanishing"])

    ratio = e["first_to_last_grad_ratio"]
    shown = f"{ratio:.3g}" if ratio is not None else "n/a"
    note = ("" if e["layers"] >= MIN_LAYERS_FOR_VANISHING else
            f" (with {e['layers']} layers, vanishing across layers is not judged: it is an "
            "effect of depth)")
    if through_time is not None:
        note += (f"; through time, ‖∂L/∂h_1‖ is {through_time:.3g}× ‖∂L/∂h_T‖ (median over epochs)"
                 if not truncated else
                 f"; through time, the gradient reaches only the last {e['time_steps_reached']} "
                 f"of {e['time_steps']} steps (truncated backpropagation)")
    return Diagnosis("healthy", e, f"No sign of exploding or vanishing gradients: layer 1 gets "
                     f"{shown}× the last layer's gradient magnitude, gradient norm growth "
                     f"{e['grad_norm_growth'] or float('nan'):.3g}×{note}.", [])
