"""TensorBoard: ``tf.summary`` event files, viewed with ``tensorboard --logdir``.

Every statistic is a scalar tagged with its ``metrics.csv`` column name; once per epoch each
layer's kernel gradients (of the epoch's last step) and kernel weights are histograms,
``layer_k/kernel_gradient`` and ``layer_k/kernel``: the view in which a distribution
collapsing to zero (vanishing) or spreading out (exploding) shows. At the end the run enters
the HParams tab's table: its configuration (dotted keys), ``status`` and ``verdict`` as
hyperparameters, and ``outcome/final_loss``, ``outcome/weakest_depth_ratio`` and
``outcome/first_to_last_ratio`` as its metrics (see :meth:`gradtools.summary.RunSummary.outcome`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from gradtools.columns import layer_column
from gradtools.extras import require
from gradtools.layers import is_kernel
from gradtools.loggers.base import figure_png, flat_params, plain
from gradtools.loggers.remote import RemoteRunLogger
from gradtools.spike_events import describe_event
from gradtools.summary import OUTCOME_NUMBERS, summarize

# before TensorFlow starts: a missing extra is said at once, not after TensorFlow's 4 s start
require("tensorboard", extra="tensorboard", feature="TensorBoardLogger")
import tensorflow as tf  # noqa: E402
from tensorboard.plugins.hparams import api as hparams_api  # noqa: E402 - after the extra is known
from tensorboard.plugins.scalar import metadata as scalar_metadata  # noqa: E402

from gradtools.columns import INDEX_COLUMNS  # noqa: E402


class TensorBoardLogger(RemoteRunLogger):
    """Writes event files to ``log_dir`` (the suite uses ``<run dir>/tensorboard``); ``name``
    names the run in the HParams table (default: ``log_dir``). A write that fails mid-run (a
    full disk) warns once and training goes on, as with the loggers of services."""

    wants_gradients = True
    service = "TensorBoard"

    def __init__(self, log_dir: str | Path, name: str | None = None):
        super().__init__()
        self._scalar_metadata = scalar_metadata.create_summary_metadata(display_name=None,
                                                                        description=None)
        self.log_dir = Path(log_dir)
        self.name = name or str(self.log_dir)
        self.writer = tf.summary.create_file_writer(str(self.log_dir))
        self._write_scalars = None
        self._write_epoch_scalars = None
        self._kernel_paths: list[str] = []
        self._last_step = 0
        self._params: dict[str, bool | int | float | str] = {}

    def start(self, *, epochs: int, steps_per_epoch: int, layer_paths: list[str],
              layer_blocks: list[str] | None = None) -> None:
        self._kernel_paths = layer_paths

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._guard("the config", lambda: self._log_params(params))

    def _log_params(self, params: Mapping[str, Any]) -> None:
        self._params = flat_params(params)
        text = "```\n" + tomli_w.dumps(plain(params)) + "\n```"
        with self.writer.as_default():
            tf.summary.text("config", text, step=0)

    def log_rows(self, rows: pd.DataFrame) -> None:
        self._guard("a step's statistics", lambda: self._log_rows(rows))

    def _log_rows(self, rows: pd.DataFrame) -> None:
        tags = [c for c in rows.columns if c not in INDEX_COLUMNS]
        if self._write_scalars is None or self._write_scalars[0] != tags:
            self._write_scalars = (tags, self._scalar_writer(tags))
        values = tf.constant(rows[tags].to_numpy(dtype=np.float32))
        steps = tf.constant(rows["step"].to_numpy(dtype=np.int64))
        self._write_scalars[1](values, steps)
        self._last_step = int(rows["step"].iloc[-1])

    def log_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self._guard("an epoch's statistics", lambda: self._log_epoch_metrics(epoch, metrics))

    def _log_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Scalars tagged with their names, at step = epoch (0-based)."""
        tags = list(metrics)
        if self._write_epoch_scalars is None or self._write_epoch_scalars[0] != tags:
            self._write_epoch_scalars = (tags, self._scalar_writer(tags))
        values = tf.constant([[float(metrics[t]) for t in tags]], dtype=tf.float32)
        self._write_epoch_scalars[1](values, tf.constant([epoch], dtype=tf.int64))

    def _scalar_writer(self, tags: list[str]):
        """One compiled call writes a whole table of scalars (a Python call per value would
        cost more than the training step that produced it)."""
        writer, metadata = self.writer, self._scalar_metadata.SerializeToString()

        @tf.function
        def write(values, steps):
            with writer.as_default():
                for row in tf.range(tf.shape(values)[0]):
                    for column, tag in enumerate(tags):
                        # tf.summary.write keeps the tag as given (scalar() would prefix the
                        # loop's name scope, "while/").
                        tf.summary.write(tag, values[row, column], step=steps[row],
                                         metadata=metadata)
            return tf.constant(True)

        return write

    def log_epoch_end(self, epoch: int, model, kernel_gradients=None) -> None:
        self._guard("the weights' histograms", lambda: self._log_epoch_end(epoch, model, kernel_gradients))

    def _log_epoch_end(self, epoch: int, model, kernel_gradients=None) -> None:
        kernels = [v for v in model.trainable_weights if is_kernel(v)]
        with self.writer.as_default():
            for k, kernel in enumerate(kernels, start=1):
                tf.summary.histogram(layer_column(k, "kernel"), kernel.numpy(), step=self._last_step)
                if kernel_gradients is not None:
                    gradient = np.asarray(kernel_gradients[k - 1])
                    if np.isfinite(gradient).all():  # a histogram of NaN has no bins
                        tf.summary.histogram(layer_column(k, "kernel_gradient"), gradient,
                                             step=self._last_step)

    def log_figure(self, name: str, figure) -> None:
        self._guard("a figure", lambda: self._log_figure(name, figure))

    def _log_figure(self, name: str, figure) -> None:
        image = tf.image.decode_png(figure_png(figure), channels=4)[tf.newaxis]
        with self.writer.as_default():
            tf.summary.image(f"figures/{name}", image, step=self._last_step)

    def log_spikes(self, events: pd.DataFrame) -> None:
        self._guard("spikes", lambda: self._log_spikes(events))

    def _log_spikes(self, events: pd.DataFrame) -> None:
        """Text ``spikes`` (each event in words) and scalar ``spikes/value`` at its step."""
        with self.writer.as_default():
            for _, event in events.iterrows():
                step = int(event["step"])
                tf.summary.text("spikes", describe_event(event), step=step)
                if np.isfinite(event["value"]):
                    tf.summary.scalar("spikes/value", float(event["value"]), step=step)

    def finish(self, history) -> None:
        self._guard("the run's end", lambda: self._finish(history))
        with contextlib.suppress(Exception):  # after a failed write, closing may fail too
            self.writer.close()

    def _finish(self, history) -> None:
        outcome = summarize(history).outcome()
        labels = {key: str(outcome[key]) for key in ("status", "verdict")}
        numbers = {f"outcome/{key}": outcome[key] for key in OUTCOME_NUMBERS if outcome[key] is not None}
        with self.writer.as_default():
            tf.summary.text("status", history.status, step=self._last_step)
            for tag, value in numbers.items():
                tf.summary.scalar(tag, value, step=self._last_step)
            hparams_api.hparams_config(
                hparams=[hparams_api.HParam(name) for name in [*self._params, *labels]],
                metrics=[hparams_api.Metric(f"outcome/{key}") for key in OUTCOME_NUMBERS])
            hparams_api.hparams({**self._params, **labels}, trial_id=self.name)
        self.writer.flush()
        self.writer.close()
