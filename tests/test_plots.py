"""What the figures draw, read back from the matplotlib Figure: the heatmap's cells and layer
names, the line figures' labels, which figures a deep model gets."""

import numpy as np
import pandas as pd

from gradtools.columns import metric_columns
from gradtools.history import History
from gradtools.plots import plot_gradient_heatmap, plot_mean_gradient, run_figures


def synthetic_metrics(n_layers: int, steps: int = 6) -> pd.DataFrame:
    """A table whose layer k has gradient norm 10^-k and weight norm 2, loss 4: sensitivity
    ‖g‖·‖W‖/|L| = 10^-k / 2, and layer 2 is NaN at the last step."""
    rng = np.random.default_rng(0)
    columns = metric_columns(n_layers)
    table = pd.DataFrame(rng.uniform(0.1, 1.0, size=(steps, len(columns))), columns=columns)
    table["step"] = np.arange(1, steps + 1)
    table["epoch"] = (table["step"] - 1) // 3
    table["batch"] = (table["step"] - 1) % 3
    table["loss"] = 4.0
    for k in range(1, n_layers + 1):
        table[f"layer_{k}/grad_norm"] = 10.0 ** -k
        table[f"layer_{k}/weight_norm"] = 2.0
    table.loc[steps - 1, "layer_2/grad_norm"] = np.nan
    return table


def test_the_heatmap_shows_log_sensitivity_per_layer_and_names_layers_by_path():
    metrics = synthetic_metrics(3)
    paths = ["encoder/attention/query/kernel", "encoder/ffn/dense/kernel", "head/kernel"]
    figure = plot_gradient_heatmap(metrics, "toy", first_nonfinite_step=6, layer_paths=paths)
    ax = figure.axes[0]
    cells = ax.images[0].get_array()
    expected = np.log10([[10.0 ** -k / 2] * 6 for k in (1, 2, 3)])
    np.testing.assert_allclose(np.ma.filled(cells, np.nan)[:, :5], expected[:, :5], rtol=1e-6)
    assert np.ma.is_masked(cells[1, 5]) or np.isnan(cells[1, 5]), "a NaN step is a blank cell"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"layer_{k} ({p})" for k, p in enumerate(paths, start=1)]
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [6], "the divergence is marked"


def test_line_figures_name_layers_by_path():
    metrics = synthetic_metrics(2)
    figure = plot_mean_gradient(metrics, "toy", layer_paths=["dense/kernel", "head/kernel"])
    labels = [line.get_label() for line in figure.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert labels == ["layer_1 (dense/kernel)", "layer_2 (head/kernel)"]


def test_a_deep_model_gets_the_heatmap_instead_of_forty_lines():
    deep = History(metrics=synthetic_metrics(40), status="completed")
    shallow = History(metrics=synthetic_metrics(3), status="completed")
    assert "mean_gradient" not in run_figures(deep, "deep") and "gradient_heatmap" in run_figures(deep, "deep")
    assert {"mean_gradient", "gradient_heatmap"} <= set(run_figures(shallow, "shallow"))
    heatmap = run_figures(deep, "deep")["gradient_heatmap"]
    assert heatmap.axes[0].images[0].get_array().shape == (40, 6)
