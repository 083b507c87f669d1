"""Every statistic gradtools.fit logs equals an independent GradientTape + NumPy computation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradtools
from gradtools.columns import metric_columns
from gradtools.steps import padding_is_exact, resolve_loss

LEARNING_RATE = 0.1


def small_model(regularizer=None):
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", kernel_regularizer=regularizer),
        keras.layers.Dense(5, activation="sigmoid"),
        keras.layers.Dense(1),
    ])


def independent_rows(model, x, y, steps, l2=0.0, batch_size=None):
    """SGD by hand over unshuffled batches: tape gradients, NumPy statistics, W ← W − lr·g."""
    rows = []
    batch_size = batch_size or len(x)
    n_batches = -(-len(x) // batch_size)
    for step in range(1, steps + 1):
        batch = (step - 1) % n_batches
        xb, yb = x[batch * batch_size:(batch + 1) * batch_size], y[batch * batch_size:(batch + 1) * batch_size]
        with tf.GradientTape() as tape:
            prediction = model(xb, training=True)
            loss = tf.reduce_mean(tf.square(prediction[:, 0] - yb))
            if l2:
                loss += l2 * tf.reduce_sum(tf.square(model.layers[0].kernel))
        variables = model.trainable_weights
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
        row = {"step": step, "epoch": (step - 1) // n_batches, "batch": batch, "loss": float(loss),
               "grad_global_norm": np.sqrt(sum((g ** 2).sum() for g in grads))}
        layer = 0
        for v, g in zip(variables, grads):
            before = v.numpy().astype(np.float64)
            after = before - LEARNING_RATE * g
            v.assign(after.astype(np.float32))
            if v.name != "kernel":
                continue
            layer += 1
            row.update({
                f"layer_{layer}/grad_mean": g.mean(),
                f"layer_{layer}/grad_abs_mean": np.abs(g).mean(),
                f"layer_{layer}/grad_norm": np.sqrt((g ** 2).sum()),
                f"layer_{layer}/grad_max_abs": np.abs(g).max(),
                f"layer_{layer}/weight_mean": after.mean(),
                f"layer_{layer}/weight_norm": np.sqrt((after ** 2).sum()),
                f"layer_{layer}/update_ratio": np.sqrt(((after - before) ** 2).sum())
                / np.sqrt((before ** 2).sum()),
            })
        rows.append(row)
    return rows


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_every_statistic_matches_an_independent_computation(l2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = rng.normal(size=16).astype(np.float32)
    keras.utils.set_random_seed(3)
    model = small_model(keras.regularizers.L2(l2) if l2 else None)
    reference = small_model()
    reference.set_weights(model.get_weights())

    history = gradtools.fit(model, x, y, loss="mean_squared_error",
                            optimizer=keras.optimizers.SGD(LEARNING_RATE),
                            epochs=3, batch_size=16, shuffle=False)
    expected = independent_rows(reference, x, y, steps=3, l2=l2)

    assert list(history.metrics.columns) == metric_columns(3)
    assert len(history.metrics) == 3
    for got, want in zip(history.metrics.to_dict("records"), expected):
        for column, value in want.items():
            assert got[column] == pytest.approx(value, rel=2e-5, abs=1e-7), column
    assert history.layer_paths == [v.path for v in model.trainable_weights if v.name == "kernel"]


@pytest.mark.parametrize("jit_compile", [True, False])
def test_statistics_hold_for_a_smaller_last_batch_with_and_without_xla(jit_compile):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.normal(size=20).astype(np.float32)
    keras.utils.set_random_seed(4)
    model = small_model()
    reference = small_model()
    reference.set_weights(model.get_weights())
    history = gradtools.fit(model, x, y, loss="mean_squared_error",
                            optimizer=keras.optimizers.SGD(LEARNING_RATE), epochs=2,
                            batch_size=8, shuffle=False, jit_compile=jit_compile)
    expected = independent_rows(reference, x, y, steps=6, batch_size=8)
    assert history.metrics["batch"].tolist() == [0, 1, 2, 0, 1, 2]
    for got, want in zip(history.metrics.to_dict("records"), expected):
        for column, value in want.items():
            assert got[column] == pytest.approx(value, rel=2e-5, abs=1e-7), column


def test_regularization_losses_are_part_of_the_differentiated_loss():
    x = np.ones((8, 3), np.float32)
    y = np.zeros(8, np.float32)
    keras.utils.set_random_seed(1)
    plain = small_model()
    regularized = small_model(keras.regularizers.L2(1.0))
    regularized.set_weights(plain.get_weights())
    kernel = plain.layers[0].kernel.numpy()
    a = gradtools.fit(plain, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.0), epochs=1,
                      batch_size=8, shuffle=False)
    b = gradtools.fit(regularized, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.0),
                      epochs=1, batch_size=8, shuffle=False)
    penalty = float((kernel.astype(np.float64) ** 2).sum())
    assert b.metrics["loss"][0] == pytest.approx(a.metrics["loss"][0] + penalty, rel=1e-5)


def sequence_model(mask_zero: bool):
    """Per-time-step softmax over a sequence; with ``mask_zero`` the zeros are masked and the
    loss averages over the unmasked steps, so a batch's mean depends on which rows it holds."""
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(10, 4, mask_zero=mask_zero),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(3, activation="softmax"),
    ])


@pytest.mark.parametrize("mask_zero", [True, False])
def test_a_smaller_last_batch_trains_at_full_size_exactly_as_the_smaller_batch_alone(mask_zero):
    """20 sequences in batches of 8: the last batch of 4 is filled up to 8 and its extra rows
    masked out of the loss; its loss and gradients are those of the 4 rows alone (whose
    masked time steps, with ``mask_zero``, differ from the filling's)."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 7, size=20)
    x = np.where(np.arange(6) < lengths[:, None], rng.integers(1, 10, size=(20, 6)), 0).astype(np.int32)
    y = rng.integers(0, 3, size=(20, 6)).astype(np.int32)
    keras.utils.set_random_seed(5)
    model = sequence_model(mask_zero)
    reference = sequence_model(mask_zero)
    reference.set_weights(model.get_weights())
    loss = keras.losses.SparseCategoricalCrossentropy()
    assert padding_is_exact(model, loss)

    history = gradtools.fit(model, x, y, loss=loss, optimizer=keras.optimizers.SGD(0.0), epochs=1,
                            batch_size=8, shuffle=False)
    for row, start in zip(history.metrics.to_dict("records"), (0, 8, 16)):
        with tf.GradientTape() as tape:
            batch_loss = loss(y[start:start + 8], reference(x[start:start + 8], training=True))
        gradients = [tf.convert_to_tensor(g) for g in tape.gradient(batch_loss, reference.trainable_weights)]
        assert row["loss"] == pytest.approx(float(batch_loss), rel=1e-6)
        assert row["grad_global_norm"] == pytest.approx(float(tf.linalg.global_norm(gradients)), rel=1e-5)


def test_padding_is_used_only_where_each_example_is_computed_alone():
    dense = [keras.Input((3,)), keras.layers.Dense(2)]
    assert padding_is_exact(keras.Sequential(dense), resolve_loss("mse"))
    assert not padding_is_exact(keras.Sequential([*dense, keras.layers.BatchNormalization()]), resolve_loss("mse"))
    assert not padding_is_exact(keras.Sequential([*dense, keras.layers.Lambda(lambda t: t - tf.reduce_mean(t, 0))]),
                                resolve_loss("mse"))

    class Centered(keras.layers.Layer):  # a layer of the user's: it might mix the rows, and does
        def call(self, t):
            return t - tf.reduce_mean(t, 0)

    assert not padding_is_exact(keras.Sequential([*dense, Centered()]), resolve_loss("mse"))
    assert not padding_is_exact(keras.Sequential(dense), resolve_loss(lambda t, p: tf.reduce_mean((t - p) ** 2)))
    assert not padding_is_exact(keras.Sequential(dense), keras.losses.MeanSquaredError(reduction=None))
    inputs = keras.Input((3,))
    two_outputs = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(1)(inputs)])
    assert not padding_is_exact(two_outputs, resolve_loss("mse"))
    one_value_per_example = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1), keras.layers.Reshape(())])
    assert not padding_is_exact(one_value_per_example, resolve_loss("mse"))  # its MSE is one number


@pytest.mark.parametrize("jit_compile", [False, True])
def test_one_non_finite_entry_anywhere_makes_the_step_non_finite(jit_compile):
    """``all_finite``: every position, dtype and kind of non-finite value is found; finite
    extremes of each dtype (float16's 65504, float64's 1e300) are not mistaken for overflow; an
    unreached variable (None) is skipped."""
    from gradtools.stats import all_finite

    check = tf.function(all_finite, jit_compile=jit_compile, autograph=False)
    rng = np.random.default_rng(0)
    loss = np.float32(0.5)
    finite = [rng.normal(size=(3, 4)).astype(np.float32), None, np.array([65504, -1, 2], np.float16),
              np.array([[1e300, -2.0], [3.0, 4.0]]), rng.normal(size=(2, 3)).astype(np.float32)]

    def with_embedding_gradient(gradients):  # an Embedding's gradient arrives as IndexedSlices
        values, rows = gradients[-1], tf.constant([0, 3])
        return [*gradients[:-1], tf.IndexedSlices(tf.constant(values), rows, tf.constant([5, 3]))]

    assert bool(check(loss, with_embedding_gradient(finite)))
    assert not bool(check(np.float32(np.nan), with_embedding_gradient(finite)))
    for position in (0, 2, 3, 4):
        for bad in (np.nan, np.inf, -np.inf):
            gradients = [None if g is None else g.copy() for g in finite]
            gradients[position].flat[-1] = bad
            assert not bool(check(loss, with_embedding_gradient(gradients))), (position, bad)


def test_a_prediction_is_saturated_when_every_probability_is_at_the_edge():
    """Hand-made softmax and sigmoid outputs: a confident softmax row with probabilities below ε
    is not saturated, one whose largest probability is above 1 − ε is; an empty batch (a
    replica given no rows) counts nothing; rows left out are not counted."""
    import tensorflow as tf

    from gradtools.stats import saturated_output_counts

    softmax = tf.constant([[1.0, 0.0, 0.0], [0.5, 0.5 - 1e-9, 1e-9], [0.4, 0.3, 0.3]])
    sigmoid = tf.constant([[1.0], [1e-9], [0.5], [0.9]])
    assert saturated_output_counts([softmax]).numpy().tolist() == [1.0, 3.0]
    assert saturated_output_counts([sigmoid]).numpy().tolist() == [2.0, 4.0]
    assert saturated_output_counts([softmax, sigmoid], rows=None).numpy().tolist() == [3.0, 7.0]
    rows = tf.constant([True, False, True, False])
    assert saturated_output_counts([sigmoid], rows=rows).numpy().tolist() == [1.0, 2.0]
    assert saturated_output_counts([tf.zeros([0, 3])]).numpy().tolist() == [0.0, 0.0]
    sequence = tf.constant([[[1.0, 0.0], [0.5, 0.5]]])  # one example, two time steps
    assert saturated_output_counts([sequence]).numpy().tolist() == [1.0, 2.0]
