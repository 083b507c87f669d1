"""A light install: the library's core runs with every optional package absent, and each
backend or tool whose extra is missing says which extra to install."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

#: The modules the extras bring (scikit-learn, Ray, the logger backends).
EXTRAS_MODULES = ("sklearn", "ray", "mlflow", "neptune", "tensorboard")


def python(code, cwd=None):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def without(*modules):
    """Code that makes each module unimportable, as if its package were not installed."""
    return "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)


def test_the_core_trains_monitors_logs_and_diagnoses_without_any_extra(tmp_path):
    # an import of any blocked module raises ImportError: the script finishing proves none is needed
    result = python(without(*EXTRAS_MODULES) + f"""
import keras, numpy as np, gradtools
from gradtools.loggers import LocalRunLogger
from gradtools.plots import run_figures
x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32"); y = x.sum(axis=1)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
local = LocalRunLogger({str(tmp_path / "run")!r}, name="core")
local.log_params({{"training": {{"epochs": 2}}}})
history = gradtools.fit(model, x, y, loss="mse", optimizer="sgd", epochs=2, batch_size=16, seed=0, loggers=[local],
                        figures=lambda h: run_figures(h, "core"))
monitor = gradtools.GradientMonitor()
model.compile(optimizer="sgd", loss="mse")
model.fit(x, y, epochs=1, batch_size=16, callbacks=[monitor], verbose=0)
print(history.status, len(history.metrics), len(monitor.metrics), gradtools.diagnose(history).verdict)
""")
    assert result.returncode == 0, result.stderr[-3000:]
    status, rows, monitored, verdict = result.stdout.split("\n")[0].split()
    assert (status, rows, monitored) == ("completed", "8", "4") and verdict in ("healthy", "vanishing", "exploding")
    assert (tmp_path / "run" / "config.toml").read_text() == "[training]\nepochs = 2\n"
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + 8
    assert (tmp_path / "run" / "figures" / "mean_gradient.png").exists()


#: Each logger backend's module, the package it needs and the extra that brings it.
BACKENDS = [("gradtools.loggers.mlflow", "mlflow", "mlflow"),
            ("gradtools.loggers.neptune", "neptune", "neptune"),
            ("gradtools.loggers.tensorboard", "tensorboard", "tensorboard")]


def test_a_backend_without_its_extra_names_the_extra_before_tensorflow_starts():
    # one process with the three packages absent, each backend imported alone
    code = without(*(package for _, package, _ in BACKENDS)) + "".join(
        f"try:\n    import {module}\nexcept ImportError as error:\n    print(type(error).__name__, error)\n"
        "else:\n    print('imported')\n" for module, _, _ in BACKENDS) + "print('tensorflow' in sys.modules)\n"
    result = python(code)
    *lines, tensorflow_started = result.stdout.splitlines()
    assert len(lines) == len(BACKENDS), result.stdout + result.stderr[-2000:]
    for line, (module, _, extra) in zip(lines, BACKENDS):
        assert line.startswith("MissingExtra"), (module, line)
        assert f"pip install 'gradtools[{extra}]'" in line, (module, line)
    assert tensorflow_started == "False", "said at once, not after TensorFlow's start"


@pytest.mark.parametrize("package, arguments, extra", [
    ("mlflow", ["run", "vanishing/shallow", "--logger", "mlflow", "--out", "runs"], "mlflow"),
    ("sklearn", ["list"], "experiments"),
])
def test_the_command_line_names_the_missing_extra_and_exits_2(tmp_path, package, arguments, extra):
    result = subprocess.run([sys.executable, "-c", without(package) + "import atexit, runpy\n"
                             "atexit.register(lambda: print('tensorflow' in sys.modules))\n"
                             f"sys.argv = ['experiments', *{arguments!r}]\n"
                             "runpy.run_module('experiments', run_name='__main__')"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"pip install 'gradtools[{extra}]'" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == "False\n", "said at once, not after TensorFlow's start"
    assert not (tmp_path / "runs").exists()
