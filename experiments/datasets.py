"""The article's data: scikit-learn's synthetic generators, optionally standardized; and
the adding problem, a long-range sequence task generated here (no downloads)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from sklearn import datasets
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError, validate_parameter_constraints

from gradtools.validation import is_integer


def make_adding_problem(n_samples: int = 2048, sequence_length: int = 50, random_state=None):
    """The adding problem (Hochreiter & Schmidhuber 1997), made to span the whole sequence.

    Each example is ``sequence_length`` steps of two channels: a value drawn uniformly from
    [0, 1) and a marker that is 1 at exactly two steps, one among the first 10 % of the steps
    and one in the second half. The target is the sum of the two marked values, so the first
    one must be carried across at least half the sequence. Predicting the mean (1.0) scores a
    mean squared error of 1/6 ≈ 0.167: a model below that has learned the dependency.

    Returns ``x`` of shape (n_samples, sequence_length, 2) and ``y`` of shape (n_samples,).
    """
    check_adding_problem(n_samples, sequence_length, random_state)
    rng = np.random.default_rng(random_state)
    rows = np.arange(n_samples)
    x = np.zeros((n_samples, sequence_length, 2), dtype=np.float32)
    x[:, :, 0] = rng.uniform(size=(n_samples, sequence_length))
    first = rng.integers(0, max(1, sequence_length // 10), n_samples)
    second = rng.integers(sequence_length // 2, sequence_length, n_samples)
    x[rows, first, 1] = 1.0
    x[rows, second, 1] = 1.0
    y = x[rows, first, 0] + x[rows, second, 0]
    return x, y


def check_adding_problem(n_samples: int = 2048, sequence_length: int = 50, random_state=None) -> None:
    """ValueError, in scikit-learn's words, for a parameter :func:`make_adding_problem` cannot take."""
    if not is_integer(n_samples, 1):
        raise ValueError(f"The 'n_samples' parameter must be an integer >= 1. Got {n_samples!r}.")
    if not is_integer(sequence_length, 4, 1000):
        raise ValueError("The 'sequence_length' parameter must be an integer in [4, 1000]. "
                         f"Got {sequence_length!r}.")
    if random_state is not None and not is_integer(random_state):
        raise ValueError(f"The 'random_state' parameter must be an integer or None. Got {random_state!r}.")


#: Config name -> generator (scikit-learn's, or ours with the same calling convention).
GENERATORS = {
    "moons": datasets.make_moons,
    "circles": datasets.make_circles,
    "classification": datasets.make_classification,
    "regression": datasets.make_regression,
    "adding": make_adding_problem,
}

#: Generators whose examples are sequences (batch, time, features).
SEQUENCE_GENERATORS = ("adding",)
#: Generators whose targets are real numbers, not class labels (which scaling would destroy).
REAL_TARGET_GENERATORS = ("regression", "adding")

_NOT_CONFIGURABLE = ("return_X_y", "coef")
#: The most examples a config may ask for: they are made in memory.
MAX_SAMPLES = 10_000_000


def generator_parameters(generator: str) -> list[str]:
    """The keyword parameters a config may give the generator."""
    signature = inspect.signature(GENERATORS[generator])
    return [name for name in signature.parameters if name not in _NOT_CONFIGURABLE]


def check_data_params(generator: str, params: dict[str, Any]) -> None:
    """Raise KeyError(key, allowed) for an unknown parameter, ValueError for a bad value
    (scikit-learn's own message, which names the parameter), without making the data: each
    value against the generator's declared constraints. What only making the data shows
    (make_classification's counts that must agree, targets without variance to standardize)
    :func:`make_dataset` raises."""
    allowed = generator_parameters(generator)
    for key in params:
        if key not in allowed:
            raise KeyError(key, ", ".join(allowed))
    if "n_samples" in params and not is_integer(params["n_samples"], 1, MAX_SAMPLES):
        raise ValueError(f"The 'n_samples' parameter must be an integer from 1 to {MAX_SAMPLES}. "
                         f"Got {params['n_samples']!r}.")
    function = GENERATORS[generator]
    if function is make_adding_problem:
        check_adding_problem(**params)
        return
    constraints = function._skl_parameter_constraints  # noqa: SLF001 - what @validate_params checks
    try:
        validate_parameter_constraints({k: v for k, v in constraints.items() if k in params}, params,
                                       caller_name=function.__name__)
    except InvalidParameterError as error:
        raise ValueError(str(error)) from None


def make_dataset(data) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as float32 arrays from a validated [data] section
    (:class:`experiments.config.DataSection`); y is 1-D for a single target, as the
    generators return it. ValueError for parameters the generator refuses together,
    ZeroDivisionError for targets to standardize that have no variance."""
    try:
        x, y = GENERATORS[data.generator](**data.params)
    except TypeError as error:
        raise ValueError(str(error)) from None
    x, y = x.astype(np.float32), y.astype(np.float32)
    if data.standardize:
        flat = x.reshape(-1, x.shape[-1])  # sequences: per channel over all steps
        x = StandardScaler().fit_transform(flat).reshape(x.shape).astype(np.float32)
    if data.standardize_targets:
        spread = np.atleast_1d(y).std(axis=0)  # one example: scikit-learn squeezes y to a scalar
        if not (spread > 0).all():
            raise ZeroDivisionError("targets with zero variance")
        y = ((y - y.mean(axis=0)) / spread).astype(np.float32)
    return x, y
