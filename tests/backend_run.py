"""Run by tests/test_backends.py under one Keras backend (KERAS_BACKEND; a process per backend,
since Keras fixes it at import): ``model.fit`` with a ``GradientMonitor`` on a deep sigmoid net
at small weights (vanishing), the article's exploding config, and under ``mixed_float16`` on
inputs whose scaled gradients overflow float16. Prints one JSON line of what was measured."""

import json
from pathlib import Path

import keras
import numpy as np

import gradtools
from experiments import gallery
from experiments.config import config_data, config_optimizer, load_config
from experiments.models import build_model
from gradtools.loggers import LocalRunLogger


def monitored_run(model, x, y, epochs: int, batch_size: int, run_dir=None) -> dict:
    """model.fit with the monitor: the verdict and how the run ended (with ``run_dir``, the
    run directory a LocalRunLogger writes, figures included, and the verdict read back from it)."""
    loggers = [LocalRunLogger(run_dir, name="backend_run")] if run_dir else []
    monitor = gradtools.GradientMonitor(stop_on_nonfinite=True, loggers=loggers, figures=bool(run_dir))
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=[monitor])
    diagnosis = gradtools.diagnose(monitor.history())
    run = {"verdict": diagnosis.verdict, "status": monitor.status, "epochs": monitor.epochs_completed,
           "first_nonfinite_step": monitor.first_nonfinite_step}
    if run_dir:
        run.update(read_back=gradtools.diagnose(run_dir).verdict,
                   figures=sorted(p.name for p in Path(run_dir, "figures").glob("*.png")))
    return run


def deep_sigmoid_run(run_dir) -> dict:
    """The gallery's ten sigmoid layers at N(0, 0.1²) weights under SGD, on digits."""
    case = next(case for case in gallery.CASES if case.name == "deep_sigmoid")
    keras.utils.set_random_seed(0)
    model, x, y = case.build()
    model.compile(optimizer=case.compile["optimizer"](), loss=case.compile["loss"])
    return monitored_run(model, x, y, case.epochs, case.batch_size, run_dir=run_dir)


def article_run(name: str, epochs: int) -> dict:
    """The config's model, data and optimizer, trained by model.fit with the monitor."""
    config = load_config(name)
    keras.utils.set_random_seed(config.seed)
    x, y = config_data(config)
    model = build_model(config.model, input_shape=x.shape[1:])
    model.compile(config_optimizer(config), config.training.loss)
    return monitored_run(model, x, y, epochs, config.training.batch_size)


def overflowing_float16_run() -> dict:
    """Inputs of about 300 under mixed_float16: the scaled gradients overflow float16 until the
    loss scaler has halved its scale enough; those steps are skipped, not a divergence."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(1, dtype="float32")])
        model.compile(keras.optimizers.SGD(1e-12), "mse")
        rng = np.random.default_rng(0)
        x = (300 * rng.standard_normal((256, 4))).astype("float32")
        y = rng.standard_normal((256, 1)).astype("float32")
        monitor = gradtools.GradientMonitor(figures=False)
        model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[monitor])
    finally:
        keras.config.set_dtype_policy("float32")
    rows = monitor.metrics
    return {"loss_scale": rows["loss_scale"].tolist(), "skipped": rows["skipped"].tolist(), "status": monitor.status,
            "monitor_variables_left": [v.path for v in model.optimizer.variables if "gradtools" in v.path]}


def checkpointed_run(directory: str) -> dict:
    """A ModelCheckpoint written during a monitored fit loads into a model of its own, Adam's
    moments included (Keras skips an optimizer state of another length, with a warning)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x = np.random.default_rng(0).standard_normal((64, 3)).astype("float32")
    path = f"{directory}/model.keras"
    model.fit(x, x.sum(axis=1), epochs=2, batch_size=16, verbose=0,
              callbacks=[gradtools.GradientMonitor(figures=False), keras.callbacks.ModelCheckpoint(path)])
    loaded = keras.saving.load_model(path)
    return {"optimizer_variables": len(loaded.optimizer.variables),
            "same_weights": all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), model.get_weights())),
            "same_optimizer_state": all(np.array_equal(a.numpy(), b.numpy()) for a, b in
                                        zip(loaded.optimizer.variables, model.optimizer.variables))}


def _small_model(model_class=keras.Sequential):
    keras.utils.set_random_seed(0)
    model = model_class([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def clipping_run() -> dict:
    """Adam with global_clipnorm=0.5: the norm of the gradients it applies, beside the tape's."""
    x = np.random.default_rng(0).standard_normal((64, 3)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3, global_clipnorm=0.5), "mse")
    monitor = gradtools.GradientMonitor(figures=False)
    model.fit(x, 10 * x.sum(axis=1), epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[monitor])
    rows = monitor.metrics
    return {"norm": rows["grad_global_norm"].tolist(), "clipped": rows["grad_global_norm_clipped"].tolist()}


def fit_raising_in_validation() -> dict:
    """A fit that raises in its validation (no probe sees it, no on_train_end): the next
    monitored fit ends that run, as failed, and trains with nothing of it left."""
    x = np.random.default_rng(0).standard_normal((32, 3)).astype("float32")
    model, first = _small_model(), gradtools.GradientMonitor(figures=False)
    try:
        model.fit(x, x.sum(axis=1), epochs=1, batch_size=8, verbose=0, callbacks=[first],
                  validation_data=(np.zeros((4, 5), "float32"), np.zeros(4, "float32")))
    except Exception:  # noqa: BLE001 - Keras's error for the validation data's shape
        pass
    status_before = first.status
    second = gradtools.GradientMonitor(figures=False)
    model.fit(x, x.sum(axis=1), epochs=1, batch_size=8, verbose=0, callbacks=[second])
    return {"first_before": status_before, "first": first.status, "second": second.status,
            "second_rows": len(second.metrics),
            "left": [v.path for v in model.optimizer.variables if "gradtools" in v.path]}


class _LoadsWeights(keras.callbacks.Callback):
    """Loads a weights file as training begins (as BackupAndRestore does)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        self.model.load_weights(self.path)
        self.iterations = int(self.model.optimizer.iterations.numpy())


def weights_loaded_as_training_begins(directory: str) -> dict:
    """A callback after the monitor loads weights, optimizer state included, in on_train_begin."""
    x = np.random.default_rng(0).standard_normal((32, 3)).astype("float32")
    saved = _small_model()
    saved.fit(x, x.sum(axis=1), epochs=1, batch_size=8, verbose=0)
    saved.save_weights(f"{directory}/w.weights.h5")
    model = _small_model()
    model.fit(x, x.sum(axis=1), epochs=1, batch_size=32, verbose=0)  # its optimizer built
    loads = _LoadsWeights(f"{directory}/w.weights.h5")
    model.fit(x, x.sum(axis=1), epochs=1, batch_size=8, verbose=0,
              callbacks=[gradtools.GradientMonitor(figures=False), loads])
    return {"loaded_iterations": loads.iterations, "saved_iterations": int(saved.optimizer.iterations.numpy())}


if __name__ == "__main__":
    import tempfile

    print(json.dumps({"backend": keras.backend.backend(),
                      "vanishing": deep_sigmoid_run(f"{tempfile.mkdtemp()}/run"),
                      "exploding": article_run("exploding/relu_baseline", epochs=5),
                      "float16": overflowing_float16_run(),
                      "checkpoint": checkpointed_run(tempfile.mkdtemp()),
                      "clipping": clipping_run(),
                      "raised_in_validation": fit_raising_in_validation(),
                      "loads_weights": weights_loaded_as_training_begins(tempfile.mkdtemp())}))
