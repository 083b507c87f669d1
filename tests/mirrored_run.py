"""Run by test_mixed_precision_and_strategies.py in a fresh process: the same model trained with
model.fit + GradientMonitor on one device and under a MirroredStrategy over two logical CPU
devices; prints the recorded statistics of both as one JSON line."""

import json

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from gradtools.monitor import GradientMonitor  # noqa: E402

COLUMNS = ["step", "loss", "grad_global_norm", "layer_1/grad_norm", "layer_1/grad_mean",
           "layer_2/grad_abs_mean", "layer_2/weight_norm", "layer_1/update_ratio"]


def monitored(strategy, x, y):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    monitor = GradientMonitor()
    model.fit(x, y, epochs=2, batch_size=64, shuffle=False, verbose=0, callbacks=[monitor])
    return {c: monitor.metrics[c].tolist() for c in COLUMNS}


def fit_refused(strategy, x, y) -> str:
    """gradtools.fit runs one device's loop: under a strategy it must say so, not crash."""
    import gradtools

    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    try:
        gradtools.fit(model, x, y, loss="mse", optimizer="sgd", epochs=1)
    except ValueError as error:
        return str(error)
    return ""


def guard_refused(strategy, x, y) -> str:
    """SpikeGuard judges one device's global gradient: under a strategy it must say so."""
    import gradtools

    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    try:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[gradtools.SpikeGuard()])
    except ValueError as error:
        return str(error)
    return ""


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.float32)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    runs = {"replicas": mirrored.num_replicas_in_sync,
            "single": {"monitor": monitored(tf.distribute.get_strategy(), x, y)},
            "mirrored": {"monitor": monitored(mirrored, x, y)},
            "fit_under_strategy": fit_refused(mirrored, x, y),
            "guard_under_strategy": guard_refused(mirrored, x, y)}
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
