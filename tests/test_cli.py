"""The run directory contract, end to end through `python -m experiments`."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import REPO_ROOT, assert_drawn_png, run_cli

from experiments.cli import main
from gradtools.columns import metric_columns

RUN_JSON_KEYS = {"experiment", "seed", "status", "first_nonfinite_step", "epochs_completed",
                 "wall_seconds", "versions"}


def run_dir_from(stdout: str, cwd):
    lines = [line for line in stdout.splitlines() if line.startswith("run: ")]
    assert len(lines) == 1, stdout
    return cwd / lines[0][len("run: "):]


def test_run_writes_the_whole_contract_and_is_deterministic(tmp_path, capsys, monkeypatch):
    args = ["run", "vanishing/sigmoid_baseline", "--set", "training.epochs=2", "--quiet"]
    first = run_cli(args + ["--out", "a"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = run_dir_from(first.stdout, tmp_path)
    assert run_dir.parent == tmp_path / "a" / "vanishing" / "sigmoid_baseline"

    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == metric_columns(4, output_saturated=True), "a sigmoid output"
    assert metrics["step"].tolist() == list(range(1, 2 * 94 + 1))
    info = json.loads((run_dir / "run.json").read_text())
    assert RUN_JSON_KEYS <= set(info)
    assert info["status"] == "completed" and info["epochs_completed"] == 2
    assert info["first_nonfinite_step"] is None and info["seed"] == 42
    assert set(info["versions"]) == {"python", "tensorflow", "keras", "gradtools"}
    assert "epochs = 2" in (run_dir / "config.toml").read_text()
    for figure, size in (("mean_gradient", (7, 5)), ("first_vs_last", (11, 6)), ("loss", (7, 4))):
        assert_drawn_png(run_dir / "figures" / f"{figure}.png", size)
    assert_drawn_png(run_dir / "figures" / "gradient_heatmap.png")
    summary = first.stdout
    assert "completed" in summary and "layer_1" in summary and "mean_gradient.png" in summary

    # the run again from its own config.toml, in this process: another process, the same bytes
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["run", str(run_dir / "config.toml"), "--quiet", "--out", "b"]) == 0
    again = run_dir_from(capsys.readouterr().out, tmp_path)
    assert again.parent == tmp_path / "b" / "vanishing" / "sigmoid_baseline"
    assert (again / "metrics.csv").read_bytes() == (run_dir / "metrics.csv").read_bytes()


def test_diverged_run_exits_0_with_its_result_recorded(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "exploding/relu_baseline", "--out", "runs", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    run_dir = run_dir_from(stdout, tmp_path)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "diverged"
    assert info["first_nonfinite_step"] == pd.read_csv(run_dir / "metrics.csv")["step"].iloc[-1]
    assert "non-finite at step" in stdout
    assert_drawn_png(run_dir / "figures" / "mean_gradient.png", (7, 5))


def test_nan_initial_weights_diverge_at_the_first_step_without_warnings(tmp_path, capsys, monkeypatch):
    """Every statistic of such a run is NaN; its summary says so without NumPy's
    "All-NaN slice" warning, which the command line printed before."""
    import warnings

    monkeypatch.chdir(tmp_path)
    nan_weights = 'model.kernel_initializer={class_name="Constant", config={value=nan}}'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["run", "vanishing/shallow", "--set", nan_weights, "--out", "runs", "--quiet"])
    assert code == 0 and [str(w.message) for w in caught] == []
    run_dir = run_dir_from(capsys.readouterr().out, tmp_path)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "diverged" and info["first_nonfinite_step"] == 1


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_ends_the_run_as_interrupted(tmp_path, signum, exit_code):
    from conftest import start_cli

    process = start_cli(["run", "vanishing/sigmoid_baseline", "--set", "training.epochs=100000",
                         "--out", "runs", "--quiet"], cwd=tmp_path)
    deadline = time.time() + 120
    metrics = None
    while time.time() < deadline and process.poll() is None:
        found = list(tmp_path.glob("runs/*/*/*/metrics.csv"))
        if found and found[0].stat().st_size > 0:
            metrics = found[0]
            break
        time.sleep(0.2)
    assert metrics is not None, process.communicate()
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code, stderr
    info = json.loads((metrics.parent / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert len(pd.read_csv(metrics)) >= 94
    assert "interrupted" in stderr


@pytest.mark.parametrize("after", [0.5, 1.5])
def test_ctrl_c_while_the_command_starts_is_one_line_exit_130(tmp_path, after):
    """Before a run exists (Python still importing, or TensorFlow starting): nothing to keep,
    and no traceback."""
    from conftest import start_cli

    process = start_cli(["run", "vanishing/sigmoid_baseline", "--out", "runs", "--quiet"], cwd=tmp_path)
    time.sleep(after)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.startswith("interrupted"), stderr


@pytest.mark.parametrize("options, words", [
    (["--seed", "7", "--set", "training.seed=3"], ["--seed = 7", "give one of the two"]),
    (["--workers", "0"], ["--workers = 0", ">= 1"]),
    (["--run-figures"], ["--run-figures", "needs --seeds"]),
    (["--neptune-mode", "sync"], ["--neptune-mode = 'sync'", "needs --logger neptune"]),
    (["--mlflow-every-row"], ["--mlflow-every-row", "needs --logger mlflow"]),
    (["--set", "data.n_samples=100000000000000"], ["data.n_samples", "from 1 to 10000000"]),
    (["--set", "data.n_samples=10000000", "--set", "data.n_features=1000000"],
     ["out of memory (Unable to allocate", "data.n_samples"]),
])
def test_conflicting_or_impossible_run_options_are_exit_2(tmp_path, capsys, options, words):
    """Or exit 1 for data that do not fit in memory (a fault, not a bad value: it was a
    MemoryError traceback)."""
    expected = 1 if "out of memory" in words[0] else 2
    config = "exploding/relu_baseline" if "data.n_features=1000000" in options else "vanishing/shallow"
    assert main(["run", config, *options, "--out", str(tmp_path / "runs"), "--quiet"]) == expected
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and all(word in message for word in words), message
    assert not (tmp_path / "runs").exists()


def test_list_shows_every_config_with_its_description(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "vanishing/sigmoid_baseline" in listed and "exploding/relu_baseline" in listed
    assert "Adam(learning_rate=0.008)" in listed


@pytest.mark.parametrize("arguments", [["--help"], ["run", "--help"], ["dashboard", "--ui", "nope"]])
def test_help_and_the_dashboard_start_no_tensorflow(tmp_path, arguments):
    """They read no config, so they skip TensorFlow's start (about 4 s): the command's own
    entry point, run in a fresh interpreter, reports what it imported."""
    probe = ("import runpy, sys\n"
             f"sys.argv = ['experiments', *{arguments!r}]\n"
             "try:\n    runpy.run_module('experiments', run_name='__main__')\n"
             "except SystemExit as end:\n    print('exit', end.code, 'tensorflow' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    expected = "exit 2 False" if arguments[0] == "dashboard" else "exit 0 False"
    assert result.stderr.splitlines()[-1] == expected, result.stderr[-2000:]
    assert "usage: python -m experiments" in result.stdout or "must be one of mlflow" in result.stderr


@pytest.mark.parametrize("ui", ["tensorboard", "mlflow"])
def test_a_dashboard_that_cannot_serve_says_why_before_starting_its_server(tmp_path, capsys, ui):
    """A port out of range was a traceback or TensorBoard's error printed twice (exit 255); a
    port in use, MLflow's log and exit 0; an --out that is a file, a traceback from MLflow."""
    import socket

    (tmp_path / "runs").mkdir()
    (tmp_path / "afile").write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [(["--port", "-1"], "--port = -1: must be an integer from 1 to 65535"),
                 (["--port", "70000"], "--port = 70000: must be an integer from 1 to 65535"),
                 (["--port", str(port)], f"--port = {port}: cannot be served on 127.0.0.1 (Address already in use)"),
                 (["--out", str(tmp_path / "afile")], "is a file, not a directory of runs")]
        for options, words in cases:
            arguments = ["dashboard", "--ui", ui, "--out", str(tmp_path / "runs"), *options]
            assert main(arguments) == 2, arguments
            message = capsys.readouterr().err
            assert message.count("\n") == 1 and words in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "runs"] and not list((tmp_path / "runs").iterdir())
