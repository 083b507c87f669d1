"""GradientMonitor on Keras's JAX backend as on TensorFlow: the same records (against jax.grad:
the conformance zoo's core), the same verdicts, mixed precision's skipped steps. Where a feature
is TensorFlow-only (gradtools.fit, SpikeGuard, preflight, the suite's runs), one line says so
before a model is touched: never a traceback from inside JAX's tracing. A process per backend:
Keras fixes its backend when it is imported."""

import json
import os
import subprocess
import sys

import numpy as np
from conftest import REPO_ROOT, jax_env, run_cli

ON_JAX = """
import numpy as np, keras, gradtools
assert keras.backend.backend() == "jax"
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
model.compile("sgd", "mse")
x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32"); y = x.sum(axis=1)
losses = model.fit(x, y, epochs=3, batch_size=16, verbose=0).history["loss"]
print("plain fit", losses[0] > losses[-1])
for name, make in [("SpikeGuard", lambda: gradtools.SpikeGuard("skip")),
                   ("gradtools.fit", lambda: gradtools.fit(model, x, y, loss="mse", optimizer="sgd", epochs=1)),
                   ("gradtools.preflight", lambda: gradtools.preflight(model, x, y, loss="mse"))]:
    try:
        make()
        print(name, "accepted")
    except gradtools.UnsupportedBackend as error:
        print(name, "refused:", error)


class OwnStep(keras.Sequential):  # a stateless train_step of one's own that never reports its loss
    def train_step(self, state, data):
        import jax
        trainable, non_trainable, optimizer_variables, metrics = state
        def loss_of(values):
            y_pred, _ = self.stateless_call(values, non_trainable, data[0], training=True)
            return keras.ops.mean((y_pred[:, 0] - data[1]) ** 2)
        loss, grads = jax.value_and_grad(loss_of)(trainable)
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, grads, trainable)
        return {"loss": loss}, (trainable, non_trainable, optimizer_variables, metrics)


own = OwnStep([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
own.compile("sgd", "mse")
try:
    own.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[gradtools.GradientMonitor(figures=False)])
except ValueError as error:
    print("own train_step refused:", error)
print("plain fit after the refusal", np.isfinite(own.fit(x, y, epochs=1, batch_size=16, verbose=0).history["loss"][0]))
"""


def test_on_jax_the_tensorflow_only_entry_points_and_a_train_step_hiding_its_loss_refuse_in_one_line(repo_root):
    """Refused before training, and the model trains as before once the monitor is gone (under
    JAX, fit takes the variables' values as it starts: the monitor gives them back)."""
    done = subprocess.run([sys.executable, "-c", ON_JAX], cwd=repo_root, env=jax_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "plain fit True", lines
    assert len(lines) == 6, lines
    assert lines[4].startswith("own train_step refused: GradientMonitor on JAX takes each step's loss where "
                               "Keras's own train_step reports it"), lines[4]
    assert lines[5] == "plain fit after the refusal True", "the refusal left the model's weights in place"
    for name, line in zip(("SpikeGuard", "gradtools.fit", "gradtools.preflight"), lines[1:4]):
        assert line.startswith(f"{name} refused: {name} works on Keras's TensorFlow backend only"), line
        assert "runs Keras on 'jax'" in line and "KERAS_BACKEND=tensorflow" in line, line


def test_the_commands_on_jax_exit_2_in_one_line_and_write_nothing(repo_root, tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=np.zeros((8, 3), "float32"), y=np.zeros(8, "float32"))
    checked = run_cli(["preflight", str(tmp_path / "model.keras"), str(tmp_path / "data.npz")], repo_root,
                      env=jax_env(), module="gradtools")
    trained = run_cli(["run", "vanishing/shallow", "--set", "training.epochs=1", "--out", str(tmp_path / "runs"),
                       "--quiet"], repo_root, env=jax_env())
    for done, command in ((checked, "python -m gradtools preflight"), (trained, "python -m experiments")):
        assert done.returncode == 2, done.stderr[-2000:]
        said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert said == [f"error: {command} works on Keras's TensorFlow backend only, and this process runs Keras "
                        "on 'jax' (KERAS_BACKEND, or ~/.keras/keras.json): run it with KERAS_BACKEND=tensorflow "
                        "(JAX and PyTorch are not supported yet)"], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def _backend_run(repo_root, backend: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "backend_run.py")], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["backend"] == backend
    return measured


def test_the_monitor_on_jax_gives_the_verdicts_and_loss_scaling_of_tensorflow(repo_root):
    """tests/backend_run.py under each backend: a deep sigmoid net at small weights is vanishing
    (and so is the run directory its LocalRunLogger writes, with the same figures),
    the article's exploding config diverges at the same step and is exploding; under
    mixed_float16 the steps whose scaled gradients overflow are skipped (the scale halved each
    time), not a divergence; and the monitor's buffer leaves the optimizer's variables when fit ends."""
    import jax  # noqa: F401 - the jax extra

    runs = {backend: _backend_run(repo_root, backend) for backend in ("tensorflow", "jax")}
    for backend, run in runs.items():
        vanishing = run["vanishing"]
        assert (vanishing["verdict"], vanishing["status"], vanishing["read_back"]) == ("vanishing", "completed",
                                                                                         "vanishing"), backend
        assert (run["exploding"]["verdict"], run["exploding"]["status"]) == ("exploding", "diverged"), backend
        float16 = run["float16"]
        scales, skipped = float16["loss_scale"], float16["skipped"]
        assert float16["status"] == "completed" and scales[0] == 2.0 ** 15 and skipped[0] == 1, backend
        assert 0 < sum(skipped) < len(skipped), backend
        for k in range(len(scales) - 1):  # a skipped step halves the scale; a finite one keeps it (no 2000 yet)
            assert scales[k + 1] == (scales[k] / 2 if skipped[k] else scales[k]), (backend, k, scales, skipped)
        assert float16["monitor_variables_left"] == [], backend
        # Adam's: iterations, learning rate, and m and v of the two kernels and two biases
        assert run["checkpoint"] == {"optimizer_variables": 2 + 2 * 4, "same_weights": True,
                                     "same_optimizer_state": True}, backend
        assert run["raised_in_validation"] == {"first_before": "running", "first": "failed", "second": "completed",
                                               "second_rows": 4, "left": []}, backend
        assert run["loads_weights"] == {"loaded_iterations": 4, "saved_iterations": 4}, backend
        clipping = run["clipping"]  # global_clipnorm=0.5: what the optimizer applies has norm min(‖g‖, 0.5)
        assert max(clipping["norm"]) > 0.5 and len(clipping["norm"]) == 4, backend
        assert np.allclose(clipping["clipped"], np.minimum(clipping["norm"], 0.5), rtol=1e-5), backend
    assert runs["jax"]["exploding"]["first_nonfinite_step"] == runs["tensorflow"]["exploding"]["first_nonfinite_step"]
    figures = runs["tensorflow"]["vanishing"]["figures"]
    assert "gradient_heatmap.png" in figures and runs["jax"]["vanishing"]["figures"] == figures
