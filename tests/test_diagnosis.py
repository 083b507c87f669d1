"""gradtools.diagnose on runs built to be vanishing, exploding (with and without NaN) and healthy."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from sklearn.datasets import make_moons

import gradtools
from conftest import REPO_ROOT, exploding_relu_setup
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
    assert diagnosis.evidence["first_to_last_grad_ratio"] < VANISHING_RATIO / 100  # about 4^-6
    assert diagnosis.evidence["first_to_last_update_ratio"] < VANISHING_RATIO
    assert any("ReLU" in remedy for remedy in diagnosis.remedies)


def test_large_relu_weights_on_large_targets_explode_with_nan():
    model, x, y = exploding_relu_setup()
    history = gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.01), epochs=10,
                            batch_size=8, seed=0)
    diagnosis = diagnose(history)
    assert diagnosis.verdict == "exploding"
    assert diagnosis.evidence["first_nonfinite_statistic_step"] <= history.first_nonfinite_step
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
    assert diagnosis.evidence["grad_norm_growth"] >= 1e3


def test_a_sensible_small_net_is_healthy():
    x, y = moons()
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
    history = gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer="adam", epochs=5, seed=2)
    diagnosis = diagnose(history)
    assert diagnosis.verdict == "healthy", diagnosis.explanation
    assert diagnosis.evidence["first_to_last_grad_ratio"] > VANISHING_RATIO
    assert diagnosis.evidence["loss_improvement"] > 0.1
    assert diagnosis.remedies == []


def test_run_json_and_the_command_line_carry_the_diagnosis(tmp_path):
    x, y = moons()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    gradtools.fit(model, x, y, loss="mse", optimizer="sgd", epochs=1, seed=0,
                  loggers=[LocalRunLogger(tmp_path / "run", name="toy")])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "gradtools", "diagnose", str(tmp_path / "run"), "--json"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["verdict"] == "healthy" and set(answer) >= {"verdict", "evidence", "explanation"}
    plain = subprocess.run([sys.executable, "-m", "gradtools", "diagnose", str(tmp_path)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "not a run directory" in plain.stderr


def test_the_suite_writes_the_diagnosis_into_run_json(tmp_path):
    from experiments.config import load_config
    from experiments.runner import run_experiment

    run = run_experiment(load_config("vanishing/sigmoid_baseline", ["training.epochs=2"]), tmp_path)
    info = json.loads((run.run_dir / "run.json").read_text())
    assert info["diagnosis"]["verdict"] == "vanishing"
    assert info["diagnosis"]["evidence"]["first_to_last_grad_ratio_first_epoch"] < VANISHING_RATIO
