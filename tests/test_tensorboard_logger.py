"""TensorBoardLogger's event files read back with TensorBoard's own reader and server."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO_ROOT, spiky_fit
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

import gradtools
from experiments.dashboard import empty_note, server_command
from gradtools.columns import metric_columns
from gradtools.loggers.tensorboard import TensorBoardLogger


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tb") / "run_a"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(1, activation="sigmoid")])
    logger = TensorBoardLogger(log_dir)
    logger.log_params({"training": {"epochs": 3}})
    history = gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer="sgd", epochs=3,
                            batch_size=16, seed=0, loggers=[logger])
    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "histograms": 0})
    accumulator.Reload()
    return log_dir, history, accumulator


def test_every_statistic_is_a_scalar_with_its_column_name_steps_and_values(logged_run):
    _, history, events = logged_run
    tags = set(events.Tags()["tensors"])
    for column in metric_columns(2)[3:]:
        assert column in tags, column
        points = events.Tensors(column)
        assert [p.step for p in points] == history.metrics["step"].tolist()
        values = [float(tensor_util.make_ndarray(p.tensor_proto)) for p in points]
        np.testing.assert_allclose(values, history.metrics[column], rtol=1e-6)


def test_kernel_and_gradient_histograms_once_per_epoch(logged_run):
    _, history, events = logged_run
    tags = set(events.Tags()["tensors"])
    last_step_of_epoch = history.metrics.groupby("epoch")["step"].max().tolist()
    for k in (1, 2):
        for name in (f"layer_{k}/kernel", f"layer_{k}/kernel_gradient"):
            assert name in tags
            points = events.Tensors(name)
            assert [p.step for p in points] == last_step_of_epoch
            buckets = tensor_util.make_ndarray(points[-1].tensor_proto)
            assert buckets.ndim == 2 and buckets[:, 2].sum() > 0  # (left, right, count) rows
    assert "config" in tags and "status" in tags


def hparams_session_groups(port):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups", headers={"Content-Type": "application/json"},
        data=json.dumps({"experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
                         "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"]}).encode())
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())["sessionGroups"]


def test_the_tensorboard_server_lists_the_run_and_its_hparams_row(logged_run):
    log_dir, history, _ = logged_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # as `python -m experiments dashboard` starts it
    server = subprocess.Popen(server_command("tensorboard", log_dir.parent, port),
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runs, deadline = None, time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as answer:
                    runs = json.loads(answer.read())
                if runs:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert runs is not None and "run_a" in runs, runs
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=10) as answer:
            scalar_tags = json.loads(answer.read())
        assert "layer_1/grad_abs_mean" in scalar_tags["run_a"]
        groups = hparams_session_groups(port)
        libraries = Path(f"/proc/{server.pid}/maps").read_text()
        assert "libtensorflow_framework" not in libraries, "the server started TensorFlow"
    finally:
        server.terminate()
        server.wait(timeout=30)
    [group] = groups
    assert group["name"] == str(log_dir)
    assert group["hparams"]["training.epochs"] == 3
    assert group["hparams"]["status"] == "completed"
    assert group["hparams"]["verdict"] == gradtools.diagnose(history).verdict
    values = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    assert set(values) == {"outcome/final_loss", "outcome/weakest_depth_ratio", "outcome/first_to_last_ratio"}
    assert values["outcome/final_loss"] == pytest.approx(history.metrics["loss"].iloc[-1], rel=1e-6)
    layer_1, layer_2 = (history.metrics[f"layer_{k}/grad_abs_mean"].median() for k in (1, 2))
    assert values["outcome/first_to_last_ratio"] == pytest.approx(layer_1 / layer_2, rel=1e-5)


def test_the_dashboard_notes_a_folder_without_event_files(logged_run, tmp_path):
    log_dir, _, _ = logged_run
    assert empty_note("tensorboard", tmp_path).endswith("starts empty: log runs with --logger tensorboard")
    assert empty_note("tensorboard", log_dir.parent) is None


def test_spikes_are_text_and_a_scalar_at_their_steps(tmp_path):
    history = spiky_fit([TensorBoardLogger(tmp_path / "tb")])
    (spike,) = history.spikes.itertuples()
    accumulator = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    accumulator.Reload()
    (text,) = accumulator.Tensors("spikes")
    words = tensor_util.make_ndarray(text.tensor_proto).item().decode()
    assert text.step == spike.step == 21
    assert words.startswith("SpikeGuard: step 21 (epoch 1, batch 21): grad_global_norm ")
    assert spike.layer in words and words.endswith("; skipped")
    (value,) = accumulator.Tensors("spikes/value")
    assert value.step == 21 and float(tensor_util.make_ndarray(value.tensor_proto)) == pytest.approx(spike.value)
