"""NeptuneLogger with the real neptune client in offline mode; what it stored is read back
from the client's own offline operation log."""

import base64
import json
import os
import socket
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from conftest import REPO_ROOT, exploding_relu_setup, spiky_fit

import gradtools
from gradtools.columns import metric_columns
from gradtools.loggers.neptune import NeptuneLogger


def stored_operations(data_dir):
    """The operations the neptune client queued in offline mode, in order."""
    logs = sorted(data_dir.glob("offline/*/data-*.log"))
    assert logs, f"neptune stored nothing under {data_dir}"
    return [json.loads(line)["obj"] for log in logs for line in log.read_text().splitlines()]


def series(operations):
    found = {}
    for op in operations:
        if op["type"] == "LogFloats":
            found.setdefault("/".join(op["path"]), []).extend(
                (entry["step"], entry["value"]) for entry in op["values"])
    return found


def assigned(operations, path):
    values = [op.get("value", op.get("values")) for op in operations if op["path"] == path.split("/")]
    return values[-1] if values else None


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "neptune"))
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    return tmp_path / "neptune"


def test_series_tags_params_and_a_diverging_run_read_back(offline):
    model, x, y = exploding_relu_setup()
    logger = NeptuneLogger(name="exploding/test", description="a run that diverges",
                           tags=["explodingGradients", "test"])
    assert logger.mode == "offline"
    logger.log_params({"training": {"epochs": 20, "loss": "mse"}, "model": {"units": [8]}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = gradtools.fit(model, x, y, loss="mse", optimizer=keras.optimizers.SGD(0.01),
                                epochs=20, batch_size=8, seed=0, loggers=[logger])
    assert history.status == "diverged"
    nonfinite_warnings = [w for w in caught if "non-finite" in str(w.message)]
    assert len(nonfinite_warnings) == 1, [str(w.message) for w in caught]

    operations = stored_operations(offline)
    assert assigned(operations, "sys/name") == "exploding/test"
    assert assigned(operations, "sys/description") == "a run that diverges"
    assert set(assigned(operations, "sys/tags")) == {"explodingGradients", "test"}
    assert assigned(operations, "parameters/training/epochs") == 20
    assert assigned(operations, "parameters/model/units") == "[8]"
    assert assigned(operations, "diagnostics/status") == "diverged"
    assert assigned(operations, "diagnostics/first_nonfinite_step") == history.first_nonfinite_step

    stored = series(operations)
    assert set(stored) == {f"metrics/{c}" for c in metric_columns(2)[3:]}
    metrics = history.metrics
    for column in ("loss", "layer_1/grad_abs_mean", "layer_2/update_ratio"):
        finite = metrics[np.isfinite(metrics[column])]
        assert [s for s, _ in stored[f"metrics/{column}"]] == finite["step"].tolist()
        np.testing.assert_allclose([v for _, v in stored[f"metrics/{column}"]], finite[column], rtol=1e-6)
    assert len(stored["metrics/loss"]) == len(metrics) - 1, "the non-finite row is not sent"
    uploads = {"/".join(op["path"]) for op in operations if op["type"].startswith("Upload")}
    assert {"figures/mean_gradient", "figures/first_vs_last", "figures/loss"} <= uploads


def test_cli_with_neptune_and_a_token_writes_the_token_nowhere(tmp_path, monkeypatch):
    from experiments.cli import main

    secret = base64.b64encode(json.dumps({"api_address": "http://127.0.0.1:9", "api_url":
                                          "http://127.0.0.1:9", "api_key": "SECRET-KEY-42"}).encode()).decode()
    monkeypatch.setenv("NEPTUNE_API_TOKEN", secret)
    monkeypatch.setenv("NEPTUNE_DATA_DIRECTORY", str(tmp_path / "nep"))
    monkeypatch.chdir(tmp_path)  # the command's main, in this process
    assert main(["run", "vanishing/shallow", "--set", "training.epochs=2", "--logger", "neptune",
                 "--neptune-mode", "offline", "--out", "runs", "--quiet"]) == 0
    assert stored_operations(tmp_path / "nep"), "the run went to Neptune's offline store"
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in written)
    for path in written:
        content = path.read_bytes()
        assert b"SECRET-KEY-42" not in content and secret.encode() not in content, path


def test_async_mode_with_an_unreachable_server_fails_before_training(tmp_path):
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    token = base64.b64encode(json.dumps({"api_address": address, "api_url": address,
                                         "api_key": "x"}).encode()).decode()
    env = {**os.environ, "NEPTUNE_API_TOKEN": token, "NEPTUNE_PROJECT": "team/project",
           "NEPTUNE_RETRIES_TIMEOUT": "2", "NEPTUNE_DATA_DIRECTORY": str(tmp_path / "nep"),
           "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "experiments", "run", "vanishing/shallow",
                             "--logger", "neptune", "--neptune-mode", "async", "--out", "runs"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Neptune could not start a run in 'async' mode" in result.stderr
    assert "offline" in result.stderr and "neptune sync" in result.stderr
    error_line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert "\x1b[" not in result.stderr, "no terminal colour codes in the message"
    assert "connection to the Neptune server was lost" in error_line
    assert "Connection refused" in error_line, "the cause is kept"
    assert not (tmp_path / "runs").exists(), "no run directory when the run never started"


def test_neptune_failing_mid_run_warns_once_and_training_goes_on(offline, tmp_path):
    from gradtools.loggers import LocalRunLogger, RunLogger

    neptune_logger = NeptuneLogger(name="toy/mid-run-failure")

    class StopNeptuneAfterFirstEpoch(RunLogger):
        """Stops the Neptune run under the logger's feet: every later call of the real client fails."""

        def log_rows(self, rows):
            pass

        def log_epoch_end(self, epoch, model, kernel_gradients=None):
            if epoch == 0:
                neptune_logger.run.stop()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 2)).astype(np.float32)
    y = x.sum(axis=1).astype(np.float32)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    local = LocalRunLogger(tmp_path / "run", name="toy/mid-run-failure")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = gradtools.fit(model, x, y, loss="mse", optimizer="sgd", epochs=3, batch_size=8,
                                loggers=[StopNeptuneAfterFirstEpoch(), neptune_logger, local])
    assert history.status == "completed" and history.epochs_completed == 3
    failures = [w for w in caught if "Neptune failed while logging" in str(w.message)]
    assert len(failures) == 1, [str(w.message) for w in caught]
    assert "local run directory is complete" in str(failures[0].message)
    assert len(gradtools.History.from_run_dir(tmp_path / "run").metrics) == 12


def test_spikes_are_a_string_series_at_their_steps_and_a_count(offline):
    history = spiky_fit([NeptuneLogger(name="spikes/test")])
    (spike,) = history.spikes.itertuples()
    operations = stored_operations(offline)
    logged = [entry for op in operations if op["type"] == "LogStrings" and op["path"] == ["spikes", "events"]
              for entry in op["values"]]
    assert [entry["step"] for entry in logged] == [spike.step] == [21]
    assert logged[0]["value"].startswith("SpikeGuard: step 21 (epoch 1, batch 21): grad_global_norm ")
    assert assigned(operations, "spikes/count") == 1
