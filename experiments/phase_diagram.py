"""The gradient phase diagram: depth × initializer scale, per activation, from a sweep table.

Each cell is one run of the ``depth_init`` sweep; its colour is log10 of the layer-1 / last
layer ``grad_abs_mean`` ratio (blue: less gradient reaches layer 1, red: more; white: 1),
its mark is the diagnosis: V vanishing, E exploding, · healthy, ✕ failed. A third row shows
the size of the whole gradient at the first step (its global norm), which the ratio cannot:
in a ReLU net activations and back-propagated errors grow together with the weights' scale,
so the ratio stays near 1 while the gradient itself grows by orders of magnitude.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

from gradtools.mean_field import chi1, critical_sigma_w2, predicted_verdict

PHASE_SWEEP = "depth_init"
ACTIVATION, DEPTH, SCALE = "model.activation", "model.depth", "model.kernel_initializer.config.scale"
MARKS = {"vanishing": "V", "exploding": "E", "healthy": "·"}
COLOUR_DECADES = 4.0

#: Where the article's networks sit, in the sweep's coordinates (Var(w) = scale / fan_in).
#: vanSigBaseline: 3 sigmoid layers, U(−1, 1) has variance 1/3, on 10 inputs: scale 10/3.
#: expReluBaseline: 1 ReLU layer, U(4, 5) has second moment 20.3, on 15 inputs: scale ≈ 305
#: (and regression data): off this map, drawn at its right edge.
ARTICLE_NETS = {
    "sigmoid": ("article's vanishing net", 3, 10 / 3),
    "relu": ("article's exploding net (scale ≈ 305)", 1, 305.0),
}


def _grid(table: pd.DataFrame, activation: str, column: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = table[table[ACTIVATION] == activation]
    values = rows.pivot_table(index=DEPTH, columns=SCALE, values=column, aggfunc="first")
    verdicts = rows.pivot_table(index=DEPTH, columns=SCALE, values="verdict", aggfunc="first")
    status = rows.pivot_table(index=DEPTH, columns=SCALE, values="status", aggfunc="first")
    verdicts = verdicts.where(status.isin(["completed", "diverged"]), "failed")
    return values, verdicts


def _log10(values) -> np.ndarray:
    """log10 of positive finite values; NaN (a blank cell) for 0 (underflow), inf or NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.asarray(values, dtype=float))
    return np.where(np.isfinite(logs), logs, np.nan)


def _heatmap(ax, values: pd.DataFrame, verdicts: pd.DataFrame | None, norm, title: str,
             cmap: str = "RdBu_r"):
    logs = _log10(values.to_numpy(dtype=float))
    image = ax.imshow(logs, cmap=cmap, norm=norm, origin="lower", aspect="auto")
    ax.set_xticks(range(values.shape[1]), [f"{s:g}" for s in values.columns])
    ax.set_yticks(range(values.shape[0]), [str(int(d)) for d in values.index])
    ax.set_xlabel("initializer scale (Var(w) = scale / fan_in)")
    ax.set_ylabel("hidden layers")
    ax.set_title(title, fontsize=10)
    if verdicts is not None:
        for i in range(verdicts.shape[0]):
            for j in range(verdicts.shape[1]):
                verdict = verdicts.iat[i, j]
                mark = MARKS.get(verdict, "✕") if isinstance(verdict, str) else ""
                ax.text(j, i, mark, ha="center", va="center", fontsize=9, fontweight="bold")
    return image


def theory_table(table: pd.DataFrame) -> pd.DataFrame:
    """Each cell's trained verdict beside mean-field theory's (:mod:`gradtools.mean_field`:
    χ₁ at the cell's σ_w² = scale, σ_b² = 0, over its depth) and χ₁ itself."""
    cells = table[[ACTIVATION, DEPTH, SCALE, "verdict"]].copy()
    cells["chi1"] = [chi1(a, s) for a, s in zip(cells[ACTIVATION], cells[SCALE])]
    cells["theory"] = [predicted_verdict(activation, int(depth), scale)
                       for activation, depth, scale in zip(cells[ACTIVATION], cells[DEPTH], cells[SCALE])]
    return cells


def _mark_theory(ax, activation: str, values: pd.DataFrame) -> None:
    """The critical line χ₁ = 1 (dashed, where it falls inside the grid) and the depths where
    theory's gradient change reaches two decades (dotted: vanishing below-left, exploding
    above-right of them)."""
    scales, depths = values.columns.to_numpy(dtype=float), values.index.to_numpy(dtype=float)
    positions = np.arange(len(scales))
    critical = critical_sigma_w2(activation)
    if scales[0] <= critical <= scales[-1]:
        x = np.interp(np.log(critical), np.log(scales), positions)
        ax.axvline(x, color="black", linestyle="--", linewidth=1.2, label="χ₁ = 1 (mean field)")
    factors = np.array([chi1(activation, scale) for scale in scales])
    with np.errstate(divide="ignore"):
        reach = 4.0 / np.abs(np.log10(factors))  # depth where χ₁^(depth/2) is 10^±2
    rows = np.interp(reach, depths, np.arange(len(depths)), right=np.nan)
    ax.plot(positions, rows, color="black", linestyle=":", linewidth=1.2, label="two decades (mean field)")
    ax.legend(fontsize=7, loc="lower left")


def _mark_article_net(ax, activation: str, values: pd.DataFrame) -> None:
    if activation not in ARTICLE_NETS:
        return
    label, depth, scale = ARTICLE_NETS[activation]
    scales, depths = np.log(values.columns.to_numpy(dtype=float)), values.index.to_numpy(dtype=float)
    # positions between the cells, on the axes' log-scale / depth coordinates
    x = np.interp(np.log(scale), scales, np.arange(len(scales)), right=len(scales) - 0.5)
    y = np.interp(depth, depths, np.arange(len(depths)))
    ax.plot(x, y, marker="*", markersize=16, color="gold", markeredgecolor="black", zorder=5)
    ax.annotate(label, (x, y), xytext=(0, 12), textcoords="offset points", ha="center",
                fontsize=8, bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8})


def plot_phase_diagram(table: pd.DataFrame) -> Figure:
    """Top row: the ratio at the first step (initialization); middle row: over the last
    epoch, with the run's diagnosis on each cell; bottom row: log10 of the global gradient
    norm at the first step. Right column: the sigmoid ratio at the first step against depth,
    one line per scale, beside the bound 4^−depth (the lecture notes' chain-rule derivation:
    the sigmoid's slope is at most
    1/4, so with small weights each layer shrinks the gradient at least 4×); the verdicts
    counted; the last activation's gradient size against depth, one line per scale."""
    activations = [a for a in ("sigmoid", "tanh", "relu") if a in set(table[ACTIVATION])]
    logs = _log10(table[["ratio_first_step", "ratio_last_epoch"]].to_numpy(dtype=float))
    logs = logs[np.isfinite(logs)]
    # capped: one deep sigmoid corner reaches 1e-17 and would wash out every other contrast
    reach = min(COLOUR_DECADES, max(1.0, float(np.abs(logs).max()))) if logs.size else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-reach, vmax=reach)
    sizes = _log10(table["grad_norm_first_step"]) if "grad_norm_first_step" in table else np.array([])
    sizes = sizes[np.isfinite(sizes)]
    size_norm = Normalize(*(np.floor(sizes.min()), np.ceil(sizes.max())) if sizes.size else (0, 1))
    fig = Figure(figsize=(5.2 * len(activations) + 5, 13), layout="constrained")
    axes = fig.subplots(3, len(activations) + 1, squeeze=False)
    ratio_image = size_image = None
    for column, activation in enumerate(activations):
        first, _ = _grid(table, activation, "ratio_first_step")
        trained, verdicts = _grid(table, activation, "ratio_last_epoch")
        ratio_image = _heatmap(axes[0, column], first, None, norm, f"{activation}: at the first step")
        _heatmap(axes[1, column], trained, verdicts, norm,
                 f"{activation}: last epoch (V vanishing, E exploding, · healthy)")
        _mark_theory(axes[1, column], activation, trained)
        if sizes.size:
            size, _ = _grid(table, activation, "grad_norm_first_step")
            size_image = _heatmap(axes[2, column], size, None, size_norm,
                                  f"{activation}: gradient size at the first step", cmap="viridis")
        for row in (0, 1, 2):
            _mark_article_net(axes[row, column], activation, first)
    if ratio_image is not None:
        fig.colorbar(ratio_image, ax=axes[:2, : len(activations)], shrink=0.6, extend="both",
                     label=f"log10(layer-1 / last-layer grad_abs_mean), clipped at ±{reach:g}")
    if size_image is not None:
        fig.colorbar(size_image, ax=axes[2, : len(activations)], shrink=0.9,
                     label="log10(global gradient norm) at the first step")
    _plot_sigmoid_bound(axes[0, -1], table)
    _plot_verdict_counts(axes[1, -1], table, activations)
    _plot_gradient_size(axes[2, -1], table, activations[-1] if activations else "relu")
    fig.suptitle("Gradient phase diagram: where gradients vanish or explode")
    return fig


def _lines_per_scale(ax, rows: pd.DataFrame, column: str, label: str) -> None:
    """``column`` against depth on a log scale, one line per initializer scale."""
    for index, (scale, group) in enumerate(rows.groupby(SCALE)):
        group = group.sort_values(DEPTH)
        ax.plot(group[DEPTH], group[column], marker="o", color=f"C{index}", label=f"{label}{scale:g}")
    ax.set_yscale("log")
    ax.set_xlabel("hidden layers")


def _plot_sigmoid_bound(ax, table: pd.DataFrame) -> None:
    rows = table[(table[ACTIVATION] == "sigmoid") & (table[SCALE] <= 1.0)]
    _lines_per_scale(ax, rows, "ratio_first_step", "sigmoid, scale ")
    depths = np.sort(table[DEPTH].unique())
    ax.plot(depths, 4.0 ** -depths, color="black", linestyle="--", label="4^−depth (sigmoid' ≤ 1/4)")
    ax.set_ylabel("layer-1 / last grad_abs_mean at the first step")
    ax.set_title("sigmoid, small weights, vs 4^−depth", fontsize=10)
    ax.legend(fontsize=8)


def _plot_gradient_size(ax, table: pd.DataFrame, activation: str) -> None:
    if "grad_norm_first_step" not in table:
        ax.set_axis_off()
        return
    _lines_per_scale(ax, table[table[ACTIVATION] == activation], "grad_norm_first_step", "scale ")
    ax.set_ylabel("global gradient norm at the first step")
    ax.set_title(f"{activation}: gradient size against depth", fontsize=10)
    ax.legend(fontsize=8)


def _plot_verdict_counts(ax, table: pd.DataFrame, activations: list[str]) -> None:
    verdicts = table["verdict"].where(table["status"].isin(["completed", "diverged"]), "failed")
    counts = pd.crosstab(table[ACTIVATION], verdicts).reindex(activations).fillna(0)
    bottom = np.zeros(len(counts))
    colors = {"healthy": "#1b7a2e", "vanishing": "#a15c00", "exploding": "#b00020", "failed": "grey"}
    for verdict in [v for v in ("healthy", "vanishing", "exploding", "failed") if v in counts]:
        ax.bar(counts.index, counts[verdict], bottom=bottom, color=colors[verdict], label=verdict)
        bottom += counts[verdict].to_numpy()
    ax.set_ylabel("grid points")
    ax.set_title("diagnosis over the grid", fontsize=10)
    ax.legend(fontsize=8)


def write_phase_diagram(table: pd.DataFrame, figures: Path) -> Path:
    figures.mkdir(parents=True, exist_ok=True)
    target = figures / "phase_diagram.png"
    plot_phase_diagram(table).savefig(target, dpi=90)
    return target
