"""Clipping formulas against NumPy, the suggested threshold, and gradient checking both ways."""

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

import gradtools
from gradtools.clip_suggestion import suggest_clip_norm
from gradtools.clipping import clip_by_global_norm, clip_by_norm, clip_by_value
from gradtools.gradcheck import check_gradients

GRADS = [np.array([[3.0, -4.0]], np.float32), np.array([12.0], np.float32), None]


def test_clip_by_value():
    clipped = clip_by_value(GRADS, 3.5)
    np.testing.assert_allclose(clipped[0], [[3.0, -3.5]])
    np.testing.assert_allclose(clipped[1], [3.5])
    assert clipped[2] is None


def test_clip_each_tensor_by_its_norm():
    clipped = clip_by_norm(GRADS, 1.0)
    np.testing.assert_allclose(clipped[0], [[0.6, -0.8]], rtol=1e-6)  # ‖g‖ = 5 → g/5
    np.testing.assert_allclose(clipped[1], [1.0], rtol=1e-6)
    np.testing.assert_allclose(clip_by_norm(GRADS, 100.0)[0], GRADS[0])  # below c: unchanged


def test_clip_by_global_norm_keeps_the_direction():
    clipped = clip_by_global_norm(GRADS, 6.5)  # global norm sqrt(9 + 16 + 144) = 13
    np.testing.assert_allclose(clipped[0], GRADS[0] / 2, rtol=1e-6)
    np.testing.assert_allclose(clipped[1], GRADS[1] / 2, rtol=1e-6)
    np.testing.assert_allclose(clip_by_global_norm(GRADS, 13.5)[1], GRADS[1], rtol=1e-6)
    for bad in (0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
            clip_by_global_norm(GRADS, bad)


def test_suggested_threshold_from_a_history_and_from_a_model():
    norms = pd.DataFrame({"grad_global_norm": [1.0, 2.0, 3.0, 10.0, np.nan, np.inf]})
    suggestion = suggest_clip_norm(norms)
    assert suggestion.threshold == pytest.approx(4.0) and suggestion.median == pytest.approx(2.5)
    assert suggestion.steps == 4 and suggestion.nonfinite_steps == 2
    assert "mean of 4 observed" in str(suggestion)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = x.sum(axis=1).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    weights = [w.copy() for w in model.get_weights()]
    probed = suggest_clip_norm(model, x, y, loss="mse", optimizer="sgd", steps=5, batch_size=10)
    assert probed.steps == 5
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)  # the model itself is not trained
    # the same 5 steps trained by hand give the same mean norm
    copy = keras.models.clone_model(model)
    copy.set_weights(weights)
    history = gradtools.fit(copy, x[:50], y[:50], loss="mse", optimizer="sgd", epochs=1,
                            batch_size=10, shuffle=False)
    assert probed.threshold == pytest.approx(history.metrics["grad_global_norm"].mean(), rel=1e-6)


def test_fit_clips_the_update_but_reports_the_gradient_before_clipping():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = (x.sum(axis=1) * 100).astype(np.float32)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    w0 = model.layers[0].kernel.numpy()
    history = gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.1), epochs=1,
                            batch_size=16, shuffle=False, clip_global_norm=0.5)
    row = history.metrics.iloc[0]
    assert row["grad_global_norm"] > 0.5
    assert row["grad_global_norm_clipped"] == pytest.approx(0.5, rel=1e-5)
    moved = np.sqrt(((model.layers[0].kernel.numpy() - w0) ** 2).sum())
    assert moved <= 0.1 * 0.5 + 1e-6


@keras.saving.register_keras_serializable("gradtools_tests")
class WrongGradientDense(keras.layers.Dense):
    """A Dense layer whose hand-written backward pass halves the kernel's gradient."""

    def call(self, inputs):
        @tf.custom_gradient
        def matmul(a, w):
            def backward(upstream):
                return (tf.matmul(upstream, w, transpose_b=True),
                        0.5 * tf.matmul(a, upstream, transpose_a=True))
            return tf.matmul(a, w), backward

        return self.activation(matmul(inputs, tf.convert_to_tensor(self.kernel)) + self.bias)


def test_gradient_checking_passes_a_correct_model_and_flags_a_wrong_backward_pass():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3))
    y = rng.normal(size=8)
    keras.utils.set_random_seed(0)
    correct = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                keras.layers.Dense(1)])
    report = check_gradients(correct, x, y, "mse")
    assert report["ok"].all() and report["max_relative_error"].max() < 1e-6

    wrong = keras.Sequential([keras.Input((3,)), WrongGradientDense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    report = check_gradients(wrong, x, y, "mse")
    assert report["ok"].tolist() == [False, True]
    assert report["max_relative_error"][0] == pytest.approx(1 / 3, rel=1e-3)  # |g/2 − g| / (3g/2)


class ResidualBlock(keras.layers.Layer):
    """A layer made of layers (built in ``__init__`` without a dtype, as most are)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.inner = keras.layers.Dense(units, activation="tanh")
        self.outer = keras.layers.Dense(units)

    def call(self, inputs):
        return inputs + self.outer(self.inner(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class TwoLayers(keras.Model):
    """A subclassed model whose get_config returns its constructor's arguments."""

    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="tanh")
        self.head = keras.layers.Dense(1)

    def call(self, inputs):
        return self.head(self.hidden(inputs))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class NoConfig(keras.Model):
    def __init__(self):
        super().__init__()
        self.head = keras.layers.Dense(1)

    def call(self, inputs):
        return self.head(inputs)


def test_gradient_checking_copies_nested_and_subclassed_models_in_float64():
    """A correct model is never flagged because part of its copy stayed float32: before, a
    functional model wrapping a Sequential got relative errors of 1.0 in the Sequential's
    kernels, and a subclassed model a clone_model error."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)), rng.normal(size=8)
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh")], name="inner")
    inputs = keras.Input((4,))
    nested = keras.Model(inputs, keras.layers.Dense(1)(ResidualBlock(4, name="block")(inner(inputs))))
    subclassed = TwoLayers()
    subclassed(x[:1].astype("float32"))
    for model, kernels in ((nested, 4), (subclassed, 2)):
        report = check_gradients(model, x, y, "mse")
        assert len(report) == kernels and report["ok"].all(), report
        assert report["max_relative_error"].max() < 1e-6
        assert all(w.dtype == "float32" for w in model.weights), "the model itself is not changed"
    assert keras.config.dtype_policy().name == "float32", "the default policy is restored"

    unrebuildable = NoConfig()
    unrebuildable(x[:1].astype("float32"))
    with pytest.raises(ValueError, match="could not copy the model .* get_config") as refused:
        check_gradients(unrebuildable, x, y, "mse")
    assert "\n" not in str(refused.value), "one line, not Keras's whole message"
