"""The compiled programs of this process, kept for reuse by later fits of the same program.

A program is a compiled epoch and the :class:`gradtools.steps.TrainStep` it runs, traced with
one model and optimizer. TensorFlow names every trace anew, so its in-memory cache would not
find an earlier compilation of the same program: reusing the trace itself is what compiles a
program once per process. A later model of the same structure *borrows* the program: its
values are copied in before training and out after (:meth:`Program.lend`,
:meth:`Program.give_back`).

:func:`program_key` says what a compiled epoch depends on; :func:`find` and :func:`keep`
look programs up and keep them (least recently used dropped first); :func:`clear` forgets
them all (a long-running process that trains many different models calls it, with
``keras.backend.clear_session()``, to free their memory).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass

import keras
import tensorflow as tf

from gradtools import compilation_cache
from gradtools.steps import TrainStep

#: How many compiled programs a process keeps: a kept program holds its model's and
#: optimizer's variables, so beyond the newest one they are kept only while those total at
#: most ``MAX_KEPT_BYTES``.
MAX_PROGRAMS = 32
MAX_KEPT_BYTES = 512 * 2**20


@dataclass
class Program:
    """A compiled epoch and the step it runs (on the model and optimizer it was traced with)."""

    step: TrainStep
    run_epoch: object
    #: The program's key until its first call, which traces it (see ``named_after``).
    untraced_key: str | None = None
    #: While another model (or optimizer) of the same structure borrows the program: the
    #: values of the ones it was traced with, which :meth:`give_back` restores.
    owners_values: list | None = None

    def lend(self, model, optimizer) -> None:
        """Start the program's variables from ``model``'s and ``optimizer``'s values, keeping
        the values of the model and optimizer it was traced with (the user may still hold
        them: training another model must not change them)."""
        owners = self._owners_variables(model, optimizer)
        if self.owners_values is None:
            self.owners_values = [v.numpy() for v in owners]
        copy_values(model.variables, self.step.model.variables)
        copy_values(optimizer.variables, self.step.optimizer.variables)

    def give_back(self, model, optimizer) -> None:
        """Once the borrower has its trained values: the traced model and optimizer get their
        own values back."""
        if self.owners_values is not None:
            copy_values(self.owners_values, self._owners_variables(model, optimizer))
            self.owners_values = None

    def _owners_variables(self, model, optimizer) -> list:
        step = self.step
        return ([*step.model.variables] if step.model is not model else []) + \
               ([*step.optimizer.variables] if step.optimizer is not optimizer else [])

    def bind(self, x, y):
        """``run_epoch(epoch, seed)`` on the examples ``x``, ``y``."""
        def run(epoch, seed):
            if self.untraced_key is None:
                return self.run_epoch(epoch, seed, x, y)
            key, self.untraced_key = self.untraced_key, None
            with compilation_cache.named_after(key):
                return self.run_epoch(epoch, seed, x, y)
        return run


#: Compiled epochs of this process, by program key, least recently used first.
_KEPT: OrderedDict[str, Program] = OrderedDict()


def kept() -> list[str]:
    """The keys of the programs this process keeps, least recently used first."""
    return list(_KEPT)


def clear() -> None:
    """Forget every kept program (later fits trace and compile anew)."""
    _KEPT.clear()


def find(key: str | None, model, loss_fn) -> Program | None:
    """The kept program of ``key`` when it was traced from a model of ``model``'s variable
    shapes and from the same code (see :func:`_same_code`); it becomes the most recently used."""
    program = _KEPT.get(key) if key is not None else None
    if (program is None or not _same_shapes(program.step.model.variables, model.variables)
            or not _same_code(program.step, model, loss_fn)):
        return None
    _KEPT.move_to_end(key)
    return program


def keep(key: str, program: Program) -> None:
    """Keep ``program`` as the newest, dropping the least recently used beyond the limits."""
    _KEPT[key] = program
    while len(_KEPT) > 1 and (len(_KEPT) > MAX_PROGRAMS or sum(map(_variable_bytes, _KEPT.values())) > MAX_KEPT_BYTES):
        _KEPT.popitem(last=False)


def forget(program: Program) -> None:
    """``program`` is not reused by later fits of this process."""
    for key in [key for key, kept_program in _KEPT.items() if kept_program is program]:
        del _KEPT[key]


def _variable_bytes(program: Program) -> int:
    variables = [*program.step.model.variables, *program.step.optimizer.variables]
    return sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables)


def copy_values(sources, targets) -> None:
    for source, target in zip(sources, targets):
        if source is not target:
            target.assign(source)


def _same_code(step: TrainStep, model, loss_fn) -> bool:
    """The program was traced from the same code as ``model`` and ``loss_fn`` run: the same
    layer classes (a class defined again, as re-running a notebook cell does, is other code
    under the same config and key) and the same loss class and function (two closures share
    a name)."""
    def classes(of):  # every layer, nested ones included (Keras has no public walk)
        return [type(layer) for layer in of._flatten_layers()]  # noqa: SLF001

    return (classes(step.model) == classes(model) and type(step.loss_fn) is type(loss_fn)
            and getattr(step.loss_fn, "fn", None) is getattr(loss_fn, "fn", None))


def _same_shapes(first, second) -> bool:
    return len(first) == len(second) and all(tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
                                             for a, b in zip(first, second))


def program_key(model, loss_fn, optimizer, data_shapes, options) -> str | None:
    """What a compiled epoch depends on, as text; None when it cannot be told (a subclassed
    model without a config): such a model is traced anew every time. ``data_shapes`` says
    the examples' shapes, dtypes and batch size; ``options`` the loop's options. Initializers,
    seeds, a learning rate that is a number (a variable) and the names of layers and weights
    are not part of the program (the logged layer paths are the caller's model's); a
    learning rate schedule is."""
    try:
        parts = [without_inputs(model.get_config()),
                 [v.shape for v in model.trainable_weights], type(optimizer).__name__,
                 without_inputs(optimizer.get_config()), type(loss_fn).__name__,
                 without_inputs(loss_fn.get_config()), getattr(getattr(loss_fn, "fn", None), "__name__", ""),
                 data_shapes, options, keras.config.dtype_policy().name]
        return json.dumps(parts, sort_keys=True, default=str)
    except (NotImplementedError, TypeError, ValueError):
        return None


#: Keys a compiled epoch takes as inputs, not as part of the program: those ending so
#: (initializers, seeds: the initial weights and the seed are arguments of the epoch)...
INPUT_SUFFIXES = ("_initializer", "seed")
#: ...and these when they hold a number (a learning rate that is a number is a variable).
INPUT_NUMBERS = ("learning_rate",)


def without_inputs(config):
    """A nested config without what a compiled epoch takes as inputs (:data:`INPUT_SUFFIXES`,
    :data:`INPUT_NUMBERS`) and without names: the one rule of what makes two programs the
    same, for :func:`program_key` and for a caller that groups runs before their models exist."""
    return _without(config, INPUT_SUFFIXES, INPUT_NUMBERS)


def _without(config, suffixes: tuple[str, ...], numbers: tuple[str, ...] = ()):
    """A nested config without its ``name`` keys, the keys ending in any of ``suffixes`` and
    the keys in ``numbers`` that hold a number (``class_name`` and ``registered_name`` stay:
    they say what a layer is)."""
    if isinstance(config, dict):
        return {k: _without(v, suffixes, numbers) for k, v in config.items()
                if not (k == "name" or (suffixes and str(k).endswith(suffixes))
                        or (k in numbers and isinstance(v, (int, float))))}
    if isinstance(config, (list, tuple)):
        return [_without(v, suffixes, numbers) for v in config]
    return config
