"""MLflowLogger with real parts: a real ``mlflow server`` on a loopback port (started the way
``make dashboard UI=mlflow`` starts it) read back through MLflow's REST API, its UI page in
headless Chromium, a local SQLite store, an unreachable server and a failure mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from browser import CHROMIUM, free_port, visit
from conftest import REPO_ROOT, assert_drawn_png, run_cli, spiky_fit

import gradtools
from experiments.cli import main
from gradtools.loggers import LocalRunLogger, RunLogger
from gradtools.loggers.mlflow import MLflowLogger, MLflowUnavailable


@dataclass
class Server:
    url: str
    root: Path
    session: int  # the dashboard command's process, which leads its session (its server leads its own)

    def get(self, route, **query):
        with urllib.request.urlopen(f"{self.url}{route}?{urllib.parse.urlencode(query)}", timeout=30) as answer:
            return answer.read()

    def api(self, endpoint, body=None, **query):
        if body is None:
            return json.loads(self.get(f"/api/2.0/mlflow/{endpoint}", **query))
        request = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def run(self, experiment, run_name):
        experiment_id = self.api("experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
        runs = self.api("runs/search", {"experiment_ids": [experiment_id],
                                        "filter": f"attributes.run_name = '{run_name}'"})["runs"]
        assert len(runs) == 1, runs
        return runs[0]

    def history(self, run_id, key):
        points = self.api("metrics/get-history", run_id=run_id, metric_key=key, max_results=100_000)["metrics"]
        points = sorted(points, key=lambda p: p["step"])
        return [int(p["step"]) for p in points], [float(p["value"]) for p in points]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments", "dashboard", "--ui", "mlflow", "--out", str(root / "runs"),
         "--port", str(port)], cwd=root, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("w"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert process.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        yield Server(url, root, process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def logged_run(server, config, *options, capsys=None):
    """``python -m experiments run`` logging to the server; the run directory. With
    ``capsys``, the command's ``main`` runs in this process (no second TensorFlow start)."""
    arguments = ["run", config, "--logger", "mlflow", "--out", "runs", "--quiet", *options]
    if capsys is None:
        result = run_cli(arguments, cwd=server.root, env={**os.environ, "MLFLOW_TRACKING_URI": server.url})
        assert result.returncode == 0, result.stderr[-3000:]
        stdout = result.stdout
    else:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", server.url)
            patch.chdir(server.root)
            capsys.readouterr()
            assert main(arguments) == 0
            stdout = capsys.readouterr().out
    return server.root / next(line for line in stdout.splitlines() if line.startswith("run: "))[5:]


def dotted(table, prefix=""):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", json.dumps(value) if isinstance(value, list) else str(value)


def by_key(entries):
    return {entry["key"]: entry["value"] for entry in entries}


def descendant_commands(pid):
    """The command lines of ``pid``'s processes and theirs, all the way down."""
    children, commands = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid
            commands[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError):
            continue  # the process ended meanwhile
    found, waiting = [], list(children.get(pid, []))
    while waiting:
        child = waiting.pop()
        found.append(commands.get(child, ""))
        waiting += children.get(child, [])
    return found


def test_the_dashboard_serves_without_mlflows_job_runner(server):
    """MLflow's GenAI job runner (seven more processes) is off: a run table needs none."""
    commands = descendant_commands(server.session)  # the dashboard command leads its session
    assert any("mlflow" in command and "server" in command for command in commands), commands
    assert not any("huey" in command for command in commands), commands


def test_a_run_reads_back_with_params_tags_every_row_and_artifacts(server):
    run_dir = logged_run(server, "vanishing/sigmoid_baseline", "--set", "training.epochs=3", "--mlflow-every-row")
    run = server.run("vanishing", "sigmoid_baseline-seed42")
    assert run["info"]["status"] == "FINISHED"
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert by_key(run["data"]["params"]) == dict(dotted(config))

    info = json.loads((run_dir / "run.json").read_text())
    tags = by_key(run["data"]["tags"])
    assert tags["status"] == info["status"] == "completed"
    assert tags["verdict"] == info["diagnosis"]["verdict"]
    assert tags["mlflow.note.content"] == config["experiment"]["description"]
    assert all(tags[tag] == "true" for tag in config["experiment"]["tags"])
    assert "first_nonfinite_step" not in tags

    metrics = pd.read_csv(run_dir / "metrics.csv")
    measured = [c for c in metrics.columns if c not in ("step", "epoch", "batch")]
    assert {m["key"] for m in run["data"]["metrics"]} == set(measured)
    for column in measured:
        steps, values = server.history(run["info"]["run_id"], column)
        assert steps == metrics["step"].tolist(), column
        # the statistics are float32; metrics.csv writes each to 9 significant digits, which
        # read back as the same float32
        np.testing.assert_array_equal(np.float32(values), np.float32(metrics[column]), column)

    listed = {f["path"] for f in server.api("artifacts/list", run_id=run["info"]["run_id"])["files"]}
    assert {"config.toml", "figures"} <= listed
    figures = {f["path"] for f in server.api("artifacts/list", run_id=run["info"]["run_id"], path="figures")["files"]}
    assert figures == {f"figures/{p.name}" for p in (run_dir / "figures").glob("*.png")}
    assert server.get("/get-artifact", path="config.toml", run_uuid=run["info"]["run_id"]) == \
        (run_dir / "config.toml").read_bytes()
    figure = server.root / "mean_gradient.png"
    figure.write_bytes(server.get("/get-artifact", path="figures/mean_gradient.png", run_uuid=run["info"]["run_id"]))
    assert_drawn_png(figure, (7, 5))


def test_by_default_each_epoch_sends_its_last_row(server, capsys):
    run_dir = logged_run(server, "vanishing/sigmoid_baseline", "--set", "training.epochs=3", "--seed", "7",
                         capsys=capsys)
    run = server.run("vanishing", "sigmoid_baseline-seed7")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    epoch_ends = metrics.groupby("epoch").tail(1)
    for column in ("loss", "layer_1/grad_abs_mean", "layer_4/update_ratio"):
        steps, values = server.history(run["info"]["run_id"], column)
        assert steps == epoch_ends["step"].tolist() and len(steps) == 3
        np.testing.assert_array_equal(np.float32(values), np.float32(epoch_ends[column]))


def test_a_diverging_run_is_recorded_as_such_without_its_non_finite_values(server, capsys):
    with pytest.warns(RuntimeWarning, match=r"non-finite values from step \d+ on \(loss first\) are not sent") as said:
        run_dir = logged_run(server, "exploding/relu_baseline", "--mlflow-every-row", capsys=capsys)
    assert len(said) == 1, [str(w.message) for w in said]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "diverged"
    run = server.run("exploding", "relu_baseline-seed42")
    tags = by_key(run["data"]["tags"])
    assert tags["status"] == "diverged" and tags["verdict"] == "exploding"
    assert tags["first_nonfinite_step"] == str(info["first_nonfinite_step"])
    metrics = pd.read_csv(run_dir / "metrics.csv")
    finite = metrics[np.isfinite(metrics["loss"])]
    assert len(finite) == len(metrics) - 1
    steps, values = server.history(run["info"]["run_id"], "loss")
    assert steps == finite["step"].tolist()
    np.testing.assert_array_equal(np.float32(values), np.float32(finite["loss"]))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary installed (.ci/run installs Debian's chromium)")
def test_the_mlflow_ui_lists_the_run_in_headless_chromium_without_console_errors(server, capsys):
    logged_run(server, "vanishing/sigmoid_baseline", "--set", "training.epochs=2", "--seed", "3", capsys=capsys)
    experiment_id = server.api("experiments/get-by-name", experiment_name="vanishing")["experiment"]["experiment_id"]
    page = visit(f"{server.url}/#/experiments/{experiment_id}/runs",
                 {"text": "document.body.innerText"},
                 ready="document.body.innerText.includes('sigmoid_baseline-seed3')")
    # The one error MLflow's own UI logs on every page: its probe for the optional
    # authentication app (GET users/current, 404 when the server runs without it).
    errors = [e for e in page.errors if not e.get("params", {}).get("entry", {}).get("url", "").endswith(
        "/ajax-api/2.0/mlflow/users/current")]
    assert errors == [], errors[:3]
    assert "sigmoid_baseline-seed3" in page.values["text"]
    shot = server.root / "mlflow_ui.png"
    shot.write_bytes(page.screenshot)
    assert_drawn_png(shot)


def test_an_unreachable_server_fails_before_training_with_exit_2(tmp_path, monkeypatch, capsys):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", address)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "vanishing/shallow", "--logger", "mlflow", "--out", "runs"]) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: the MLflow server at " + address + " cannot be reached"), error
    assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists(), "no run directory when the run never started"


def test_a_local_store_and_a_failure_mid_run_that_warns_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLflowLogger(name="toy-seed0", experiment="toy", tracking_uri=uri,
                          artifact_location=(tmp_path / "artifacts").as_uri())

    class DeleteTheRunAfterFirstEpoch(RunLogger):
        """Deletes the MLflow run under the logger's feet: MLflow refuses every later write."""

        def log_rows(self, rows):
            pass

        def log_epoch_end(self, epoch, model, kernel_gradients=None):
            if epoch == 0:
                logger.client.delete_run(logger.run_id)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 2)).astype(np.float32)
    y = x.sum(axis=1).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    local = LocalRunLogger(tmp_path / "run", name="toy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = gradtools.fit(model, x, y, loss="mse", optimizer="sgd", epochs=3, batch_size=8,
                                loggers=[logger, DeleteTheRunAfterFirstEpoch(), local])
    assert history.status == "completed" and history.epochs_completed == 3
    failures = [w for w in caught if "MLflow failed while logging" in str(w.message)]
    assert len(failures) == 1, [str(w.message) for w in caught]
    assert "local run directory is complete" in str(failures[0].message)
    assert len(gradtools.History.from_run_dir(tmp_path / "run").metrics) == 12


def test_a_bad_store_fails_when_the_logger_is_made(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(MLflowUnavailable, match="MLflow could not start a run in"):
        MLflowLogger(name="x", experiment="x", tracking_uri=f"sqlite:///{tmp_path / 'file' / 'db'}")


def test_a_read_only_store_is_one_line_exit_2(tmp_path):
    """MLflow logs each database error with its traceback before raising it (about 90 lines
    on the terminal), and SQLAlchemy's message starts with when it was raised."""
    import mlflow

    store = tmp_path / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{store}").search_experiments()  # makes the store's tables
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///file:{store}?mode=ro&uri=true"}
    done = run_cli(["run", "vanishing/shallow", "--set", "training.epochs=1", "--logger", "mlflow", "--quiet",
                    "--out", str(tmp_path / "out")], tmp_path, env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: MLflow could not start a run in sqlite:///file:{store}?mode=ro&uri=true: MlflowException: "
        "(sqlite3.OperationalError) attempt to write a readonly database"], done.stderr


def test_the_dashboard_notes_a_store_that_does_not_exist_yet(tmp_path):
    from experiments.dashboard import empty_note

    assert empty_note("mlflow", tmp_path).endswith("the run table starts empty: log runs with --logger mlflow")
    (tmp_path / "mlflow.db").touch()
    assert empty_note("mlflow", tmp_path) is None


def test_the_dashboard_refuses_an_unknown_ui_with_exit_2(capsys):
    from experiments.cli import main

    assert main(["dashboard", "--ui", "grafana"]) == 2
    assert "mlflow, tensorboard" in capsys.readouterr().err


def test_spikes_are_metrics_at_their_steps_and_tags(server):
    logger = MLflowLogger(name="spiky", experiment="spikes", tracking_uri=server.url)
    history = spiky_fit([logger])
    (spike,) = history.spikes.itertuples()
    run = server.run("spikes", "spiky")
    run_id = run["info"]["run_id"]
    assert server.history(run_id, "spikes/value") == ([21], [pytest.approx(spike.value, rel=1e-6)])
    assert server.history(run_id, "spikes/threshold") == ([21], [pytest.approx(spike.threshold, rel=1e-6)])
    tags = by_key(run["data"]["tags"])
    assert tags["spikes"] == "1" and tags["last_spike"].startswith("SpikeGuard: step 21 (epoch 1, batch 21)")
