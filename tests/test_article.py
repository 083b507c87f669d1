"""The article's effects, measured by running its experiments with fewer epochs (without
figures: these tests read numbers; test_plots and test_cli test the figures).

Measured at 20 epochs, seeds 42/0/1 (see the README): sigmoid baseline layer-1/last-layer
grad_abs_mean ratio 0.11-0.15; ReLU 0.70-1.06; Adam 0.38-0.52.
"""

import pytest

from experiments.config import load_config
from experiments.runner import run_experiment
from gradtools.layer_ratios import first_to_last_ratio

EPOCHS = 20


def run(reference, out, *overrides):
    return run_experiment(load_config(reference, list(overrides)), out, figures=False)


def ratio(name, tmp_path, epochs=EPOCHS):
    result = run(name, tmp_path, f"training.epochs={epochs}")
    assert result.history.status == "completed"
    return first_to_last_ratio(result.history.metrics)


@pytest.fixture(scope="module")
def vanishing_ratios(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return {name: ratio(f"vanishing/{name}", out) for name in ("sigmoid_baseline", "relu", "adam")}


def test_sigmoid_layer_1_gets_a_small_fraction_of_the_last_layers_gradient(vanishing_ratios):
    assert vanishing_ratios["sigmoid_baseline"] < 0.2


@pytest.mark.parametrize("fix", ["relu", "adam"])
def test_relu_and_adam_raise_that_fraction_several_fold(vanishing_ratios, fix):
    assert vanishing_ratios[fix] >= 3 * vanishing_ratios["sigmoid_baseline"]


def test_exploding_baseline_diverges_within_the_first_epoch(tmp_path):
    result = run("exploding/relu_baseline", tmp_path, "training.epochs=3")
    assert result.history.status == "diverged"
    assert result.history.first_nonfinite_step <= 47  # 1500 examples / 32 = 47 steps per epoch
    assert result.history.epochs_completed == 0


@pytest.mark.parametrize("fix", ["grad_clipping", "glorot_tanh", "l2_regularization"])
def test_the_three_exploding_fixes_complete_with_finite_loss(tmp_path, fix):
    result = run(f"exploding/{fix}", tmp_path, f"training.epochs={EPOCHS}")
    assert result.history.status == "completed"
    assert result.history.first_nonfinite_step is None
    losses = result.history.metrics["loss"]
    assert losses.notna().all() and losses.iloc[-47:].mean() < losses.iloc[:47].mean()


def test_the_sources_suggested_threshold_delays_but_does_not_prevent_divergence(tmp_path):
    baseline = run("exploding/relu_baseline", tmp_path, "training.epochs=5")
    suggested = run("exploding/suggested_clipnorm", tmp_path, "training.epochs=5")
    threshold = suggested.config.training.clip_global_norm
    assert isinstance(threshold, float) and threshold > 1e6  # the probe itself explodes
    assert suggested.history.status == "diverged"
    assert suggested.history.first_nonfinite_step > 10 * baseline.history.first_nonfinite_step
    fixed = run("exploding/suggested_clipnorm", tmp_path, "training.epochs=5", "training.clip_global_norm=100.0")
    assert fixed.history.status == "completed"
