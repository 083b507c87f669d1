"""``SpikeGuard``: catch a loss or gradient spike while training, name the layer where it
started, and act on it, inside ``model.fit`` or :func:`gradtools.fit`.

A spike, and the layer named, are defined in :mod:`gradtools.spikes`. The defaults follow
the guards of large-model training where they carry over: OLMo-core's
``StabilityMonitorCallback`` flags the loss and gradient norm above mean + 6σ of a 128-step
window; here the median and the median absolute deviation, on a log scale, take the mean's and
σ's places, so that the spikes in the window do not raise the bar for the next one. The window
is 64 steps and a value 100× the level is always a spike: measured on the gallery (healthy
models, seeds 0 and 1, three times their epochs; bad batches injected into the transformer and
the ResNet), 128 steps let a bad batch 10⁵× the level pass once the gradient norm had fallen two
decades within the window, and 32 steps called the per-batch swings of a converged BiLSTM
spikes; no healthy run has a swing above 92×, no bad batch was below 1,700×. ZClip (arXiv
2504.02507) clips the gradient norm to such a rolling bound (``action="clip"``); metaseq skips
the batch (``"skip"``); OLMo and PaLM restart from a checkpoint before the spike and skip its
batches (``"rollback"``, from a snapshot held in memory).
"""

from __future__ import annotations

import sys
import threading
import warnings

import keras
import pandas as pd
import tensorflow as tf

from gradtools import probes
from gradtools.backend import require_supported_backend
from gradtools.spike_events import ACTIONS, describe_event, events_table
from gradtools.spikes import EVENT_CAPACITY, QUANTITIES, TAKEN, GuardSettings, GuardState, learning_rate_variable
from gradtools.validation import require_integer, require_positive_number

#: Spikes printed per fit when ``verbose``; the others are in ``guard.events``.
PRINTED_EVENTS = 20

NO_LOSS_SEEN = ("SpikeGuard needs each step's loss, and this model's train_step computes it without "
                "self.compute_loss(): compute it with loss = self.compute_loss(x=x, y=y, y_pred=y_pred)")


class SpikeGuard(keras.callbacks.Callback):
    """Watches every train step's loss and global gradient norm (and each layer's gradient
    norm, to name the layer), and acts on a spike: a value far above the last ``window`` steps' (see
    :mod:`gradtools.spikes`), or a non-finite loss or gradient.

    Args:
        action: what to do about a spike.

            - ``"warn"``: nothing but the event (and a printed line when ``verbose``);
            - ``"skip"``: the step's update is not applied (weights, optimizer state and
              BatchNormalization statistics stay as before the step);
            - ``"clip"``: the step's gradient is scaled down to the global norm's limit
              (adaptive clipping); a loss spike whose gradient is within its limit is applied;
            - ``"lower_lr"``: the learning rate is multiplied by ``lr_factor`` for
              ``lr_steps`` steps, starting with the spike's (whose gradient is clipped as by
              ``"clip"``), then restored (it must be a number, not a schedule);
            - ``"rollback"``: weights, layer statistics and optimizer state go back to the last
              snapshot (taken every ``snapshot_every`` steps without a spike; it holds a copy
              of every weight and optimizer variable in memory), the step not applied;
            - ``"stop"``: no update from the spike on, and training stops (``model.fit`` after
              the batch, ``gradtools.fit`` after the epoch).

            A non-finite step is never applied, except under ``"warn"``.
        window: the steps the level (median) and σ (1.4826 · MAD) are taken over.
        threshold: how many σ above the level is a spike (OLMo-core's 6).
        min_ratio: a spike is also at least this many times the level (a nearly constant
            series has a tiny σ).
        max_ratio: a value this many times the level is a spike whatever σ is.
        warmup: steps seen before any judgement but of non-finite values.
        lr_factor, lr_steps: for ``"lower_lr"``.
        snapshot_every: for ``"rollback"``.
        verbose: print one line per spike (at most :data:`PRINTED_EVENTS` per fit).

    ``guard.events`` is a DataFrame with a row per spike: ``step`` (from 1), ``epoch``,
    ``batch``, ``quantity`` (``loss``, ``grad_global_norm`` or ``nonfinite``), its ``value``,
    the ``threshold`` it crossed and the window's ``median``, the ``layer`` (kernel path) whose
    gradient norm rose most over its median (on a non-finite step: the non-finite one nearest
    the output) and that rise, ``layer_jump``, and the ``action`` taken (``warned``,
    ``skipped``, ``clipped``, ``applied``, ``lowered_lr``, ``rolled_back``, ``stopped``).

    Beside a :class:`gradtools.GradientMonitor` in the same ``model.fit``, the monitor's
    History, loggers and diagnosis get the events too. One device only: under a distribution
    strategy with several replicas it raises before training.
    """

    def __init__(self, action: str = "warn", *, window: int = 64, threshold: float = 6.0,
                 min_ratio: float = 2.0, max_ratio: float = 100.0, warmup: int = 16, lr_factor: float = 0.1,
                 lr_steps: int = 100, snapshot_every: int = 20, verbose: bool = True):
        super().__init__()
        require_supported_backend("SpikeGuard")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(map(repr, ACTIONS))}, got {action!r}")
        require_integer("window", window, 2)
        require_integer("warmup", warmup, 1)
        require_integer("lr_steps", lr_steps)
        require_integer("snapshot_every", snapshot_every)
        require_positive_number("threshold", threshold)
        require_positive_number("min_ratio", min_ratio)
        if not (isinstance(lr_factor, (int, float)) and 0 < lr_factor < 1):
            raise ValueError(f"lr_factor must be a number between 0 and 1 (exclusive), got {lr_factor!r}")
        require_positive_number("max_ratio", max_ratio)
        if not 1 <= min_ratio < max_ratio:
            raise ValueError(f"min_ratio and max_ratio must be 1 <= min_ratio < max_ratio, got {min_ratio!r} "
                             f"and {max_ratio!r}")
        self.settings = GuardSettings(action, window, float(threshold), float(min_ratio), float(max_ratio), warmup,
                                      float(lr_factor), lr_steps, snapshot_every)
        self.verbose = verbose
        self._state: GuardState | None = None
        #: True once a spike stopped training (``action="stop"``), read by compiled loops.
        self.stop_flag: tf.Variable | None = None
        self._rows: list[dict] = []
        self._reported = 0
        self._dropped = 0
        self._tokens = []
        self._epoch, self._first_step = 0, 1
        self._loss = threading.local()

    @property
    def action(self) -> str:
        return self.settings.action

    @property
    def events(self) -> pd.DataFrame:
        """One row per spike so far (see the class's docstring)."""
        return events_table(self._rows)

    @property
    def dropped(self) -> int:
        """Spikes counted but not kept: more than fit the in-graph table between two reads."""
        return self._dropped

    @property
    def stopped(self) -> bool:
        return self.stop_flag is not None and bool(self.stop_flag.numpy())

    # --- used by model.fit (as a callback) and by gradtools.fit ------------------------------

    def attach(self, model, optimizer, *, loss_from_model: bool) -> None:
        """Wrap the optimizer's ``apply`` (the inner one under a LossScaleOptimizer: it gets
        the unscaled gradients of the steps whose gradients are finite; the outer one then only
        counts steps) and, when ``loss_from_model``, ``model.compute_loss`` to see the step's
        loss; otherwise the loop hands it over with :meth:`note_step`."""
        replicas = max(tf.distribute.get_strategy().num_replicas_in_sync,
                       getattr(getattr(model, "distribute_strategy", None), "num_replicas_in_sync", 1))
        if replicas > 1:
            raise ValueError(f"SpikeGuard runs on one device: under a distribution strategy with {replicas} "
                             "replicas it cannot yet judge the global gradient; train without it, or on one device")
        self.detach()  # a guard that watched a fit which raised: its wrappers go first
        self._state, self._rows, self._reported, self._dropped = None, [], 0, 0
        self.stop_flag = tf.Variable(False, trainable=False)
        self._epoch, self._first_step = 0, 1
        guard, updater = self, getattr(optimizer, "inner_optimizer", optimizer)
        scaled = updater is not optimizer
        if self.action == "lower_lr":
            learning_rate_variable(updater)  # a schedule is refused before training

        def targets_of(trainable_variables):
            return list(trainable_variables if trainable_variables is not None
                        else updater._trainable_variables)  # noqa: SLF001 (no public list)

        def wrap_apply(original_apply):
            def apply(grads, trainable_variables=None):
                state = guard._state_for(model, updater, targets_of(trainable_variables), counts_steps=not scaled)
                loss, judged = guard._take_step()
                state.guarded_apply(loss, list(grads), lambda g: original_apply(g, trainable_variables), judged)
            return apply

        def wrap_counting(original_apply):  # under a loss scaler: every step, applied or not
            def apply(grads, trainable_variables=None):
                state = guard._state_for(model, updater, targets_of(trainable_variables), counts_steps=False)
                state.steps.assign_add(1)
                return original_apply(grads, trainable_variables)
            return apply

        self._tokens = [(updater, "apply", probes.wrap(updater, "apply", wrap_apply, probes.GUARD))]
        if scaled:
            self._tokens.append((optimizer, "apply", probes.wrap(optimizer, "apply", wrap_counting, probes.GUARD)))
        if loss_from_model:
            def wrap_compute_loss(original_compute_loss):
                def compute_loss(*args, **kwargs):
                    loss = original_compute_loss(*args, **kwargs)
                    guard.note_step(loss)
                    return loss
                return compute_loss
            self._tokens.append((model, "compute_loss",
                                 probes.wrap(model, "compute_loss", wrap_compute_loss, probes.GUARD)))

    def detach(self) -> None:
        """Take the wrappers away; a learning rate lowered by a spike is restored."""
        for owner, name, token in self._tokens:
            probes.unwrap(owner, name, token)
        self._tokens = []
        if self._state is not None:
            self._state.restore_learning_rate()

    def left_out_nonfinite(self):
        """In-graph, after the step's update: True when the step was not finite and the guard
        did not apply it (no divergence, then), else False."""
        return self._state.nonfinite_left_out if self._state is not None else tf.constant(False)

    def note_step(self, loss, gradients=None) -> None:
        """In-graph, before the optimizer's ``apply`` is called: the step's loss, and the
        gradients to judge when they are not those ``apply`` gets (``gradtools.fit`` clips before
        ``apply``; the guard judges the gradients before clipping, as in ``model.fit``)."""
        self._loss.value = (tf.cast(loss, tf.float32), gradients)

    def begin_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._first_step = int(self._state.steps.numpy()) + 1 if self._state is not None else 1

    def read_events(self) -> None:
        """Eagerly: the events the compiled steps wrote since the last read, as rows."""
        if self._state is None:
            return
        steps, rows, dropped = self._state.take_events()
        if dropped and not self._dropped:
            warnings.warn(f"SpikeGuard: more than {EVENT_CAPACITY} spikes between two reads; the others are "
                          "counted in guard.dropped, not kept", RuntimeWarning, stacklevel=2)
        self._dropped += dropped
        for step, row in zip(steps, rows):
            self._rows.append(self._event(int(step), row))

    def new_events(self) -> pd.DataFrame:
        """The events not handed out by an earlier call (for a run's record)."""
        self.read_events()
        fresh, self._reported = self._rows[self._reported:], len(self._rows)
        return events_table(fresh)

    # --- the Keras callback ----------------------------------------------------------------

    def on_train_begin(self, logs=None):
        callback_list = probes.calling_callback_list()
        probes.end_runs_of_other_fits(self.model, callback_list)
        self.attach(self.model, self.model.optimizer, loss_from_model=True)
        probes.retrace_watched(self.model, self._end_abruptly, callback_list)  # with the guard

    def on_epoch_begin(self, epoch, logs=None):
        self.begin_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self.read_events()
        if self.action == "stop" and self.stopped:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        self.read_events()

    def on_train_end(self, logs=None):
        self.read_events()
        self.detach()
        probes.unwatch(self.model, self._end_abruptly)
        self.model.make_train_function(force=True)  # later fits run without the guard

    def _end_abruptly(self, error: BaseException) -> None:
        """What ``on_train_end`` does, for a fit that raised: the events so far kept, the
        wrappers removed, the learning rate given back; the next fit traces anew."""
        probes.unwatch(self.model, self._end_abruptly)
        try:
            self.read_events()
        except Exception:  # noqa: BLE001 - the error on its way up is the one to report
            pass
        self.detach()
        self.model.train_function = None

    # --- inside -------------------------------------------------------------------------------

    def _state_for(self, model, optimizer, variables, counts_steps: bool) -> GuardState:
        if self._state is None:
            if not optimizer.built:
                with tf.init_scope():
                    optimizer.build(variables)
            self._state = GuardState(self.settings, model, optimizer, variables, self.stop_flag, counts_steps)
        return self._state

    def _take_step(self):
        """(loss, gradients to judge or None) noted for this step (in this thread)."""
        noted, self._loss.value = getattr(self._loss, "value", None), None
        if noted is None:
            raise ValueError(NO_LOSS_SEEN)
        return noted

    def _event(self, step: int, row) -> dict:
        value, threshold, median, quantity, layer, jump, taken = (float(v) for v in row)
        paths = self._state.paths
        event = {"step": step, "epoch": self._epoch, "batch": step - self._first_step,
                 "quantity": QUANTITIES[int(quantity)], "value": value, "threshold": threshold,
                 "median": median, "layer": paths[int(layer)] if 0 <= layer < len(paths) else "",
                 "layer_jump": jump, "action": TAKEN[int(taken)]}
        if self.verbose and len(self._rows) < PRINTED_EVENTS:
            print(describe_event(event), file=sys.stderr)
            if len(self._rows) + 1 == PRINTED_EVENTS:
                print("SpikeGuard: further spikes are not printed; they are in guard.events", file=sys.stderr)
        return event

