"""gradtools.fit on models that are not the article's: divergence, logging schedule, errors."""

import json

import keras
import numpy as np
import pandas as pd
import pytest

import gradtools
from gradtools.loggers import RunLogger


def regression_data(n=64, features=4, scale=1.0):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x.sum(axis=1) * scale).astype(np.float32)
    return x, y


def mlp(features=4, init="glorot_uniform"):
    return keras.Sequential([keras.Input((features,)),
                             keras.layers.Dense(8, activation="relu", kernel_initializer=init),
                             keras.layers.Dense(1)])


def exploding_setup():
    x, y = regression_data(scale=200.0)
    keras.utils.set_random_seed(0)
    init = keras.initializers.RandomUniform(4.0, 5.0)
    return mlp(init=init), x, y


def test_nonfinite_run_is_recorded_as_diverged_and_stops_there():
    model, x, y = exploding_setup()
    history = gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.01),
                            epochs=20, batch_size=8, seed=0)
    assert history.status == "diverged"
    step = history.first_nonfinite_step
    assert isinstance(step, int) and step >= 1
    last = history.metrics.iloc[-1]
    assert last["step"] == step
    assert not np.isfinite(last["loss"]) or not np.isfinite(last["grad_global_norm"])
    assert np.isfinite(history.metrics["loss"].iloc[0])
    assert history.epochs_completed == (step - 1) // 8


def test_without_stop_on_nonfinite_training_goes_on_and_stays_diverged():
    model, x, y = exploding_setup()
    history = gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.01),
                            epochs=3, batch_size=8, seed=0, stop_on_nonfinite=False)
    assert history.status == "diverged"
    assert history.epochs_completed == 3
    assert history.metrics["step"].tolist() == list(range(1, 25))
    assert history.first_nonfinite_step < 24


def test_log_every_samples_steps_and_keeps_the_nonfinite_one():
    x, y = regression_data()
    keras.utils.set_random_seed(0)
    history = gradtools.fit(mlp(), x, y, loss="mse", optimizer="sgd", epochs=2, batch_size=8,
                            log_every=3, seed=0)
    assert history.metrics["step"].tolist() == [1, 4, 7, 10, 13, 16]
    assert history.metrics["epoch"].tolist() == [0, 0, 0, 1, 1, 1]
    assert history.metrics["batch"].tolist() == [0, 3, 6, 1, 4, 7]

    model, x, y = exploding_setup()
    diverged = gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.01),
                             epochs=5, batch_size=8, log_every=1000, seed=0)
    assert diverged.metrics["step"].tolist() == [1, diverged.first_nonfinite_step]


def test_same_seed_gives_identical_numbers_and_another_seed_does_not():
    x, y = regression_data()

    def train(seed):
        keras.utils.set_random_seed(seed)
        return gradtools.fit(mlp(), x, y, loss="mse", optimizer="adam", epochs=3, batch_size=8,
                             seed=seed).metrics

    first, second, other = train(5), train(5), train(6)
    pd.testing.assert_frame_equal(first, second)
    assert not first["loss"].equals(other["loss"])


def test_functional_model_with_batchnorm_and_dropout_numbers_layers_by_kernel():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(6, activation="tanh")(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    hidden = keras.layers.Dropout(0.2)(hidden)
    outputs = keras.layers.Dense(1)(hidden)
    model = keras.Model(inputs, outputs)
    x, y = regression_data()
    history = gradtools.fit(model, x, y, loss="mse", optimizer="rmsprop", epochs=2, seed=0)
    assert history.status == "completed"
    assert history.n_layers == 2
    assert [p.split("/")[-1] for p in history.layer_paths] == ["kernel", "kernel"]
    assert (history.metrics["layer_1/grad_abs_mean"] > 0).all()


def test_loggers_receive_every_row_and_the_final_status():
    class Recorder(RunLogger):
        def __init__(self):
            self.steps, self.finished = [], None

        def log_rows(self, rows):
            self.steps += rows["step"].tolist()
            assert "layer_1/grad_norm" in rows.columns

        def finish(self, history):
            self.finished = history.status

    recorder = Recorder()
    x, y = regression_data()
    gradtools.fit(mlp(), x, y, loss="mse", optimizer="sgd", epochs=2, batch_size=16,
                  loggers=[recorder])
    assert recorder.steps == list(range(1, 9))
    assert recorder.finished == "completed"


def test_a_run_directory_takes_one_run(tmp_path):
    """A LocalRunLogger that wrote a run refuses a second one (gradtools.fit mixed both into
    one directory: steps 1-8 twice, epochs_completed 1); the first run stays as it was."""
    from gradtools.loggers import LocalRunLogger

    x, y = regression_data()
    logger = LocalRunLogger(tmp_path / "run", name="once")
    gradtools.fit(mlp(), x, y, loss="mse", optimizer="sgd", epochs=1, batch_size=16, loggers=[logger], figures=False)
    written = (tmp_path / "run" / "metrics.csv").read_bytes()
    with pytest.raises(ValueError, match="has written a run to .* already: a run directory holds one run"):
        gradtools.fit(mlp(), x, y, loss="mse", optimizer="sgd", epochs=1, batch_size=16, loggers=[logger])
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == written
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("at_epoch", [1, 2])
def test_ctrl_c_while_loggers_write_an_epoch_keeps_the_record_whole(tmp_path, at_epoch):
    """Ctrl-C just after the progress line of an epoch (here: raised by the logger told of it
    after the run directory, as the command line's progress line is): the run directory counts
    the epoch whose rows it holds, and a run whose every epoch trained is completed (it read
    interrupted after 1 epoch, beside a metrics.csv of 2)."""
    from gradtools.loggers import LocalRunLogger

    class CtrlC(RunLogger):
        def log_rows(self, rows):
            pass

        def log_progress(self, *, epochs_completed, status):
            if epochs_completed == at_epoch:
                raise KeyboardInterrupt

    x, y = regression_data()
    local = LocalRunLogger(tmp_path / "run", name="ctrl-c")
    with pytest.raises(KeyboardInterrupt):
        gradtools.fit(mlp(), x, y, loss="mse", optimizer="sgd", epochs=2, batch_size=16, loggers=[local, CtrlC()],
                      figures=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["epochs_completed"] == at_epoch
    assert info["status"] == ("completed" if at_epoch == 2 else "interrupted")
    assert pd.read_csv(tmp_path / "run" / "metrics.csv")["epoch"].max() == at_epoch - 1


def test_an_error_inside_training_reaches_loggers_as_failed_and_is_raised():
    class Failing(RunLogger):
        status = None

        def log_rows(self, rows):
            raise RuntimeError("disk full")

        def finish(self, history):
            Failing.status = history.status

    x, y = regression_data()
    with pytest.raises(RuntimeError, match="disk full"):
        gradtools.fit(mlp(), x, y, loss="mse", optimizer="sgd", epochs=1, loggers=[Failing()])
    assert Failing.status == "failed"


@pytest.mark.parametrize("name, value", [("epochs", 0), ("batch_size", -1), ("log_every", 1.5)])
def test_bad_arguments_are_named(name, value):
    x, y = regression_data()
    kwargs = {"epochs": 1, name: value}
    with pytest.raises(ValueError, match=name):
        gradtools.fit(mlp(), x, y, loss="mse", optimizer="sgd", **kwargs)


def test_a_model_without_kernels_is_refused_clearly():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    x, y = regression_data()
    with pytest.raises(ValueError, match="kernel"):
        gradtools.fit(model, x, y[:, None].repeat(4, axis=1), loss="mse", optimizer="sgd",
                      epochs=1)


def dropout_mlp(seed, prefix="", head=keras.layers.Dense):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name=f"{prefix}hidden"),
                             keras.layers.Dropout(0.3, name=f"{prefix}dropout"),
                             keras.layers.BatchNormalization(name=f"{prefix}norm"),
                             head(1, name=f"{prefix}head")], name=f"{prefix}reused")


class OtherDense(keras.layers.Dense):
    """A Dense by another class: the same config, another program."""


class HeadEachEpoch(gradtools.loggers.RunLogger):
    def __init__(self):
        self.kernels = []

    def log_rows(self, rows):
        pass

    def log_epoch_end(self, epoch, model, kernel_gradients=None):
        self.kernels.append(model.get_layer("head").kernel.numpy().copy())


def test_a_second_model_of_the_same_structure_reuses_the_compiled_epoch_with_the_same_numbers():
    from gradtools import programs
    from gradtools.steps import resolve_loss

    x, y = regression_data()
    options = dict(loss="mse", epochs=2, batch_size=16)
    programs.clear()
    first, first_optimizer = dropout_mlp(0), keras.optimizers.Adam(0.01)
    gradtools.fit(first, x, y, optimizer=first_optimizer, seed=0, **options)
    assert len(programs.kept()) == 1
    first_values = [v.numpy().copy() for v in (*first.variables, *first_optimizer.variables)]
    second, seen_reused = dropout_mlp(1), HeadEachEpoch()
    reused = gradtools.fit(second, x, y, optimizer=keras.optimizers.Adam(0.05), seed=1, loggers=[seen_reused],
                           **options)
    assert len(programs.kept()) == 1, "the same program: traced and compiled once"
    assert programs.find(programs.kept()[0], first, resolve_loss("mse")).step.model is first
    # other layer names, the same program; the history names the caller's layers
    renamed = gradtools.fit(dropout_mlp(2, prefix="other_"), x, y, optimizer="adam", **options)
    assert len(programs.kept()) == 1
    assert renamed.layer_paths == ["other_reused/other_hidden/kernel", "other_reused/other_head/kernel"]
    assert renamed.layer_blocks == ["other_hidden", "other_head"]
    gradtools.fit(dropout_mlp(2, head=OtherDense), x, y, optimizer="adam", **options)
    assert len(programs.kept()) == 2, "another layer class is another program"
    # the program trains its own variables: the model and optimizer it was traced with, which
    # the user still holds, keep their values whatever other models it trained since
    for kept, now in zip(first_values, (*first.variables, *first_optimizer.variables)):
        np.testing.assert_array_equal(kept, now.numpy(), err_msg=now.path)

    programs.clear()  # the same run, traced afresh
    fresh_model, seen_fresh = dropout_mlp(1), HeadEachEpoch()
    fresh = gradtools.fit(fresh_model, x, y, optimizer=keras.optimizers.Adam(0.05), seed=1, loggers=[seen_fresh],
                          **options)
    pd.testing.assert_frame_equal(reused.metrics, fresh.metrics, check_exact=True)
    # a logger that looks at the model after each epoch sees the caller's model trained so far
    assert len(seen_reused.kernels) == 2
    for a, b in zip(seen_reused.kernels, seen_fresh.kernels):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(second.variables, fresh_model.variables):  # the caller's model is trained
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_program_is_reused_only_for_the_same_code():
    """A layer class defined again under the same name (a notebook cell run again) and another
    loss closure of the same name are other code under the same config: traced anew, never
    run stale. (Without XLA: what is checked is which program runs, not its compilation.)"""
    x, y = regression_data()

    def scaled(scale):
        class Scaled(keras.layers.Dense):  # the same name and config each time, other code
            def call(self, inputs):
                return super().call(inputs) * scale
        return Scaled

    def model_of(layer_class):
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((4,)), layer_class(1)])

    def first_loss(model, loss, weight=1.0):
        """The first step's loss (one batch of all examples), and what it must be."""
        expected = weight * float(np.mean((model(x).numpy()[:, 0] - y) ** 2))
        history = gradtools.fit(model, x, y, loss=loss, optimizer="sgd", epochs=1, batch_size=len(x), seed=0,
                                jit_compile=False)
        return history.metrics["loss"].iloc[0], expected

    for layer_class in (scaled(1.0), scaled(100.0)):
        measured, expected = first_loss(model_of(layer_class), "mse")
        assert measured == pytest.approx(expected, rel=1e-5)
    same = scaled(1.0)
    for weight in (1.0, 100.0):  # a lambda (no valid scope name of its own), twice
        loss = lambda t, p, w=weight: w * keras.losses.mean_squared_error(t, p)  # noqa: E731
        measured, expected = first_loss(model_of(same), loss, weight)
        assert measured == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")  # Keras's own, true
def test_a_layer_no_gradient_reaches_and_several_inputs_are_clear_errors():
    x, y = regression_data()

    class Unused(keras.Model):  # a layer built but never called: the loss does not depend on it
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.used, self.unused = keras.layers.Dense(1), keras.layers.Dense(1, name="never_called")

        def build(self, shape):
            self.used.build(shape)
            self.unused.build(shape)

        def call(self, inputs):
            return self.used(inputs)

    message = "no gradient reaches unused/never_called/kernel: the loss does not depend on it"
    with pytest.raises(ValueError, match=message):
        gradtools.fit(Unused(name="unused"), x, y, loss="mse", optimizer="sgd", epochs=1, jit_compile=False)
    model = Unused(name="unused")
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[gradtools.GradientMonitor()])
    with pytest.raises(ValueError, match="use model.fit with gradtools.GradientMonitor"):
        gradtools.fit(mlp(), [x, x], y, loss="mse", optimizer="sgd", epochs=1)


def test_a_learning_rate_schedule_is_part_of_the_program():
    """A schedule is traced into the compiled epoch (a number is a variable): a model with
    another schedule must not reuse the program, or it trains with the first one's rates."""
    from gradtools import programs

    x, y = regression_data()

    def trained(decay_rate):
        schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=decay_rate)
        model = dropout_mlp(0)
        gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(schedule), epochs=2,
                      batch_size=16, seed=0, figures=False)
        return model.get_layer("head").kernel.numpy()

    programs.clear()
    trained(0.5)
    after_another_schedule = trained(0.9)
    assert len(programs.kept()) == 2
    programs.clear()
    np.testing.assert_array_equal(after_another_schedule, trained(0.9))


def small_convnet():
    """keras-io's MNIST convnet in miniature: its max pooling has no deterministic XLA gradient."""
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                             keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                             keras.layers.Dense(3, activation="softmax")])


def test_a_seeded_convnet_that_xla_cannot_compile_deterministically_trains_without_xla():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8, 8, 1)).astype(np.float32), rng.integers(0, 3, 40)
    arguments = dict(loss="sparse_categorical_crossentropy", optimizer="adam", epochs=2, batch_size=16,
                     seed=0, figures=False)
    keras.utils.set_random_seed(0)
    model = small_convnet()
    initial = model.get_weights()
    with pytest.warns(RuntimeWarning, match="MaxPool.*training without XLA") as warned:
        fell_back = gradtools.fit(model, x, y, **arguments)
    assert len(warned) == 1 and fell_back.status == "completed" and fell_back.epochs_completed == 2
    assert not np.allclose(model.get_weights()[0], initial[0]), "the caller's model was trained"
    reference = small_convnet()
    reference.set_weights(initial)
    plain = gradtools.fit(reference, x, y, jit_compile=False, **arguments)
    pd.testing.assert_frame_equal(fell_back.metrics, plain.metrics)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_process_keeps_many_small_programs_and_drops_the_oldest_beyond_the_limits(monkeypatch):
    """What :mod:`gradtools.programs` keeps for reuse: up to MAX_PROGRAMS
    small programs (a report's nets), and beyond the newest one only while their variables
    total at most MAX_KEPT_BYTES (checked on untraced programs: keeping compiles nothing)."""
    from collections import OrderedDict

    from gradtools import programs
    from gradtools.steps import TrainStep, resolve_loss

    def program(units):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)])
        return programs.Program(TrainStep(model, resolve_loss("mse"), keras.optimizers.SGD()), run_epoch=None)

    monkeypatch.setattr(programs, "_KEPT", OrderedDict())
    for k in range(programs.MAX_PROGRAMS + 4):
        programs.keep(f"small-{k}", program(2))
    assert programs.kept() == [f"small-{k}" for k in range(4, programs.MAX_PROGRAMS + 4)]
    assert programs.MAX_PROGRAMS >= 28  # a report's nets (and the old limit was 8)

    monkeypatch.setattr(programs, "MAX_KEPT_BYTES", 10_000)
    programs.keep("big", program(1000))  # 5000 float32 weights: 20 kB alone
    assert programs.kept() == ["big"], "the newest is kept even when it alone is over"
    programs.keep("small-again", program(2))
    assert programs.kept() == ["small-again"]
