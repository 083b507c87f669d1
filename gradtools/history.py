"""The result of a training run: its metrics table and how it ended."""

from __future__ import annotations

import functools
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from gradtools.columns import STEP_COLUMNS, layer_columns
from gradtools.spike_events import SPIKES_FILE, empty_events, read_events

if TYPE_CHECKING:
    from gradtools.diagnosis import Diagnosis

#: How a run can end. ``diverged`` is a result (a non-finite loss or gradient), not an error.
#: A run directory still says ``running`` when its process was killed (or is still training).
COMPLETED, DIVERGED, INTERRUPTED, FAILED, RUNNING = "completed", "diverged", "interrupted", "failed", "running"
STATUSES = (COMPLETED, DIVERGED, INTERRUPTED, FAILED, RUNNING)
#: The statuses of a run that went to its end: what an interruption afterwards cannot undo.
FINAL_STATUSES = (COMPLETED, DIVERGED)
#: The statuses of a run that ended before its end.
EARLY_END_STATUSES = (INTERRUPTED, FAILED)


class RunDirectoryError(ValueError):
    """A run directory that cannot be read; the message names the file and what is wrong."""


class DamagedRunWarning(UserWarning):
    """A run directory was read, but part of it had to be left out (a cut last row)."""


def read_metrics(path: Path) -> pd.DataFrame:
    """A metrics table written by appends; a last row that a killed process or a full disk
    cut short is left out, with one warning. Any other damage (bytes that are not text, a row
    of another length before the last, a value that is not a number) is a
    :class:`RunDirectoryError` naming the file and the line or column."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise RunDirectoryError(f"{path} is damaged: it is not text, as the tables of a run directory are") from None
    lines = text.splitlines(keepends=True)
    if not lines:
        return pd.DataFrame()
    header, rows = lines[0], lines[1:]
    fields = header.count(",")
    if rows and (not rows[-1].endswith("\n") or rows[-1].count(",") != fields):
        warnings.warn(f"{path}: its last row was cut short (the run stopped while writing it); "
                      "it is left out", DamagedRunWarning, stacklevel=3)
        rows = rows[:-1]
    for number, row in enumerate(rows, start=2):
        if row.count(",") != fields:
            raise RunDirectoryError(f"{path} is damaged: line {number} has {row.count(',') + 1} values, "
                                    f"the header {fields + 1}")
    table = pd.read_csv(io.StringIO(header + "".join(rows)))
    for column in table.columns if len(table) else ():
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise RunDirectoryError(f"{path} is damaged: column {column!r} holds values that are not numbers")
    return table

#: The files of a run directory (docs/run-directory.md): the metrics table, the run's record,
#: its config (when a config made it), its figures, and the per-epoch table of gradients
#: through time (recurrent models only).
METRICS_FILE, INFO_FILE, CONFIG_FILE, FIGURES_DIR = "metrics.csv", "run.json", "config.toml", "figures"
STATE_GRADIENTS_FILE = "state_gradients.csv"


@dataclass
class History:
    """What :func:`gradtools.fit` measured.

    ``metrics`` has one row per logged step with the columns of
    :func:`gradtools.columns.metric_columns`; ``layer_paths`` names the kernel variable behind
    each numbered layer (``layer_paths[0]`` is ``layer_1``) and ``layer_blocks`` the block
    (top-level layer) it belongs to, which says how deep it sits (:mod:`gradtools.layers`).
    """

    metrics: pd.DataFrame
    status: str
    first_nonfinite_step: int | None = None
    epochs_completed: int = 0
    wall_seconds: float = 0.0
    layer_paths: list[str] = field(default_factory=list)
    #: The block of each numbered layer; empty when unknown (each layer is then its own block).
    layer_blocks: list[str] = field(default_factory=list)
    #: Per-epoch gradients through time of :class:`gradtools.through_time.TracedRNN` layers:
    #: ``epoch``, ``layer_k/recurrent_spectral_radius`` (at the epoch's start) and
    #: ``layer_k/state_grad_norm/t<t>`` (mean of the finite ‖∂L/∂h_t‖ over the epoch's steps)
    #: and ``layer_k/bptt_steps`` (how far back the gradient may flow); else None.
    state_gradients: pd.DataFrame | None = None
    #: Each block's blocks downstream in the model's graph (:func:`gradtools.layers.block_downstream`);
    #: empty when unknown (each block is then before every block listed after it).
    block_downstream: dict[str, list[str]] = field(default_factory=dict)
    #: The spikes a :class:`gradtools.SpikeGuard` caught (:data:`gradtools.spike_events.EVENT_COLUMNS`):
    #: empty when a guard watched and caught none; None when no guard watched.
    spikes: pd.DataFrame | None = None
    #: The run's :class:`gradtools.Diagnosis`, made once when a run with loggers ends
    #: (:func:`gradtools.loggers.base.end_run`) and handed to them; None otherwise.
    diagnosis: Diagnosis | None = field(default=None, compare=False, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layer_paths)

    @property
    def unfinished(self) -> bool:
        """True for a run directory whose process never closed it (killed, or still running)."""
        return self.status == RUNNING

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> "History":
        """Read a run directory written by :class:`gradtools.loggers.LocalRunLogger`.
        Raises :class:`RunDirectoryError` naming what is missing or damaged."""
        run_dir = Path(run_dir)
        metrics_file, info_file = run_dir / METRICS_FILE, run_dir / INFO_FILE
        missing = [p.name for p in (metrics_file, info_file) if not p.is_file()]
        if missing:
            raise RunDirectoryError(
                f"{run_dir} is not a run directory: missing {', '.join(missing)}"
            )
        try:
            info = json.loads(info_file.read_text())
            if not isinstance(info, dict) or "status" not in info:
                raise ValueError("no status")
        except (ValueError, UnicodeDecodeError) as error:
            raise RunDirectoryError(f"{info_file} is damaged ({error}): not the JSON a run "
                                    "directory holds") from None
        state_file, spikes_file = run_dir / STATE_GRADIENTS_FILE, run_dir / SPIKES_FILE
        entry = functools.partial(_entry, info, info_file)
        metrics = read_metrics(metrics_file)
        _require_columns(metrics, len(entry("layer_paths", list, [])), metrics_file)
        return cls(
            metrics=metrics,
            status=entry("status", str, None),
            first_nonfinite_step=entry("first_nonfinite_step", int, None),
            epochs_completed=entry("epochs_completed", int, 0),
            wall_seconds=entry("wall_seconds", (int, float), 0.0),
            layer_paths=entry("layer_paths", list, []),
            layer_blocks=entry("layer_blocks", list, []),
            state_gradients=read_metrics(state_file) if state_file.is_file() else None,
            block_downstream=_downstream(entry("block_downstream", dict, {}), info_file),
            spikes=(read_events(spikes_file) if spikes_file.is_file()
                    else empty_events() if entry("spike_guard", dict, None) else None),
        )


def _require_columns(metrics: pd.DataFrame, n_layers: int, metrics_file: Path) -> None:
    """The step columns and every statistic of each numbered layer are there: a table without
    them is not one gradtools wrote (a column deleted, another tool's CSV)."""
    missing = [c for c in [*STEP_COLUMNS, *layer_columns(n_layers)] if c not in metrics.columns]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RunDirectoryError(f"{metrics_file} lacks the column{'s' * (len(missing) > 1)} {shown}: "
                                "not the table a run directory holds")


def _entry(info: dict, info_file: Path, key: str, kind, default):
    """``info[key]``, or ``default`` when it is absent or null; a value of another kind is a
    :class:`RunDirectoryError` naming the file and the key."""
    value = info.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RunDirectoryError(f"{info_file} is damaged: {key!r} is {value!r}, not what a run directory holds")
    return value


def _downstream(value: dict, info_file: Path) -> dict[str, list[str]]:
    if not all(isinstance(blocks, list) and all(isinstance(b, str) for b in blocks) for blocks in value.values()):
        raise RunDirectoryError(f"{info_file} is damaged: 'block_downstream' is {value!r}, not what a run "
                                "directory holds")
    return value


def run_status(run_dir: Path) -> str | None:
    """The status in ``run_dir``'s run.json; None when it is missing or damaged."""
    try:
        info = json.loads((Path(run_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    status = info.get("status") if isinstance(info, dict) else None
    return status if isinstance(status, str) else None
