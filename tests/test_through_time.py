"""Gradients through time: the per-time-step statistic against independent computations, the
geometric prediction against a linear RNN whose recurrent matrix is known, truncated BPTT,
recurrent-kernel columns, and the same names in the run directory, Neptune and TensorBoard."""


import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import gradtools
from gradtools.columns import LAYER_STATS, metric_columns
from gradtools.history import History
from gradtools.loggers import LocalRunLogger
from gradtools.loggers.neptune import NeptuneLogger
from gradtools.loggers.tensorboard import TensorBoardLogger
from gradtools.recurrence import geometric_prediction, spectral_radius, state_column
from gradtools.steps import resolve_loss
from gradtools.through_time import TracedRNN

T, FEATURES, UNITS, N = 12, 3, 6, 16


def tiny_rnn(cell, **kwargs):
    return keras.Sequential([keras.Input((T, FEATURES)), TracedRNN(cell, **kwargs),
                             keras.layers.Dense(1, name="out")])


def data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(N, T, FEATURES)).astype(np.float32),
            rng.normal(size=(N,)).astype(np.float32))


def one_step(model, x, y, **kwargs):
    """One epoch of one full batch: the epoch means are exactly the first step's values."""
    return gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.0), epochs=1,
                         batch_size=N, shuffle=False, seed=0, **kwargs)


def manual_state_gradients(cell, dense, x, y):
    """‖∂L/∂h_t‖ and ∂L/∂(recurrent kernel) from an explicit Python unrolling of a tanh
    SimpleRNN, with each h_t watched by the tape: nothing of TracedRNN involved."""
    kernel, recurrent, bias = (v.numpy() for v in (cell.kernel, cell.recurrent_kernel, cell.bias))
    kernel, recurrent, bias = tf.constant(kernel), tf.Variable(recurrent), tf.constant(bias)
    with tf.GradientTape(persistent=True) as tape:
        h, states = tf.zeros([N, UNITS]), []
        for t in range(T):
            h = tf.tanh(x[:, t] @ kernel + h @ recurrent + bias)
            tape.watch(h)
            states.append(h)
        prediction = dense(h)
        loss = tf.reduce_mean((prediction - y[:, None]) ** 2)
    norms = [float(tf.norm(g)) for g in tape.gradient(loss, states)]
    return np.array(norms), tape.gradient(loss, recurrent).numpy()


def test_state_gradients_and_recurrent_columns_equal_an_explicit_unrolling():
    keras.utils.set_random_seed(1)
    x, y = data()
    model = tiny_rnn(keras.layers.SimpleRNNCell(UNITS))
    model(x[:1])
    cell, dense = model.layers[0].inner_cell, model.layers[1]
    expected_norms, expected_recurrent_grad = manual_state_gradients(cell, dense, tf.constant(x),
                                                                     tf.constant(y))
    history = one_step(model, x, y)

    assert list(history.metrics.columns) == metric_columns(2, recurrent_layers=[1])
    row = history.metrics.iloc[0]
    np.testing.assert_allclose(row["layer_1/recurrent_grad_norm"],
                               np.linalg.norm(expected_recurrent_grad), rtol=1e-4)
    np.testing.assert_allclose(row["layer_1/recurrent_grad_abs_mean"],
                               np.abs(expected_recurrent_grad).mean(), rtol=1e-4)
    measured = history.state_gradients.iloc[0][[state_column(1, t) for t in range(1, T + 1)]]
    np.testing.assert_allclose(measured.to_numpy(float), expected_norms, rtol=1e-4)
    assert expected_norms[0] < expected_norms[-1]  # the statistic is not flat: it could be wrong


def test_traced_layers_compute_the_same_values_as_keras_rnn():
    x, _ = data()
    for make_cell in (keras.layers.SimpleRNNCell, keras.layers.LSTMCell, keras.layers.GRUCell):
        cell = make_cell(UNITS)
        traced = TracedRNN(cell)
        np.testing.assert_allclose(traced(x).numpy(), keras.layers.RNN(cell)(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("radius", [0.9, 1.1])
def test_a_linear_rnn_follows_the_geometric_prediction_exactly(radius):
    """h_t = W h_{t-1} + U x_t with W = r·Q, Q orthogonal: ‖∂L/∂h_t‖ = r^(T−t) ‖∂L/∂h_T‖."""
    keras.utils.set_random_seed(2)
    x, y = data()
    cell = keras.layers.SimpleRNNCell(UNITS, activation="linear")
    model = tiny_rnn(cell)
    model(x[:1])
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(UNITS, UNITS)))
    cell.recurrent_kernel.assign((radius * q).astype(np.float32))
    states = one_step(model, x, y).state_gradients
    norms = states.iloc[0][[state_column(1, t) for t in range(1, T + 1)]].to_numpy(float)
    measured_radius = states.iloc[0]["layer_1/recurrent_spectral_radius"]
    np.testing.assert_allclose(measured_radius, radius, rtol=1e-5)
    np.testing.assert_allclose(norms, geometric_prediction(measured_radius, norms[-1], T), rtol=1e-3)
    assert (norms[0] / norms[-1] > 2) == (radius > 1)  # 1.1^11 ≈ 2.85, 0.9^11 ≈ 0.31


def test_truncated_bptt_stops_the_gradient_k_steps_back():
    keras.utils.set_random_seed(4)
    x, y = data()
    k = 4
    model = tiny_rnn(keras.layers.LSTMCell(UNITS), truncate_bptt=k)
    history = one_step(model, x, y)
    states = history.state_gradients.iloc[0]
    norms = states[[state_column(1, t) for t in range(1, T + 1)]].to_numpy(float)
    assert (norms[: T - k - 1] == 0).all()  # h_1 … h_{T-k-1}: no gradient
    assert (norms[T - k - 1:] > 0).all()   # h_{T-k} … h_T: the last k steps back
    assert states["layer_1/bptt_steps"] == k + 1  # the setting, recorded: h_{T-k} … h_T
    # The diagnosis judges the window the setting allows, not the zeros before it.
    evidence = gradtools.diagnose(history).evidence
    assert evidence.bptt_steps == k + 1 and evidence.time_steps == T
    assert evidence.state_grad_ratio == pytest.approx(norms[T - k - 1] / norms[T - 1], rel=1e-6)
    assert np.isnan(spectral_radius(np.ones((UNITS, 4 * UNITS))))  # LSTM: no spectral radius


# Keras 3.15 saving any model under NumPy 2 (a plain Dense model too): its variables' __array__
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_models_holding_a_traced_rnn_share_one_program_and_save(tmp_path):
    """Keras can describe such a model: two of the same structure train in one compiled
    program (with the second's own weights: the numbers of a fresh trace), another truncation
    is another program, and the model saves and loads back."""
    from gradtools import programs, training

    x, y = data()
    programs.clear()
    keras.utils.set_random_seed(5)
    one_step(tiny_rnn(keras.layers.SimpleRNNCell(UNITS)), x, y)
    keras.utils.set_random_seed(6)
    second = tiny_rnn(keras.layers.SimpleRNNCell(UNITS))
    initial = [v.numpy() for v in second.variables]
    reused = one_step(second, x, y)
    assert len(programs.kept()) == 1, "the same program: traced and compiled once"

    programs.clear()
    fresh_model = tiny_rnn(keras.layers.SimpleRNNCell(UNITS))
    for variable, value in zip(fresh_model.variables, initial):
        variable.assign(value)
    fresh = one_step(fresh_model, x, y)
    pd.testing.assert_frame_equal(reused.metrics, fresh.metrics, check_exact=True)
    pd.testing.assert_frame_equal(reused.state_gradients, fresh.state_gradients, check_exact=True)

    data_of, loss = training.EpochData.of(x, y, N), resolve_loss("mse")
    shapes = [list(data_of.x.shape), list(data_of.y.shape), data_of.batch_size]
    keys = {programs.program_key(tiny_rnn(keras.layers.SimpleRNNCell(UNITS), truncate_bptt=k), loss,
                                 keras.optimizers.SGD(0.0), shapes, {}) for k in (None, 3, 4)}
    assert None not in keys and len(keys) == 3

    path = tmp_path / "traced.keras"
    truncated = tiny_rnn(keras.layers.LSTMCell(UNITS), truncate_bptt=3)
    truncated.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[0], TracedRNN) and loaded.layers[0].truncate_bptt == 3
    assert isinstance(loaded.layers[0].inner_cell, keras.layers.LSTMCell)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), truncated.predict(x, verbose=0))


def test_bad_truncation_is_refused():
    with pytest.raises(ValueError, match="truncate_bptt"):
        TracedRNN(keras.layers.SimpleRNNCell(2), truncate_bptt=0)


def test_every_logger_stores_the_state_gradients_under_the_same_names(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    from test_neptune_logger import series, stored_operations

    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    keras.utils.set_random_seed(5)
    x, y = data()
    local = LocalRunLogger(tmp_path / "run", name="rnn/test")
    loggers = [local, NeptuneLogger(name="rnn/test"), TensorBoardLogger(tmp_path / "tb")]
    history = gradtools.fit(tiny_rnn(keras.layers.SimpleRNNCell(UNITS)), x, y, loss="mse",
                            optimizer="adam", epochs=3, batch_size=8, seed=0, loggers=loggers)
    names = [c for c in history.state_gradients.columns if c != "epoch"]
    assert names == (["layer_1/recurrent_spectral_radius", "layer_1/bptt_steps"]
                     + [state_column(1, t) for t in range(1, T + 1)])
    assert (history.state_gradients["layer_1/bptt_steps"] == T).all()

    from_disk = History.from_run_dir(tmp_path / "run")
    np.testing.assert_allclose(from_disk.state_gradients[names], history.state_gradients[names], rtol=1e-6)
    assert (tmp_path / "run" / "figures" / "state_gradients.png").is_file()
    evidence = gradtools.diagnose(from_disk).to_dict()["evidence"]
    assert evidence["state_grad_ratio"] == pytest.approx(gradtools.diagnose(history).evidence.state_grad_ratio)
    assert evidence["state_grad_ratio"] > 0

    stored = series(stored_operations(tmp_path / "neptune"))
    for name in names:
        values = [v for _, v in stored[f"epoch_metrics/{name}"]]
        assert [s for s, _ in stored[f"epoch_metrics/{name}"]] == [0, 1, 2]
        np.testing.assert_allclose(values, history.state_gradients[name], rtol=1e-5)

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    for name in (names[0], names[2], names[-1]):
        points = events.Tensors(name)
        assert [p.step for p in points] == [0, 1, 2]
        np.testing.assert_allclose([float(tensor_util.make_ndarray(p.tensor_proto)) for p in points],
                                   history.state_gradients[name], rtol=1e-5)
    for stat in LAYER_STATS:
        assert f"layer_1/recurrent_{stat}" in events.Tags()["tensors"]
