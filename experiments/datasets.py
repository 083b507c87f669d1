"""The article's data: scikit-learn's synthetic generators, optionally standardized."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from sklearn import datasets
from sklearn.preprocessing import StandardScaler

#: Config name -> scikit-learn generator.
GENERATORS = {
    "moons": datasets.make_moons,
    "circles": datasets.make_circles,
    "classification": datasets.make_classification,
    "regression": datasets.make_regression,
}

#: Keys of [data] that are ours, not the generator's.
OWN_KEYS = ("generator", "standardize", "standardize_targets")
_NOT_CONFIGURABLE = ("return_X_y", "coef")


def generator_parameters(generator: str) -> list[str]:
    """The keyword parameters a config may give the generator."""
    signature = inspect.signature(GENERATORS[generator])
    return [name for name in signature.parameters if name not in _NOT_CONFIGURABLE]


def check_data_params(generator: str, params: dict[str, Any]) -> None:
    """Raise KeyError(key, allowed) for an unknown parameter, ValueError for a bad value
    (scikit-learn's own validation message, which names the parameter)."""
    allowed = generator_parameters(generator)
    for key in params:
        if key not in allowed:
            raise KeyError(key, ", ".join(allowed))
    try:
        GENERATORS[generator](**params)  # scikit-learn validates its own parameters
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from None


def make_dataset(data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as float32 arrays from a validated [data] section; y is 1-D for a single
    target, as the generators return it."""
    params = {k: v for k, v in data.items() if k not in OWN_KEYS}
    x, y = GENERATORS[data["generator"]](**params)
    x, y = x.astype(np.float32), y.astype(np.float32)
    if data.get("standardize"):
        x = StandardScaler().fit_transform(x).astype(np.float32)
    if data.get("standardize_targets"):
        y = ((y - y.mean(axis=0)) / y.std(axis=0)).astype(np.float32)
    return x, y
