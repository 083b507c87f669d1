"""``gradtools.fit``: a compiled GradientTape training loop that records gradient statistics.

One call of an XLA-compiled ``tf.function`` runs a whole epoch of :class:`gradtools.steps.TrainStep`;
the per-layer statistics of every step are computed in the graph and only that small table
comes back to Python per epoch. What varies between runs of one model (the shuffle seed, the
learning rate, the weights) enters the compiled epoch as values, not constants, so runs of the
same program share its compilation (see :mod:`gradtools.compilation_cache`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from gradtools import compilation_cache, through_time
from gradtools import programs as programs_cache
from gradtools.backend import require_supported_backend
from gradtools.history import History
from gradtools.layers import layer_layout
from gradtools.loggers.base import RunLogger
from gradtools.recording import RunRecord
from gradtools.steps import TrainStep, padding_is_exact, resolve_loss, with_loss_scaling
from gradtools.validation import MAX_SEED, require_integer


def fit(model: keras.Model, x, y, *, loss, optimizer, epochs: int, batch_size: int = 32,
        shuffle: bool = True, seed: int | None = None, log_every: int = 1, stop_on_nonfinite: bool = True,
        loggers: Sequence[RunLogger] = (), jit_compile: bool = True, clip_value: float | None = None,
        clip_global_norm: float | None = None, figures=True, spike_guard=None,
        optimizer_state: bool = False) -> History:
    """Train ``model`` on ``(x, y)`` and record per-layer gradient statistics.

    Args:
        model: any built (or buildable) Keras 3 model.
        x, y: arrays held in memory; batches are slices of a per-epoch permutation.
        loss: a Keras loss name (``"binary_crossentropy"``), config dict, instance or function.
            ``model.losses`` (regularizers) are added to it before differentiating.
        optimizer: a Keras optimizer name, config dict or instance (under the
            ``mixed_float16`` policy it is wrapped in a LossScaleOptimizer, as ``compile``
            does). Its own clipping options apply to the update; the statistics describe the
            gradients before clipping, divided by the loss scale.
        epochs, batch_size: as in ``model.fit``; the last batch of an epoch may be smaller,
            and a batch size larger than the data trains on one batch of all of it. (A smaller
            last batch is computed at full size, its extra rows masked out of the loss, when
            :func:`gradtools.steps.padding_is_exact` says that trains exactly as it would.)
        shuffle: reshuffle the examples every epoch (a full permutation, seeded by ``seed``).
        seed: when given, seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``)
            and turns on op determinism, so the same seed gives identical numbers.
        log_every: record statistics at steps 1, 1 + log_every, 1 + 2·log_every, …;
            a step with a non-finite loss or gradient is always recorded.
        stop_on_nonfinite: stop after the first step whose loss or gradients are not finite.
        loggers: :class:`gradtools.loggers.RunLogger` instances that receive every row.
        jit_compile: compile each epoch with XLA (the default, several times faster on small
            models); pass False for a model with ops XLA cannot compile. With a ``seed``, a
            model XLA cannot compile deterministically (the gradient of max pooling) trains
            without XLA after one RuntimeWarning.
        clip_value, clip_global_norm: clip the gradients before the update
            (:func:`gradtools.clipping.clip_by_value`, then
            :func:`gradtools.clipping.clip_by_global_norm`); the statistics still describe
            the gradients before clipping, and the column ``grad_global_norm_clipped`` is added.
        figures: when the run ends, draw :func:`gradtools.plots.run_figures` once and hand
            them to every logger (``log_figure``); a function of the History returning
            ``{name: Figure}`` draws those instead; False draws none.
        spike_guard: a :class:`gradtools.SpikeGuard`: every step is judged, and a spike acted
            on, in the compiled epoch; its events are ``History.spikes`` and go to the
            loggers. (Such a fit compiles a program of its own: it is not shared.)

    ``optimizer_state=True`` adds, per layer, :mod:`gradtools.optimizer_state`'s columns:
    ``update_cosine`` (the update against −g), and for Adam, AdamW and Nadam ``adam_m_norm``,
    ``adam_v_norm`` and ``eps_dominated``.
    Outputs made by a sigmoid or softmax add ``output_saturated``, the fraction of predictions
    with every probability within ε of 0 or 1 (:func:`gradtools.stats.saturated_output_counts`).
    Recurrent layers get ``layer_k/recurrent_<stat>`` columns for their recurrent kernel; a
    :class:`gradtools.through_time.TracedRNN` also gets, once per epoch, ‖∂L/∂h_t‖ for every
    time step (``History.state_gradients``).

    Returns:
        a :class:`gradtools.History`. A non-finite loss or gradient ends the run with status
        ``"diverged"`` and ``first_nonfinite_step`` set; it never raises. Ctrl-C and errors
        are passed on to every logger (status ``"interrupted"`` / ``"failed"``) and re-raised.
    """
    require_supported_backend("gradtools.fit")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("log_every", log_every)):
        require_integer(name, value)
    if seed is not None:
        require_integer("seed", seed, 0, MAX_SEED)
        keras.utils.set_random_seed(int(seed))
        tf.config.experimental.enable_op_determinism()
    data = EpochData.of(x, y, batch_size)
    if not model.built:
        model(data.x[:1])
    _require_one_device(model.trainable_weights)
    optimizer = with_loss_scaling(keras.optimizers.get(optimizer))
    options = dict(clip_value=clip_value, clip_global_norm=clip_global_norm, shuffle=shuffle,
                   stop_on_nonfinite=stop_on_nonfinite, jit_compile=jit_compile,
                   keep_gradients=any(getattr(logger, "wants_gradients", False) for logger in loggers),
                   spike_guard=spike_guard, optimizer_state=bool(optimizer_state))
    shuffle_seed = int(seed) if seed is not None else int(np.random.default_rng().integers(2**31))
    loop = EpochLoop(model, resolve_loss(loss), optimizer, data, options, RunRecord(model, loggers, figures))
    return loop.train(epochs, shuffle_seed, log_every)


@dataclass(frozen=True)
class EpochData:
    """The examples as tensors, and how an epoch cuts them into batches."""

    x: tf.Tensor
    y: tf.Tensor
    batch_size: int

    @classmethod
    def of(cls, x, y, batch_size: int) -> "EpochData":
        if _several_arrays(x) or _several_arrays(y):
            raise ValueError("gradtools.fit takes one array of inputs and one of targets; for a model "
                             "with several inputs or outputs, use model.fit with gradtools.GradientMonitor")
        x, y = _as_tensor(x), _as_tensor(y)
        if int(y.shape[0]) != int(x.shape[0]):
            raise ValueError(f"x has {int(x.shape[0])} examples but y has {int(y.shape[0])}")
        if int(x.shape[0]) == 0:
            raise ValueError("x and y hold no examples")
        return cls(x, y, min(batch_size, int(x.shape[0])))  # like model.fit: one batch of all

    @property
    def n_examples(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_examples / self.batch_size)

    def full_batches(self, x_epoch, y_epoch):
        """The epoch's full batches as static-shaped [n_full, batch_size, …] tensors (XLA
        needs static shapes), and the smaller last batch (empty when there is none)."""
        n_full = self.n_examples // self.batch_size
        cut = n_full * self.batch_size
        return (*self._batched(x_epoch[:cut], y_epoch[:cut], n_full), x_epoch[cut:], y_epoch[cut:])

    def padded_batches(self, x_epoch, y_epoch):
        """Every batch of the epoch at full size, [n_batches, batch_size, …]: the last one is
        filled up with the epoch's first examples (see :meth:`real_rows`)."""
        fill = self.n_batches * self.batch_size - self.n_examples
        return self._batched(tf.concat([x_epoch, x_epoch[:fill]], 0), tf.concat([y_epoch, y_epoch[:fill]], 0),
                             self.n_batches)

    def real_rows(self, b):
        """Which rows of padded batch ``b`` are the epoch's own (all but the filling)."""
        return tf.range(self.batch_size) < self.n_examples - b * self.batch_size

    def _batched(self, x, y, count: int):
        return (tf.reshape(x, [count, self.batch_size, *self.x.shape[1:]]),
                tf.reshape(y, [count, self.batch_size, *self.y.shape[1:]]))


def _several_arrays(values) -> bool:
    """A dict of arrays, or a list of them (a nested list of numbers is one array)."""
    return isinstance(values, dict) or (isinstance(values, (list, tuple)) and len(values) > 0
                                         and hasattr(values[0], "shape"))


def _as_tensor(values):
    tensor = tf.convert_to_tensor(values)
    if tensor.dtype.is_floating:
        tensor = tf.cast(tensor, keras.backend.floatx())
    return tensor


def epoch_function(step: TrainStep, data: EpochData, shuffle: bool, stop_on_nonfinite: bool,
                   jit_compile: bool):
    """``run_epoch(epoch, shuffle_seed, x, y)``: one compiled call runs every step of an epoch
    and returns the rows of statistics, the finite flags, the number of steps done, the last
    step's kernel gradients and each traced layer's mean ‖∂L/∂h_t‖ (NaN where none was finite).
    The examples are arguments, not constants: other data of the same shapes reuses it.

    A smaller last batch is, where :func:`gradtools.steps.padding_is_exact` allows, filled up
    to full size and its extra rows masked out of the loss, so the program holds one copy of
    the step; otherwise it runs as a second copy, which costs compilation time.

    The loop is written with ``tf.while_loop`` and ``tf.cond``, not AutoGraph: converting
    Python source would be a large part of every trace, in every process."""
    n_values = step.n_values
    n_full, remainder = divmod(data.n_examples, data.batch_size)
    padded = remainder > 0 and padding_is_exact(step.model, step.loss_fn)
    n_looped = data.n_batches if padded else n_full

    @tf.function(jit_compile=jit_compile, autograph=False)
    def run_epoch(epoch, shuffle_seed, x, y):
        x_epoch, y_epoch = _ordered(x, y, shuffle, epoch, shuffle_seed)
        if padded:
            x_looped, y_looped = data.padded_batches(x_epoch, y_epoch)
        else:
            x_looped, y_looped, x_last, y_last = data.full_batches(x_epoch, y_epoch)

        def going(b, tally):  # stops after a non-finite step when asked to, and when a guard stopped
            more = tf.logical_and(b < n_looped, tally.last_finite) if stop_on_nonfinite else b < n_looped
            return tf.logical_and(more, tf.logical_not(step.guard.stop_flag)) if step.guard_stops else more

        def one_batch(b, tally):
            real_rows = data.real_rows(b) if padded else None
            return b + 1, tally.add(b, step(x_looped[b], y_looped[b], real_rows))

        _, tally = tf.while_loop(going, one_batch, (tf.constant(0), _EpochTally.empty(step, data.n_batches, n_values)))
        if remainder and not padded:
            last_runs = tally.last_finite if stop_on_nonfinite else tf.constant(True)
            if step.guard_stops:
                last_runs = tf.logical_and(last_runs, tf.logical_not(step.guard.stop_flag))
            tally = tf.cond(last_runs, lambda: tally.add(tf.constant(n_full), step(x_last, y_last)), lambda: tally)
        return tally.results()

    return run_epoch


def _ordered(x, y, shuffle: bool, epoch, shuffle_seed):
    """The epoch's examples: a full permutation seeded by (shuffle_seed, epoch), or in order."""
    if not shuffle:
        return x, y
    noise = tf.random.stateless_uniform(tf.shape(x)[:1], seed=tf.stack([shuffle_seed, epoch]))
    order = tf.argsort(noise)
    return tf.gather(x, order), tf.gather(y, order)


def compiled_program(model, loss_fn, optimizer, data: EpochData, **options) -> programs_cache.Program:
    """The compiled epoch for this model, loss, optimizer, data shapes and options: one this
    process already compiled for a model of the same structure (it then starts from
    ``model``'s and ``optimizer``'s values: :mod:`gradtools.programs`), or a new one, named
    after its key, which finds it in the persistent cache
    (:func:`gradtools.compilation_cache.named_after`)."""
    data_shapes = [list(data.x.shape), data.x.dtype.name, list(data.y.shape), data.y.dtype.name, data.batch_size]
    guard = options["spike_guard"]
    key = None if guard is not None else programs_cache.program_key(model, loss_fn, optimizer, data_shapes, options)
    kept = programs_cache.find(key, model, loss_fn)
    if kept is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_weights)
        kept.lend(model, optimizer)
        return kept
    step = TrainStep(model, loss_fn, optimizer, clip_value=options["clip_value"],
                     clip_global_norm=options["clip_global_norm"], keep_gradients=options["keep_gradients"],
                     guard=guard, optimizer_state=options["optimizer_state"])
    program = programs_cache.Program(step, epoch_function(step, data, options["shuffle"], options["stop_on_nonfinite"],
                                                          options["jit_compile"]), untraced_key=key)
    if key is not None:
        programs_cache.keep(key, program)
    return program


class _EpochTally(NamedTuple):
    """What an epoch accumulates, in-graph (a named tuple: AutoGraph carries it through the
    loop): rows, finite flags, steps done, the last kernel gradients, and sums and counts of
    the finite ‖∂L/∂h_t‖ of each traced layer."""

    rows: tf.TensorArray
    flags: tf.TensorArray
    done: tf.Tensor
    last_finite: tf.Tensor
    last_gradients: list
    state_sums: list
    state_counts: list

    @classmethod
    def empty(cls, step: TrainStep, n_batches: int, n_values: int) -> "_EpochTally":
        zeros = [tf.zeros([layer.time_steps], tf.float32) for layer in step.traced]
        kernels = [step.variables[i] for i in step.layout.kernel_positions]
        return cls(tf.TensorArray(tf.float32, size=n_batches, element_shape=[n_values]),
                   tf.TensorArray(tf.bool, size=n_batches, element_shape=[]), tf.constant(0),
                   tf.constant(True), [tf.zeros_like(k) for k in kernels] if step.keep_gradients else [],
                   zeros, list(zeros))

    def add(self, index, result) -> "_EpochTally":
        row, finite, kernel_gradients, state_norms = result
        ok = [tf.math.is_finite(norms) for norms in state_norms]  # a diverging step hides nothing
        return _EpochTally(
            self.rows.write(index, row), self.flags.write(index, finite), index + 1, finite,
            kernel_gradients if self.last_gradients else [],
            [s + tf.where(f, n, 0.0) for s, f, n in zip(self.state_sums, ok, state_norms)],
            [c + tf.cast(f, tf.float32) for c, f in zip(self.state_counts, ok)])

    def results(self):
        state_means = [s / c for s, c in zip(self.state_sums, self.state_counts)]  # 0/0: NaN
        return self.rows.stack(), self.flags.stack(), self.done, self.last_gradients, state_means


class EpochLoop:
    """The Python side of ``fit``: runs the compiled epochs of the program for ``model``,
    ``loss_fn``, ``optimizer``, ``data`` and ``options`` (:func:`compiled_program`), and hands
    each epoch's table of logged rows to the run's :class:`gradtools.recording.RunRecord`."""

    def __init__(self, model, loss_fn, optimizer, data: EpochData, options: dict, record: RunRecord):
        self.model, self.loss_fn, self.optimizer, self.data, self.options = model, loss_fn, optimizer, data, options
        self.record, self.n_batches = record, data.n_batches
        self.programs = [compiled_program(model, loss_fn, optimizer, data, **options)]
        self.step, self.run_epoch = self.programs[0].step, self.programs[0].bind(data.x, data.y)
        # loggers that look at the model after each epoch need its values then; else at the end
        self.model_each_epoch = any(type(logger).log_epoch_end is not RunLogger.log_epoch_end
                                    for logger in record.loggers)

    def train(self, epochs: int, shuffle_seed: int, log_every: int) -> History:
        """Run the epochs, logging every ``log_every``-th step; the History, however it ends
        (an error or Ctrl-C is passed on to the loggers, then raised)."""
        self.log_every = log_every
        guard = self.options["spike_guard"]
        self.record.start(layer_layout(self.model.trainable_weights).paths, self.step.columns,  # the caller's names
                          through_time.traced_layers(self.model), epochs=epochs, steps_per_epoch=self.n_batches)
        try:
            if guard is not None:  # before the first call traces the program
                guard.attach(self.step.model, self.step.optimizer, loss_from_model=False)
                self.record.watch_spikes()
            return self._epochs(epochs, tf.constant(shuffle_seed, tf.int64))
        except BaseException as error:
            self._hand_back()
            self.record.end_abruptly(error, every_epoch_done=self.record.epochs_completed >= epochs)
            self._explain(error)
            raise
        finally:  # the caller's model has its trained values: a borrowed program's owners get theirs
            for program in self.programs:
                program.give_back(self.model, self.optimizer)
            if guard is not None:
                guard.detach()

    def _epochs(self, epochs: int, seed) -> History:
        guard = self.options["spike_guard"]
        for epoch in range(epochs):
            radii = through_time.spectral_radii(self.step.traced)
            if guard is not None:
                guard.begin_epoch(epoch)
            with _quiet_first_trace(epoch == 0):
                results = self._epoch(epoch, seed)
            if self.model_each_epoch:
                self._hand_back()
            if self.record_epoch(epoch, epochs, radii, *results):
                break
        self._hand_back()
        return self.record.end()

    def _explain(self, error: BaseException) -> None:
        """A compilation cache that cannot be written is said as such; XLA's refusal of an op
        gets a note on what to do."""
        if not isinstance(error, tf.errors.OpError):
            return
        unwritable_cache = compilation_cache.write_failure(error)
        if unwritable_cache is not None:
            raise unwritable_cache from error
        if self.options["jit_compile"] and not self.record.frames:
            error.add_note("gradtools.fit compiles each epoch with XLA; if XLA cannot compile "
                           "an op of this model, call it with jit_compile=False")

    def _epoch(self, epoch: int, seed):
        """One epoch's results. Nothing has trained when the first call of a program fails in
        these two ways, and it is traced again (:meth:`_trace_again`):

        - XLA refuses to compile it deterministically (a ``seed`` turned op determinism on:
          max pooling's gradient): without XLA, after one warning;
        - a damaged entry of the compilation cache (cut short, empty, overwritten): the entry
          is set aside as ``*.damaged``, and the program compiled anew, after one warning
          (XLA does not compile a program again in the process once its load failed)."""
        try:
            return self.run_epoch(tf.constant(epoch, tf.int64), seed)
        except tf.errors.UnimplementedError as error:
            if epoch > 0 or not self.options["jit_compile"] or "deterministic" not in str(error):
                raise
            reason = str(error).strip().splitlines()[0]
            warnings.warn(f"gradtools.fit: XLA cannot compile this model deterministically, which a seed "
                          f"asks for ({reason}); training without XLA, which is slower (pass "
                          f"jit_compile=False to skip the attempt, or no seed to keep XLA)",
                          RuntimeWarning, stacklevel=5)
            with_xla = False
        except tf.errors.OpError as error:
            damaged = compilation_cache.set_aside_damaged() if compilation_cache.read_failure(error) else []
            if not damaged:
                raise
            warnings.warn(f"gradtools.fit: damaged entries of the compilation cache set aside "
                          f"({', '.join(path.name + '.damaged' for path in damaged)} in {damaged[0].parent}); "
                          "compiling anew", RuntimeWarning, stacklevel=5)
            with_xla = True
        self._trace_again(with_xla)
        return self.run_epoch(tf.constant(epoch, tf.int64), seed)

    def _trace_again(self, with_xla: bool) -> None:
        """The same program traced anew, with or without XLA; the one that failed is no
        longer reused."""
        programs_cache.forget(self.programs[-1])
        self.programs.append(compiled_program(self.model, self.loss_fn, self.optimizer, self.data,
                                              **{**self.options, "jit_compile": with_xla}))
        self.step, self.run_epoch = self.programs[-1].step, self.programs[-1].bind(self.data.x, self.data.y)

    def _hand_back(self) -> None:
        """When the compiled program was traced with another model of the same structure,
        the caller's model and optimizer get its values: after each epoch when a logger looks
        at the model then, and when training ends however it ends."""
        programs_cache.copy_values(self.step.model.variables, self.model.variables)
        programs_cache.copy_values(self.step.optimizer.variables, self.optimizer.variables)

    def record_epoch(self, epoch, epochs, radii, values, finite_flags, done, last_gradients,
                     state_means) -> bool:
        """Log one epoch; True when training stops here."""
        done = int(done)
        finite_flags = finite_flags.numpy()[:done]
        batches = np.arange(done)
        logged = (batches + epoch * self.n_batches) % self.log_every == 0
        logged |= ~finite_flags  # and every non-finite step
        self.record.columns = self.step.columns  # with OUTPUT_COLUMN once the step is traced on logits
        self.record.add_rows(epoch, epoch * self.n_batches + batches[logged] + 1, batches[logged],
                             values.numpy()[:done][logged], finite_flags[logged])
        through_time_values = self.record.through_time_row(epoch, radii, [m.numpy() for m in state_means])
        stopping = not finite_flags.all() and self.options["stop_on_nonfinite"]
        guard = self.options["spike_guard"]
        if guard is not None:
            self.record.add_spikes(guard.new_events())
            stopping = stopping or guard.stopped
        kernel_gradients = [g.numpy() for g in last_gradients] if self.step.keep_gradients else None
        self.record.end_epoch(epoch, self.record.epochs_completed + (not stopping),
                              last=stopping or epoch + 1 == epochs, through_time_values=through_time_values,
                              kernel_gradients=kernel_gradients)
        return stopping


def _require_one_device(variables) -> None:
    distributed = any(isinstance(getattr(v, "value", v), tf.distribute.DistributedValues)
                      for v in variables)
    if distributed or tf.distribute.get_strategy().num_replicas_in_sync > 1:
        raise ValueError("gradtools.fit trains on one device; under a distribution strategy, "
                         "train with model.fit and record with gradtools.GradientMonitor")


@contextlib.contextmanager
def _quiet_first_trace(active: bool):
    """Every ``fit`` call compiles its own epoch function by design; TensorFlow's warning
    about frequent retracing says nothing useful about that, so it is muted while tracing."""
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    if active:
        tf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf_logger.setLevel(level)
