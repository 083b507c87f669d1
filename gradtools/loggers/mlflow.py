"""MLflow: a run table with parameters, tags and verdicts side by side, and every series.

One MLflow run per training run, in the MLflow experiment you name (the experiment suite uses
one per config group):

- metrics: every ``metrics.csv`` column under the same name (``loss``,
  ``layer_1/grad_abs_mean``…) with the step as MLflow's step, sent in one batch after each
  epoch: by default the epoch's last logged row (``rows_per_epoch=1``), which is what a chart
  over a run's epochs needs; ``rows_per_epoch=None`` sends every row, so the series equal
  ``metrics.csv``, at MLflow's speed (about 3,000 values a second into SQLite here: a
  100-epoch run of a 4-layer net with 94 steps an epoch has 280,000); the per-epoch numbers
  (``layer_k/state_grad_norm/t<t>``) with the epoch as the step;
- params: the configuration given to ``log_params``, flattened to dotted keys
  (``training.epochs``);
- tags: ``status``, ``first_nonfinite_step``, ``verdict`` (see :meth:`gradtools.summary.RunSummary.outcome`) and the
  tags given (each as ``<tag> = "true"``); the description as MLflow's note;
- artifacts: the figures under ``figures/``, and any files passed to :meth:`log_file`.

The store is the ``tracking_uri`` given, else MLflow's own ``MLFLOW_TRACKING_URI``, else
MLflow's default. A server that cannot be reached raises :class:`MLflowUnavailable` when the
logger is made (before training); a failure later warns once and training goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradtools.extras import require
from gradtools.history import EARLY_END_STATUSES
from gradtools.loggers.base import LoggerUnavailable, figure_png, flat_params
from gradtools.loggers.remote import RemoteRunLogger
from gradtools.spike_events import describe_event
from gradtools.summary import summarize

mlflow = require("mlflow", extra="mlflow", feature="MLflowLogger")
from mlflow.entities import Metric, Param, RunTag  # noqa: E402 - after the extra is known to be there

#: Seconds to wait for an ``http(s)://`` tracking server to answer its health check.
REACH_TIMEOUT = 10.0

#: Seconds ``finish`` waits for the sender thread to hand MLflow what is left.
FINISH_TIMEOUT = 120.0

#: Metrics and tags are gathered and handed to the sender at most this often (each hand-off
#: is one commit of MLflow's store), or when a batch is full.
FLUSH_SECONDS = 2.0
BATCH_SIZE = 1000

#: MLflow's longest parameter value; longer ones are cut (the full config is an artifact).
MAX_PARAM_LENGTH = 6000


class MLflowUnavailable(LoggerUnavailable):
    """The MLflow store or server could not be used when the run was set up."""


def check_reachable(tracking_uri: str, timeout: float = REACH_TIMEOUT) -> None:
    """For a server URI, its ``/health`` endpoint must answer; a local store needs nothing."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise MLflowUnavailable(f"the MLflow server at {tracking_uri} cannot be reached ({reason}); "
                                "start it (mlflow server) or set MLFLOW_TRACKING_URI to one that runs") from None


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (another process may create it at the same moment)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def _store_logs_muted():
    store = logging.getLogger("mlflow.store")
    level = store.level
    store.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        store.setLevel(level)


def _database_words(error: Exception) -> str:
    """The error's own line: SQLAlchemy puts a note on when it was raised before it, and the
    SQL statement after it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("(raised as a result of", "[SQL:", "[parameters:",
                                                            "(Background on this error"))]
    return (kept or lines or [type(error).__name__])[0][:300]


class MLflowLogger(RemoteRunLogger):
    """Logs one run to MLflow (a SQLite file, a folder or a tracking server).

    ``experiment`` is the MLflow experiment (created if absent, its artifacts stored at
    ``artifact_location``, by default where the store or server puts them), ``name`` the
    run's name. ``run_id`` is the MLflow run's id once the logger is made.
    """

    service = "MLflow"

    def __init__(self, *, name: str, experiment: str, tracking_uri: str | None = None,
                 tags: Sequence[str] = (), description: str = "", rows_per_epoch: int | None = 1,
                 artifact_location: str | None = None):
        super().__init__()
        if rows_per_epoch is not None and rows_per_epoch < 1:
            raise ValueError(f"rows_per_epoch must be None (every row) or an integer >= 1, not {rows_per_epoch!r}")
        self.rows_per_epoch = rows_per_epoch
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        check_reachable(self.tracking_uri)
        run_tags = {tag: "true" for tag in tags}
        if description:
            run_tags["mlflow.note.content"] = description
        try:
            with _store_logs_muted():  # it logs each database error with its traceback, then raises it
                self.client = mlflow.MlflowClient(self.tracking_uri)
                experiment_id = _experiment_id(self.client, experiment, artifact_location)
                self.run_id = self.client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
        except Exception as error:  # the store raises many types; all mean "not started"
            raise MLflowUnavailable(f"MLflow could not start a run in {self.tracking_uri}: "
                                    f"{type(error).__name__}: {_database_words(error)}") from None
        self._metrics: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._spikes = 0
        self._flushed_at = time.monotonic()
        self._figures_dir = Path(tempfile.mkdtemp(prefix="gradtools-mlflow-"))
        self._queue: queue.Queue = queue.Queue()
        self._sender = threading.Thread(target=self._send, name="gradtools-mlflow", daemon=True)
        self._sender.start()

    def _send(self) -> None:
        """The sender thread: MLflow stores about 3,000 values a second, so it writes while
        the next epochs train; the first failure warns and the rest is dropped."""
        while (item := self._queue.get()) is not None:
            self._guard(*item)

    def _later(self, what: str, action) -> None:
        self._queue.put((what, action))

    def _batch(self, what: str, *, metrics=(), params=(), tags=()) -> None:
        self._later(what, lambda: self.client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags))

    def _gather(self, metrics=(), **tags: str) -> None:
        """Keep ``metrics`` and the newest value of each tag; hand them over when due."""
        self._metrics.extend(metrics)
        self._tags.update(tags)
        if len(self._metrics) >= BATCH_SIZE or time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        metrics, tags = self._metrics, [RunTag(key, value) for key, value in self._tags.items()]
        self._metrics, self._tags, self._flushed_at = [], {}, time.monotonic()
        if metrics or tags:
            self._batch("metrics and tags", metrics=metrics, tags=tags)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._batch("parameters", params=[Param(key, str(value)[:MAX_PARAM_LENGTH])
                                          for key, value in flat_params(params).items()])

    def log_rows(self, rows: pd.DataFrame) -> None:
        now = int(time.time() * 1000)
        self._gather([Metric(column, value, now, step)
                      for column, steps, values in self.finite_series(self._sampled(rows))
                      for step, value in zip(steps, values)])

    def _sampled(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Each epoch's ``rows_per_epoch`` rows, evenly spaced and ending with its last."""
        if self.rows_per_epoch is None:
            return rows
        kept = []
        for _, epoch in rows.groupby("epoch", sort=True):
            count = min(self.rows_per_epoch, len(epoch))
            positions = np.unique(np.round(np.linspace(len(epoch) - 1, 0, count)).astype(int))
            kept.append(epoch.iloc[positions])
        return pd.concat(kept)

    def log_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        finite = self.finite_epoch_metrics(epoch, metrics)
        self._gather([Metric(name, value, now, epoch) for name, value in finite.items()])

    def on_first_nonfinite(self, step: int) -> None:
        self._gather(first_nonfinite_step=str(step))

    def log_spikes(self, events: pd.DataFrame) -> None:
        """Metrics ``spikes/value`` and ``spikes/threshold`` at each spike's step (finite
        ones), tags ``spikes`` (how many so far) and ``last_spike`` (the newest, in words)."""
        now = int(time.time() * 1000)
        self._spikes += len(events)
        self._gather([Metric(f"spikes/{column}", float(event[column]), now, int(event["step"]))
                      for _, event in events.iterrows() for column in ("value", "threshold")
                      if np.isfinite(event[column])],
                     spikes=str(self._spikes), last_spike=describe_event(events.iloc[-1]))

    def log_progress(self, *, epochs_completed: int, status: str) -> None:
        self._gather(status=status, epochs_completed=str(epochs_completed))

    def log_figure(self, name: str, figure) -> None:
        path = self._figures_dir / f"{name}.png"
        path.write_bytes(figure_png(figure))
        self._later(f"figures/{name}", lambda: self.client.log_artifact(self.run_id, str(path), "figures"))

    def log_file(self, path: str | Path) -> None:
        """An artifact at the top of the run's artifacts."""
        self._later(f"artifact {Path(path).name}", lambda: self.client.log_artifact(self.run_id, str(path)))

    def finish(self, history) -> None:
        """Tags ``status``, ``first_nonfinite_step`` and ``verdict``; the MLflow run ends
        FINISHED, or FAILED when the training ended early (interrupted, failed)."""
        outcome = summarize(history).outcome()
        self._gather(**{key: str(outcome[key]) for key in ("status", "first_nonfinite_step", "verdict")
                        if outcome[key] is not None})
        self._flush()
        state = "FAILED" if history.status in EARLY_END_STATUSES else "FINISHED"
        self._later("the run's end", lambda: self.client.set_terminated(self.run_id, status=state))
        self._queue.put(None)
        self._sender.join(FINISH_TIMEOUT)
        if self._sender.is_alive():
            warnings.warn(f"MLflow had not taken everything {FINISH_TIMEOUT:.0f} s after the run ended; "
                          "what it took is kept, the run directory is complete", RuntimeWarning, stacklevel=2)
        else:
            shutil.rmtree(self._figures_dir, ignore_errors=True)
