"""Optional backends and what to install for each: ``pip install 'gradtools[<extra>]'``."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """A backend's package is not installed; the message names the extra that installs it."""


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtra` saying which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(
            f"{feature} needs the module {module.split('.')[0]}, which cannot be imported "
            f"({error}): pip install 'gradtools[{extra}]'"
        ) from None
