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


def test_the_mean_gradient_figure_samples_one_row_per_epoch_at_the_chosen_batch():
    metrics = synthetic_metrics(2, steps=9)  # 3 epochs of 3 batches
    metrics["layer_1/grad_mean"] = np.arange(9) * 0.1
    figure = plot_mean_gradient(metrics, "toy", sample_batch=2)
    line = figure.axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(line.get_ydata(), [0.2, 0.5, 0.8])  # batch 2 of each epoch
    assert "batch 2" in figure.axes[0].get_xlabel()


def test_first_vs_last_shows_magnitudes_on_a_log_scale_and_marks_the_divergence():
    from gradtools.plots import plot_first_vs_last

    metrics = synthetic_metrics(3)
    figure = plot_first_vs_last(metrics, "toy", first_nonfinite_step=4)
    top_left, top_right, bottom_left, bottom_right = figure.axes
    assert bottom_left.get_yscale() == "log" and top_left.get_yscale() == "linear"
    np.testing.assert_allclose(bottom_right.get_lines()[0].get_ydata(), metrics["layer_3/grad_abs_mean"])
    assert any(list(line.get_xdata()) == [4, 4] for line in bottom_left.get_lines())


def test_the_loss_figure_draws_the_epoch_means_on_a_log_scale_when_it_spans_decades():
    from gradtools.plots import plot_loss

    metrics = synthetic_metrics(1)
    metrics["loss"] = [1000.0, 100.0, 10.0, 1.0, 0.1, 0.01]
    ax = plot_loss(metrics, "toy").axes[0]
    epoch_mean = next(line for line in ax.get_lines() if line.get_label() == "epoch mean")
    np.testing.assert_allclose(epoch_mean.get_ydata(), [370.0, 0.37])
    assert ax.get_yscale() == "log"


def test_the_comparison_labels_each_run_and_the_seed_band_spans_the_seeds():
    from gradtools.plots import plot_comparison, plot_seed_band

    low, high = synthetic_metrics(2), synthetic_metrics(2)
    high["layer_1/grad_abs_mean"] = low["layer_1/grad_abs_mean"] * 1000
    ax = plot_comparison({"low": low, "high": high}, "layer_1/grad_abs_mean", "toy").axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["low", "high"]
    assert ax.get_yscale() == "log"
    left, right = plot_seed_band([low, high], "toy", sample_batch=0).axes[:2]
    band = right.collections[0].get_paths()[0].vertices[:, 1]
    per_epoch = [m.groupby("epoch")["layer_1/grad_abs_mean"].mean() for m in (low, high)]
    assert np.isclose(band.min(), min(s.min() for s in per_epoch))
    assert np.isclose(band.max(), max(s.max() for s in per_epoch))


def test_the_state_gradient_figure_draws_the_geometric_prediction():
    from gradtools.plots import plot_state_gradients
    from gradtools.recurrence import geometric_prediction, spectral_radius_column, state_column

    norms = 0.9 ** np.arange(9, -1, -1.0)  # ‖∂L/∂h_t‖, t = 1 … 10, a linear RNN at r = 0.9
    table = pd.DataFrame([{"epoch": 0, spectral_radius_column(1): 0.9,
                           **{state_column(1, t): v for t, v in enumerate(norms, start=1)}}])
    ax = plot_state_gradients(table, "toy").axes[0]
    measured, predicted = ax.get_lines()[:2]
    np.testing.assert_allclose(measured.get_ydata(), norms)
    np.testing.assert_allclose(predicted.get_ydata(), geometric_prediction(0.9, norms[-1], 10))
    assert ax.get_yscale() == "log"
