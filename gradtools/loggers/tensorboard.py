"""TensorBoard: ``tf.summary`` event files, viewed with ``tensorboard --logdir``.

Every statistic is a scalar tagged with its ``metrics.csv`` column name; once per epoch each
layer's kernel gradients (of the epoch's last step) and kernel weights are histograms,
``layer_k/kernel_gradient`` and ``layer_k/kernel``: the view in which a distribution
collapsing to zero (vanishing) or spreading out (exploding) shows.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
import tomli_w

from gradtools.loggers.base import RunLogger

_NOT_SCALARS = ("step", "epoch", "batch")


class TensorBoardLogger(RunLogger):
    """Writes event files to ``log_dir`` (the suite uses ``<run dir>/tensorboard``)."""

    wants_gradients = True

    def __init__(self, log_dir: str | Path):
        try:
            from tensorboard.plugins.scalar import metadata as scalar_metadata
        except ImportError:
            raise ImportError("TensorBoardLogger needs the tensorboard package, which TensorFlow "
                              "2.21 no longer installs: pip install 'gradtools[dashboard]'") from None
        self._scalar_metadata = scalar_metadata.create_summary_metadata(display_name=None,
                                                                        description=None)
        self.log_dir = Path(log_dir)
        self.writer = tf.summary.create_file_writer(str(self.log_dir))
        self._write_scalars = None
        self._write_epoch_scalars = None
        self._kernel_paths: list[str] = []
        self._last_step = 0

    def start(self, *, epochs: int, steps_per_epoch: int, layer_paths: list[str],
              layer_blocks: list[str] | None = None) -> None:
        self._kernel_paths = layer_paths

    def log_params(self, params: Mapping[str, Any]) -> None:
        from gradtools.loggers.local import _toml_ready

        text = "```\n" + tomli_w.dumps(_toml_ready(params)) + "\n```"
        with self.writer.as_default():
            tf.summary.text("config", text, step=0)

    def log_rows(self, rows: pd.DataFrame) -> None:
        tags = [c for c in rows.columns if c not in _NOT_SCALARS]
        if self._write_scalars is None or self._write_scalars[0] != tags:
            self._write_scalars = (tags, self._scalar_writer(tags))
        values = tf.constant(rows[tags].to_numpy(dtype=np.float32))
        steps = tf.constant(rows["step"].to_numpy(dtype=np.int64))
        self._write_scalars[1](values, steps)
        self._last_step = int(rows["step"].iloc[-1])

    def log_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> None:
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
        kernels = [v for v in model.trainable_weights if v.name == "kernel"]
        with self.writer.as_default():
            for k, kernel in enumerate(kernels, start=1):
                tf.summary.histogram(f"layer_{k}/kernel", kernel.numpy(), step=self._last_step)
                if kernel_gradients is not None:
                    gradient = np.asarray(kernel_gradients[k - 1])
                    if np.isfinite(gradient).all():  # a histogram of NaN has no bins
                        tf.summary.histogram(f"layer_{k}/kernel_gradient", gradient,
                                             step=self._last_step)

    def log_figure(self, name: str, figure) -> None:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80)
        image = tf.image.decode_png(buffer.getvalue(), channels=4)[tf.newaxis]
        with self.writer.as_default():
            tf.summary.image(f"figures/{name}", image, step=self._last_step)

    def finish(self, history) -> None:
        with self.writer.as_default():
            tf.summary.text("status", history.status, step=self._last_step)
        self.writer.flush()
        self.writer.close()
