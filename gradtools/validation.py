"""Checks of the numbers a user passes in, with messages that name the parameter, the value
received and what is allowed (scikit-learn's habit)."""

from __future__ import annotations

import math
import numbers
from pathlib import Path

#: Seeds are 32-bit: NumPy's and TensorFlow's generators take no more.
MAX_SEED = 2**32 - 1
#: Counts (epochs, batch sizes, log_every): TensorFlow counts steps and sizes in 32 bits.
MAX_COUNT = 2**31 - 1


def is_integer(value, minimum: int | None = None, maximum: int | None = None) -> bool:
    """An integer (not a bool) within the bounds given."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and (minimum is None or value >= minimum) and (maximum is None or value <= maximum))


def is_number(value, minimum: float | None = None, exclusive: bool = False) -> bool:
    """A finite real number (not a bool), above ``minimum`` (or at it, unless ``exclusive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return minimum is None or (value > minimum if exclusive else value >= minimum)


def require_integer(name: str, value, minimum: int = 1, maximum: int = MAX_COUNT) -> None:
    if not is_integer(value, minimum, maximum):
        raise ValueError(f"{name} must be an integer from {minimum} to {maximum}, got {value!r}")


def require_positive_number(name: str, value) -> None:
    if not is_number(value, 0, exclusive=True):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def nearest_existing(path: str | Path) -> Path:
    """``path`` if it exists, else the nearest folder above it that does (at worst the root):
    where a folder that is to be made would go, or the file in its way."""
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
