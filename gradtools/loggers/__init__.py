"""Loggers receive a run's parameters, metrics, figures and status; one module per backend."""

from gradtools.loggers.base import RunLogger
from gradtools.loggers.local import LocalRunLogger
from gradtools.loggers.progress import ProgressLogger

__all__ = ["RunLogger", "LocalRunLogger", "ProgressLogger"]
