"""Figures of a run's gradient statistics, drawn from its metrics table.

Uses matplotlib's object API (``Figure``), so no pyplot state and no display are needed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from gradtools.columns import layer_column, layer_name, layer_numbers
from gradtools.history import History
from gradtools.layer_ratios import sensitivity_table
from gradtools.layers import layer_label
from gradtools.recurrence import (
    geometric_prediction,
    spectral_radius_column,
    state_gradient_curve,
    state_gradient_layers,
)


def _mark_divergence(ax, x_value, label: str) -> None:
    ax.axvline(x_value, color="red", linestyle="--", linewidth=1.2)
    ax.text(x_value, 0.98, f" {label}", color="red", transform=ax.get_xaxis_transform(),
            va="top", ha="left", fontsize=8)


def _spans_decades(values, decades: float = 2.0) -> bool:
    positive = np.asarray(values, dtype=float)
    positive = positive[np.isfinite(positive) & (positive > 0)]
    return positive.size > 1 and np.log10(positive.max() / positive.min()) >= decades


def sample_per_epoch(metrics: pd.DataFrame, batch: int) -> pd.DataFrame:
    """One row per epoch: ``batch`` if it was logged in that epoch, else the first logged
    batch after it, else the epoch's last logged row."""
    picked = []
    for _, rows in metrics.groupby("epoch", sort=True):
        at_or_after = rows[rows["batch"] >= batch]
        picked.append(at_or_after.iloc[0] if len(at_or_after) else rows.iloc[-1])
    return pd.DataFrame(picked).reset_index(drop=True)


def plot_mean_gradient(metrics: pd.DataFrame, title: str = "",
                       first_nonfinite_step: int | None = None, layer_paths=(),
                       sample_batch: int = 0) -> Figure:
    """The signed mean gradient of every layer's kernel, one point per epoch: the logged row
    at batch ``sample_batch`` of each epoch (see :func:`sample_per_epoch`).
    A run with fewer than two epochs is drawn at every logged step instead (x = step), so a
    run that diverged early still shows its curve. A divergence is marked in red."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    by_epoch = metrics["epoch"].nunique() >= 2
    data = sample_per_epoch(metrics, sample_batch) if by_epoch else metrics
    x_name = "epoch" if by_epoch else "step"
    for k in layer_numbers(metrics):
        ax.plot(data[x_name], data[layer_column(k, "grad_mean")], label=layer_label(k, layer_paths))
    if first_nonfinite_step is not None:
        where = metrics.loc[metrics["step"] == first_nonfinite_step, x_name]
        x_value = where.iloc[0] if len(where) else first_nonfinite_step
        _mark_divergence(ax, x_value, f"non-finite at step {first_nonfinite_step}")
    ax.set_title(f"Mean gradient {title}")
    ax.set_xlabel(f"{x_name} (batch {sample_batch} of each epoch)" if by_epoch else x_name)
    ax.set_ylabel("mean of kernel gradient")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    return fig


def plot_first_vs_last(metrics: pd.DataFrame, title: str = "",
                       first_nonfinite_step: int | None = None, layer_paths=()) -> Figure:
    """Layer 1 beside the last layer, at every logged step: the signed mean gradient on top
    and the mean absolute gradient below on a shared log scale (what
    shows vanishing: the signed mean cancels out, the magnitude does not)."""
    layers = layer_numbers(metrics)
    first, last = layers[0], layers[-1]
    fig = Figure(figsize=(11, 6), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, sharey="row")
    for column, k in enumerate((first, last)):
        axes[0, column].plot(metrics["step"], metrics[layer_column(k, "grad_mean")], linewidth=0.6)
        axes[0, column].axhline(0, color="grey", linewidth=0.5)
        axes[0, column].set_title(layer_label(k, layer_paths) + (" (first)" if k == first else " (last)"),
                                  fontsize=9)
        axes[1, column].plot(metrics["step"], metrics[layer_column(k, "grad_abs_mean")],
                             linewidth=0.6, color="tab:orange")
        axes[1, column].set_yscale("log")
        axes[1, column].set_xlabel("step")
        if first_nonfinite_step is not None:
            for row in (0, 1):
                _mark_divergence(axes[row, column], first_nonfinite_step, "non-finite")
    axes[0, 0].set_ylabel("grad_mean (signed)")
    axes[1, 0].set_ylabel("grad_abs_mean (log)")
    fig.suptitle(f"First vs last layer {title}")
    return fig


def plot_loss(metrics: pd.DataFrame, title: str = "", first_nonfinite_step: int | None = None,
              layer_paths=()) -> Figure:
    """The loss at every logged step, and its mean per epoch."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(metrics["step"], metrics["loss"], linewidth=0.5, alpha=0.5, label="step")
    per_epoch = metrics.groupby("epoch").agg(step=("step", "max"), loss=("loss", "mean"))
    if len(per_epoch) >= 2:
        ax.plot(per_epoch["step"], per_epoch["loss"], linewidth=1.5, label="epoch mean")
    if _spans_decades(metrics["loss"]):
        ax.set_yscale("log")
    if first_nonfinite_step is not None:
        _mark_divergence(ax, first_nonfinite_step, f"non-finite at step {first_nonfinite_step}")
    ax.set_title(f"Loss {title}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return fig


def _limit_to(ax, values, decades: float) -> None:
    """Log-scale y limits: the positive finite ``values`` widened by ``decades`` each way."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size:
        ax.set_ylim(positive.min() / 10**decades, positive.max() * 10**decades)


def plot_state_gradients(state_gradients: pd.DataFrame, title: str) -> Figure:
    """‖∂L/∂h_t‖ against the time step t on a log scale, for the first and the last epoch
    (mean over each epoch's steps), next to the geometric prediction ‖∂L/∂h_T‖·r^(T−t) for
    the recurrent kernel's spectral radius r at the start of training: the 0.9^30 vs 1.1^30
    picture, measured. LSTM/GRU kernels are not square, so they have no r and no prediction."""
    layers = state_gradient_layers(state_gradients)
    fig = Figure(figsize=(7 * len(layers), 5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(layers)))
    epochs = sorted({int(state_gradients["epoch"].min()), int(state_gradients["epoch"].max())})
    for ax, k in zip(axes, layers):
        measured = []
        for index, epoch in enumerate(epochs):
            color = f"C{index}"
            norms = state_gradient_curve(state_gradients, k, epoch)
            t = np.arange(1, norms.size + 1)
            shown = np.where(norms > 0, norms, np.nan)  # log scale; zero = no gradient flowed
            ax.plot(t, shown, color=color, linewidth=1.6, label=f"measured, epoch {epoch + 1}")
            radius = float(state_gradients.loc[state_gradients["epoch"] == epoch,
                                               spectral_radius_column(k)].iloc[0])
            measured.append(shown)
            # The prediction for the first epoch only: trained tanh units saturate, and then
            # r^(T−t) says nothing. Drawn on top: for a linear RNN it lies on the measurement.
            if index == 0 and np.isfinite(radius) and np.isfinite(norms[-1]) and norms[-1] > 0:
                ax.plot(t, geometric_prediction(radius, norms[-1], norms.size), color="black",
                        linestyle=(0, (2, 3)), linewidth=2, zorder=3,
                        label=f"‖∂L/∂h_T‖·r^(T−t), r = {radius:.3g} at the start")
        ax.set_yscale("log")
        _limit_to(ax, np.concatenate(measured), decades=2)
        ax.set_xlabel("time step t")
        ax.set_ylabel("‖∂L/∂h_t‖ (mean over the epoch's steps)")
        ax.set_title(f"Gradient through time {title}, layer_{k}", fontsize=10)
        ax.legend(fontsize=8)
    return fig


#: Above this many numbered layers, the per-layer line figure is left out: the heatmap shows them.
MAX_LAYER_LINES = 12


def plot_gradient_heatmap(metrics: pd.DataFrame, title: str = "",
                          first_nonfinite_step: int | None = None, layer_paths=()) -> Figure:
    """Where gradients die or blow up, at a glance: one row per numbered layer (first at the
    top), one column per logged step, coloured by log10 of the layer's sensitivity
    ‖g‖·‖W‖/|loss|. A healthy network is one colour from top to bottom; vanishing shows as
    rows that fade towards the input, exploding as a bright band."""
    values = np.log10(sensitivity_table(metrics).where(lambda t: t > 0)).to_numpy(dtype=float).T
    ks = layer_numbers(metrics)
    fig = Figure(figsize=(9, 1.6 + 0.32 * len(ks)), layout="constrained")
    ax = fig.add_subplot()
    steps = metrics["step"].to_numpy()
    finite = values[np.isfinite(values)]
    norm = Normalize(*(np.floor(finite.min()), np.ceil(finite.max()))) if finite.size else None
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="magma", norm=norm,
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, len(ks) - 0.5, -0.5))
    ax.set_yticks(range(len(ks)), [layer_label(k, layer_paths) for k in ks], fontsize=7)
    ax.set_xlabel("step")
    if first_nonfinite_step is not None:
        _mark_divergence(ax, first_nonfinite_step, f"non-finite at step {first_nonfinite_step}")
    fig.colorbar(image, ax=ax, label="log10 ‖g‖·‖W‖ / |loss|")
    ax.set_title(f"Gradient sensitivity per layer {title}")
    return fig


def run_figures(history: History, title: str = "", sample_batch: int = 0) -> dict[str, Figure]:
    """Every standard figure of one run, by file stem; ``sample_batch`` as in
    :func:`plot_mean_gradient`."""
    if history.metrics.empty:
        return {}
    args = (history.metrics, title, history.first_nonfinite_step, history.layer_paths)
    figures = {"gradient_heatmap": plot_gradient_heatmap(*args)}
    if len(layer_numbers(history.metrics)) <= MAX_LAYER_LINES:
        figures["mean_gradient"] = plot_mean_gradient(*args, sample_batch=sample_batch)
    figures["first_vs_last"] = plot_first_vs_last(*args)
    figures["loss"] = plot_loss(*args)
    states = history.state_gradients
    if states is not None and not states.empty and state_gradient_layers(states):
        figures["state_gradients"] = plot_state_gradients(states, title)
    if history.spikes is not None and not history.spikes.empty:
        figures["spikes"] = plot_spikes(history.metrics, history.spikes, title)
    if layer_column(1, "update_cosine") in history.metrics:
        figures["optimizer_state"] = plot_optimizer_state(history.metrics, title, history.layer_paths)
    return figures


#: The optimizer-state columns (:mod:`gradtools.optimizer_state`) and how each panel shows them.
_OPTIMIZER_PANELS = (("update_cosine", "cos(update, −gradient)", "linear"),
                     ("adam_m_norm", "‖m‖ (Adam's first moment)", "log"),
                     ("adam_v_norm", "‖v‖ (Adam's second moment)", "log"),
                     ("eps_dominated", "ε-dominated fraction", "linear"))


def plot_optimizer_state(metrics: pd.DataFrame, title: str = "", layer_paths=()) -> Figure:
    """Per layer, against the step: the cosine between the update and −g, and for the Adam
    family ‖m‖, ‖v‖ and the ε-dominated fraction (``optimizer_state=True``)."""
    panels = [panel for panel in _OPTIMIZER_PANELS if layer_column(1, panel[0]) in metrics]
    fig = Figure(figsize=(8, 2.6 * len(panels)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True))
    layers = layer_numbers(metrics)[:MAX_LAYER_LINES]
    for ax, (stat, label, scale) in zip(axes, panels):
        for k in layers:
            ax.plot(metrics["step"], metrics[layer_column(k, stat)], linewidth=1,
                    label=layer_label(k, list(layer_paths)))
        ax.set_yscale(scale)
        ax.set_ylabel(label, fontsize=9)
    axes[0].set_title(f"Optimizer state {title}".strip(), fontsize=10)
    axes[0].legend(fontsize=7, ncol=2)
    axes[-1].set_xlabel("step")
    return fig


def plot_spikes(metrics: pd.DataFrame, spikes: pd.DataFrame, title: str = "") -> Figure:
    """The loss and the global gradient norm at every logged step, the spikes a
    :class:`gradtools.SpikeGuard` caught marked on both (by the action taken), and the
    threshold each crossed."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    at_spikes = metrics.set_index("step").reindex(spikes["step"])
    for ax, column in zip(axes, ("loss", "grad_global_norm")):
        ax.plot(metrics["step"], metrics[column], linewidth=0.6, color="0.35", label=column)
        for action, group in spikes.groupby("action", sort=False):
            ax.scatter(group["step"], at_spikes.loc[group["step"], column], marker="x", s=36, zorder=3,
                       label=f"spike: {action}")
        crossed = spikes[spikes["quantity"] == column]
        if len(crossed):
            ax.scatter(crossed["step"], crossed["threshold"], marker="_", s=120, color="red", zorder=3,
                       label="threshold crossed")
        if _spans_decades(metrics[column]):
            ax.set_yscale("log")
        ax.set_ylabel(column)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("step")
    fig.suptitle(f"Spikes {title}".strip())
    return fig


def plot_signal_propagation(signal: pd.DataFrame, title: str = "") -> Figure:
    """The signal-propagation plot of :attr:`gradtools.preflight.Preflight.signal` (Brock et
    al. 2021): per block in depth order, the mean square of its output and its gradient
    sensitivity (log scales), and the fractions of saturated and dead units."""
    figure = Figure(figsize=(11, 3.6), layout="constrained")
    axes = figure.subplots(1, 3)
    depth = np.arange(len(signal))
    panels = [("mean_square", "output mean square", True), ("sensitivity", "gradient sensitivity ‖g‖·‖W‖/|L|", True),
              ("saturated", "saturated (sigmoid, tanh, softmax)", False)]
    for ax, (column, label, log) in zip(axes, panels):
        values = pd.to_numeric(signal.get(column, pd.Series(np.nan, index=signal.index)), errors="coerce")
        ax.plot(depth, values, marker="o", color="C0", label=label)
        if column == "saturated" and "dead" in signal:
            ax.plot(depth, pd.to_numeric(signal["dead"], errors="coerce"), marker="s", color="C3", label="dead ReLU")
        if log and (values > 0).any():
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("block (input → output)")
        ax.legend(fontsize=7)
    axes[2].set_ylim(-0.05, 1.05)
    figure.suptitle(title or "signal propagation at initialization")
    return figure


def plot_comparison(runs: Mapping[str, pd.DataFrame], stat: str, title: str, center: str = "mean") -> Figure:
    """``stat`` of several runs overlaid (x = step), labelled by the mapping's keys: every
    logged value faintly, and its rolling ``center`` (mean or median) over one epoch's worth
    of rows as a line; log scale when the values span two decades or more."""
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    every_value = []
    for index, (label, metrics) in enumerate(runs.items()):
        color = f"C{index % 10}"
        values = metrics[stat].astype(float)
        window = max(1, int(metrics.groupby("epoch").size().median()))
        ax.plot(metrics["step"], values, linewidth=0.4, alpha=0.2, color=color)
        rolling = values.rolling(window, min_periods=1)
        ax.plot(metrics["step"], rolling.median() if center == "median" else rolling.mean(), linewidth=1.6,
                color=color, label=label)
        every_value.append(values.to_numpy())
    if every_value and _spans_decades(np.concatenate(every_value)):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(f"step (line: {center} over one epoch of steps)")
    ax.set_ylabel(stat)
    ax.legend(fontsize=8)
    return fig


def _band(ax, frames: list[pd.DataFrame], x_name: str, column: str, label: str, color: str) -> None:
    table = pd.concat([f.set_index(x_name)[column].rename(i) for i, f in enumerate(frames)], axis=1)
    ax.plot(table.index, table.mean(axis=1), color=color, label=label, linewidth=1.4)
    ax.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=color, alpha=0.2)


def plot_seed_band(runs: list[pd.DataFrame], title: str, sample_batch: int = 0) -> Figure:
    """Several seeds of one experiment: per layer, the mean over seeds as a line and the
    min–max over seeds as a band. Left, the signed mean gradient at batch ``sample_batch`` of
    each epoch; right, the mean absolute gradient (per-epoch mean, log scale)."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    runs = [m.replace([np.inf, -np.inf], np.nan) for m in runs]  # a diverged step has no point
    sampled = [sample_per_epoch(m, sample_batch) for m in runs]
    per_epoch = [m.groupby("epoch").mean(numeric_only=True).reset_index() for m in runs]
    for index, k in enumerate(layer_numbers(runs[0])):
        color = f"C{index % 10}"
        _band(left, sampled, "epoch", layer_column(k, "grad_mean"), layer_name(k), color)
        _band(right, per_epoch, "epoch", layer_column(k, "grad_abs_mean"), layer_name(k), color)
    left.axhline(0, color="grey", linewidth=0.5)
    left.set_title(f"Mean gradient {title}: mean of {len(runs)} seeds, band min–max")
    left.set_xlabel(f"epoch (batch {sample_batch})")
    magnitudes = np.concatenate([f.filter(like="/grad_abs_mean").to_numpy(dtype=float).ravel()
                                 for f in per_epoch])
    if (np.isfinite(magnitudes) & (magnitudes > 0)).any():  # a run that diverged at once has none
        right.set_yscale("log")
    right.set_title("grad_abs_mean, epoch mean over steps")
    right.set_xlabel("epoch")
    left.legend(fontsize=8)
    return fig
