"""Run one experiment config: data, model, optimizer, run directory, gradtools.fit."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import gradtools
from experiments.config import ExperimentConfig, config_data, config_optimizer
from experiments.models import build_model
from gradtools.backend import require_supported_backend
from gradtools.history import CONFIG_FILE
from gradtools.loggers import LocalRunLogger, RunLogger
from gradtools.plots import run_figures
from gradtools.spike_guard import SpikeGuard

#: The article's script recorded batch index 5 of every epoch; its figure samples the same.
ARTICLE_SAMPLE_BATCH = 5


@dataclass
class Run:
    config: ExperimentConfig
    run_dir: Path
    history: gradtools.History


def new_run_dir(out: Path, config: ExperimentConfig) -> Path:
    """Create and return ``<out>/<group>/<name>/<YYYYmmdd-HHMMSS>-seed<N>``, with a suffix if
    that exists. Created atomically, so parallel workers never share a directory."""
    parent = Path(out) / config.group / config.name
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-seed{config.seed}"
    candidate, n = parent / stem, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = parent / f"{stem}-{n}"


#: Probe steps behind clip_global_norm = "suggested" (the sources: "a few iterations").
SUGGESTION_STEPS = 20

#: Logger backends besides the run directory, by their --logger name.
BACKENDS = ("neptune", "mlflow", "tensorboard")


@dataclass(frozen=True)
class Backends:
    """Where runs are logged besides their run directories (``--logger`` and its options)."""

    names: tuple[str, ...] = ()
    neptune_mode: str | None = None
    mlflow_every_row: bool = False

    def __post_init__(self):
        unknown = set(self.names) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown logger {sorted(unknown)[0]!r}; choose from {', '.join(BACKENDS)}")


#: Logging to the run directory only.
NO_BACKENDS = Backends()


def article_figures(title: str):
    """The standard figures, with the mean gradient sampled as the article did."""
    return lambda history: run_figures(history, title, sample_batch=ARTICLE_SAMPLE_BATCH)


def run_experiment(config: ExperimentConfig, out: str | Path = "runs",
                   loggers: list[RunLogger] = (), backends: Backends = NO_BACKENDS,
                   run_dir: str | Path | None = None,
                   figures: bool = True) -> Run:
    """Train ``config`` and write its run directory, logging also to ``backends``.
    Everything that can fail before training (the data, the optimizer, the model, reaching
    Neptune) happens before the directory is created. The directory is a new ``<out>/<group>/<name>/<time>-seed<N>``
    unless ``run_dir`` (absent or empty) is given. ``figures=False`` draws none (sweep points,
    seed replicas: their summary figures are drawn from the tables)."""
    require_supported_backend("python -m experiments")
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    x, y = corrupted(config_data(config), config)
    optimizer = config_optimizer(config)
    model = build_model(config.model, input_shape=x.shape[1:])
    config, suggestion = _with_suggested_clip(config, model, x, y)
    loggers = [*loggers, *_remote_loggers(config, backends, Path(out))]
    run_dir = new_run_dir(Path(out), config) if run_dir is None else Path(run_dir)
    local = LocalRunLogger(run_dir, name=config.run_name, seed=config.seed)
    loggers = [local, *loggers]
    if "tensorboard" in backends.names:
        from gradtools.loggers.tensorboard import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir / "tensorboard", name=f"{config.run_name}/{run_dir.name}"))
    for logger in loggers:
        logger.log_params(config.to_dict())
        if logger is not local:  # the run directory's own config.toml, for the others
            logger.log_file(run_dir / CONFIG_FILE)
    history = gradtools.fit(model, x, y, optimizer=optimizer,
                            loggers=loggers, figures=article_figures(config.run_name) if figures else False,
                            **_fit_arguments(config))
    if suggestion is not None:
        local.update_info(clip_suggestion=str(suggestion))
    return Run(config, run_dir, history)


def _fit_arguments(config: ExperimentConfig) -> dict:
    """``gradtools.fit``'s arguments from the [training] section."""
    training = config.training
    arguments = dict(loss=training.loss, epochs=training.epochs, batch_size=training.batch_size,
                     shuffle=training.shuffle, seed=training.seed, log_every=training.log_every,
                     stop_on_nonfinite=training.stop_on_nonfinite)
    for name in ("clip_value", "clip_global_norm"):
        if getattr(training, name) is not None:
            arguments[name] = getattr(training, name)
    if training.spike_guard is not None:
        arguments["spike_guard"] = SpikeGuard(training.spike_guard)
    return arguments


def corrupted(data: tuple[np.ndarray, np.ndarray], config: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The examples with [data] corrupt_batches' targets multiplied by corrupt_scale."""
    x, y = data
    if not config.data.corrupt_batches:
        return x, y
    y, size = y.copy(), config.training.batch_size
    for batch in config.data.corrupt_batches:
        y[batch * size:(batch + 1) * size] *= config.data.corrupt_scale
    return x, y


def _with_suggested_clip(config: ExperimentConfig, model, x, y):
    """``clip_global_norm = "suggested"`` replaced by the number probe steps suggest (the
    config that is written and run holds the number), and the suggestion; else unchanged."""
    if config.training.clip_global_norm != "suggested":
        return config, None
    from gradtools.clip_suggestion import suggest_clip_norm

    suggestion = suggest_clip_norm(model, x, y, loss=config.training.loss,
                                   optimizer=config.optimizer.keras_config(),
                                   steps=SUGGESTION_STEPS, batch_size=config.training.batch_size)
    return config.replace("training", clip_global_norm=suggestion.threshold), suggestion


def mlflow_store(out: Path) -> tuple[str, str | None]:
    """The tracking URI and where new experiments keep their artifacts: MLflow's own
    ``MLFLOW_TRACKING_URI`` (and its server's choice), else ``<out>/mlflow.db`` (and
    ``<out>/mlflow-artifacts``)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}", (out / "mlflow-artifacts").as_uri()


def _remote_loggers(config: ExperimentConfig, backends: Backends, out: Path) -> list[RunLogger]:
    """The loggers that must reach a service, started before the run directory exists."""
    remote: list[RunLogger] = []
    if "neptune" in backends.names:
        from gradtools.loggers.neptune import NeptuneLogger

        remote.append(NeptuneLogger(name=config.run_name, description=config.experiment.description,
                                    tags=list(config.experiment.tags), mode=backends.neptune_mode))
    if "mlflow" in backends.names:
        from gradtools.loggers.mlflow import MLflowLogger

        tracking_uri, artifact_location = mlflow_store(out)
        remote.append(MLflowLogger(name=f"{config.name}-seed{config.seed}", experiment=config.group,
                                   tracking_uri=tracking_uri, artifact_location=artifact_location,
                                   tags=list(config.experiment.tags),
                                   description=config.experiment.description,
                                   rows_per_epoch=None if backends.mlflow_every_row else 1))
    return remote
