"""The run directory: the files every other tool (figures, diagnosis, comparison) reads.

    <run dir>/config.toml    the parameters given to log_params
    <run dir>/metrics.csv    one row per logged step, appended after every epoch
    <run dir>/run.json       status, first non-finite step, epochs, wall time, versions
    <run dir>/state_gradients.csv  recurrent models: one row per epoch of ‖∂L/∂h_t‖, t = 1…T
    <run dir>/figures/*.png  the standard figures of gradtools.plots, plus any logged ones
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import tomli_w

from gradtools.history import STATE_GRADIENTS_FILE
from gradtools.loggers.base import RunLogger
from gradtools.plots import run_figures


def library_versions() -> dict[str, str]:
    """Versions that decide the numbers of a run."""
    import keras
    import tensorflow as tf

    from gradtools import __version__

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gradtools": __version__,
    }


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _toml_ready(value: Any) -> Any:
    """Drop None (TOML has no null) and stringify what TOML cannot hold."""
    if isinstance(value, Mapping):
        return {str(k): _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value]
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class LocalRunLogger(RunLogger):
    """Writes one run directory: created on construction; it may exist but must be empty."""

    def __init__(self, run_dir: str | Path, *, name: str, seed: int | None = None):
        self.run_dir = Path(run_dir)
        self.name = name
        self.seed = seed
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if any(self.run_dir.iterdir()):
            raise FileExistsError(f"{self.run_dir} is not empty: a run directory holds one run")
        (self.run_dir / "figures").mkdir()
        self.metrics_path = self.run_dir / "metrics.csv"
        self._started = time.time()
        self._info: dict[str, Any] = {
            "experiment": name,
            "seed": seed,
            "status": "running",
            "first_nonfinite_step": None,
            "epochs_completed": 0,
            "wall_seconds": None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self._started)),
            "versions": library_versions(),
        }
        self._write_info()

    def _write_info(self) -> None:
        _write_atomically(self.run_dir / "run.json", json.dumps(self._info, indent=2) + "\n")

    def start(self, *, epochs: int, steps_per_epoch: int, layer_paths: list[str],
              layer_blocks: list[str] | None = None) -> None:
        self._info.update(epochs=epochs, steps_per_epoch=steps_per_epoch, layer_paths=layer_paths,
                          layer_blocks=layer_blocks)
        self._write_info()

    def log_params(self, params: Mapping[str, Any]) -> None:
        _write_atomically(self.run_dir / "config.toml", tomli_w.dumps(_toml_ready(params)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_rows(pd.DataFrame([{"step": step, **metrics}]))

    def log_rows(self, rows: pd.DataFrame) -> None:
        new_file = not self.metrics_path.exists()
        with self.metrics_path.open("a", newline="") as stream:
            rows.to_csv(stream, header=new_file, index=False)

    def log_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> None:
        path = self.run_dir / STATE_GRADIENTS_FILE
        new_file = not path.exists()
        with path.open("a", newline="") as stream:
            pd.DataFrame([{"epoch": epoch, **metrics}]).to_csv(stream, header=new_file, index=False)

    def log_figure(self, name: str, figure) -> None:
        figure.savefig(self.run_dir / "figures" / f"{name}.png", dpi=100)

    def finish(self, history) -> None:
        if not self.metrics_path.exists():
            history.metrics.to_csv(self.metrics_path, index=False)
        for stem, figure in run_figures(history, self.name).items():
            self.log_figure(stem, figure)
        self._info.update(
            status=history.status,
            first_nonfinite_step=history.first_nonfinite_step,
            epochs_completed=history.epochs_completed,
            wall_seconds=round(time.time() - self._started, 3),
            layer_paths=history.layer_paths,
            layer_blocks=history.layer_blocks,
        )
        self._write_info()

    def update_info(self, **entries: Any) -> None:
        """Add entries to run.json (e.g. a diagnosis) after the run."""
        self._info.update(entries)
        self._write_info()
