"""A gallery of architectures people train, healthy and broken, each trained with
``model.fit`` + :class:`gradtools.GradientMonitor` on data made offline.

The healthy models follow keras-io examples (a convnet, a ResNet with batch normalization,
a transformer encoder, a bidirectional LSTM, a Conv1D and a GRU sequence model, an MLP
regressor); the broken ones are the classic failures (a deep saturating net, an explosion
to NaN under SGD, an explosion that stays finite under Adam, a recurrent net whose gradient
vanishes through time). Every case states the verdict a correct diagnosis must give.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from sklearn.datasets import load_diabetes, load_digits

from gradtools.diagnosis import diagnose
from gradtools.monitor import GradientMonitor
from gradtools.through_time import TracedRNN


@dataclass
class Case:
    """One gallery model: how to build it and its data, and what the diagnosis must say."""

    name: str
    architecture: str
    expected: str
    build: Callable[[], tuple[keras.Model, np.ndarray, np.ndarray]]
    compile: dict[str, Any]
    epochs: int
    batch_size: int = 32
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    tensorflow_only: str = ""  # why the case runs on Keras's TensorFlow backend only


# --- data, made offline ----------------------------------------------------------------------

def digits(n: int = 1024):
    """scikit-learn's bundled 8×8 digits, scaled to [0, 1], as (n, 8, 8, 1) images."""
    data = load_digits()
    x = (data.images[:n] / 16.0).astype(np.float32)[..., None]
    return x, data.target[:n].astype(np.int32)


def diabetes():
    """scikit-learn's bundled diabetes regression (442 × 10), targets standardized."""
    data = load_diabetes()
    y = (data.target - data.target.mean()) / data.target.std()
    return data.data.astype(np.float32) * 10, y.astype(np.float32)


def token_sentiment(n: int = 1024, length: int = 24, vocab: int = 64, seed: int = 0):
    """Token sequences labelled 1 when "positive" words (ids 2–5) outnumber "negative" ones
    (ids 6–9): a stand-in for IMDB sentiment that needs the whole sequence."""
    rng = np.random.default_rng(seed)
    x = rng.integers(10, vocab, size=(n, length))
    marks = rng.integers(0, 4, size=n)
    for i, count in enumerate(marks):
        positive = rng.random() < 0.5
        words = rng.integers(2, 6, count + 1) if positive else rng.integers(6, 10, count + 1)
        spots = rng.choice(length, count + 1, replace=False)
        x[i, spots] = words
    y = (((x >= 2) & (x <= 5)).sum(1) > ((x >= 6) & (x <= 9)).sum(1)).astype(np.int32)
    return x.astype(np.int32), y


def waves(n: int = 768, length: int = 64, seed: int = 0):
    """Noisy sine, square and sawtooth waves of random frequency and phase: 3 classes."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length)
    y = rng.integers(0, 3, n)
    freq = rng.uniform(2, 6, (n, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    angle = 2 * np.pi * freq * t + phase
    shapes = [np.sin(angle), np.sign(np.sin(angle)), 2 * ((angle / (2 * np.pi)) % 1) - 1]
    x = np.choose(y[:, None], shapes) + 0.3 * rng.normal(size=(n, length))
    return x[..., None].astype(np.float32), y.astype(np.int32)


def first_token_recall(n: int = 512, length: int = 60, seed: int = 0):
    """The label is the sign of the first step's value; the rest is noise: the gradient must
    travel the whole sequence back to learn it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, length, 1)).astype(np.float32)
    return x, (x[:, 0, 0] > 0).astype(np.float32)


# --- healthy models, after keras-io examples -------------------------------------------------

def convnet():
    """keras-io "Simple MNIST convnet": two Conv2D + MaxPooling blocks, dropout, softmax."""
    x, y = digits()
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="conv1"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(64, 3, activation="relu", padding="same", name="conv2"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax", name="head"),
    ], name="convnet")
    return model, x, y


def _residual_block(x, filters: int, name: str):
    shortcut = x
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn1")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn2")(x)
    return keras.layers.Activation("relu")(keras.layers.add([shortcut, x]))


def resnet():
    """A small ResNet (keras-io / Keras Applications style): stem, three residual blocks of
    Conv–BN–ReLU, global pooling, softmax."""
    x, y = digits()
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(32, 3, padding="same", use_bias=False, name="stem")(inputs)
    h = keras.layers.Activation("relu")(keras.layers.BatchNormalization(name="stem_bn")(h))
    for index in range(3):
        h = _residual_block(h, 32, f"block{index + 1}")
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="resnet"), x, y


class TokenAndPositionEmbedding(keras.layers.Layer):
    """keras-io "Text classification with Transformer": token plus position embeddings."""

    def __init__(self, length: int, vocab: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocab, dim, name="tokens")
        self.positions = keras.layers.Embedding(length, dim, name="positions")

    def call(self, x):
        positions = keras.ops.arange(keras.ops.shape(x)[-1])
        return self.tokens(x) + self.positions(positions)


class TransformerBlock(keras.layers.Layer):
    """keras-io's encoder block: self-attention and a feed-forward net, each with dropout,
    a residual connection and layer normalization."""

    def __init__(self, dim: int, heads: int, hidden: int, rate: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(heads, key_dim=dim, name="attention")
        self.ffn = keras.Sequential([keras.layers.Dense(hidden, activation="relu"),
                                     keras.layers.Dense(dim)], name="ffn")
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.drop1 = keras.layers.Dropout(rate)
        self.drop2 = keras.layers.Dropout(rate)

    def call(self, inputs, training=False):
        attended = self.drop1(self.attention(inputs, inputs), training=training)
        out1 = self.norm1(inputs + attended)
        return self.norm2(out1 + self.drop2(self.ffn(out1), training=training))


def transformer():
    """keras-io "Text classification with Transformer" on a synthetic sentiment task."""
    x, y = token_sentiment()
    inputs = keras.Input((x.shape[1],), dtype="int32")
    h = TokenAndPositionEmbedding(x.shape[1], 64, 32, name="embedding")(inputs)
    h = TransformerBlock(32, 2, 32, name="encoder")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dropout(0.1)(h)
    h = keras.layers.Dense(20, activation="relu", name="dense")(h)
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="transformer"), x, y


def bilstm():
    """keras-io "Bidirectional LSTM on IMDB": embedding, two bidirectional LSTMs, sigmoid."""
    x, y = token_sentiment()
    model = keras.Sequential([
        keras.Input((x.shape[1],), dtype="int32"),
        keras.layers.Embedding(64, 32, name="embedding"),
        keras.layers.Bidirectional(keras.layers.LSTM(32, return_sequences=True), name="bilstm1"),
        keras.layers.Bidirectional(keras.layers.LSTM(32), name="bilstm2"),
        keras.layers.Dense(1, activation="sigmoid", name="head"),
    ], name="bilstm")
    return model, x, y.astype(np.float32)


def conv1d():
    """keras-io "Timeseries classification from scratch": three Conv1D–BN–ReLU blocks,
    global average pooling, softmax; on synthetic waves."""
    x, y = waves()
    inputs = keras.Input(x.shape[1:])
    h = inputs
    for index in range(3):
        h = keras.layers.Conv1D(32, 3, padding="same", name=f"conv{index + 1}")(h)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization(name=f"bn{index + 1}")(h))
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="conv1d"), x, y


def gru():
    """A GRU sequence classifier on the same waves."""
    x, y = waves()
    model = keras.Sequential([
        keras.Input(x.shape[1:]),
        keras.layers.GRU(32, name="gru"),
        keras.layers.Dense(3, activation="softmax", name="head"),
    ], name="gru")
    return model, x, y


def mlp_regressor():
    """A Dense ReLU regressor on the diabetes data (keras-io "regression" style)."""
    x, y = diabetes()
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(64, activation="relu", name="hidden1"),
        keras.layers.Dense(64, activation="relu", name="hidden2"),
        keras.layers.Dense(1, name="head"),
    ], name="mlp_regressor")
    return model, x, y


# --- broken models ---------------------------------------------------------------------------

def deep_sigmoid():
    """Ten sigmoid layers with small weights: sigmoid' ≤ 1/4 per layer, so the gradient of
    the first layers is a product of ten small factors."""
    x, y = digits()
    small = keras.initializers.RandomNormal(0.0, 0.1, seed=0)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten()]
        + [keras.layers.Dense(32, activation="sigmoid", kernel_initializer=small, name=f"sigmoid{i}")
           for i in range(1, 11)]
        + [keras.layers.Dense(10, activation="softmax", name="head")], name="deep_sigmoid")
    return model, x, y


def _raw_regression(n: int = 512, features: int = 15, seed: int = 0):
    """Unscaled regression targets (std in the hundreds), as in the exploding experiments."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    w = rng.normal(size=features) * 50
    return x, (x @ w).astype(np.float32)


def sgd_nan():
    """Large ReLU weights (uniform in [4, 5]) on unscaled targets under SGD: NaN within a
    few steps."""
    x, y = _raw_regression()
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(35, activation="relu", name="hidden",
                           kernel_initializer=keras.initializers.RandomUniform(4, 5, seed=0)),
        keras.layers.Dense(1, name="head"),
    ], name="sgd_nan")
    return model, x, y


def adam_finite():
    """A 14-layer ReLU MLP initialized with a standard deviation of 0.8 (He would be 0.25):
    every layer multiplies the signal by about 3, the loss starts near 1e14 and Adam's
    bounded steps cannot bring it down; nothing becomes NaN."""
    x, y = diabetes()
    big = keras.initializers.RandomNormal(0.0, 0.8, seed=0)
    model = keras.Sequential(
        [keras.Input((x.shape[1],))]
        + [keras.layers.Dense(32, activation="relu", kernel_initializer=big, name=f"relu{i}")
           for i in range(1, 14)]
        + [keras.layers.Dense(1, kernel_initializer=big, name="head")], name="adam_finite")
    return model, x, y


def rnn_through_time():
    """A SimpleRNN over 60 steps whose recurrent kernel has spectral radius 0.5, asked to
    recall the first step: ‖∂L/∂h_1‖ is about 0.5^59 of ‖∂L/∂h_T‖."""
    x, y = first_token_recall()
    cell = keras.layers.SimpleRNNCell(
        16, recurrent_initializer=keras.initializers.Orthogonal(gain=0.5, seed=0))
    model = keras.Sequential([
        keras.Input(x.shape[1:]),
        TracedRNN(cell, name="rnn"),
        keras.layers.Dense(1, activation="sigmoid", name="head"),
    ], name="rnn_through_time")
    return model, x, y


def _adam(rate=1e-3):
    return lambda: keras.optimizers.Adam(rate)


CASES = [
    Case("convnet", "Conv2D ×2 + pooling + dropout (keras-io MNIST convnet), digits 8×8",
         "healthy", convnet, dict(optimizer=_adam(), loss="sparse_categorical_crossentropy"), 4),
    Case("resnet", "ResNet: 3 residual blocks of Conv–BN–ReLU, digits 8×8", "healthy", resnet,
         dict(optimizer=_adam(), loss="sparse_categorical_crossentropy"), 3),
    Case("transformer", "Transformer encoder (token+position embedding, MHA, LayerNorm), tokens",
         "healthy", transformer, dict(optimizer=_adam(), loss="sparse_categorical_crossentropy"), 4),
    Case("bilstm", "Bidirectional LSTM ×2 text classifier (keras-io IMDB), tokens", "healthy", bilstm,
         dict(optimizer=_adam(), loss="binary_crossentropy"), 3),
    Case("conv1d", "Conv1D–BN–ReLU ×3 time-series classifier (keras-io), waves", "healthy", conv1d,
         dict(optimizer=_adam(), loss="sparse_categorical_crossentropy"), 4),
    Case("gru", "GRU sequence classifier, waves", "healthy", gru,
         dict(optimizer=_adam(3e-3), loss="sparse_categorical_crossentropy"), 4),
    Case("mlp_regressor", "Dense ReLU ×2 regressor, diabetes", "healthy", mlp_regressor,
         dict(optimizer=_adam(), loss="mse"), 10),
    Case("deep_sigmoid", "10 sigmoid Dense layers, small init, SGD", "vanishing", deep_sigmoid,
         dict(optimizer=lambda: keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy"), 3),
    Case("sgd_nan", "ReLU Dense, init U(4, 5), unscaled targets, SGD", "exploding", sgd_nan,
         dict(optimizer=lambda: keras.optimizers.SGD(0.01), loss="mse"), 2),
    Case("adam_finite", "14 ReLU Dense layers, init N(0, 0.8), Adam", "exploding", adam_finite,
         dict(optimizer=_adam(), loss="mse"), 3),
    Case("rnn_through_time", "SimpleRNN, T = 60, recurrent spectral radius 0.5, recall step 1",
         "vanishing", rnn_through_time,
         dict(optimizer=_adam(), loss="binary_crossentropy"), 3,
         tensorflow_only="gradients through time (gradtools.through_time.TracedRNN)"),
]


# --- training and measuring ------------------------------------------------------------------

class _EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._started)


@dataclass
class Trained:
    case: Case
    model: keras.Model
    monitor: GradientMonitor | None
    losses: list[float]
    epoch_seconds: list[float]


def train(case: Case, seed: int = 0, monitored: bool = True, epochs: int | None = None,
          callbacks=()) -> Trained:
    """``model.fit`` of the case, with a :class:`GradientMonitor` when ``monitored``, and
    ``callbacks`` after it."""
    keras.utils.set_random_seed(seed)
    model, x, y = case.build()
    model.compile(optimizer=case.compile["optimizer"](), loss=case.compile["loss"])
    monitor = GradientMonitor() if monitored else None
    timer = _EpochTimer()
    fitted = model.fit(x, y, epochs=epochs or case.epochs, batch_size=case.batch_size, verbose=0,
                       callbacks=[timer] + ([monitor] if monitor else []) + list(callbacks))
    return Trained(case, model, monitor, fitted.history["loss"], timer.seconds)


def steady_epoch_seconds(trained: Trained) -> float:
    """The median epoch time after the first (which includes tracing and compiling)."""
    return float(np.median(trained.epoch_seconds[1:]))


def monitor_overhead(case: Case, epochs: int = 6, repeats: int = 2) -> tuple[float, float]:
    """Steady-state seconds per epoch of plain ``model.fit`` and of ``model.fit`` with the
    monitor, measured alternately in this process, the fastest of ``repeats`` each."""
    plain, monitored = [], []
    for _ in range(repeats):
        plain.append(steady_epoch_seconds(train(case, monitored=False, epochs=epochs)))
        monitored.append(steady_epoch_seconds(train(case, monitored=True, epochs=epochs)))
    return min(plain), min(monitored)


def gallery_row(case: Case, seeds=(0,), overhead: bool = True) -> dict[str, Any]:
    """The case's verdict on each seed with the evidence of the first, and the monitor's
    cost over plain ``model.fit``."""
    runs = [train(case, seed) for seed in seeds]
    diagnoses = [diagnose(run.monitor.history()) for run in runs]
    row = {
        "model": case.name, "architecture": case.architecture, "expected": case.expected,
        "verdicts": [d.verdict for d in diagnoses], "evidence": evidence_line(diagnoses[0]),
        "loss": f"{runs[0].losses[0]:.3g} → {runs[0].losses[-1]:.3g}",
        "heatmap": runs[0].monitor.history(),
    }
    if overhead:
        row["epoch_ms_fit"], row["epoch_ms_monitored"] = (1e3 * s for s in monitor_overhead(case))
    return row


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README's gallery table."""
    lines = ["| model | architecture, data | expected | verdict | evidence | loss (first → last epoch) "
             "| epoch: fit → with monitor |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        counts = ", ".join(f"{row['verdicts'].count(v)}× {v}" for v in dict.fromkeys(row["verdicts"]))
        timing = (f"{row['epoch_ms_fit']:.0f} → {row['epoch_ms_monitored']:.0f} ms "
                  f"({row['epoch_ms_monitored'] / row['epoch_ms_fit']:.2f}×)"
                  if "epoch_ms_fit" in row else "—")
        lines.append(f"| {row['model']} | {row['architecture']} | {row['expected']} | {counts} | "
                     f"{row['evidence']} | {row['loss']} | {timing} |")
    return "\n".join(lines) + "\n"


def evidence_line(diagnosis) -> str:
    """The one number that decided the verdict (or that kept it healthy)."""
    e = diagnosis.evidence
    if diagnosis.verdict == "exploding":
        if e.first_nonfinite_statistic_step is not None:
            return f"NaN/Inf at step {e.first_nonfinite_statistic_step}"
        worst = max(diagnosis.layers, key=lambda f: f.numbers["grad_to_weight"] or 0)
        return (f"loss {e.loss_epoch_median_max:.2g}; ‖g‖/‖W‖ {worst.numbers['grad_to_weight']:.2g}"
                f" ({worst.path})")
    if e.state_grad_ratio is not None and e.state_grad_ratio < 1e-3:
        return f"‖∂L/∂h_1‖/‖∂L/∂h_T‖ = {e.state_grad_ratio:.2g} (T = {e.time_steps})"
    if e.weakest_block is None:
        return "one block"
    return f"weakest block {e.weakest_block}: {e.weakest_depth_ratio:.2g}× the strongest after it"


# --- bad batches: the spike guard on real models ----------------------------------------------

#: Steps (from 1) whose batch is bad in :func:`train_with_bad_batches`: after the guard's
#: warm-up, within the shortest case's run (3 epochs of 32 steps).
BAD_STEPS = (20, 45, 70, 90)
#: How much a bad batch weighs: its labels are wrong and its loss counts 10³ times.
BAD_WEIGHT = 1e3


def bad_batch_stream(case: Case, x, y, bad_steps, seed: int = 0):
    """The examples of ``case.epochs`` epochs end to end (each epoch a new permutation), as
    (x, y, sample weights, steps per epoch): at each of ``bad_steps`` the batch's class labels
    are shifted to wrong ones and weigh :data:`BAD_WEIGHT`. Unlearnable and heavy, as a
    corrupted shard is; a new one each time, so the model cannot fit it."""
    rng = np.random.default_rng(seed)
    size, per_epoch = case.batch_size, len(x) // case.batch_size
    order = np.concatenate([rng.permutation(len(x))[:per_epoch * size] for _ in range(case.epochs)])
    x, y = x[order], y[order].copy()
    weights = np.ones(len(order), np.float32)
    classes = int(y.max()) + 1
    for step in bad_steps:
        rows = slice((step - 1) * size, step * size)
        y[rows] = (y[rows] + rng.integers(1, classes, size=size)) % classes
        weights[rows] = BAD_WEIGHT
    return x, y, weights, per_epoch


def train_with_bad_batches(case: Case, bad_steps=BAD_STEPS, guard=None, seed: int = 0):
    """``model.fit`` of a classification case over :func:`bad_batch_stream`, with a monitor and
    ``guard``: (the monitor's metrics, the guard's events or None, the median loss of the
    last epoch's good steps)."""
    keras.utils.set_random_seed(seed)
    model, x, y = case.build()
    model.compile(optimizer=case.compile["optimizer"](), loss=case.compile["loss"])
    x, y, weights, per_epoch = bad_batch_stream(case, x, y, bad_steps, seed)
    monitor = GradientMonitor(figures=False)
    model.fit(x, y, sample_weight=weights, batch_size=case.batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=[monitor] + ([guard] if guard is not None else []))
    metrics = monitor.metrics
    last = metrics[(metrics["step"] > metrics["step"].max() - per_epoch) & ~metrics["step"].isin(bad_steps)]
    return metrics, guard.events if guard is not None else None, float(last["loss"].median())


def spike_table(names=("transformer", "resnet"), actions=("skip", "rollback", "clip", "lower_lr")) -> str:
    """Markdown: for each case, the last epoch's median loss on clean data, with bad batches
    and no guard, and with the guard's each action, and which bad batches each caught."""
    from gradtools.spike_guard import SpikeGuard  # noqa: PLC0415 - only this table needs it

    lines = ["| model | run | bad batches caught | other spikes | loss, last epoch (median) | × clean |",
             "|---|---|---|---|---|---|"]
    for name in names:
        case = next(c for c in CASES if c.name == name)
        _, events, clean = train_with_bad_batches(case, bad_steps=(), guard=SpikeGuard("warn", verbose=False))
        lines.append(f"| {name} | clean data, guard watching | — | {len(events)} | {clean:.4g} | 1 |")
        _, _, unguarded = train_with_bad_batches(case)
        lines.append(f"| {name} | bad batches, no guard | — | — | {unguarded:.4g} | {unguarded / clean:.3g} |")
        for action in actions:
            _, events, loss = train_with_bad_batches(case, guard=SpikeGuard(action, verbose=False))
            caught = sorted(set(events["step"]) & set(BAD_STEPS))
            lines.append(f"| {name} | bad batches, {action} | {len(caught)} of {len(BAD_STEPS)} | "
                         f"{len(set(events['step']) - set(BAD_STEPS))} | {loss:.4g} | {loss / clean:.3g} |")
    return "\n".join(lines) + "\n"
