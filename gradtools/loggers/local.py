"""The run directory: the files every other tool (figures, diagnosis, comparison) reads.

    <run dir>/config.toml    the parameters given to log_params
    <run dir>/metrics.csv    one row per logged step, appended after every epoch
    <run dir>/run.json       status, first non-finite step, epochs, wall time, versions
    <run dir>/state_gradients.csv  recurrent models: one row per epoch of ‖∂L/∂h_t‖, t = 1…T
    <run dir>/spikes.csv     with a SpikeGuard: one row per spike it caught, appended after every epoch
    <run dir>/figures/*.png  the standard figures of gradtools.plots, plus any logged ones

What survives a fault: run.json is replaced atomically after every epoch (status
``running`` and the epochs completed so far, then the final status with the last epoch), so a
killed run is an honest record of what it finished, and the final status is on disk before
any figure is drawn: an interruption while they are drawn cannot undo it. An append or a file
that fails to write (a full disk) is rolled back: no half row, no empty figure, no
``.partial`` file is left behind.

An epoch's rows and its run.json are written in a background thread while the next epoch
trains (writing the CSV took about as long as training a small net's epoch); at most one
epoch is in flight, its rows always land before its run.json, any status but ``running``
waits until it is on disk, and an epoch whose write failed is not counted as completed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from gradtools.history import (
    CONFIG_FILE,
    FIGURES_DIR,
    FINAL_STATUSES,
    INFO_FILE,
    METRICS_FILE,
    RUNNING,
    STATE_GRADIENTS_FILE,
)
from gradtools.loggers.base import RunLogger, figure_png, plain
from gradtools.spike_events import SPIKES_FILE


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


def _naming(error: OSError, path: Path) -> OSError:
    """The same error, saying which file it was about (a failed write() does not)."""
    return OSError(error.errno, error.strerror or str(error), str(path))


def write_atomically(path: Path, write) -> None:
    """``write(partial_path)``, then rename it over ``path``; on failure nothing is left."""
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    except OSError as error:
        raise _naming(error, path) from error
    finally:
        partial.unlink(missing_ok=True)


#: NumPy's format for each column type of a metrics table: a float32 to 9 significant
#: digits reads back as the same float32.
_COLUMN_FORMATS = {np.dtype(np.int64): "%d", np.dtype(np.float32): "%.9g"}


def _write_csv(stream, rows: pd.DataFrame, header: bool) -> None:
    """``rows`` as CSV. A table of integers and float32 (the metrics rows, thousands of
    values an epoch) is formatted by NumPy: pandas' shortest-repr formatting of a small net's
    epoch took longer than training it, and held the interpreter while the next epoch waited
    for it. Other tables are written by pandas."""
    formats = [_COLUMN_FORMATS.get(dtype) for dtype in rows.dtypes]
    if None in formats:
        rows.to_csv(stream, header=header, index=False)
        return
    if header:
        rows.head(0).to_csv(stream, index=False)
    np.savetxt(stream, rows.to_numpy(dtype=np.float64), fmt=formats, delimiter=",")


def _append_or_roll_back(path: Path, rows: pd.DataFrame) -> None:
    """Append ``rows`` to a CSV (with a header if it is new); if the write fails, cut the
    file back to what it was, so it never ends in half a row."""
    size = path.stat().st_size if path.exists() else None
    try:
        with path.open("a", newline="") as stream:
            _write_csv(stream, rows, header=size is None)
    except BaseException as error:
        if size is None:
            path.unlink(missing_ok=True)
        else:
            with path.open("r+b") as stream:
                stream.truncate(size)
        if isinstance(error, OSError):
            raise _naming(error, path) from error
        raise


def _write_csv_file(path: Path, rows: pd.DataFrame) -> None:
    with path.open("w", newline="") as stream:
        _write_csv(stream, rows, header=True)


def _append_all(appends) -> None:
    """``(path, rows)`` appends, in order."""
    for path, rows in appends:
        _append_or_roll_back(path, rows)


class LocalRunLogger(RunLogger):
    """Writes one run directory: created on construction; it may exist but must be empty."""

    def __init__(self, run_dir: str | Path, *, name: str, seed: int | None = None):
        self.run_dir = Path(run_dir)
        self.name = name
        self.seed = seed
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if any(self.run_dir.iterdir()):
            raise FileExistsError(f"{self.run_dir} is not empty: a run directory holds one run")
        (self.run_dir / FIGURES_DIR).mkdir()
        self.metrics_path = self.run_dir / METRICS_FILE
        self._started = time.time()
        self._info: dict[str, Any] = {
            "experiment": name,
            "seed": seed,
            "status": RUNNING,
            "first_nonfinite_step": None,
            "epochs_completed": 0,
            "wall_seconds": None,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self._started)),
            "versions": library_versions(),
        }
        self._appends: list[tuple[Path, pd.DataFrame]] = []  # this epoch's, written with its progress
        self._writer: ThreadPoolExecutor | None = None
        self._writing: Future | None = None
        self._epochs_on_disk, self._write_failed = 0, False
        self._started_run = False
        self._write_info()

    def _info_text(self) -> str:
        return json.dumps(self._info, indent=2) + "\n"

    def _write_info(self) -> None:
        self._flush()
        self._replace_run_json(self._info_text())

    def _replace_run_json(self, text: str) -> None:
        write_atomically(self.run_dir / INFO_FILE, lambda path: path.write_text(text))

    def _write_epoch(self, appends, info_text: str, epochs_completed: int) -> None:
        """An epoch's appends, then its run.json (in the writer thread)."""
        try:
            _append_all(appends)
            self._replace_run_json(info_text)
        except BaseException:
            self._write_failed = True
            raise
        self._epochs_on_disk = epochs_completed

    def _wait(self) -> None:
        """Wait for the epoch being written; raise its error, once. After a failed write the
        rows logged since are dropped: written, they would follow a gap."""
        writing, self._writing = self._writing, None
        try:
            if writing is not None:
                writing.result()
        finally:
            if self._write_failed:
                self._appends = []

    def _flush(self) -> None:
        """Everything logged so far on disk, before a write outside the epochs."""
        self._wait()
        appends, self._appends = self._appends, []
        _append_all(appends)

    def _counted(self, epochs_completed: int) -> int:
        """Epochs completed, not counting one whose write failed."""
        return min(epochs_completed, self._epochs_on_disk) if self._write_failed else epochs_completed

    def start(self, *, epochs: int, steps_per_epoch: int, layer_paths: list[str],
              layer_blocks: list[str] | None = None) -> None:
        if self._started_run:  # a second run's rows would follow the first one's
            raise ValueError(f"this LocalRunLogger has written a run to {self.run_dir} already: a run "
                             "directory holds one run; give each run a new LocalRunLogger")
        self._started_run = True
        self._info.update(epochs=epochs, steps_per_epoch=steps_per_epoch, layer_paths=layer_paths,
                          layer_blocks=layer_blocks)
        self._write_info()

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = tomli_w.dumps(plain(params))
        write_atomically(self.run_dir / CONFIG_FILE, lambda path: path.write_text(text))

    def log_rows(self, rows: pd.DataFrame) -> None:
        self._appends.append((self.metrics_path, rows))

    def log_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._appends.append((self.run_dir / STATE_GRADIENTS_FILE, pd.DataFrame([{"epoch": epoch, **metrics}])))

    def log_spikes(self, events: pd.DataFrame) -> None:
        self._appends.append((self.run_dir / SPIKES_FILE, events))

    def log_progress(self, *, epochs_completed: int, status: str) -> None:
        """Start writing the epoch (its rows, then run.json) once the previous one is written;
        any status but ``running`` is on disk when this returns."""
        self._wait()
        self._info.update(epochs_completed=self._counted(epochs_completed), status=status,
                          wall_seconds=round(time.time() - self._started, 3))
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="gradtools-run-dir")
        appends, self._appends = self._appends, []
        self._writing = self._writer.submit(self._write_epoch, appends, self._info_text(),
                                            self._info["epochs_completed"])
        if status != RUNNING:
            self._wait()

    def log_figure(self, name: str, figure) -> None:
        write_atomically(self.run_dir / FIGURES_DIR / f"{name}.png",
                          lambda path: path.write_bytes(figure_png(figure)))

    def finish(self, history) -> None:
        """The final entries of run.json, the diagnosis among them. The status itself was written
        by the last :meth:`log_progress` (a ``completed`` or ``diverged`` status is not undone here)."""
        self._flush()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        if self._info["status"] not in FINAL_STATUSES:
            self._info.update(status=history.status, first_nonfinite_step=history.first_nonfinite_step)
        self._info.update(epochs_completed=self._counted(history.epochs_completed),
                          first_nonfinite_step=history.first_nonfinite_step,
                          wall_seconds=round(time.time() - self._started, 3),
                          layer_paths=history.layer_paths, layer_blocks=history.layer_blocks,
                          block_downstream=history.block_downstream)
        if history.diagnosis is not None:
            self._info["diagnosis"] = history.diagnosis.to_dict()
        if history.spikes is not None:
            self._info["spike_guard"] = {"spikes": len(history.spikes),
                                         "actions": history.spikes["action"].value_counts().to_dict()}
        if not self.metrics_path.exists():
            write_atomically(self.metrics_path, lambda path: _write_csv_file(path, history.metrics))
        self._write_info()

    def update_info(self, **entries: Any) -> None:
        """Add entries to run.json (e.g. a diagnosis) after the run."""
        self._info.update(entries)
        self._write_info()
