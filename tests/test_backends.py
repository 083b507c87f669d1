"""On a Keras backend gradtools cannot record on (JAX today), every entry point says so in one
line naming what is supported, before it touches a model: never a traceback from inside JAX's
tracing. A process per backend: Keras fixes its backend when it is imported."""

import os
import subprocess
import sys

import numpy as np
from conftest import REPO_ROOT, run_cli

ON_JAX = """
import numpy as np, keras, gradtools
assert keras.backend.backend() == "jax"
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
model.compile("sgd", "mse")
x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32"); y = x.sum(axis=1)
losses = model.fit(x, y, epochs=3, batch_size=16, verbose=0).history["loss"]
print("plain fit", losses[0] > losses[-1])
for name, make in [("GradientMonitor", gradtools.GradientMonitor), ("SpikeGuard", lambda: gradtools.SpikeGuard("skip")),
                   ("gradtools.fit", lambda: gradtools.fit(model, x, y, loss="mse", optimizer="sgd", epochs=1)),
                   ("gradtools.preflight", lambda: gradtools.preflight(model, x, y, loss="mse"))]:
    try:
        make()
        print(name, "accepted")
    except gradtools.UnsupportedBackend as error:
        print(name, "refused:", error)
"""


def _jax_env():
    import jax  # noqa: F401 - the jax extra (make installs it): without it Keras cannot start on JAX

    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO_ROOT)}


def test_on_jax_plain_training_works_and_every_entry_point_refuses_in_one_line(repo_root):
    done = subprocess.run([sys.executable, "-c", ON_JAX], cwd=repo_root, env=_jax_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "plain fit True", lines
    assert len(lines) == 5, lines
    for name, line in zip(("GradientMonitor", "SpikeGuard", "gradtools.fit", "gradtools.preflight"), lines[1:]):
        assert line.startswith(f"{name} refused: {name} works on Keras's TensorFlow backend only"), line
        assert "runs Keras on 'jax'" in line and "KERAS_BACKEND=tensorflow" in line, line


def test_the_commands_on_jax_exit_2_in_one_line_and_write_nothing(repo_root, tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=np.zeros((8, 3), "float32"), y=np.zeros(8, "float32"))
    checked = run_cli(["preflight", str(tmp_path / "model.keras"), str(tmp_path / "data.npz")], repo_root,
                      env=_jax_env(), module="gradtools")
    trained = run_cli(["run", "vanishing/shallow", "--set", "training.epochs=1", "--out", str(tmp_path / "runs"),
                       "--quiet"], repo_root, env=_jax_env())
    for done, command in ((checked, "python -m gradtools preflight"), (trained, "python -m experiments")):
        assert done.returncode == 2, done.stderr[-2000:]
        said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert said == [f"error: {command} works on Keras's TensorFlow backend only, and this process runs Keras "
                        "on 'jax' (KERAS_BACKEND, or ~/.keras/keras.json): run it with KERAS_BACKEND=tensorflow "
                        "(JAX and PyTorch are not supported yet)"], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()
