"""``gradtools.diagnose``: vanishing, exploding or healthy, per layer and for the run, with the
numbers behind the verdict.

Every layer is judged on scale-free numbers of its own (``docs/diagnosis.md`` has the rule, the
thresholds and where they come from):

- its **sensitivity** S = ‖g‖·‖W‖ / |loss|: the first-order relative change of the loss when
  the layer's weights move by their own size in the steepest direction. It does not depend on
  the layer's shape or on how its weights are scaled, and in a network that is positively
  homogeneous (ReLU, no normalization) ⟨g, W⟩ is the same for every layer, so healthy layers
  have comparable S whatever their role;
- its **update ratio** ‖ΔW‖ / ‖W‖ per step (what the optimizer did with the gradient);
- its **gradient-to-weight ratio** ‖g‖ / ‖W‖, and its own history (how far its weight norm
  grew, shown as evidence).

The rule is the table :data:`RULES` (``docs/diagnosis.md`` shows it, with why each threshold):
a run is **exploding** when a rule of that verdict holds for the run (a NaN/Inf, an astronomical
loss, a gradient norm that grows by orders of magnitude, or, through time, ‖∂L/∂h_first‖ far
above ‖∂L/∂h_T‖) or for a layer (update ratio, gradient-to-weight ratio); otherwise
**vanishing** when one holds for a block (the top-level layer a kernel belongs to: see
:mod:`gradtools.layers`), whose kernels all get exactly zero at most steps or whose sensitivity
falls two decades below the strongest block after it, or through time; otherwise **healthy**.
Blocks, not single kernels, are compared: the query and key projections of an attention
layer get far less gradient than its value projection at the same depth, which says the gradient
reached that depth; for the same reason a kernel that alone gets exactly zero (the query and
key projections of an attention over a single context token) is not dead.

**healthy** otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from gradtools.columns import (
    LOSS_SCALE_COLUMNS,
    OPTIMIZER_STATE_COLUMNS,
    OUTPUT_COLUMN,
    layer_column,
    layer_name,
    layer_numbers,
)
from gradtools.history import COMPLETED, History, RunDirectoryError
from gradtools.layer_ratios import sensitivity_table
from gradtools.layers import layer_label
from gradtools.recurrence import bptt_steps_column, state_gradient_curve, state_gradient_layers
from gradtools.spike_events import spikes_sentence

#: A block whose sensitivity is below this fraction of the strongest block after it vanishes.
VANISHING_RATIO = 1e-2
#: ‖∂L/∂h_1‖ / ‖∂L/∂h_T‖ below this (median over epochs) vanishes through time; above its
#: inverse explodes through time.
VANISHING_THROUGH_TIME = 1e-3
#: A layer whose weights change by their own norm per step (epoch median) explodes.
EXPLODING_UPDATE_RATIO = 1.0
#: A layer whose gradient norm is this many times its weight norm (epoch median) explodes: a
#: plain gradient step of learning rate 1e-5, the smallest in common use, would move its
#: weights by their own size.
EXPLODING_GRAD_TO_WEIGHT = 1e5
#: A block whose every kernel gets a gradient of exactly zero at more than this fraction of the
#: steps (its units, or those after it, are dead or saturated) vanishes.
DEAD_FRACTION = 0.5
#: An epoch whose median loss reaches this explodes.
ASTRONOMICAL_LOSS = 1e10
#: Growth of the global gradient norm over its median in the first FIRST_STEPS logged steps.
EXPLODING_GRAD_GROWTH = 1e3
FIRST_STEPS = 10
#: Shown as evidence only: an epoch-mean loss that improves less than this (relative) stalled.
STALLED_LOSS_IMPROVEMENT = 0.01
#: How many layers an explanation names before it says "and N more".
NAMED_LAYERS = 3
#: Outputs the loss cannot use: more than this fraction of a probability output's predictions
#: with every probability within ε of 0 or 1 (window median; :data:`gradtools.columns.OUTPUT_COLUMN`) ...
SATURATED_OUTPUT = 0.5
#: ... while the loss (window median) is above that of a constant prediction of a balanced
#: binary target, ln 2: a net that is right with that confidence has a loss near 0.
UNLEARNED_LOSS = float(np.log(2))
#: The sensitivity growing this many times from the last block to the first (its trend over
#: depth) explodes through depth: the mirror of VANISHING_RATIO.
EXPLODING_DEPTH_GROWTH = 1e2


@dataclass(frozen=True)
class Wording:
    """How an explanation names its windows: a trained run's first epoch and whole run, or
    :func:`gradtools.preflight`'s batches at initialization (one window: the rules of the
    whole run's window are not applied, they would say the same again)."""

    first_window: str = "in the first epoch"
    run_window: str | None = "over the run"
    median: str = "epoch median"
    unit: str = "step"


TRAINED = Wording()
AT_INITIALIZATION = Wording("at initialization", None, "median over the batches", "batch")

REMEDIES = {
    "vanishing": [
        "non-saturating activations: ReLU, Leaky ReLU, ELU, PReLU instead of sigmoid/tanh",
        "initialization scaled to the layer (Glorot/Xavier, He)",
        "batch normalization (between the linear part and the activation)",
        "residual (skip) connections, or fewer layers",
        "an adaptive optimizer (RMSprop, Adam) that rescales small gradients",
        "for recurrent nets: LSTM or GRU cells instead of a simple RNN",
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


@dataclass(frozen=True)
class Rule:
    """One line of the rule: the verdict ``verdict`` when ``quantity`` (a key of a layer's
    numbers, or of the run's evidence, by ``scope``) compares to ``threshold`` as
    ``comparison`` says (``"present"``: it is not None). ``reason`` is the explanation's
    text (``str.format`` with ``value``, ``threshold`` and the numbers' keys); ``when`` and
    ``shown`` are the row of the table in ``docs/diagnosis.md`` (:func:`rules_table`), and
    ``source`` the paragraph there that says why this threshold. Of rules with one ``group``,
    only the first that holds is given as a reason."""

    verdict: str
    scope: str
    quantity: str
    comparison: str
    threshold: float | None
    reason: str
    when: str
    shown: str
    source: str
    group: str = ""
    #: Which window the quantity is measured over: "first" (the first epoch), "run", or "".
    window: str = ""

    def holds(self, value) -> bool:
        if value is None:
            return False
        if self.comparison == "present":
            return True
        return {">=": value >= self.threshold, ">": value > self.threshold,
                "<": value < self.threshold}[self.comparison]


_ZERO = ("its block's gradient (every kernel's) is exactly 0 at {value:.0%} of the {unit}es {window} "
         "(its units, or those after it, are dead or saturated)")
_DEPTH = ("its block gets {value:.3g}× the gradient sensitivity of the strongest block after it "
          "({after}) {window} (threshold {threshold:g})")
_TIME = ("through time, {label}: ‖∂L/∂h_first‖ is {value:.3g}× ‖∂L/∂h_T‖ (median over epochs, {span}; "
         "threshold {threshold:g})")

#: The rule, in the order its reasons are given. A run is exploding when a rule of that verdict
#: holds for the run or for any layer; else vanishing when one of that verdict holds; else healthy.
RULES = (
    Rule("exploding", "run", "output_saturated", ">", SATURATED_OUTPUT,
         "exploding activations at the output: {value:.0%} of the output's predictions have every probability "
         "within Keras's ε of 0 or 1 ({median}, where the loss's median is above ln 2; threshold {threshold:.0%}): "
         "from the logits the loss grows with them and the gradient with the activations behind them, and "
         "from probabilities clipped to [ε, 1 − ε] the gradient is exactly 0",
         "outputs the loss cannot use: the fraction of a sigmoid's or softmax's predictions with every probability "
         "within ε of 0 or 1, window median, in windows whose median loss is above ln 2", "> 50 %",
         "Outputs the loss cannot use"),
    Rule("exploding", "run", "first_nonfinite_statistic_step", "present", None,
         "the loss or the gradients became NaN/Inf at {unit} {value}",
         "the loss or a gradient became NaN/Inf (not a step the loss scaler skipped)", "any", "Mixed precision"),
    Rule("exploding", "run", "loss_epoch_median_max", ">=", ASTRONOMICAL_LOSS,
         "the loss reached {value:.3g} ({median}; threshold {threshold:g})",
         "the loss, epoch median", "≥ 10¹⁰", "Why these exploding thresholds"),
    Rule("exploding", "run", "grad_norm_growth", ">=", EXPLODING_GRAD_GROWTH,
         "the global gradient norm grew {value:.3g}× over its first " + str(FIRST_STEPS)
         + " steps (threshold {threshold:g}×)",
         f"the global gradient norm ÷ its median over the first {FIRST_STEPS} logged steps", "≥ 10³",
         "Why these exploding thresholds"),
    Rule("exploding", "run", "state_grad_ratio_max", ">=", 1 / VANISHING_THROUGH_TIME, _TIME,
         "through time: ‖∂L/∂h_first‖ ÷ ‖∂L/∂h_T‖, median over epochs (`TracedRNN` layers)", "≥ 10³",
         "Through time"),
    Rule("exploding", "run", "depth_growth", ">=", EXPLODING_DEPTH_GROWTH,
         "through depth, the gradient sensitivity grows {value:.3g}× from the last block to the first (the trend "
         "over {blocks} blocks, {window}; threshold {threshold:g})",
         "through depth: a block's sensitivity grows toward the input, by its trend from the last block to "
         "the first, in the first epoch", "≥ 10²", "Through depth, growing", window="first"),
    Rule("exploding", "layer", "update_ratio", ">=", EXPLODING_UPDATE_RATIO,
         "each step changes its weights by {value:.3g}× their norm ({median}; threshold {threshold:g})",
         "a layer's update ratio, epoch median", "≥ 1", "Why these exploding thresholds"),
    Rule("exploding", "layer", "grad_to_weight", ">=", EXPLODING_GRAD_TO_WEIGHT,
         "its gradient norm is {value:.3g}× its weight norm ({median}; threshold {threshold:g})",
         "a layer's gradient-to-weight ratio, epoch median", "≥ 10⁵", "Why these exploding thresholds"),
    Rule("vanishing", "layer", "block_zero_gradient_first_epoch", ">", DEAD_FRACTION, _ZERO,
         "every kernel of a block gets a gradient of exactly 0, in the first epoch (dead or saturated units)",
         "> 50 % of the steps", "Dead layers", group="zero", window="first"),
    Rule("vanishing", "layer", "block_zero_gradient", ">", DEAD_FRACTION, _ZERO,
         "every kernel of a block gets a gradient of exactly 0, over the run", "> 50 % of the steps",
         "Dead layers", group="zero", window="run"),
    Rule("vanishing", "layer", "depth_ratio_first_epoch", "<", VANISHING_RATIO, _DEPTH,
         "a block's sensitivity (its strongest layer's, or a block's before it if stronger) ÷ the strongest "
         "block after it, in the first epoch",
         "< 10⁻²", "Why two decades for vanishing, by block", window="first"),
    Rule("vanishing", "layer", "depth_ratio", "<", VANISHING_RATIO, _DEPTH,
         "the same, over the run", "< 10⁻²", "Why two decades for vanishing, by block", window="run"),
    Rule("vanishing", "run", "state_grad_ratio", "<", VANISHING_THROUGH_TIME, _TIME,
         "through time: ‖∂L/∂h_first‖ ÷ ‖∂L/∂h_T‖, median over epochs (`TracedRNN` layers)", "< 10⁻³",
         "Through time"),
)


def reasons(verdict: str, scope: str, numbers: dict, context: dict | None = None,
            wording: Wording = TRAINED) -> list[str]:
    """The reasons the rules of ``verdict`` and ``scope`` give for ``numbers``: one per rule
    that holds (the first of a group), in the table's order. ``context`` fills the other
    names a reason's text uses, by the rule's quantity (``{quantity: {name: value}}``);
    ``wording`` names the windows."""
    given, groups = [], set()
    windows = {"first": wording.first_window, "run": wording.run_window, "": ""}
    for rule in RULES:
        value = numbers.get(rule.quantity)
        if (rule.verdict != verdict or rule.scope != scope or rule.group in groups or windows[rule.window] is None
                or not rule.holds(value)):
            continue
        given.append(rule.reason.format(value=value, threshold=rule.threshold, window=windows[rule.window],
                                        median=wording.median, unit=wording.unit,
                                        **(context or {}).get(rule.quantity, {})))
        if rule.group:
            groups.add(rule.group)
    return given


def rules_table() -> str:
    """The rule as the Markdown table of ``docs/diagnosis.md``."""
    rows = ["| verdict | when | threshold | why (below) |", "|---|---|---|---|"]
    rows += [f"| {rule.verdict} | {rule.when} | {rule.shown} | {rule.source} |" for rule in RULES]
    return "\n".join(rows + ["| healthy | none of the above | | |"])


@dataclass
class LayerFinding:
    """The numbers of one numbered layer and what they say."""

    layer: int
    path: str
    block: str
    verdict: str
    numbers: dict[str, float | None]
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{layer_name(self.layer)} ({self.path})" if self.path else layer_name(self.layer)


@dataclass
class Evidence:
    """The run's numbers a verdict is built on (the rules of scope "run" read them by name,
    :data:`RULES`), and those an explanation shows beside it; None where a run has no such
    number (no traced recurrent layer, one block, a loss that never became finite)."""

    layers: int
    first_nonfinite_statistic_step: int | None
    skipped_steps: int
    loss_epoch_median_max: float | None
    grad_norm_growth: float | None
    loss_improvement: float | None
    median_loss_swing: float | None
    blocks: int = 0
    weakest_block: str | None = None
    weakest_depth_ratio: float | None = None
    depth_growth: float | None = None
    #: Through time (traced recurrent layers, :func:`through_time_evidence`).
    time_steps: int | None = None
    bptt_steps: int | None = None
    state_grad_layer: int | None = None
    state_grad_ratio_first_epoch: float | None = None
    state_grad_ratio: float | None = None
    state_grad_ratio_max: float | None = None
    state_grad_layer_max: int | None = None
    #: How the run ended, and how many spikes a SpikeGuard caught (None: no guard watched).
    status: str | None = None
    spikes: int | None = None
    #: The largest window median of the fraction of saturated predictions (every probability
    #: within ε of 0 or 1), over the
    #: windows whose median loss is above ln 2 (None: no such window, or no probability output).
    output_saturated: float | None = None
    #: Preflight only: the output's logits at initialization, and the bound they exceed.
    output_logit_median_abs: float | None = None
    output_logit_bound: float | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


@dataclass
class Diagnosis:
    verdict: str
    evidence: Evidence
    explanation: str
    remedies: list[str] = field(default_factory=list)
    layers: list[LayerFinding] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def layer_table(self) -> pd.DataFrame:
        """One row per numbered layer: its path, block, verdict and numbers."""
        return pd.DataFrame([{"layer": f.layer, "path": f.path, "block": f.block,
                              "verdict": f.verdict, **f.numbers} for f in self.layers])

    def __str__(self) -> str:
        lines = [f"verdict: {self.verdict}", self.explanation]
        if self.remedies:
            lines.append("what usually helps:")
            lines += [f"  - {remedy}" for remedy in self.remedies]
        return "\n".join(lines)


# --- numbers ------------------------------------------------------------------------------------

def _finite(values) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array[np.isfinite(array)]


def _median(values) -> float | None:
    finite = _finite(values)
    return float(np.median(finite)) if finite.size else None


def _number(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def judging_windows(metrics: pd.DataFrame) -> pd.Series:
    """The windows a median is taken over: each epoch's logged steps; or, when epochs log fewer
    than FIRST_STEPS steps (full-batch training logs one), runs of FIRST_STEPS consecutive
    logged steps, so that no single step decides (a kernel that starts at zero changes by about
    its own norm at its second step, and the layers before it get exactly 0 at its first)."""
    epochs = metrics["epoch"]
    if len(metrics) == 0 or metrics.groupby("epoch").size().median() >= FIRST_STEPS:
        return epochs
    return pd.Series(np.arange(len(metrics)) // FIRST_STEPS, index=metrics.index)


def _max_epoch_median(values: pd.Series, epochs: pd.Series) -> float | None:
    """The largest per-epoch median of the finite values (one spike does not decide)."""
    medians = values.replace([np.inf, -np.inf], np.nan).groupby(epochs).median()
    return _number(medians.max()) if medians.notna().any() else None


def judged_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows a verdict is built on: every logged step but those the loss scaler skipped."""
    if "skipped" in metrics:
        return metrics[metrics["skipped"].fillna(0) == 0]
    return metrics


#: What a spike guard did to a step that left no update: those steps are not the net's.
NOT_APPLIED = ("skipped", "rolled_back", "stopped")


def without_spikes(metrics: pd.DataFrame, spikes: pd.DataFrame | None) -> pd.DataFrame:
    """The rows but those of the spikes a :class:`gradtools.SpikeGuard` caught and did not
    apply: a bad batch left out says something about the data, not about how the gradient
    flows through the net (the spikes are reported beside the verdict). A spike that was
    applied, clipped or not (``warned``, ``clipped``, ``lowered_lr``), stays: the net trained
    on it, and a real explosion must not be hidden by a guard that only watched it."""
    if spikes is None or spikes.empty:
        return metrics
    left_out = spikes.loc[spikes["action"].isin(NOT_APPLIED), "step"]
    return metrics[~metrics["step"].isin(left_out)]


def first_nonfinite_step(metrics: pd.DataFrame) -> int | None:
    """The first judged step whose loss or gradient statistics are NaN/Inf."""
    rows = judged_rows(metrics)
    columns = [c for c in rows.columns if c not in ("step", "epoch", "batch", *LOSS_SCALE_COLUMNS)
               and c.rsplit("/", 1)[-1] not in OPTIMIZER_STATE_COLUMNS]
    bad = ~np.isfinite(rows[columns].to_numpy(dtype=float)).all(axis=1)
    return int(rows["step"][bad].iloc[0]) if bad.any() else None


def _grad_growth(metrics: pd.DataFrame) -> float | None:
    norms = _finite(metrics["grad_global_norm"])
    if not norms.size:
        return None
    early = np.median(norms[:FIRST_STEPS])
    return _number(norms.max() / early) if early > 0 else None


def _weight_growth(metrics: pd.DataFrame, k: int) -> float | None:
    weights = _finite(metrics[layer_column(k, "weight_norm")])
    return _number(weights.max() / weights[0]) if weights.size and weights[0] > 0 else None


def _zero_fraction(values: pd.Series) -> float | None:
    return float((values == 0).mean()) if len(values) else None


def _block_zero_fractions(metrics: pd.DataFrame, ks, blocks) -> dict[str, dict[str, float | None]]:
    """For each block, the fraction of steps (of the first epoch; of the run) at which every
    kernel of the block got a gradient of exactly 0."""
    windows = judging_windows(metrics)
    in_first_epoch = windows == windows.min()
    fractions = {}
    for block in dict.fromkeys(blocks):
        norms = metrics[[layer_column(k, "grad_norm") for k, b in zip(ks, blocks) if b == block]]
        largest = norms.max(axis=1, skipna=False)  # NaN where any is NaN: not zero
        fractions[block] = {"block_zero_gradient_first_epoch": _zero_fraction(largest[in_first_epoch]),
                            "block_zero_gradient": _zero_fraction(largest)}
    return fractions


def _layer_numbers(metrics: pd.DataFrame, k: int, sensitivities: pd.DataFrame) -> dict[str, float | None]:
    """Every per-layer number except the depth ratios (which need the other blocks)."""
    epochs = judging_windows(metrics)
    in_first_epoch = epochs == epochs.min()
    first_epoch = metrics[in_first_epoch]
    grad, weight = metrics[layer_column(k, "grad_norm")], metrics[layer_column(k, "weight_norm")]
    return {
        "sensitivity_first_epoch": _median(sensitivities.loc[in_first_epoch, layer_name(k)]),
        "sensitivity": _median(sensitivities[layer_name(k)]),
        "zero_gradient_first_epoch": _zero_fraction(first_epoch[layer_column(k, "grad_norm")]),
        "zero_gradient": _zero_fraction(grad),
        "grad_to_weight": _max_epoch_median(grad / weight, epochs),
        "update_ratio": _max_epoch_median(metrics[layer_column(k, "update_ratio")], epochs),
        "weight_growth": _weight_growth(metrics, k),
    }


def _later_blocks(blocks: list[str], downstream: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each block's later blocks: those downstream of it (``History.block_downstream``), or,
    where that is unknown, every block listed after it."""
    order = list(dict.fromkeys(blocks))
    return {block: downstream[block] if block in downstream else order[i + 1:] for i, block in enumerate(order)}


def _block_ratios(numbers: list[dict], blocks: list[str], later: dict[str, list[str]],
                  key: str) -> dict[str, float | None]:
    """For each block with later blocks: the strongest ``key`` of it and of the blocks before
    it (upstream: the gradient reached at least that far back) over the strongest of the
    blocks after it. A weak side branch (a squeeze-and-excitation gate) behind a strong block
    is not a depth the gradient failed to reach."""
    strongest = {}
    for block in later:
        values = [n[key] for n, b in zip(numbers, blocks) if b == block and n[key] is not None]
        strongest[block] = max(values) if values else None
    ratios = {}
    for block, after in later.items():
        before = [b for b, its_later in later.items() if block in its_later]
        reached = [strongest[b] for b in [block, *before] if strongest.get(b) is not None]
        values = [strongest[b] for b in after if strongest.get(b) is not None]
        ratios[block] = (_number(max(reached) / max(values))
                         if strongest[block] is not None and values and max(values) > 0 else None)
    return ratios


# --- judging layers -----------------------------------------------------------------------------

def _strongest_after(numbers, blocks, later: list[str], key: str) -> str | None:
    candidates = [(n[key], b) for n, b in zip(numbers, blocks) if b in later and n[key] is not None]
    return max(candidates)[1] if candidates else None


def layer_findings(metrics: pd.DataFrame, paths, blocks, downstream=None,
                   wording: Wording = TRAINED) -> list[LayerFinding]:
    """Every numbered layer judged on its own numbers and its block's depth ratio (against the
    blocks ``downstream`` of it: ``History.block_downstream``; unknown: the blocks listed after it)."""
    ks = layer_numbers(metrics)
    paths = list(paths) if paths and len(paths) == len(ks) else [""] * len(ks)
    known = blocks and len(blocks) == len(ks)
    blocks = list(blocks) if known else [layer_name(k) for k in ks]
    later = _later_blocks(blocks, (downstream or {}) if known else {})
    sensitivities = sensitivity_table(metrics)
    numbers = [_layer_numbers(metrics, k, sensitivities) for k in ks]
    ratios = {key: _block_ratios(numbers, blocks, later, source) for key, source in (
        ("depth_ratio_first_epoch", "sensitivity_first_epoch"), ("depth_ratio", "sensitivity"))}
    zero_fractions = _block_zero_fractions(metrics, ks, blocks)
    findings = []
    for k, path, block, n in zip(ks, paths, blocks, numbers):
        n = {**n, **{key: ratios[key].get(block) for key in ratios}, **zero_fractions[block]}
        context = {key: {"after": _strongest_after(numbers, blocks, later[block], source)} for key, source in (
            ("depth_ratio_first_epoch", "sensitivity_first_epoch"), ("depth_ratio", "sensitivity"))}
        exploding = reasons("exploding", "layer", n, context, wording)
        vanishing = reasons("vanishing", "layer", n, context, wording)
        verdict = "exploding" if exploding else "vanishing" if vanishing else "healthy"
        findings.append(LayerFinding(k, path, block, verdict, n, exploding or vanishing))
    return findings


# --- through time -------------------------------------------------------------------------------

def through_time_evidence(state_gradients: pd.DataFrame | None) -> dict:
    """For the traced recurrent layers: T, the steps the gradient may reach (``bptt_steps``),
    and ‖∂L/∂h_first‖ / ‖∂L/∂h_T‖ over those steps, in the first epoch and as the median over
    epochs, for the layer where it is smallest and where it is largest; {} without any."""
    if state_gradients is None or state_gradients.empty:
        return {}
    per_layer = []
    for k in state_gradient_layers(state_gradients):
        curves = np.stack([state_gradient_curve(state_gradients, k, int(e))
                           for e in state_gradients["epoch"]])
        reach = _bptt_steps(state_gradients, k, curves.shape[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = curves[:, -reach] / curves[:, -1]
        median = np.nanmedian(ratios) if np.isfinite(ratios).any() else np.nan
        per_layer.append((k, curves.shape[1], reach, ratios[0], median))
    low = min(per_layer, key=lambda item: np.nan_to_num(item[4], nan=np.inf))
    high = max(per_layer, key=lambda item: np.nan_to_num(item[4], nan=-np.inf))
    return {
        "time_steps": int(low[1]),
        "bptt_steps": int(low[2]),
        "state_grad_layer": int(low[0]),
        "state_grad_ratio_first_epoch": _number(low[3]),
        "state_grad_ratio": _number(low[4]),
        "state_grad_ratio_max": _number(high[4]),
        "state_grad_layer_max": int(high[0]),
    }


def _bptt_steps(state_gradients: pd.DataFrame, k: int, time_steps: int) -> int:
    column = bptt_steps_column(k)
    if column in state_gradients and state_gradients[column].notna().any():
        return int(min(state_gradients[column].dropna().iloc[0], time_steps))
    return time_steps  # tables written before the setting was recorded


def _run_context(e: Evidence, label) -> dict:
    """The names the run's reasons use beside their value: through time, the layer and the
    span; through depth, the number of blocks."""
    context = {"depth_growth": {"blocks": e.blocks}}
    if e.time_steps is None:
        return context
    span = (f"over the last {e.bptt_steps} of {e.time_steps} steps (truncated backpropagation)"
            if e.bptt_steps < e.time_steps else f"T = {e.time_steps}")
    return {**context, "state_grad_ratio": {"label": label(e.state_grad_layer), "span": span},
            "state_grad_ratio_max": {"label": label(e.state_grad_layer_max), "span": span}}


# --- the run ------------------------------------------------------------------------------------

def run_evidence(metrics: pd.DataFrame) -> Evidence:
    """The run-level numbers: non-finite steps, skipped steps, loss size and progress, growth."""
    judged = judged_rows(metrics)
    epoch_loss = judged.groupby("epoch")["loss"].mean()
    ends = epoch_loss.iloc[[0, -1]] if len(epoch_loss) else epoch_loss
    improvement = ((ends.iloc[0] - ends.iloc[1]) / abs(ends.iloc[0])
                   if len(epoch_loss) >= 2 and np.isfinite(ends).all() and ends.iloc[0] else None)
    losses = _finite(judged["loss"])
    swings = np.abs(np.diff(losses)) / np.maximum(np.abs(losses[:-1]), 1e-12) if losses.size > 1 else []
    return Evidence(
        layers=len(layer_numbers(metrics)),
        first_nonfinite_statistic_step=first_nonfinite_step(metrics),
        skipped_steps=int((metrics["skipped"] > 0).sum()) if "skipped" in metrics else 0,
        loss_epoch_median_max=_max_epoch_median(judged["loss"], judging_windows(judged)),
        grad_norm_growth=_grad_growth(judged),
        loss_improvement=_number(improvement) if improvement is not None else None,
        median_loss_swing=_number(np.median(swings)) if len(swings) else None,
        output_saturated=_output_saturated(judged),
    )


def _output_saturated(metrics: pd.DataFrame) -> float | None:
    """The largest window median of :data:`OUTPUT_COLUMN` over the windows whose median loss is
    above :data:`UNLEARNED_LOSS` (a net confidently right has saturated outputs and a loss near 0)."""
    if OUTPUT_COLUMN not in metrics:
        return None
    windows = judging_windows(metrics)
    medians = metrics[[OUTPUT_COLUMN, "loss"]].replace([np.inf, -np.inf], np.nan).groupby(windows).median()
    unlearned = medians.loc[medians["loss"] > UNLEARNED_LOSS, OUTPUT_COLUMN].dropna()
    return _number(unlearned.max()) if len(unlearned) else None


def _named(findings: list[LayerFinding]) -> str:
    shown = "; ".join(f"{f.label}: {', '.join(f.reasons)}" for f in findings[:NAMED_LAYERS])
    more = len(findings) - NAMED_LAYERS
    return shown + (f"; and {more} more layer{'s' if more > 1 else ''}" if more > 0 else "")


def _depth_summary(e: Evidence) -> str:
    if e.weakest_block is None:
        return ("one block, so no depth to compare" if e.blocks < 2
                else "no block's sensitivity could be compared")
    return (f"the weakest block ({e.weakest_block}) gets {e.weakest_depth_ratio:.3g}× the "
            f"gradient sensitivity of the strongest block after it (threshold {VANISHING_RATIO:g})")


def _weakest(findings: list[LayerFinding]) -> tuple[str | None, float | None]:
    ratios = [(min(r for r in (f.numbers["depth_ratio_first_epoch"], f.numbers["depth_ratio"])
                   if r is not None), f.block) for f in findings
              if f.numbers["depth_ratio_first_epoch"] is not None or f.numbers["depth_ratio"] is not None]
    if not ratios:
        return None, None
    ratio, block = min(ratios)
    return block, ratio


def diagnose(source) -> Diagnosis:
    """Diagnose a :class:`gradtools.History` (from ``gradtools.fit``, ``GradientMonitor.history()``
    or ``History.from_run_dir``), a run directory, or a metrics DataFrame."""
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    if isinstance(source, (str, Path)):
        source = History.from_run_dir(source)
    history = source if isinstance(source, History) else History(metrics=source, status=COMPLETED)
    metrics = history.metrics
    if metrics.empty:
        raise RunDirectoryError(f"{where}no logged steps to diagnose (the run stopped before its "
                                "first epoch ended, or its metrics table is empty)")
    diagnosis = judge(history)
    if history.unfinished:
        diagnosis.explanation += (f" This run did not finish: its run directory still says "
                                  f"'running' after {history.epochs_completed} complete epochs (the "
                                  "process was killed, or is still training); the verdict covers "
                                  "the steps logged so far.")
    diagnosis.evidence.status = history.status
    if history.spikes is not None:
        diagnosis.evidence.spikes = len(history.spikes)
        if not history.spikes.empty:
            diagnosis.explanation += " " + spikes_sentence(history.spikes)
    return diagnosis


def judge(history: History, wording: Wording = TRAINED) -> Diagnosis:
    """:func:`diagnose` of a History with rows, its explanation worded by ``wording``."""
    metrics = without_spikes(history.metrics, history.spikes)
    e = run_evidence(metrics)
    findings = layer_findings(judged_rows(metrics), history.layer_paths, history.layer_blocks,
                              history.block_downstream, wording)
    weakest_block, weakest_ratio = _weakest(findings)
    e = replace(e, blocks=len({f.block for f in findings}), weakest_block=weakest_block,
                weakest_depth_ratio=weakest_ratio, depth_growth=_depth_growth(findings),
                **through_time_evidence(history.state_gradients))
    context = _run_context(e, lambda k: layer_label(k, history.layer_paths))
    numbers = e.to_dict()

    exploding_layers = [f for f in findings if f.verdict == "exploding"]
    exploding = (reasons("exploding", "run", numbers, context, wording)
                 + ([_named(exploding_layers)] if exploding_layers else []))
    if exploding:
        return Diagnosis("exploding", e, "Exploding gradients: " + "; ".join(exploding) + ".",
                         REMEDIES["exploding"], findings)
    vanishing_layers = [f for f in findings if f.verdict == "vanishing"]
    time_vanishing = reasons("vanishing", "run", numbers, context, wording)
    if vanishing_layers or time_vanishing:
        text = "; ".join(([_named(vanishing_layers)] if vanishing_layers else []) + time_vanishing)
        return Diagnosis("vanishing", e, "Vanishing gradients: " + text + "." + _vanishing_tail(e, vanishing_layers),
                         REMEDIES["vanishing"], findings)
    return Diagnosis("healthy", e, _healthy_text(e, findings, wording) + _still_kernels_note(findings), [], findings)


def _depth_growth(findings: list[LayerFinding]) -> float | None:
    """How many times the gradient sensitivity grows from the last block to the first, by the
    least-squares trend of its logarithm over the blocks in the order their kernels come
    (each block's strongest kernel, first window; blocks whose sensitivity is 0 or unknown
    left out): above 1 it grows toward the input. None with fewer than three blocks."""
    strongest: dict[str, float] = {}
    for finding in findings:
        value = finding.numbers["sensitivity_first_epoch"]
        if value is not None and value > 0:
            strongest[finding.block] = max(value, strongest.get(finding.block, 0.0))
    if len(strongest) < 3:
        return None
    slope = np.polyfit(np.arange(len(strongest)), np.log10(list(strongest.values())), 1)[0]
    return _number(10 ** (-slope * (len(strongest) - 1)))


def _vanishing_tail(e: Evidence, vanishing_layers: list[LayerFinding]) -> str:
    tail = " The loss stalled." if (e.loss_improvement is not None
                                    and e.loss_improvement < STALLED_LOSS_IMPROVEMENT) else ""
    recovered = [f for f in vanishing_layers
                 if f.numbers["depth_ratio"] is not None and f.numbers["depth_ratio"] >= VANISHING_RATIO]
    if vanishing_layers and len(recovered) == len(vanishing_layers):
        lowest = min(f.numbers["depth_ratio"] for f in recovered)
        tail += (f" Over the whole run the ratio recovers ({lowest:.3g}): the early layers "
                 "learned late.")
    return tail


def _still_kernels_note(findings: list[LayerFinding]) -> str:
    """Kernels that get exactly 0 at most steps inside blocks that get a gradient elsewhere:
    not a verdict (see the module's docstring), but they do not learn."""
    still = [f.label for f in findings if max(f.numbers["zero_gradient_first_epoch"] or 0,
                                              f.numbers["zero_gradient"] or 0) > DEAD_FRACTION]
    if not still:
        return ""
    return (f" These kernels get a gradient of exactly 0 at most steps, while their block gets one "
            f"elsewhere, so they do not learn: {', '.join(still[:NAMED_LAYERS])}"
            + (f" and {len(still) - NAMED_LAYERS} more" if len(still) > NAMED_LAYERS else "")
            + " (attention over a single key gives its query and key projections none; dead units "
            "inside a layer made of layers do the same).")


def _healthy_text(e: Evidence, findings: list[LayerFinding], wording: Wording) -> str:
    largest_update = max((f.numbers["update_ratio"] or 0 for f in findings), default=0)
    growth = e.grad_norm_growth
    text = (f"No sign of exploding or vanishing gradients: {_depth_summary(e)}; no layer's "
            f"weights change by more than {largest_update:.3g}× their norm per {wording.unit} "
            f"({wording.median}); gradient norm growth {growth if growth is not None else float('nan'):.3g}×")
    if e.state_grad_ratio is not None:
        reach = ("" if e.bptt_steps == e.time_steps else
                 f" over the last {e.bptt_steps} of {e.time_steps} steps (truncated "
                 "backpropagation)")
        text += (f"; through time, ‖∂L/∂h_first‖ is {e.state_grad_ratio:.3g}× ‖∂L/∂h_T‖ "
                 f"(median over epochs{reach})")
    return text + "."
