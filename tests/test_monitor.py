"""GradientMonitor inside plain model.fit: exact statistics, model kinds, steps_per_execution."""

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import exploding_relu_setup

from gradtools.columns import CLIPPED_COLUMN, metric_columns
from gradtools.loggers import LocalRunLogger
from gradtools.monitor import GradientMonitor


def lstm_batchnorm_model():
    inputs = keras.Input((5, 3))
    hidden = keras.layers.LSTM(4)(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    hidden = keras.layers.Dense(6, activation="tanh")(hidden)
    outputs = keras.layers.Dense(1)(hidden)
    return keras.Model(inputs, outputs)


def test_statistics_equal_an_independent_tape_computation_with_weights_fixed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5, 3)).astype(np.float32)
    y = rng.normal(size=(16, 1)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = lstm_batchnorm_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[monitor])

    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
    variables = model.trainable_weights
    grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
    by_name = [(v.name, v.numpy().astype(np.float64), g) for v, g in zip(variables, grads)]
    kernels = [(w, g) for name, w, g in by_name if name == "kernel"]
    assert len(kernels) == 3  # the LSTM's input kernel and two Dense kernels (not recurrent_kernel)
    # the LSTM's recurrent kernel, under layer_1/recurrent_<stat>, the columns gradtools.fit uses
    (recurrent,) = [(w, g) for name, w, g in by_name if name == "recurrent_kernel"]

    metrics = monitor.metrics
    assert list(metrics.columns) == metric_columns(3, recurrent_layers={1})
    assert metrics["step"].tolist() == [1, 2] and metrics["epoch"].tolist() == [0, 1]
    for _, row in metrics.iterrows():
        assert row["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert row["grad_global_norm"] == pytest.approx(np.sqrt(sum((g ** 2).sum() for g in grads)), rel=1e-5)
        for k, (w, g) in enumerate(kernels, start=1):
            assert row[f"layer_{k}/grad_mean"] == pytest.approx(g.mean(), rel=1e-4, abs=1e-8)
            assert row[f"layer_{k}/grad_abs_mean"] == pytest.approx(np.abs(g).mean(), rel=1e-5)
            assert row[f"layer_{k}/grad_norm"] == pytest.approx(np.sqrt((g ** 2).sum()), rel=1e-5)
            assert row[f"layer_{k}/grad_max_abs"] == pytest.approx(np.abs(g).max(), rel=1e-5)
            assert row[f"layer_{k}/weight_mean"] == pytest.approx(w.mean(), rel=1e-5, abs=1e-8)
            assert row[f"layer_{k}/weight_norm"] == pytest.approx(np.sqrt((w ** 2).sum()), rel=1e-5)
            assert row[f"layer_{k}/update_ratio"] == 0.0
        w, g = recurrent
        assert row["layer_1/recurrent_grad_abs_mean"] == pytest.approx(np.abs(g).mean(), rel=1e-5)
        assert row["layer_1/recurrent_grad_norm"] == pytest.approx(np.sqrt((g ** 2).sum()), rel=1e-5)
        assert row["layer_1/recurrent_weight_norm"] == pytest.approx(np.sqrt((w ** 2).sum()), rel=1e-5)


def test_update_ratio_is_the_applied_sgd_step_and_clipping_is_reported():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y = rng.normal(size=(8, 1)).astype(np.float32) * 50
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    w0 = model.layers[0].kernel.numpy().astype(np.float64)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x) - y))
    g = tape.gradient(loss, model.layers[0].kernel).numpy().astype(np.float64)
    model.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=1.0), loss="mse")
    monitor = GradientMonitor()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    row = monitor.metrics.iloc[0]
    assert row["layer_1/grad_norm"] == pytest.approx(np.sqrt((g ** 2).sum()), rel=1e-5)
    assert row["layer_1/grad_norm"] > 1.0, "the statistics describe the gradient before clipping"
    # clipnorm clips each tensor to norm 1: the kernel moved by lr * 1 along g.
    w1 = model.layers[0].kernel.numpy().astype(np.float64)
    assert np.sqrt(((w1 - w0) ** 2).sum()) == pytest.approx(0.1, rel=1e-4)
    assert row["layer_1/update_ratio"] == pytest.approx(0.1 / np.sqrt((w0 ** 2).sum()), rel=1e-4)
    assert row[CLIPPED_COLUMN] <= np.sqrt(2) + 1e-6 and row[CLIPPED_COLUMN] < row["grad_global_norm"]


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.embedding = keras.layers.Embedding(20, 4)
        self.conv = keras.layers.Conv1D(3, 2)
        self.gru = keras.layers.GRU(3)
        self.dropout = keras.layers.Dropout(0.2)
        self.out = keras.layers.Dense(1)

    def call(self, inputs, training=False):
        hidden = self.gru(self.conv(self.embedding(inputs)))
        return self.out(self.dropout(hidden, training=training))


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_subclassed_model_with_embedding_conv_gru_dropout_and_steps_per_execution(steps_per_execution, tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 20, size=(40, 6))
    y = rng.normal(size=(40, 1)).astype(np.float32)
    keras.utils.set_random_seed(2)
    model = Subclassed()
    model.compile(optimizer="adam", loss="mse", steps_per_execution=steps_per_execution)
    logger = LocalRunLogger(tmp_path / "run", name="toy/subclassed")
    monitor = GradientMonitor(loggers=[logger])
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[monitor],
              validation_data=(x[:8], y[:8]))
    assert monitor.metrics["step"].tolist() == list(range(1, 11))
    assert monitor.metrics["batch"].tolist() == [0, 1, 2, 3, 4] * 2
    assert monitor.status == "completed" and monitor.epochs_completed == 2
    assert len(monitor.layer_paths) == 3  # conv, gru and dense kernels; embeddings are not "kernel"
    assert (monitor.metrics["layer_1/grad_norm"] > 0).all()
    assert (monitor.metrics["layer_2/recurrent_grad_norm"] > 0).all()  # the GRU's recurrent kernel
    written = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert written["step"].tolist() == monitor.metrics["step"].tolist()


def test_log_every_and_a_diverging_fit_stopped_and_recorded():
    model, x, y = exploding_relu_setup(seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    monitor = GradientMonitor(log_every=100, stop_on_nonfinite=True)
    history = model.fit(x, y, batch_size=8, epochs=20, verbose=0, callbacks=[monitor])
    assert monitor.status == "diverged"
    step = monitor.first_nonfinite_step
    assert monitor.metrics["step"].tolist() == [1, step]
    assert len(history.history["loss"]) < 20, "training stopped"


@pytest.mark.parametrize("how", ["ctrl-c in a callback", "error in a step"])
def test_a_fit_that_raises_is_recorded_as_it_ended_and_leaves_nothing_behind(tmp_path, how):
    """Keras calls no on_train_end when fit raises: run.json stayed 'running', monitor.status
    said 'completed', the probes stayed on the model and the run directory's writer thread
    alive. Now: interrupted (Ctrl-C) or failed (an error), the rows taken so far kept, the
    probes gone, and a later plain fit trains."""
    import json
    import threading

    x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    y = x.sum(axis=1, keepdims=True)

    class CtrlC(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    callbacks, expected = [], KeyboardInterrupt
    if how == "error in a step":  # a NaN in the third batch: check_numerics fails that step
        x[40] = np.nan
        layers = [keras.layers.Lambda(lambda t: tf.debugging.check_numerics(t, "input"))]
        expected = tf.errors.InvalidArgumentError
    else:
        layers, callbacks = [], [CtrlC()]
    model = keras.Sequential([keras.Input((3,)), *layers, keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    monitor = GradientMonitor(loggers=[LocalRunLogger(tmp_path / "run", name="raised")], figures=False)
    with pytest.raises(expected):
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[monitor, *callbacks])
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    status = "interrupted" if how.startswith("ctrl-c") else "failed"
    assert monitor.status == info["status"] == status
    steps = pd.read_csv(tmp_path / "run" / "metrics.csv")["step"].tolist()
    if status == "interrupted":
        assert steps == list(range(1, 9)) and info["epochs_completed"] == 2
    else:
        assert steps == [1, 2] and info["epochs_completed"] == 0, "the failed step's row never came"
    assert "apply" not in vars(model.optimizer) and "compute_loss" not in vars(model)
    assert not [t for t in threading.enumerate() if t.name.startswith("gradtools-run-dir")]
    model.fit(x[:32], y[:32], epochs=1, verbose=0)  # trains, without the monitor's probes


def test_a_layer_unfrozen_without_compiling_again_is_named_before_training():
    """Keras's "Unknown variable" came from inside the step (plain Keras trains only the head
    then, silently); now one ValueError before anything runs, and after compile it is monitored."""
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    y = x.sum(axis=1)
    base = keras.layers.Dense(4, name="base")
    base.trainable = False
    model = keras.Sequential([keras.Input((4,)), base, keras.layers.Dense(1, name="head")])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    base.trainable = True
    with pytest.raises(ValueError, match=r"2 trainable variables \(\w+/base/kernel, \w+/base/bias\) became "
                                         r"trainable after model.compile .* call model.compile again"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[GradientMonitor(figures=False)])
    assert "compute_loss" not in vars(model)
    model.compile(optimizer="adam", loss="mse")
    monitor = GradientMonitor(figures=False)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    assert [p.split("/", 1)[1] for p in monitor.layer_paths] == ["base/kernel", "head/kernel"]
    assert monitor.status == "completed"


def test_the_probes_are_removed_after_fit():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
    monitor = GradientMonitor()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[monitor])
    assert "apply" not in vars(model.optimizer) and "compute_loss" not in vars(model)
    model.fit(x, y, epochs=1, verbose=0)
    assert len(monitor.metrics) == 1


def test_each_model_fit_is_a_run_of_its_own_a_backbone_unfrozen_included(tmp_path):
    """Freeze, train the head, unfreeze, train all (the usual fine-tuning): the second fit's
    table has its own steps and layers, not the first fit's rows under other meanings."""
    import gradtools

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = x.sum(axis=1).astype(np.float32)
    keras.utils.set_random_seed(0)
    backbone = keras.layers.Dense(8, activation="tanh", name="backbone")
    model = keras.Sequential([keras.Input((4,)), backbone, keras.layers.Dense(1, name="head")])
    monitor = GradientMonitor()
    backbone.trainable = False
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert [path.split("/")[-2] for path in monitor.layer_paths] == ["head"]
    backbone.trainable = True
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert [path.split("/")[-2] for path in monitor.layer_paths] == ["backbone", "head"]
    assert monitor.metrics["step"].tolist() == [1, 2, 3, 4]
    assert np.isfinite(monitor.metrics.drop(columns=["step", "epoch", "batch"]).to_numpy()).all()
    assert gradtools.diagnose(monitor.history()).verdict == "healthy"

    logged = GradientMonitor(loggers=[LocalRunLogger(tmp_path / "run", name="first")])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[logged])
    with pytest.raises(ValueError, match="give each model.fit a new GradientMonitor"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[logged])


class _OwnTrainStep:
    """keras.io's custom train_step, computing the loss one way or another (``how``)."""

    @staticmethod
    def model(how):
        import keras
        import tensorflow as tf

        class Custom(keras.Model):
            def __init__(self):
                super().__init__()
                self.hidden, self.out = keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)
                self.own_optimizer = keras.optimizers.SGD(0.01)

            def call(self, x):
                return self.out(self.hidden(x))

            def train_step(self, data):
                x, y = data
                with tf.GradientTape() as tape:
                    y_pred = self(x, training=True)
                    loss = (self.compute_loss(x=x, y=y, y_pred=y_pred) if how == "compute_loss"
                            else keras.losses.mean_squared_error(y, y_pred))
                grads = tape.gradient(loss, self.trainable_variables)
                optimizer = self.own_optimizer if how == "own optimizer" else self.optimizer
                optimizer.apply(grads, self.trainable_variables)
                return {"loss": tf.reduce_mean(loss)}

        keras.utils.set_random_seed(0)
        model = Custom()
        model.compile(optimizer="sgd", loss="mse")
        return model


@pytest.mark.parametrize("how", ["compute_loss", "own loss", "own optimizer"])
def test_a_custom_train_step_is_monitored_or_told_what_it_lacks(how):
    """Monitored when it computes the loss with self.compute_loss and updates with
    model.optimizer; a loss of its own is a ValueError saying how to compute it (it was an
    AttributeError from inside the monitor); optimizers of its own (a GAN's) a warning that
    nothing was recorded (it was silence, then 'no logged steps' from diagnose)."""
    import warnings

    from gradtools import GradientMonitor

    x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model, monitor = _OwnTrainStep.model(how), GradientMonitor(figures=False)
    if how == "own loss":
        with pytest.raises(ValueError, match=r"without self\.compute_loss\(\): compute it with loss = "):
            model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[monitor])
        error = lambda: float(np.mean((model.predict(x, verbose=0) - y) ** 2))  # noqa: E731
        before = error()
        model.fit(x, y, epochs=3, batch_size=16, verbose=0)  # the model trains as it did before the monitor
        assert error() < before
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[monitor])
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if how == "own optimizer":
        assert said == ["GradientMonitor recorded no step: this model's train_step never updates its weights "
                        "with model.optimizer (a model with optimizers of its own, as a GAN's, is not monitored)"]
        assert monitor.metrics.empty
    else:
        assert said == []
        assert len(monitor.metrics) == 8 and np.isfinite(monitor.metrics["loss"]).all()
