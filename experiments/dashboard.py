"""``python -m experiments dashboard``: serve the runs of ``--out`` in MLflow's UI or in
TensorBoard, on the loopback interface only."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path

from experiments.config import ConfigError

#: UI name -> default port.
UIS = {"mlflow": 5000, "tensorboard": 6006}


def server_command(ui: str, out: Path, port: int | None = None) -> list[str]:
    """The command that serves ``out``: an ``mlflow server`` over ``<out>/mlflow.db`` (what
    ``--logger mlflow`` writes unless ``MLFLOW_TRACKING_URI`` is set) with its artifacts, or
    TensorBoard over the ``tensorboard`` folders of the run directories (without starting
    TensorFlow: :mod:`experiments.tensorboard_server`)."""
    if ui not in UIS:
        raise ConfigError("--ui", "--ui", ui, f"must be one of {', '.join(UIS)}")
    port = UIS[ui] if port is None else port
    out = out.resolve()
    if ui == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--ui", "--ui", ui, "needs TensorBoard: pip install 'gradtools[tensorboard]'")
        return [sys.executable, "-m", "experiments.tensorboard_server", "--logdir", str(out),
                "--host", "127.0.0.1", "--port", str(port)]
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow is None:
        raise ConfigError("--ui", "--ui", ui, "needs MLflow: pip install 'gradtools[mlflow]'")
    return [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{out / 'mlflow.db'}",
            "--artifacts-destination", str(out / "mlflow-artifacts")]


def check_served(out: Path, port: int) -> None:
    """``--out`` is a directory or does not exist yet (a dashboard started before the runs shows
    them as they come), and ``--port`` a port number free on the loopback interface: said now,
    as one line, not by the server (MLflow logged the port in use and exited 0; TensorBoard
    printed its error twice and exited 255)."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", "--out", str(out), "is a file, not a directory of runs")
    if not 1 <= port <= 65535:
        raise ConfigError("--port", "--port", port, "must be an integer from 1 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a port
        try:  # a dashboard stopped a moment ago left in TIME_WAIT is free to them
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise ConfigError("--port", "--port", port, f"cannot be served on 127.0.0.1 ({error.strerror}): "
                              "give another with --port") from None


def empty_note(ui: str, out: Path) -> str | None:
    """A note for a UI that will start with nothing to show: no runs of ``out`` logged to it."""
    if ui == "mlflow" and not (out / "mlflow.db").exists():
        return (f"note: {out / 'mlflow.db'} does not exist yet, so the run table starts empty: "
                "log runs with --logger mlflow")
    if ui == "tensorboard" and next(out.rglob("events.out.tfevents.*"), None) is None:
        return (f"note: no run under {out} has TensorBoard files yet, so TensorBoard starts empty: "
                "log runs with --logger tensorboard")
    return None


def server_environment(ui: str) -> dict[str, str]:
    """The server's environment: for MLflow, its job runner off unless the user set
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``. The runner serves MLflow's GenAI jobs (scorers,
    prompt optimization), none of which a run table needs, and it starts seven more processes
    that cost a server several times its own CPU."""
    if ui == "mlflow":
        return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return dict(os.environ)
