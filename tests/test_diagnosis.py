"""gradtools.diagnose on runs built to be vanishing, exploding (with and without NaN) and healthy
(the article's nets are judged in test_report.py, on the report's runs; the gallery of real
architectures is in test_gallery.py)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO_ROOT, exploding_relu_setup
from sklearn.datasets import make_moons

import gradtools
from gradtools.columns import OUTPUT_COLUMN
from gradtools.diagnosis import VANISHING_RATIO, diagnose
from gradtools.loggers import LocalRunLogger


def moons():
    x, y = make_moons(512, noise=0.2, random_state=0)
    return x.astype(np.float32), y.astype(np.float32)


def test_deep_sigmoid_net_with_small_weights_is_vanishing():
    x, y = moons()
    keras.utils.set_random_seed(0)
    small = keras.initializers.RandomNormal(0.0, 0.1)
    model = keras.Sequential([keras.Input((2,))]
                             + [keras.layers.Dense(16, activation="sigmoid", kernel_initializer=small)
                                for _ in range(6)]
                             + [keras.layers.Dense(1, activation="sigmoid", kernel_initializer=small)])
    history = gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer="sgd", epochs=2, seed=0)
    diagnosis = diagnose(history)
    assert diagnosis.verdict == "vanishing"
    first, last = diagnosis.layers[0], diagnosis.layers[-1]
    assert first.verdict == "vanishing" and first.numbers["depth_ratio_first_epoch"] < VANISHING_RATIO / 100
    assert first.numbers["update_ratio"] < VANISHING_RATIO * last.numbers["update_ratio"], \
        "under SGD the first layer's weights barely move"
    assert first.path in diagnosis.explanation and first.path == history.layer_paths[0]
    assert any("ReLU" in remedy for remedy in diagnosis.remedies)


def test_a_deep_relu_net_with_tiny_weights_is_dead_and_vanishing():
    """16 ReLU layers with Var(w) = 0.1/fan_in: most steps give every kernel a gradient of
    exactly 0, so no sensitivity ratio exists; the layers are dead."""
    x, y = moons()
    keras.utils.set_random_seed(0)
    tiny = keras.initializers.VarianceScaling(0.1, mode="fan_in", distribution="uniform", seed=0)
    model = keras.Sequential([keras.Input((2,))]
                             + [keras.layers.Dense(10, activation="relu", kernel_initializer=tiny)
                                for _ in range(16)]
                             + [keras.layers.Dense(1, activation="sigmoid")])
    history = gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer="rmsprop", epochs=2, seed=0)
    diagnosis = diagnose(history)
    assert diagnosis.verdict == "vanishing", diagnosis.explanation
    assert (history.metrics["layer_1/grad_norm"] == 0).mean() > 0.5
    dead = [f for f in diagnosis.layers if (f.numbers["zero_gradient"] or 0) > 0.5]
    assert dead and dead[0].layer == 1 and "exactly 0" in diagnosis.explanation


def test_large_relu_weights_on_large_targets_explode_with_nan():
    model, x, y = exploding_relu_setup()
    history = gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.01), epochs=10,
                            batch_size=8, seed=0)
    diagnosis = diagnose(history)
    assert diagnosis.verdict == "exploding"
    assert diagnosis.evidence.first_nonfinite_statistic_step <= history.first_nonfinite_step
    assert "clip" in " ".join(diagnosis.remedies)


def test_a_too_large_learning_rate_explodes_before_any_nan():
    """Linear regression with SGD at lr 2 multiplies the weight error by about -3 a step."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 1)).astype(np.float32)
    y = (3 * x[:, 0]).astype(np.float32)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    history = gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(2.0), epochs=2,
                            batch_size=16, shuffle=False, seed=1)
    assert history.status == "completed", "no NaN: the growth alone must give the verdict"
    diagnosis = diagnose(history)
    assert diagnosis.verdict == "exploding"
    assert diagnosis.evidence.grad_norm_growth >= 1e3


def test_a_sensible_small_net_is_healthy():
    x, y = moons()
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
    history = gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer="adam", epochs=5, seed=2)
    diagnosis = diagnose(history)
    assert diagnosis.verdict == "healthy", diagnosis.explanation
    assert diagnosis.evidence.weakest_depth_ratio > VANISHING_RATIO
    assert all(f.verdict == "healthy" for f in diagnosis.layers)
    assert diagnosis.evidence.loss_improvement > 0.1
    assert diagnosis.remedies == []


def test_run_json_and_the_command_line_carry_the_diagnosis(tmp_path):
    x, y = moons()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    gradtools.fit(model, x, y, loss="mse", optimizer="sgd", epochs=1, seed=0,
                  loggers=[LocalRunLogger(tmp_path / "run", name="toy")], figures=False)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "gradtools", "diagnose", str(tmp_path / "run"), "--json"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["verdict"] == "healthy" and set(answer) >= {"verdict", "evidence", "explanation"}
    plain = subprocess.run([sys.executable, "-m", "gradtools", "diagnose", str(tmp_path)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "not a run directory" in plain.stderr


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_a_head_that_starts_at_zero_trained_full_batch_is_healthy(optimizer):
    """Full-batch training logs one step per epoch, so an epoch's median was one step: a
    kernel starting at zero changes by about its own norm at its second step (1.9× with
    momentum: 'exploding'), and the layer before it gets exactly 0 at the first ('vanishing').
    Medians are now over ten logged steps when epochs are shorter."""
    from gradtools import GradientMonitor

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 10)).astype("float32")
    y = (x @ rng.normal(size=10) > 0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid", kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9) if optimizer == "sgd_momentum" else "adam",
                  loss="binary_crossentropy")
    monitor = GradientMonitor(figures=False)
    losses = model.fit(x, y, epochs=40, batch_size=200, verbose=0, callbacks=[monitor]).history["loss"]
    metrics = monitor.metrics
    assert metrics["layer_1/grad_norm"].iloc[0] == 0 and metrics["layer_2/update_ratio"].iloc[1] > 0.9
    diagnosis = diagnose(monitor.history())
    assert diagnosis.verdict == "healthy", diagnosis.explanation
    assert losses[-1] < 0.95 * losses[0], losses


def test_a_too_large_learning_rate_trained_full_batch_still_explodes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 1)).astype(np.float32)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    history = gradtools.fit(model, x, 3 * x[:, 0], loss="mse", optimizer=keras.optimizers.SGD(2.0), epochs=12,
                            batch_size=256, shuffle=False, seed=1)
    assert history.status == "completed" and len(history.metrics) == 12
    diagnosis = diagnose(history)
    assert diagnosis.verdict == "exploding", diagnosis.explanation
    assert diagnosis.layers[0].numbers["update_ratio"] >= 1


@pytest.mark.parametrize("scale, verdict", [(30.0, "exploding"), (9.0, "healthy")])
def test_tanh_in_the_chaotic_phase_explodes_through_depth_when_trained(scale, verdict):
    """Ten tanh layers at σ_w² = 30 under SGD: the gradient sensitivity grows by orders of
    magnitude toward the input and the loss stays above a constant predictor's (ln 2); at
    σ_w² = 9 it grows by less than 10² and the net learns."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 16)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    keras.utils.set_random_seed(0)
    chaotic = keras.initializers.VarianceScaling(scale, seed=0)
    hidden = [keras.layers.Dense(32, activation="tanh", kernel_initializer=chaotic) for _ in range(10)]
    model = keras.Sequential([keras.Input((16,)), *hidden, keras.layers.Dense(1, activation="sigmoid")])
    history = gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer=keras.optimizers.SGD(0.01), epochs=5,
                            batch_size=32, seed=0, figures=False)
    diagnosis = diagnose(history)
    last_epoch_loss = history.metrics.groupby("epoch")["loss"].mean().iloc[-1]
    assert diagnosis.verdict == verdict, diagnosis.explanation
    if verdict == "exploding":
        assert diagnosis.evidence.depth_growth >= 100 and "through depth" in diagnosis.explanation
        assert last_epoch_loss > np.log(2)
    else:
        assert diagnosis.evidence.depth_growth < 100 and last_epoch_loss < 0.6


def test_outputs_beyond_the_losss_range_are_named_as_the_cause():
    """Twelve ReLU layers at VarianceScaling(30) under a sigmoid: logits about 10⁶, every
    probability within ε of 0 or 1, a loss of about 10⁶ that SGD at 1e-9 cannot move."""
    from experiments import zoo

    subject = zoo.relu12_scale30()
    monitor = gradtools.GradientMonitor(figures=False)
    subject.model.fit(subject.x, subject.y, batch_size=subject.batch_size, epochs=2, verbose=0, callbacks=[monitor])
    assert (monitor.metrics[OUTPUT_COLUMN] == 1.0).all()
    diagnosis = diagnose(monitor.history())
    assert diagnosis.verdict == "exploding"
    assert diagnosis.explanation.startswith("Exploding gradients: exploding activations at the output: 100%")
    assert diagnosis.evidence.output_saturated == 1.0


def test_a_net_confidently_right_is_not_an_output_beyond_range():
    """Logistic regression with a weight of 100 on separable data: every probability is within
    ε of 0 or 1, and right, so the loss is about 0: saturated, not exploding."""
    rng = np.random.default_rng(0)
    x = (rng.uniform(0.5, 1.0, size=(64, 1)) * rng.choice([-1.0, 1.0], size=(64, 1))).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid",
                                                                    kernel_initializer=keras.initializers.Constant(100.0))])
    model.compile(keras.optimizers.SGD(0.01), "binary_crossentropy")
    monitor = gradtools.GradientMonitor(figures=False)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert (monitor.metrics[OUTPUT_COLUMN] == 1.0).all() and (monitor.metrics["loss"] < 1e-6).all()
    diagnosis = diagnose(monitor.history())
    assert diagnosis.evidence.output_saturated is None
    assert "exploding activations at the output" not in diagnosis.explanation
    assert diagnosis.verdict != "exploding", diagnosis.explanation
