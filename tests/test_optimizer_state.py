"""Optimizer-state instruments (``optimizer_state=True``), checked against the optimizer's own
variables read after training and a GradientTape at the last step's weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_drawn_png

import gradtools
from gradtools.columns import layer_column
from gradtools.plots import run_figures

ROWS, BATCH = 64, 16


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0], np.float32))[:, None]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    return model, x, y


class _WeightsBeforeLastBatch(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if batch == ROWS // BATCH - 1:
            self.values = [v.numpy() for v in self.model.trainable_weights]


def _expected_last_step(model, optimizer, x, y, before) -> dict[str, float]:
    """From the optimizer's moments after training and a tape at the weights before the last
    step (the last batch: shuffle off), each layer's columns at the last step."""
    after = [v.numpy() for v in model.trainable_weights]
    for variable, value in zip(model.trainable_weights, before):
        variable.assign(value)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y[-BATCH:], model(x[-BATCH:], training=True))
    gradients = [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
    for variable, value in zip(model.trainable_weights, after):
        variable.assign(value)
    expected = {}
    kernels = [i for i, v in enumerate(model.trainable_weights) if v.name == "kernel"]
    for k, i in enumerate(kernels, start=1):
        change, g = (after[i] - before[i]).ravel(), gradients[i].ravel()
        expected[layer_column(k, "update_cosine")] = float(-change @ g / (np.linalg.norm(change) * np.linalg.norm(g)))
        index = optimizer._get_variable_index(model.trainable_weights[i])  # noqa: SLF001
        m, v = optimizer._momentums[index].numpy(), optimizer._velocities[index].numpy()  # noqa: SLF001
        expected[layer_column(k, "adam_m_norm")] = float(np.linalg.norm(m))
        expected[layer_column(k, "adam_v_norm")] = float(np.linalg.norm(v))
        expected[layer_column(k, "eps_dominated")] = float(np.mean(np.sqrt(_denominator(optimizer, index, v))
                                                                   < optimizer.epsilon))
    return expected


def _denominator(optimizer, index, v):
    """What Keras's update divides by, less ε, squared: Adam's and AdamW's v (its running
    maximum with amsgrad), Nadam's v / (1 − β₂ᵗ) (keras/src/optimizers/adam.py, nadam.py)."""
    if isinstance(optimizer, keras.optimizers.Nadam):
        return v / (1 - optimizer.beta_2 ** int(optimizer.iterations.numpy()))
    if optimizer.amsgrad:
        return optimizer._velocity_hats[index].numpy()  # noqa: SLF001
    return v


OPTIMIZERS = {"adam": lambda: keras.optimizers.Adam(0.01, epsilon=0.05),
              "adamw_amsgrad": lambda: keras.optimizers.AdamW(0.01, epsilon=0.05, amsgrad=True),
              "nadam": lambda: keras.optimizers.Nadam(0.01, epsilon=0.05)}


@pytest.mark.parametrize(("trainer", "name"), [("model.fit", "adam"), ("gradtools.fit", "adam"),
                                             ("model.fit", "adamw_amsgrad"), ("model.fit", "nadam")])
def test_adams_moments_and_the_update_direction_match_the_optimizer_and_a_tape(trainer, name):
    """ε = 0.05 is large enough that part of each kernel's steps are ε-dominated."""
    model, x, y = _problem()
    optimizer = OPTIMIZERS[name]()
    last = _WeightsBeforeLastBatch()
    if trainer == "model.fit":
        model.compile(optimizer, "mse")
        monitor = gradtools.GradientMonitor(figures=False, optimizer_state=True)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, last])
        metrics = monitor.metrics
    else:
        start = [v.numpy() for v in model.trainable_weights]
        # the weights before the last step: train from the start on all but the last batch
        gradtools.fit(model, x[:-BATCH], y[:-BATCH], loss="mse", optimizer=OPTIMIZERS[name](), epochs=1,
                      batch_size=BATCH, shuffle=False, figures=False, seed=0)
        last.values = [v.numpy() for v in model.trainable_weights]
        for variable, value in zip(model.trainable_weights, start):
            variable.assign(value)
        history = gradtools.fit(model, x, y, loss="mse", optimizer=optimizer, epochs=1, batch_size=BATCH,
                                shuffle=False, figures=False, seed=0, optimizer_state=True)
        metrics = history.metrics
    expected = _expected_last_step(model, optimizer, x, y, last.values)
    row = metrics.iloc[-1]
    for column, value in expected.items():
        assert row[column] == pytest.approx(value, rel=1e-4, abs=1e-6), column
    fractions = [expected[layer_column(k, "eps_dominated")] for k in (1, 2)]
    assert 0 < max(fractions) < 1, "the check is not trivial"
    assert expected[layer_column(1, "update_cosine")] < 0.99, "Adam's update is not the gradient's direction"


def test_the_instruments_leave_every_other_column_as_it_was():
    """An LSTM (a recurrent kernel's columns beside its kernel's) under a sigmoid (the
    output_saturated column after the instruments), with SGD: the same table with the
    instruments on as off, and SGD's update along −g."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(ROWS, 5, 3)).astype(np.float32)
    y = (x[:, -1, 0] > 0).astype(np.float32)
    tables = []
    for on in (False, True):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4),
                                  keras.layers.Dense(1, activation="sigmoid")])
        model.compile(keras.optimizers.SGD(0.1), "binary_crossentropy")
        monitor = gradtools.GradientMonitor(figures=False, optimizer_state=on)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
        tables.append(monitor.metrics)
    off, on = tables
    assert "layer_1/recurrent_grad_norm" in off and "output_saturated" in off
    assert list(on.columns) == [c for c in on.columns if c in off.columns or "update_cosine" in c]
    assert on[list(off.columns)].equals(off)
    assert np.allclose(on[[layer_column(k, "update_cosine") for k in (1, 2)]], 1.0, atol=1e-5)


def test_plain_sgd_updates_along_the_negative_gradient_and_has_no_moments():
    model, x, y = _problem()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = gradtools.GradientMonitor(figures=False, optimizer_state=True)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    cosines = monitor.metrics[[layer_column(k, "update_cosine") for k in (1, 2)]].to_numpy()
    assert np.allclose(cosines, 1.0, atol=1e-5)
    assert not any("adam_" in column for column in monitor.metrics.columns)


def test_the_instruments_are_off_by_default():
    model, x, y = _problem()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    monitor = gradtools.GradientMonitor(figures=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[monitor])
    assert not any(column.endswith(("update_cosine", "eps_dominated")) for column in monitor.metrics.columns)


def test_the_run_figures_show_the_optimizer_state(tmp_path):
    model, x, y = _problem()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    monitor = gradtools.GradientMonitor(figures=False, optimizer_state=True)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[monitor])
    figure = run_figures(monitor.history())["optimizer_state"]
    assert [ax.get_ylabel() for ax in figure.axes] == ["cos(update, −gradient)", "‖m‖ (Adam's first moment)",
                                                       "‖v‖ (Adam's second moment)", "ε-dominated fraction"]
    assert len(figure.axes[0].lines) == 2, "one line per layer"
    path = tmp_path / "optimizer_state.png"
    figure.savefig(path)
    assert_drawn_png(path)


def test_a_kernel_without_a_gradient_is_named_with_the_instruments_on():
    """A layer the loss never reaches: the same message as without the instruments."""
    inputs = keras.Input((4,))
    used, unused = keras.layers.Dense(1), keras.layers.Dense(1)
    model = keras.Model(inputs, [used(inputs), unused(inputs)])
    model.compile(keras.optimizers.Adam(0.01), ["mse", None])
    x, y = _problem()[1:]
    with pytest.raises(ValueError, match="no gradient reaches"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[gradtools.GradientMonitor(figures=False, optimizer_state=True)])
