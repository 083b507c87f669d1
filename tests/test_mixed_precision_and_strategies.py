"""Mixed precision (a LossScaleOptimizer's scaled gradients and skipped steps) and a
MirroredStrategy over two logical CPU devices, for GradientMonitor and gradtools.fit."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO_ROOT

import gradtools
from gradtools.diagnosis import diagnose
from gradtools.monitor import GradientMonitor


@pytest.fixture
def mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] - x[:, 1] > 0).astype(np.float32)


def small_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.Dense(1, activation="sigmoid", dtype="float32")])


def tape_kernel_norms(model, x, y):
    """‖∂L/∂kernel‖ of the unscaled loss, computed independently of gradtools."""
    with tf.GradientTape() as tape:
        loss = keras.losses.binary_crossentropy(y[:, None], model(x, training=True))
        loss = tf.reduce_mean(loss)
    kernels = [v for v in model.trainable_weights if v.name == "kernel"]
    return [float(tf.norm(g)) for g in tape.gradient(loss, kernels)]


def test_the_monitor_records_unscaled_gradients_under_mixed_float16(mixed_precision):
    x, y = data()
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="binary_crossentropy")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])
    expected = tape_kernel_norms(model, x, y)
    row = monitor.metrics.iloc[-1]
    assert row["loss_scale"] == 2.0 ** 15 and row["skipped"] == 0
    for k, norm in enumerate(expected, start=1):  # not 32768 times larger
        assert row[f"layer_{k}/grad_norm"] == pytest.approx(norm, rel=1e-2)


def test_steps_the_loss_scaler_skips_are_recorded_not_a_divergence(mixed_precision):
    x, y = data()
    model = small_model()
    # 2^40 overflows float16 in the backward pass: the scaler halves it and skips the step
    # until the gradients fit.
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0 ** 40)
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    monitor = GradientMonitor(stop_on_nonfinite=True)
    model.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0, callbacks=[monitor])
    metrics = monitor.metrics
    skipped = metrics[metrics["skipped"] == 1]
    assert len(skipped) >= 10, "the first steps overflow"
    assert skipped["loss_scale"].tolist() == [2.0 ** (40 - i) for i in range(len(skipped))]
    assert skipped["step"].iloc[:10].tolist() == list(range(1, 11))
    assert metrics["step"].tolist() == list(range(1, 41)), "every train step, skipped or not"
    assert monitor.status == "completed" and monitor.first_nonfinite_step is None
    assert monitor.epochs_completed == 10, "a skipped step does not stop training"
    diagnosis = diagnose(monitor.history())
    assert diagnosis.verdict != "exploding", diagnosis.explanation
    assert diagnosis.evidence.skipped_steps == len(skipped)


def test_gradtools_fit_wraps_the_optimizer_under_a_mixed_policy(mixed_precision):
    """Batches of 48 and 16 (the last one filled up to 48 and masked): each row has the
    unscaled gradients of its own examples."""
    x, y = data()
    model = small_model()
    history = gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer=keras.optimizers.SGD(0.0),
                            epochs=1, batch_size=48, shuffle=False, seed=0)
    assert len(history.metrics) == 2
    for (_, row), batch in zip(history.metrics.iterrows(), (slice(0, 48), slice(48, 64))):
        assert row["loss_scale"] == 2.0 ** 15 and row["skipped"] == 0
        for k, norm in enumerate(tape_kernel_norms(model, x[batch], y[batch]), start=1):
            assert row[f"layer_{k}/grad_norm"] == pytest.approx(norm, rel=1e-2)
    assert history.status == "completed"


def guarded_mixed_fit(initial_scale, spoil):
    """A small regressor under mixed_float16 with a loss scaler starting at ``initial_scale``,
    trained one epoch (40 batches of 16, in order) on data ``spoil(x, y)`` changes, with a
    monitor and SpikeGuard("skip"): (monitor, guard, model)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(640, 8)).astype(np.float32)
    y = x.sum(axis=1).astype(np.float32)
    spoil(x, y)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01),
                                                                initial_scale=initial_scale), loss="mse")
    guard, monitor = gradtools.SpikeGuard("skip", verbose=False), GradientMonitor(figures=False)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, guard])
    return monitor, guard, model


def test_the_spike_guard_under_mixed_float16_skips_a_bad_batch_and_the_scaler_keeps_its_own(mixed_precision):
    """The guard sits inside the loss scaler: it gets the unscaled gradients of the steps the
    scaler applies; a float16 overflow stays the scaler's to skip, not a spike. (A small loss
    scale, so that this bad batch's scaled gradient fits in float16: at the default 2¹⁵ the
    scaler itself skips it.)"""
    def spoil(x, y):
        y[25 * 16:26 * 16] *= 1e3

    monitor, guard, model = guarded_mixed_fit(8.0, spoil)
    (event,) = guard.events.itertuples()
    metrics = monitor.metrics.set_index("step")
    assert event.step == 26 and event.action == "skipped"
    assert event.value == pytest.approx(metrics.loc[26, "grad_global_norm"], rel=1e-3)  # unscaled, as recorded
    assert metrics.loc[26, "layer_1/update_ratio"] == 0 and metrics.loc[26, "loss_scale"] == 8
    assert (metrics["skipped"] == 0).all()
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_the_spike_guard_counts_the_steps_the_loss_scaler_skips(mixed_precision):
    """A step whose scaled gradient overflows float16 is the scaler's to skip, not a spike; the
    guard's step numbers still count it, as the monitor's do."""
    def spoil(x, y):
        x[2 * 16:3 * 16] *= 1e4  # step 3 overflows float16 at a loss scale of 128
        y[25 * 16:26 * 16] *= 30  # step 26: a spike the guard sees

    monitor, guard, _ = guarded_mixed_fit(128.0, spoil)
    assert monitor.metrics.set_index("step").loc[3, "skipped"] == 1
    assert list(guard.events["step"]) == [26] and list(guard.events["batch"]) == [25]


def test_a_mirrored_strategy_gives_the_single_device_statistics():
    """Two logical CPU devices must be set up before TensorFlow starts: a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "mirrored_run.py")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    single, mirrored = runs["single"], runs["mirrored"]
    assert runs["replicas"] == 2
    assert "GradientMonitor" in runs["fit_under_strategy"], "gradtools.fit points to model.fit"
    assert "SpikeGuard runs on one device: under a distribution strategy with 2 replicas" in \
        runs["guard_under_strategy"]
    for source in ("monitor",):
        assert single[source].keys() == mirrored[source].keys()
        for column, values in single[source].items():
            np.testing.assert_allclose(mirrored[source][column], values, rtol=1e-4, atol=1e-7,
                                       err_msg=f"{source}: {column}")
