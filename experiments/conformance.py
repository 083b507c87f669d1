"""The conformance zoo: what gradtools records, checked against references it did not produce.

For every model and mode of :mod:`experiments.zoo`:

- **GradientMonitor**: ``model.fit`` runs one epoch (``shuffle=False``) with the monitor and a
  callback that keeps the weights before chosen steps; for each such step an independent
  ``tf.GradientTape`` over ``model.compute_loss`` on the same batch, at those weights, gives
  the reference loss and gradients (under a loss scaler: of the scaled loss, divided by the
  scale, as Keras's ``train_step`` does; under a strategy: each replica's, summed, as Keras's
  optimizer does). The recorded loss, global norm and every layer's gradient mean, mean
  \\|g\\|, norm and max \\|g\\| must equal the reference's, computed here in NumPy.
- **gradtools.fit**, wherever it takes the model: one epoch at learning rate 0 (every step at
  the starting weights), each checked step against the tape at those weights; then one epoch
  of SGD in both loops (the model's own rate under plain SGD, else 1e-3) from the same
  starting weights, every step's loss, global norm and layer norms against ``model.fit``'s
  (with the monitor), within twice what rounding alone moves ``model.fit``'s (its weights
  moved by 1e-7), or within the tolerance where that is less; where rounding moves it by more
  than 1e-3 (chaotic), the trajectory is not compared and the cell says so.

A cell is ``exact`` when the largest relative difference is within the case's tolerance
(float32 rounding: 1e-4; float16 rounding under ``mixed_float16``: 1e-2), ``differs by x``
otherwise, ``refused: …`` when gradtools says in one line what it cannot do, and ``error: …``
for anything else (a crash). ``python -m experiments conformance`` prints the table.
"""

from __future__ import annotations

import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import gradtools
from gradtools.columns import OUTPUT_COLUMN, layer_column
from gradtools.monitor import GradientMonitor

FLOAT32_TOLERANCE = 1e-4
#: A trajectory that weights moved by 1e-7 move by more than this is not compared.
CHAOTIC = 1e-3
FLOAT16_TOLERANCE = 1e-2


def on_tensorflow() -> bool:
    """gradtools.fit is TensorFlow's whole-epoch loop: on another backend only the monitor is checked."""
    return keras.backend.backend() == "tensorflow"


@dataclass
class Subject:
    """A compiled model, its data and how ``model.fit`` is called on it.

    ``x``, ``y`` and ``sample_weight`` are arrays (or dicts / lists of arrays) sliced into
    batches in order; ``class_weight`` is passed to ``fit`` and turned into sample weights
    here, independently of Keras, for the reference. ``fit_loss`` is the loss to hand
    ``gradtools.fit`` (None: the case does not call it). ``refit`` changes the model after the
    first check (a backbone unfrozen, then recompiled) for a second one."""

    model: keras.Model
    x: Any
    y: Any
    batch_size: int
    sample_weight: Any = None
    class_weight: dict | None = None
    dataset: bool = False
    fit_loss: Any = None
    strategy: Any = None
    refit: Any = None
    fit_kwargs: dict = field(default_factory=dict)
    #: gradtools.fit's jit_compile (XLA takes many minutes to compile a large convnet's epoch)
    fit_jit_compile: bool = True
    #: the optimizer's learning rate is 0: every step is checked, at the starting weights
    frozen_weights: bool = False

    @property
    def n_rows(self) -> int:
        return len(keras.tree.flatten(self.x)[0])

    @property
    def n_steps(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def batch(self, step: int):
        """(x, y, sample_weight) of step ``step`` (from 1), as model.fit cuts them."""
        lo, hi = (step - 1) * self.batch_size, step * self.batch_size
        cut = keras.tree.map_structure(lambda a: a[lo:hi], (self.x, self.y))
        weights = None if self.sample_weight is None else self.sample_weight[lo:hi]
        if self.class_weight is not None:
            labels = np.asarray(cut[1])
            labels = labels.argmax(-1) if labels.ndim > 1 and labels.shape[-1] > 1 else labels.reshape(len(labels))
            by_class = np.array([self.class_weight.get(int(round(float(label))), 1.0) for label in labels], np.float32)
            weights = by_class if weights is None else weights * by_class
        return (*cut, weights)

    def fit_arguments(self) -> dict:
        arguments = dict(batch_size=self.batch_size, **self.fit_kwargs)
        if self.dataset:
            parts = (self.x, self.y) if self.sample_weight is None else (self.x, self.y, self.sample_weight)
            arguments = dict(x=tf.data.Dataset.from_tensor_slices(parts).batch(self.batch_size), **self.fit_kwargs)
        else:
            arguments.update(x=self.x, y=self.y, sample_weight=self.sample_weight)
        if self.class_weight is not None:
            arguments["class_weight"] = self.class_weight
        return arguments


@dataclass
class Case:
    """One model in one mode: how to build it, and what gradtools must do with it."""

    model: str
    mode: str
    build: Any  # () -> Subject
    tolerance: float = FLOAT32_TOLERANCE
    expect: str = "exact"  # or "refused": a one-line error or warning is the right answer
    refusal: str = ""  # words the refusal must hold
    needs: str = ""  # "two devices": runs where two logical CPU devices were made at start
    tensorflow_only: str = ""  # why the case runs on Keras's TensorFlow backend only (a tf.distribute strategy…)
    core: bool = False  # part of the fast core that `make test` runs
    core_fit: bool = True  # the core checks gradtools.fit on it too (False: its XLA compilation is slow)
    mixed_precision: bool = False


@dataclass
class Outcome:
    """``kind`` is exact, differs, refused or error; ``worst`` the largest relative difference."""

    kind: str
    worst: float = 0.0
    detail: str = ""
    steps: tuple[int, ...] = ()

    def cell(self) -> str:
        if self.kind == "exact":
            return f"exact ({self.worst:.0e}" + (f"; {self.detail})" if self.detail else ")")
        if self.kind == "differs":
            return f"**differs by {self.worst:.1e}**" + (f" ({self.detail})" if self.detail else "")
        return f"{self.kind}: {self.detail}"


# --- the references --------------------------------------------------------------------------

class Snapshots(keras.callbacks.Callback):
    """The model's variables (and a loss scaler's scale) before each of ``steps`` (from 1)."""

    def __init__(self, steps):
        super().__init__()
        self.wanted, self.taken = set(steps), {}

    def on_train_batch_begin(self, batch, logs=None):
        if batch + 1 in self.wanted:
            if hasattr(self.model, "jax_state_sync"):  # JAX: the variables hold the state once written back
                self.model.jax_state_sync()
            optimizer = self.model.optimizer
            scale = None
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                scale = float(optimizer.dynamic_scale.numpy()) if optimizer.built else float(optimizer.initial_scale)
            self.taken[batch + 1] = ([v.numpy() for v in self.model.variables], scale)


def reference(model, batch, values, scale, strategy=None, graph=True, jit_compile=False) -> dict:
    """On Keras's JAX backend, :func:`jax_reference`; else the GradientTape's (below)."""
    if keras.backend.backend() == "jax":
        return jax_reference(model, batch, values, scale, graph)
    return tape_reference(model, batch, values, scale, strategy, graph, jit_compile)


def jax_reference(model, batch, values, scale, graph=True) -> dict:
    """The loss and every trainable variable's gradient (by path, float64) that a step on
    ``batch`` takes at ``values``, from ``jax.grad`` of ``model.compute_loss`` over the model
    called with the trainable variables as arguments (a ``keras.StatelessScope`` maps each
    variable to its traced value and collects the losses layers add, so that regularizers' and
    ``add_loss`` losses are differentiated too); jitted
    when ``graph``, as ``model.fit`` is."""
    import jax  # noqa: PLC0415 - only under Keras's JAX backend

    for variable, value in zip(model.variables, values):
        variable.assign(value)
    x, y, sample_weight = batch
    trainable = model.trainable_variables

    def loss_of(trainable_values):
        with keras.StatelessScope(state_mapping=list(zip(trainable, trainable_values)), collect_losses=True):
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        return loss * scale if scale is not None else loss, loss

    step = jax.value_and_grad(loss_of, has_aux=True)
    (_, loss), gradients = (jax.jit(step) if graph else step)([v.value for v in trainable])
    unscale = 1.0 if scale is None else scale
    return {"loss": float(loss), "gradients": {v.path: np.asarray(g, np.float64) / unscale
                                               for v, g in zip(trainable, gradients)}}


def tape_reference(model, batch, values, scale, strategy=None, graph=True, jit_compile=False) -> dict:
    """The loss and every trainable variable's gradient (by path, float64) that a step on
    ``batch`` takes at ``values``, from a GradientTape over ``model.compute_loss``; in a
    ``tf.function`` (with ``jit_compile``) when ``graph``, as ``model.fit`` computes it: TensorFlow
    fuses a convolution, its batch normalization and activation in graphs, and the rounding of
    the fused kernels differs from eager execution's (MobileNetV2: by 6e-4 in one layer's max |g|)."""
    for variable, value in zip(model.variables, values):
        variable.assign(value)
    x, y, sample_weight = batch

    def replica_step(x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            scaled = loss * scale if scale is not None else loss
        gradients = tape.gradient(scaled, model.trainable_weights)
        probabilities = [t for t in tf.nest.flatten(y_pred) if hasattr(t, "_keras_logits")]
        return loss, [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in
                      zip(gradients, model.trainable_weights)], probabilities

    if strategy is None:
        step = tf.function(replica_step, jit_compile=jit_compile) if graph else replica_step
        loss, gradients, probabilities = step(x, y, sample_weight)
        losses, gradients = [loss.numpy()], [[g.numpy()] for g in gradients]
        probabilities = [[p.numpy()] for p in probabilities]
    else:
        parts = (x, y) if sample_weight is None else (x, y, sample_weight)
        data = tf.data.Dataset.from_tensors(parts)
        distributed = next(iter(strategy.experimental_distribute_dataset(data)))
        step = (lambda x, y: replica_step(x, y, None)) if sample_weight is None else replica_step
        loss, gradients, probabilities = tf.function(lambda batch: strategy.run(step, args=batch))(distributed)
        losses = [t.numpy() for t in strategy.experimental_local_results(loss)]
        gradients = [[t.numpy() for t in strategy.experimental_local_results(g)] for g in gradients]
        probabilities = [[t.numpy() for t in strategy.experimental_local_results(p)] for p in probabilities]
    unscale = 1.0 if scale is None else scale
    return {"loss": float(np.sum(np.asarray(losses, np.float64))),
            "gradients": {v.path: np.sum([np.asarray(p, np.float64) for p in parts], axis=0) / unscale
                          for v, parts in zip(model.trainable_weights, gradients)},
            "output_saturated": _saturated_fraction([part for parts in probabilities for part in parts])}


def _saturated_fraction(probabilities: list[np.ndarray]) -> float | None:
    """The fraction of the probability outputs' predictions (their last axis) whose every
    probability is within Keras's ε of 0 or 1, in NumPy; None without such outputs."""
    if not probabilities:
        return None
    epsilon = np.float32(keras.config.epsilon())
    saturated, counted = 0, 0
    for p in probabilities:
        p = np.asarray(p, np.float32)
        p = p.reshape(-1, p.shape[-1] if p.ndim > 1 else 1)
        saturated += int(np.all((p < epsilon) | (p > 1 - epsilon), axis=-1).sum())
        counted += p.shape[0]
    return saturated / counted if counted else 0.0


def expected_row(ref: dict, layer_paths: list[str], before: dict | None = None, after: dict | None = None,
                 scale: float | None = None) -> dict[str, tuple[float, float]]:
    """The statistics gradtools records, computed in NumPy from a reference: column -> (value,
    the size its difference is relative to). Each numbered layer's kernel (and the recurrent
    kernel beside it, in ``recurrent_`` columns); with the variables' values ``before`` and
    ``after`` the step (by path), the weight statistics and update ratio; with the loss
    ``scale``, the loss scale column."""
    gradients = ref["gradients"]
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in gradients.values()))
    row = {"loss": (ref["loss"], abs(ref["loss"])), "grad_global_norm": (norm, norm)}
    if scale is not None:
        row["loss_scale"] = (scale, scale)
    if ref.get("output_saturated") is not None:
        row[OUTPUT_COLUMN] = (ref["output_saturated"], 1.0)  # a fraction: its difference is absolute
    for k, path in enumerate(layer_paths, start=1):
        parent = path.rsplit("/", 1)[0]
        for prefix, variable in (("", path), ("recurrent_", f"{parent}/recurrent_kernel")):
            if variable in gradients:
                row.update(_layer_statistics(layer_column(k, prefix), gradients[variable],
                                             None if before is None else before[variable],
                                             None if after is None else after[variable]))
    return row


def _layer_statistics(prefix: str, g, w0, w1) -> dict[str, tuple[float, float]]:
    with np.errstate(invalid="ignore", over="ignore"):  # a step a loss scaler skips: its gradients overflowed
        abs_mean, norm, max_abs = float(np.abs(g).mean()), float(np.sqrt(np.sum(g * g))), float(np.abs(g).max())
        mean = float(g.mean())
    row = {"grad_mean": (mean, abs_mean), "grad_abs_mean": (abs_mean, abs_mean),
           "grad_norm": (norm, norm), "grad_max_abs": (max_abs, max_abs)}
    if w0 is not None and w1 is not None:
        w0, w1 = np.asarray(w0, np.float64), np.asarray(w1, np.float64)
        weight_norm, ratio = float(np.linalg.norm(w1)), float(np.linalg.norm(w1 - w0) / np.linalg.norm(w0))
        row.update(weight_mean=(float(w1.mean()), float(np.abs(w1).mean())), weight_norm=(weight_norm, weight_norm),
                   update_ratio=(ratio, ratio))
    return {prefix + name: value for name, value in row.items()}


def relative_difference(recorded, expected: dict[str, tuple[float, float]]) -> tuple[float, str]:
    """The largest relative difference over the row's values, and the column where it is.
    Each value's difference is relative to its own size, but a signed mean's to the mean of
    the absolute values (it may cancel to about 0); a non-finite value must be recorded as the
    same non-finite value."""
    worst, where = 0.0, ""
    for column, (value, scale) in expected.items():
        got = float(recorded[column])
        if not math.isfinite(value) or not math.isfinite(got):
            difference = 0.0 if (got == value or (math.isnan(got) and math.isnan(value))) else math.inf
        else:
            difference = abs(got - value) / abs(scale) if scale else (0.0 if got == value else math.inf)
        if difference > worst:
            worst, where = difference, column
    return worst, where


# --- the checks ------------------------------------------------------------------------------

def checked_steps(subject: Subject) -> list[int]:
    """The first two steps and the last (a smaller batch, where the data makes one); every
    step when the weights do not change (learning rate 0)."""
    if subject.frozen_weights:
        return list(range(1, subject.n_steps + 1))
    steps_per_execution = int(getattr(subject.model, "steps_per_execution", 1) or 1)
    candidates = sorted({1, 2, subject.n_steps} & set(range(1, subject.n_steps + 1)))
    return [s for s in candidates if (s - 1) % steps_per_execution == 0]


def check_monitor(subject: Subject) -> tuple[float, str, list[int], str]:
    """One epoch of ``model.fit`` with the monitor, each checked step against the tape (and
    the weights before the next step, or after the epoch, against the recorded weight
    statistics)."""
    model = subject.model
    steps = checked_steps(subject)
    snapshots = Snapshots([1] if subject.frozen_weights else steps + [s + 1 for s in steps])
    monitor = GradientMonitor(figures=False)
    model.fit(**subject.fit_arguments(), epochs=1, shuffle=False, verbose=0, callbacks=[monitor, snapshots])
    trained = [v.numpy() for v in model.variables]
    snapshots.taken.setdefault(subject.n_steps + 1, (trained, None))
    by_path = {step: dict(zip((v.path for v in model.variables), values))
               for step, (values, _) in snapshots.taken.items()}
    rows = monitor.metrics.set_index("step")
    worst, where, checked = 0.0, "", []
    try:
        for step in steps:
            taken = snapshots.taken.get(1 if subject.frozen_weights else step)
            if taken is None:
                continue
            values, scale = taken
            ref = reference(model, subject.batch(step), values, scale, subject.strategy,
                            graph=not model.run_eagerly, jit_compile=bool(model.jit_compile))
            after = by_path[1] if subject.frozen_weights else by_path.get(step + 1)
            expected = expected_row(ref, monitor.layer_paths, by_path[1 if subject.frozen_weights else step],
                                    after, scale)
            difference, column = relative_difference(rows.loc[step], expected)
            checked.append(step)
            if difference >= worst:
                worst, where = difference, f"step {step} {column}"
    finally:
        for variable, value in zip(model.variables, trained):
            variable.assign(value)
    if subject.n_steps not in checked:
        raise AssertionError(f"the last step ({subject.n_steps}) was not checked: {checked}")
    return worst, where, checked, ""


def check_fit(subject: Subject, build) -> tuple[float, str, list[int], str]:
    """``gradtools.fit`` on a fresh copy of the subject: at learning rate 0 each checked step
    against the tape at the starting weights (a difference above the tolerance that is within
    twice what an eager and a compiled tape differ by on that step is rounding, and noted);
    then one epoch of SGD, every step's loss and
    norms against ``model.fit``'s, judged against how far rounding alone moves ``model.fit``'s
    own (its weights moved by 1e-7). Where that moves it by more than :data:`CHAOTIC` (a net
    whose last, 4-row batch normalizes at 1×1 pixels) two correct loops part as far, and the
    trajectory is not compared: the cell says so."""
    start = [v.numpy() for v in subject.model.variables]
    scale = float(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()).initial_scale) \
        if keras.config.dtype_policy().name == "mixed_float16" else None
    history = gradtools.fit(subject.model, subject.x, subject.y, loss=subject.fit_loss,
                            optimizer=keras.optimizers.SGD(0.0), epochs=1, batch_size=subject.batch_size,
                            shuffle=False, figures=False, stop_on_nonfinite=False,
                            jit_compile=subject.fit_jit_compile)
    rows = history.metrics.set_index("step")
    worst, where = 0.0, ""
    steps = sorted({1, 2, subject.n_steps} & set(range(1, subject.n_steps + 1)))
    notes = []
    for step in steps:
        if scale is not None:  # the scale of this step: the loss scaler halves it after a step that overflowed
            scale = float(rows.loc[step, "loss_scale"])
        expected = expected_row(reference(subject.model, subject.batch(step), start, scale), history.layer_paths,
                                scale=scale)
        difference, column = relative_difference(rows.loc[step], expected)
        if difference > FLOAT32_TOLERANCE:  # as far as two correct tapes part on this step?
            eager = expected_row(reference(subject.model, subject.batch(step), start, scale, graph=False),
                                 history.layer_paths, scale=scale)
            floor, _ = relative_difference({c: v for c, (v, _) in eager.items()}, expected)
            if difference <= 2 * floor:
                notes.append(f"step {step}: {difference:.0e}, where an eager and a compiled tape part by {floor:.0e}")
                continue
        if difference >= worst:
            worst, where = difference, f"step {step} {column}"
    # the trajectory: from the same weights, SGD in both (the model's own rate when it trains
    # with plain SGD, else 1e-3), every step's loss and norms as model.fit's. (Not Adam: it
    # turns a gradient that is 0 but for rounding, as an attention key's bias or EfficientNet's
    # deep kernels get, into full steps of either sign, and two correct loops part after a step.)
    rate = _sgd_rate(subject.model.optimizer)
    theirs = _fit_rows(build(), subject.fit_loss, rate)
    by_gradtools = build()
    history = gradtools.fit(by_gradtools.model, by_gradtools.x, by_gradtools.y, loss=subject.fit_loss,
                            optimizer=keras.optimizers.SGD(rate), epochs=1, batch_size=subject.batch_size,
                            shuffle=False, figures=False, stop_on_nonfinite=False,
                            jit_compile=subject.fit_jit_compile)
    apart, column = _rows_apart(history.metrics.set_index("step"), theirs)
    # how far rounding alone moves model.fit's own trajectory: its weights moved by 1e-7
    spread, _ = _rows_apart(_fit_rows(build(), subject.fit_loss, rate, nudge=1e-7), theirs)
    if spread > CHAOTIC:  # two correct loops part as far: the trajectory says nothing
        notes.append(f"trajectory not compared: model.fit's own moves by {spread:.1g} when its weights move by 1e-7")
    elif apart > max(2 * spread, FLOAT32_TOLERANCE) and apart >= worst:
        worst, where = apart, f"{column} against model.fit's (which rounding moves by {spread:.0e})"
    return worst, where, steps, "; ".join(notes)


def _fit_rows(subject: Subject, loss, rate: float, nudge: float = 0.0):
    """model.fit's rows (with the monitor) for one epoch of SGD(``rate``) on ``subject``, its
    weights first multiplied by 1 + ``nudge``·N(0, 1)."""
    model = subject.model
    model.compile(optimizer=keras.optimizers.SGD(rate), loss=loss, jit_compile=model.jit_compile,
                  run_eagerly=model.run_eagerly, steps_per_execution=model.steps_per_execution)
    noise = np.random.default_rng(0)
    for variable in model.trainable_weights if nudge else []:
        value = variable.numpy()
        variable.assign((value * (1 + nudge * noise.standard_normal(value.shape))).astype(value.dtype))
    monitor = GradientMonitor(figures=False)
    model.fit(**subject.fit_arguments(), epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    return monitor.metrics.set_index("step")


def _rows_apart(ours, theirs) -> tuple[float, str]:
    """The largest relative difference of the loss and the norms, over every step."""
    worst, where = 0.0, ""
    columns = ["loss", "grad_global_norm"] + [c for c in theirs.columns if c.endswith("/grad_norm")]
    for step in theirs.index:
        expected = {c: (float(theirs.loc[step, c]), abs(float(theirs.loc[step, c]))) for c in columns}
        difference, column = relative_difference(ours.loc[step], expected)
        if difference >= worst:
            worst, where = difference, f"step {step} {column}"
    return worst, where


def _sgd_rate(optimizer) -> float:
    """The learning rate of the trajectory check: the model's own under plain SGD (a net that
    explodes is trained at 1e-9), else 1e-3."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if type(inner) is keras.optimizers.SGD and not inner.momentum:
        return float(keras.ops.convert_to_numpy(inner.learning_rate))
    return 1e-3


def outcome_of(run, case: Case) -> Outcome:
    """Run one check. A ValueError, NotImplementedError or RuntimeWarning that gradtools itself
    raises (its one-line refusals) is ``refused``; anything else raised is ``error``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            worst, where, steps, note = run()
    except Exception as error:  # a crash is what the zoo is here to find
        if isinstance(error, (ValueError, NotImplementedError, RuntimeWarning)) and _raised_by_gradtools(error):
            return Outcome("refused", detail=_first_line(error))
        frame = traceback.extract_tb(error.__traceback__)[-1]
        return Outcome("error", detail=f"{type(error).__name__}: {_first_line(error)} "
                                       f"({Path(frame.filename).name}:{frame.lineno})")
    kind = "exact" if worst <= case.tolerance else "differs"
    return Outcome(kind, worst, where if kind == "differs" else note, tuple(steps))


def _raised_by_gradtools(error) -> bool:
    """The innermost Python frame of the error's traceback is in the gradtools package."""
    innermost = traceback.extract_tb(error.__traceback__)[-1].filename
    return Path(innermost).resolve().is_relative_to(Path(gradtools.__file__).resolve().parent)


def _first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def run_case(case: Case, core: bool = False) -> dict:
    """The outcomes of one case: the monitor's, and gradtools.fit's where it takes the model
    (in the ``core`` run, where the case says so)."""
    started = time.perf_counter()
    policy = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_float16" if case.mixed_precision else "float32")
    try:
        subjects = []
        monitor = outcome_of(lambda: _monitor_and_refit(_built(case, subjects)), case)
        fit = None
        if subjects and subjects[0].fit_loss is not None and (case.core_fit or not core) and on_tensorflow():
            fit = outcome_of(lambda: check_fit(case.build(), case.build), case)
    finally:
        keras.config.set_dtype_policy(policy)
        keras.backend.clear_session()
    return {"model": case.model, "mode": case.mode, "expect": case.expect, "refusal": case.refusal,
            "monitor": monitor, "fit": fit, "seconds": time.perf_counter() - started}


def _built(case: Case, subjects: list) -> Subject:
    subjects.append(case.build())
    return subjects[-1]


def _monitor_and_refit(subject: Subject):
    worst, where, steps, note = check_monitor(subject)
    if subject.refit is not None:
        subject.refit(subject.model)
        again, where_again, _, _ = check_monitor(subject)
        if again >= worst:
            worst, where = again, f"second fit, {where_again}"
    return worst, where, steps, note


def as_expected(result: dict) -> bool:
    """The monitor's cell is what the case expects (a refusal with the case's words), and
    gradtools.fit, where it ran, is exact."""
    monitor, fit = result["monitor"], result["fit"]
    refused_right = monitor.kind != "refused" or result["refusal"] in monitor.detail
    return monitor.kind == result["expect"] and refused_right and (fit is None or fit.kind == "exact")


def markdown_table(results: list[dict]) -> str:
    lines = ["| model | mode | GradientMonitor vs tape | gradtools.fit vs tape and model.fit | steps checked | s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        fit = "—" if r["fit"] is None else r["fit"].cell()
        steps = ", ".join(str(s) for s in r["monitor"].steps) if r["monitor"].kind in ("exact", "differs") else ""
        lines.append(f"| {r['model']} | {r['mode']} | {r['monitor'].cell()} | {fit} | {steps} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
