"""SpikeGuard: bad batches injected at known steps are caught and named, and each action does
exactly what it says, checked against runs that never saw the bad batch, the weights before
the step, or the learning rate Keras reads."""

import json

import keras
import numpy as np
import pytest

import gradtools
from gradtools import GradientMonitor, SpikeGuard
from gradtools.diagnosis import diagnose
from gradtools.history import History
from gradtools.loggers import LocalRunLogger
from gradtools.plots import plot_spikes

BATCH, N_BATCHES = 16, 40
#: Batches (0-based, in every epoch: no shuffling) whose targets are multiplied by 10³ (inputs
#: would not do: the batch normalization after the first layer takes their scale out); after
#: the guard's warm-up of 16 steps.
BAD = (20, 31)


def regression(n_batches=N_BATCHES, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_batches * BATCH, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8) + 0.1 * rng.normal(size=len(x))).astype(np.float32)
    return x, y


def corrupted(x, bad=BAD, scale=1e3):
    x = x.copy()
    for b in bad:
        x[b * BATCH:(b + 1) * BATCH] *= scale
    return x


def without(values, bad=BAD):
    keep = np.ones(len(values), bool)
    for b in bad:
        keep[b * BATCH:(b + 1) * BATCH] = False
    return values[keep]


def mlp(optimizer="adam", seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu", name="hidden"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Dense(16, activation="relu", name="hidden2"),
                              keras.layers.Dense(1, name="head")])
    model.compile(optimizer=keras.optimizers.get(optimizer), loss="mse")
    return model


def steps_of(bad, epochs, n_batches=N_BATCHES):
    return [e * n_batches + b + 1 for e in range(epochs) for b in bad]


class WeightsAtBatchEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights, self.rates = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([w.copy() for w in self.model.get_weights()])
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def same_weights(first, second, rtol=1e-6, atol=1e-7):
    return all(np.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(first, second))


# --- detection ---------------------------------------------------------------------------------

def test_every_injected_bad_batch_is_caught_and_named_and_nothing_else():
    x, y = regression()
    model = mlp()
    guard = SpikeGuard("warn", verbose=False)
    model.fit(x, corrupted(y), batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[guard])
    events = guard.events
    assert list(events["step"]) == steps_of(BAD, 2)
    assert list(events["epoch"]) == [0, 0, 1, 1] and list(events["batch"]) == [*BAD, *BAD]
    assert set(events["quantity"]) == {"grad_global_norm"} and set(events["action"]) == {"warned"}
    assert (events["value"] > 100 * events["threshold"]).all() and (events["threshold"] > events["median"]).all()
    assert set(events["layer"]) <= {w.path for w in model.trainable_weights if w.name == "kernel"}
    assert (events["layer_jump"] > 100).all()


def test_a_clean_run_has_no_event():
    x, y = regression()
    guard = SpikeGuard("warn", verbose=False)
    mlp().fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.events.empty and guard.dropped == 0


def test_a_non_finite_batch_is_one_event_naming_a_non_finite_layer_and_is_never_applied():
    x, y = regression()
    x_bad = x.copy()
    x_bad[25 * BATCH] = np.nan
    model = mlp()
    guard = SpikeGuard("clip", verbose=False)
    model.fit(x_bad, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    (event,) = guard.events.itertuples()
    assert (event.step, event.quantity, event.action) == (26, "nonfinite", "skipped")
    assert event.layer in {v.path for v in model.trainable_weights}
    assert all(np.isfinite(w).all() for w in model.get_weights())


# --- the actions ------------------------------------------------------------------------------

@pytest.mark.parametrize("loop", ["model.fit", "gradtools.fit"])
def test_skip_trains_exactly_as_if_the_bad_batches_were_not_there(loop):
    """A skipped step leaves no trace: weights, Adam's moments and step count, and the
    BatchNormalization statistics the bad batch moved, are all as before it."""
    x, y = regression()

    def train(inputs, targets, guard):
        model = mlp()
        if loop == "model.fit":
            model.fit(inputs, targets, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                      callbacks=[guard] if guard else [])
        else:
            gradtools.fit(model, inputs, targets, loss="mse", optimizer=model.optimizer, epochs=2,
                          batch_size=BATCH, shuffle=False, spike_guard=guard, figures=False)
        return model

    guard = SpikeGuard("skip", verbose=False)
    guarded = train(x, corrupted(y), guard)
    # the reference never saw those batches; its steps are numbered without them
    reference = train(without(x), without(y), None)
    assert list(guard.events["step"]) == steps_of(BAD, 2) and set(guard.events["action"]) == {"skipped"}
    assert same_weights(guarded.get_weights(), reference.get_weights())
    assert int(guarded.optimizer.iterations.numpy()) == 2 * (N_BATCHES - len(BAD))
    assert same_weights([v.numpy() for v in guarded.optimizer.variables],
                        [v.numpy() for v in reference.optimizer.variables])


def test_rollback_restores_the_last_snapshot_and_skips_the_batch():
    x, y = regression()
    model = mlp()
    seen = WeightsAtBatchEnd()
    guard = SpikeGuard("rollback", snapshot_every=10, verbose=False)
    model.fit(x, corrupted(y, bad=(25,)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[guard, seen])
    assert list(guard.events["action"]) == ["rolled_back"] and list(guard.events["step"]) == [26]
    # after step 26 the model is as after step 20, the last snapshot (weights and BN statistics)
    assert same_weights(seen.weights[25], seen.weights[19], rtol=0, atol=0)
    assert not same_weights(seen.weights[24], seen.weights[19])


def test_clip_scales_the_spike_step_to_the_threshold_it_crossed():
    """Under plain SGD the update is −lr·g: its global norm over lr is the clipped gradient's
    norm, which must be the threshold the event reports."""
    x, y = regression()
    rate = 0.01
    model = mlp(keras.optimizers.SGD(rate))
    seen = WeightsAtBatchEnd()
    guard = SpikeGuard("clip", verbose=False)
    model.fit(x, corrupted(y, bad=(25,)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[guard, seen])
    (event,) = guard.events.itertuples()
    assert event.action == "clipped" and event.value > 100 * event.threshold
    trainable = [i for i, w in enumerate(model.weights) if w.trainable]
    change = np.sqrt(sum(np.sum((seen.weights[25][i] - seen.weights[24][i]) ** 2) for i in trainable))
    assert change / rate == pytest.approx(event.threshold, rel=1e-3)


def test_lower_lr_lowers_the_rate_for_its_steps_then_gives_it_back():
    x, y = regression()
    model = mlp(keras.optimizers.SGD(0.01))
    seen = WeightsAtBatchEnd()
    guard = SpikeGuard("lower_lr", lr_factor=0.1, lr_steps=5, verbose=False)
    model.fit(x, corrupted(y, bad=(20,)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[guard, seen])
    assert list(guard.events["action"]) == ["lowered_lr"]
    # the spike's step (batch 20, 0-based) and the four after it run at the lowered rate, five
    # steps; read after each batch, the rate is lowered after batches 20..23 and back after 24
    # (the fifth step restores it once applied)
    assert seen.rates[19] == pytest.approx(0.01)
    assert seen.rates[20:24] == pytest.approx([0.001] * 4)
    assert seen.rates[24:] == pytest.approx([0.01] * (N_BATCHES - 24))


def test_lower_lr_ending_inside_its_cool_down_gives_the_rate_back():
    x, y = regression(n_batches=24)
    model = mlp(keras.optimizers.SGD(0.01))
    guard = SpikeGuard("lower_lr", lr_steps=100, verbose=False)
    model.fit(x, corrupted(y, bad=(20,)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert len(guard.events) == 1
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)


@pytest.mark.parametrize("loop", ["model.fit", "gradtools.fit"])
def test_stop_ends_training_at_the_spike_with_the_weights_from_before_it(loop):
    x, y = regression()
    reference = mlp()
    reference.fit(x[:25 * BATCH], y[:25 * BATCH], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    model = mlp()
    guard = SpikeGuard("stop", verbose=False)
    if loop == "model.fit":
        model.fit(x, corrupted(y, bad=(25,)), batch_size=BATCH, epochs=3, shuffle=False, verbose=0, callbacks=[guard])
    else:
        history = gradtools.fit(model, x, corrupted(y, bad=(25,)), loss="mse", optimizer=model.optimizer,
                                epochs=3, batch_size=BATCH, shuffle=False, spike_guard=guard, figures=False,
                                jit_compile=False)  # the skip test compiles the guard with XLA
        assert history.metrics["step"].max() == 26  # the epoch's loop ended at the spike
    assert list(guard.events["step"]) == [26] and guard.stopped
    assert same_weights(model.get_weights(), reference.get_weights())


# --- what a user meets ----------------------------------------------------------------------------

def test_settings_out_of_range_are_named_with_what_is_allowed():
    with pytest.raises(ValueError, match="action must be one of 'warn', 'skip'"):
        SpikeGuard("ignore")
    with pytest.raises(ValueError, match="window must be an integer from 2"):
        SpikeGuard(window=1)
    with pytest.raises(ValueError, match="lr_factor must be a number between 0 and 1"):
        SpikeGuard("lower_lr", lr_factor=2)


def test_lower_lr_with_a_schedule_is_refused_before_training():
    x, y = regression(n_batches=2)
    model = mlp(keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.9)))
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="learning rate.*schedule.*ExponentialDecay"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[SpikeGuard("lower_lr")])
    assert same_weights(model.get_weights(), before, rtol=0, atol=0)


def test_a_printed_line_per_spike(capsys):
    x, y = regression()
    mlp().fit(x, corrupted(y, bad=(25,)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[SpikeGuard("skip")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("SpikeGuard: step 26 (epoch 1, batch 26): grad_global_norm ")
    assert "/kernel ×" in line and line.endswith("; skipped")


# --- beside the monitor, in the run's record -------------------------------------------------------

@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """model.fit with the guard (skip) before a monitor that writes a run directory."""
    run_dir = tmp_path_factory.mktemp("guarded") / "run"
    x, y = regression()
    guard = SpikeGuard("skip", verbose=False)
    monitor = GradientMonitor(loggers=[LocalRunLogger(run_dir, name="guarded")])
    mlp().fit(x, corrupted(y), batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[guard, monitor])
    return monitor, guard, run_dir


def test_beside_a_monitor_the_record_has_the_computed_gradient_and_the_spikes(guarded_run):
    """The monitor records the gradient the step computed (the guard sits next to the
    optimizer, whichever callback comes first), and a skipped step moves no weight."""
    monitor, guard, run_dir = guarded_run
    metrics = monitor.metrics.set_index("step")
    spike_steps = steps_of(BAD, 2)
    assert (metrics.loc[spike_steps, "grad_global_norm"] > 100 * metrics["grad_global_norm"].median()).all()
    assert (metrics.loc[spike_steps, "layer_1/update_ratio"] == 0).all()
    assert (metrics.drop(spike_steps)["layer_1/update_ratio"] > 0).all()

    history = History.from_run_dir(run_dir)
    assert list(history.spikes["step"]) == spike_steps
    assert history.spikes.equals(monitor.history().spikes) and history.spikes.equals(guard.events)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["spike_guard"] == {"spikes": 4, "actions": {"skipped": 4}}
    assert (run_dir / "figures" / "spikes.png").is_file()
    assert "4 spikes, the first at step 21 (grad_global_norm) in " in info["diagnosis"]["explanation"]


def test_the_monitor_outside_the_guard_whichever_comes_first():
    x, y = regression()
    guard, monitor = SpikeGuard("skip", verbose=False), GradientMonitor(figures=False)
    mlp().fit(x, corrupted(y, bad=(25,)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[monitor, guard])
    metrics = monitor.metrics.set_index("step")
    assert metrics.loc[26, "grad_global_norm"] > 100 * metrics["grad_global_norm"].median()
    assert metrics.loc[26, "layer_1/update_ratio"] == 0 and list(monitor.history().spikes["step"]) == [26]


def test_the_verdict_leaves_the_caught_spikes_out(guarded_run):
    """Four bad batches make the gradient norm jump 10³×: with them, the run reads as exploding;
    the guard's record takes them out, and the healthy net underneath is judged healthy."""
    history = guarded_run[0].history()
    assert diagnose(history).verdict == "healthy"
    assert diagnose(History(metrics=history.metrics, status=history.status)).verdict == "exploding"


def test_the_spike_figure_marks_each_spike_on_both_curves(guarded_run):
    history = guarded_run[0].history()
    figure = plot_spikes(history.metrics, history.spikes)
    for ax, column in zip(figure.axes, ("loss", "grad_global_norm")):
        marks = [c for c in ax.collections if c.get_label().startswith("spike")]
        (points,) = [m.get_offsets() for m in marks]
        assert list(points[:, 0]) == steps_of(BAD, 2)
        expected = history.metrics.set_index("step").loc[steps_of(BAD, 2), column]
        assert np.allclose(points[:, 1], expected)


# --- the suite's spikes/ configs -------------------------------------------------------------------

def test_the_spikes_configs_no_guard_diverges_and_skip_ends_where_the_clean_run_does(tmp_path):
    """configs/spikes/: two batches an epoch with targets ×10³ make plain SGD diverge at the
    first of them; skipping them ends within 5 % of the run on clean data (median loss of the
    last epoch), every bad batch of every epoch caught."""
    from experiments.config import load_config
    from experiments.runner import run_experiment

    runs = {name: run_experiment(load_config(f"spikes/{name}", ["training.epochs=5"]), tmp_path, figures=False)
            for name in ("clean", "no_guard", "skip")}
    assert runs["no_guard"].history.status == "diverged"
    assert runs["no_guard"].history.first_nonfinite_step <= 20 + 1 + 3  # a few steps after the first bad batch
    clean, skipped = (runs[name].history.metrics for name in ("clean", "skip"))
    config = runs["skip"].config
    per_epoch = len(clean) // 5
    expected = [e * per_epoch + b + 1 for e in range(5) for b in config.data.corrupt_batches]
    spikes = History.from_run_dir(runs["skip"].run_dir).spikes
    assert list(spikes["step"]) == expected and set(spikes["action"]) == {"skipped"}
    last = [m[m["epoch"] == 4]["loss"].median() for m in (clean, skipped)]
    assert last[1] == pytest.approx(last[0], rel=0.05)


# --- what the review found ------------------------------------------------------------------------

class RaiseAtBatch(keras.callbacks.Callback):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise RuntimeError("a callback failed")


@pytest.mark.parametrize("guard_first", [True, False])
def test_a_fit_that_raises_takes_the_guard_away_and_gives_the_rate_back(guard_first):
    """Keras calls no on_train_end when fit raises: the guard's wrappers must go anyway, the
    lowered learning rate come back, and a monitor beside it close its run as failed."""
    x, y = regression()
    model = mlp(keras.optimizers.SGD(0.01))
    guard, monitor = SpikeGuard("lower_lr", lr_steps=100, verbose=False), GradientMonitor(figures=False)
    callbacks = [guard, monitor, RaiseAtBatch(22)] if guard_first else [monitor, guard, RaiseAtBatch(22)]
    with pytest.raises(RuntimeError, match="a callback failed"):
        model.fit(x, corrupted(y, bad=(20,)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=callbacks)
    assert list(guard.events["step"]) == [21] and monitor.status == "failed"
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)
    assert "apply" not in vars(model.optimizer) and "compute_loss" not in vars(model)
    model.fit(x, corrupted(y, bad=(20,)), batch_size=BATCH, epochs=1, shuffle=False, verbose=0)  # unguarded now
    assert len(guard.events) == 1 and float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)


def test_clipping_a_step_whose_gradient_is_zero_leaves_it_zero():
    """A batch whose inputs and targets are all 0 has a gradient of exactly 0 (no bias
    gradient either, with no biases): clip must not turn 0/0 into NaN weights."""
    x, y = regression()
    x[5 * BATCH:6 * BATCH], y[5 * BATCH:6 * BATCH] = 0.0, 0.0
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", use_bias=False),
                              keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    guard = SpikeGuard("clip", verbose=False)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[guard])
    assert guard.events.empty and all(np.isfinite(w).all() for w in model.get_weights())


def test_in_gradtools_fit_the_guard_judges_before_clipping_and_a_skipped_nan_is_no_divergence():
    x, y = regression()
    y = corrupted(y, bad=(25,))
    x[30 * BATCH] = np.nan
    model = mlp(keras.optimizers.SGD(0.01))
    guard = SpikeGuard("skip", verbose=False)
    history = gradtools.fit(model, x, y, loss="mse", optimizer=model.optimizer, epochs=1, batch_size=BATCH,
                            shuffle=False, clip_global_norm=1.0, spike_guard=guard, figures=False, jit_compile=False)
    events = guard.events.set_index("step")
    assert list(events.index) == [26, 31]
    assert events.loc[26, "quantity"] == "grad_global_norm"  # the norm before clipping to 1
    assert events.loc[26, "value"] == pytest.approx(history.metrics.set_index("step").loc[26, "grad_global_norm"])
    assert events.loc[31, "quantity"] == "nonfinite"
    assert history.status == "completed" and history.metrics["step"].max() == N_BATCHES
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert diagnose(history).verdict == "healthy"
