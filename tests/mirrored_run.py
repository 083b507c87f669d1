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


def collectives_ordered(strategy, x, y) -> list[bool]:
    """With the monitor's probes installed, the train step traced under ``strategy``: for
    each pair of all-reduces on one device (the monitor's and the optimizer's), whether one
    depends on the other. Unordered, each replica may start either first, and a replica that
    joins the other one's collective fails with "Shape mismatch in the collective instance"."""
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
    graphs = []

    class TraceStep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            data = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(64))
            step = tf.function(lambda batch: strategy.run(self.model.train_step, args=(batch,)))
            graphs.append(step.get_concrete_function(next(iter(data))).graph)

    model.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[GradientMonitor(figures=False), TraceStep()])
    collectives = [op for op in graphs[0].get_operations() if op.type.startswith("Collective")]
    return [a in _ancestors(b) or b in _ancestors(a)
            for i, a in enumerate(collectives) for b in collectives[i + 1:] if a.device == b.device]


def _ancestors(op) -> set:
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


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


def main():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.float32)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    runs = {"replicas": mirrored.num_replicas_in_sync,
            "single": {"monitor": monitored(tf.distribute.get_strategy(), x, y)},
            "mirrored": {"monitor": monitored(mirrored, x, y)},
            "fit_under_strategy": fit_refused(mirrored, x, y),
            "collectives_ordered": collectives_ordered(mirrored, x, y)}
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
