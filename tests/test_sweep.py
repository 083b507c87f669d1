"""Sweeps: a tiny grid (8 points, 1 epoch) run by both executors gives the same numbers; a
Ray task hands each point back as it finishes; a Ray address nothing answers at is a clear
error; points are ordinary run directories; a bad grid value fails its points only; a second
run resumes; the phase diagram is drawn from the table."""

import contextlib
import io
import json
import shutil
import tomllib

import numpy as np
import pandas as pd
import pytest
from conftest import assert_drawn_png

from experiments.cli import main
from experiments.phase_diagram import plot_phase_diagram, write_phase_diagram
from experiments.ray_tasks import start_ray
from experiments.report import phase_section
from experiments.sweep import load_sweep, run_sweep
from gradtools.history import History

TINY = """
[sweep]
name = "tiny"
base = "vanishing/sigmoid_baseline"
description = "a test grid"

[set]
data.n_samples = 256
training.epochs = 1
"model.kernel_initializer" = { class_name = "VarianceScaling", config = { scale = 1.0, mode = "fan_in", \
distribution = "uniform" } }

[grid]
model.activation = ["sigmoid", "relu"]
model.depth = [1, 4]
model.kernel_initializer.config.scale = [0.3, 3.0]
"""
NUMBERS = ["ratio_first_step", "ratio_first_epoch", "ratio_last_epoch", "ratio", "grad_norm_first_step",
           "last_epoch_loss"]


TWO_POINTS = """
[sweep]
name = "two"
base = "vanishing/shallow"

[set]
training.epochs = 300
data.n_samples = 512

[grid]
optimizer.config.learning_rate = [0.01, 0.02]
"""  # one program: one Ray task runs both points


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    path = root / "tiny.toml"
    path.write_text(TINY)
    # in this process: worker processes are tested in test_faults.py (Ctrl-C on a two-worker sweep)
    local = run_sweep(load_sweep(path), root / "local", executor="local", workers=1, quiet=True)
    import signal

    import ray

    sigterm = signal.getsignal(signal.SIGTERM)
    with contextlib.redirect_stderr(io.StringIO()) as said:
        start_ray(2)  # as a sweep starts it; one Ray session for both sweeps
    assert said.getvalue() == "", said.getvalue()
    # ray.init's own handler ended a sweep on SIGTERM with exit 15 and no word, or absl's stack
    # dump (134); the command's handler says it was interrupted and exits 143
    assert signal.getsignal(signal.SIGTERM) is sigterm
    try:
        ray_result = run_sweep(load_sweep(path), root / "ray", executor="ray", workers=2, quiet=True)
        two = two_points_under_ray(root)
    finally:
        ray.shutdown()
    return root, path, local, ray_result, two


def two_points_under_ray(root):
    """Runs TWO_POINTS with Ray; returns its result, and when each point reached this process
    (seconds) with the point's own training time (its run.json's ``wall_seconds``)."""
    import time

    from experiments.sweep import SweepDirectory

    path = root / "two.toml"
    path.write_text(TWO_POINTS)
    arrivals = {}
    record = SweepDirectory.record

    def timed(self, point, row, *files):
        arrivals[point.id] = time.perf_counter()
        record(self, point, row, *files)

    SweepDirectory.record = timed
    try:
        result = run_sweep(load_sweep(path), root / "two", executor="ray", workers=1, quiet=True)
    finally:
        SweepDirectory.record = record
    trained = {point: json.loads((result.directory / "points" / point / "run.json").read_text())["wall_seconds"]
               for point in arrivals}
    return result, [(arrivals[point], trained[point]) for point in sorted(arrivals, key=arrivals.get)]


def test_a_ray_task_hands_each_point_back_as_it_finishes(tiny):
    """The first point of a task reaches the driver (and disk) while the second still trains:
    a Ctrl-C then keeps it, as with the local executor."""
    (first_arrived, _), (second_arrived, second_trained) = tiny[4][1]
    assert second_trained > 0.2, "too short to tell"
    assert second_arrived - first_arrived > 0.5 * second_trained  # one task returning both: 4.5 ms apart


def test_each_point_trains_with_its_own_learning_rate(tiny, tmp_path):
    """Grouping points by program once dropped the learning rate from their configs: every
    point then trained with the optimizer's default. A point's numbers are those of a plain
    run with its values."""
    result = tiny[4][0]
    rates = {}
    for _, row in result.table.iterrows():
        config = tomllib.loads((result.directory / "points" / row["point"] / "config.toml").read_text())
        rates[row["point"]] = config["optimizer"]["config"]["learning_rate"]
        assert rates[row["point"]] == row["optimizer.config.learning_rate"]
    assert sorted(rates.values()) == [0.01, 0.02]
    assert result.table["last_epoch_loss"].nunique() == 2
    point = next(p for p, rate in rates.items() if rate == 0.02)
    settings = ["training.epochs=300", "data.n_samples=512", "optimizer.config.learning_rate=0.02"]
    assert main(["run", "vanishing/shallow", *(a for s in settings for a in ("--set", s)),
                 "--out", str(tmp_path), "--quiet"]) == 0
    (plain,) = tmp_path.glob("vanishing/shallow/*/metrics.csv")
    assert (result.directory / "points" / point / "metrics.csv").read_bytes() == plain.read_bytes()


def test_both_executors_give_identical_numbers(tiny):
    _, _, local, ray, _ = tiny
    assert len(local.table) == len(ray.table) == 8
    assert (local.table["status"] == "completed").all() and local.failed == 0
    keys = ["point", "model.activation", "model.depth", "model.kernel_initializer.config.scale"]
    merged = local.table.merge(ray.table, on=keys, suffixes=("_local", "_ray"))
    assert len(merged) == 8
    for column in NUMBERS:
        np.testing.assert_array_equal(merged[f"{column}_local"], merged[f"{column}_ray"], err_msg=column)
    assert (merged["verdict_local"] == merged["verdict_ray"]).all()
    # the numbers say something: deep sigmoid with small weights vanishes, shallow does not
    table = local.table.set_index(keys[1:])
    assert table.loc[("sigmoid", 4, 0.3), "ratio_first_step"] < 0.1 * table.loc[("sigmoid", 1, 0.3), "ratio_first_step"]
    # in the 4-layer ReLU net the ratio stays within a decade of 1 at both scales while the
    # gradient itself grows with the weights (measured: 0.33 -> 7.8, ratio 1.6 and 0.47)
    relu_small, relu_large = table.loc[("relu", 4, 0.3)], table.loc[("relu", 4, 3.0)]
    assert relu_large["grad_norm_first_step"] > 10 * relu_small["grad_norm_first_step"]
    assert all(0.1 < r["ratio_first_step"] < 10 for r in (relu_small, relu_large))


def test_every_point_is_an_ordinary_run_directory(tiny):
    _, _, local, ray, _ = tiny
    for result in (local, ray):
        for _, row in result.table.iterrows():
            history = History.from_run_dir(row["run_dir"])
            assert history.status == row["status"]
            config = tomllib.loads((result.directory / "points" / row["point"] / "config.toml").read_text())
            assert config["model"]["depth"] == row["model.depth"]
            # each point keeps its own value (not the last point's: no shared config objects)
            assert (config["model"]["kernel_initializer"]["config"]["scale"]
                    == row["model.kernel_initializer.config.scale"])
            assert len([k for k in history.layer_paths]) == row["model.depth"] + 1
            info = json.loads((result.directory / "points" / row["point"] / "run.json").read_text())
            assert info["diagnosis"]["verdict"] == row["verdict"]
    assert json.loads((local.directory / "sweep.json").read_text())["grid"]["model.depth"] == [1, 4]


def test_a_second_run_resumes_and_a_bad_grid_value_fails_only_its_points(tiny, tmp_path, capsys):
    root, path, local, _, _ = tiny
    out = tmp_path / "resume"
    shutil.copytree(root / "local", out)
    # a sweep.csv written before grad_norm_first_step existed: it is filled in from the run directories
    old_table = out / "sweeps/tiny/sweep.csv"
    pd.read_csv(old_table).drop(columns=["grad_norm_first_step"]).to_csv(old_table, index=False)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "sweeps/tiny/points").glob("*/metrics.csv")}
    path2 = tmp_path / "tiny.toml"
    path2.write_text(TINY.replace('["sigmoid", "relu"]', '["sigmoid", "relu", "sigmoidd"]'))
    code = main(["sweep", str(path2), "--out", str(out), "--workers", "1"])
    assert code == 1  # some points failed
    captured = capsys.readouterr()
    assert "8 already done" in captured.err and "4 to run" in captured.err
    assert "4 points run, 8 already done, 4 failed" in captured.out
    assert "model.activation = 'sigmoidd'" in captured.err
    after = {p.name: p.stat().st_mtime_ns for p in (out / "sweeps/tiny/points").glob("*/metrics.csv")}
    assert after == before, "completed points are neither recomputed nor rewritten"
    table = pd.read_csv(out / "sweeps/tiny/sweep.csv")
    assert len(table) == 12
    failed = table[table["status"] == "failed"]
    assert len(failed) == 4 and (failed["model.activation"] == "sigmoidd").all()
    assert failed["error"].str.contains("not a Keras activation").all()
    same = table[table["status"] == "completed"].set_index("point")[NUMBERS]
    pd.testing.assert_frame_equal(same.sort_index(), local.table.set_index("point")[NUMBERS].sort_index())


def test_a_point_made_with_other_settings_runs_again_and_leaves_the_table_at_once(tiny, tmp_path, capsys):
    """A point's identity is its grid values, but it is reused only when made with the whole
    config it has now: after [set] training.epochs 1 -> 2, both points train again (their old
    rows were results of 1 epoch under a sweep.json claiming 2)."""
    root = tiny[0]
    out = tmp_path / "edited"
    shutil.copytree(root / "local", out)
    two = TINY.replace('["sigmoid", "relu"]', '["sigmoid"]').replace("[1, 4]", "[1]")
    unchanged, edited = tmp_path / "tiny.toml", tmp_path / "tiny_edited.toml"
    unchanged.write_text(two)
    edited.write_text(two.replace("training.epochs = 1", "training.epochs = 2"))
    points = out / "sweeps/tiny/points"
    first = load_sweep(unchanged).points()[0].id
    assert json.loads((points / first / "settings.json").read_text())["training"]["epochs"] == 1
    (points / first / "settings.json").unlink()  # as a point written before settings.json existed
    assert main(["sweep", str(unchanged), "--out", str(out), "--workers", "1"]) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().err, "its config.toml holds the same config"
    assert main(["sweep", str(edited), "--out", str(out), "--workers", "1"]) == 0
    assert "0 already done, 2 to run" in capsys.readouterr().err
    table = pd.read_csv(out / "sweeps/tiny/sweep.csv")
    ran = table[table["point"].isin(load_sweep(edited).points()[i].id for i in range(2))]
    assert len(ran) == 2 and (ran["epochs_completed"] == 2).all()
    for point in ran["point"]:
        assert json.loads((points / point / "settings.json").read_text())["training"]["epochs"] == 2
        assert tomllib.loads((points / point / "config.toml").read_text())["training"]["epochs"] == 2


def test_bad_sweep_files_exit_2_naming_file_and_key(tmp_path, capsys):
    cases = [(TINY.replace('base = "vanishing/sigmoid_baseline"', 'base = "vanishing/nope"'), "sweep.base"),
             (TINY.replace("model.depth = [1, 4]", "model.depth = 4"), "grid.model.depth"),
             (TINY.replace("[grid]", "[gird]"), "[gird]"),
             (TINY.replace('name = "tiny"', 'name = "../escaped"'), "sweep.name"),  # a folder under --out
             (TINY.replace("training.epochs = 1", "training.epochs = 1\nmodel.depth = 2"), "grid.model.depth"),
             # every point fails: the file is wrong, and nothing is written
             (TINY.replace("training.epochs = 1", "training.epochs = -1"), "training.epochs"),
             (TINY.replace("model.depth = [1, 4]", "model.bogus = [1, 4]"), "model.bogus")]
    for index, (text, key) in enumerate(cases):
        path = tmp_path / f"bad{index}.toml"
        path.write_text(text)
        assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
        message = capsys.readouterr().err
        assert str(path) in message and key in message, message
    assert not (tmp_path / "out").exists()


def test_a_ray_address_nothing_answers_at_is_exit_2_within_seconds_and_writes_nothing(tmp_path, capsys):
    """Ray itself retried such an address for 14 minutes, then failed with a traceback."""
    import socket
    import time

    (tmp_path / "tiny.toml").write_text(TINY)
    with socket.socket() as probe:  # a port of this machine that nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.perf_counter()
    for given in (address, f"ray://{address}"):
        code = main(["sweep", str(tmp_path / "tiny.toml"), "--executor", "ray", "--ray-address", given,
                     "--out", str(tmp_path / "out"), "--quiet"])
        message = capsys.readouterr().err
        assert code == 2, message
        assert message.count("\n") == 1 and "Traceback" not in message, message
        assert f"--ray-address = '{given}': no Ray cluster answers there" in message, message
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "out").exists()


def test_ray_failing_to_start_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """A real failure of ray.init (its temporary directory cannot be made)."""
    (tmp_path / "tiny.toml").write_text(TINY)
    monkeypatch.setenv("RAY_TMPDIR", "/proc/gradtools-no-such-dir")
    code = main(["sweep", str(tmp_path / "tiny.toml"), "--executor", "ray", "--out", str(tmp_path / "out"),
                 "--quiet"])
    message = capsys.readouterr().err
    assert code == 2, message
    assert message.count("\n") == 1 and "Traceback" not in message, message
    assert "--executor = 'ray': Ray could not start here: " in message and "gradtools-no-such-dir" in message


def test_phase_diagram_figure_from_the_table(tiny, tmp_path):
    _, _, local, _, _ = tiny
    target = write_phase_diagram(local.table, tmp_path)
    activations = local.table["model.activation"].nunique()
    assert_drawn_png(target, (5.2 * activations + 5, 13), dpi=90)
    figure = plot_phase_diagram(local.table)
    titles = [ax.get_title() for ax in figure.axes]
    assert "sigmoid: at the first step" in titles and "relu: last epoch (V vanishing, E exploding, · healthy)" in titles
    assert "relu: gradient size at the first step" in titles
    assert any("4^−depth" in t for t in titles)
    html = phase_section(local.table)  # the report's section embeds the figure
    assert '<img alt="phase diagram" src="data:image/png;base64,' in html and "8 runs" in html


def test_a_finished_points_model_is_freed_when_the_next_point_starts():
    """Each point starts TensorFlow's settings again (``run_sweep_point``): the garbage
    collector's freeze happens once per process, or it would keep the previous point's model
    for good (the worker's ``_clear`` could not free it)."""
    import gc
    import weakref

    import keras

    from experiments.worker import clear_models, quiet_tensorflow

    def a_point():
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
        model(np.ones((2, 8), np.float32))
        return weakref.ref(model)

    quiet_tensorflow()
    finished = a_point()
    frozen = gc.get_freeze_count()
    quiet_tensorflow()  # the next point starts
    clear_models()
    assert finished() is None, "the finished point's model was kept"
    assert gc.get_freeze_count() <= frozen


def test_a_large_grid_says_how_far_its_check_is(tmp_path, monkeypatch, capsys):
    """Each point's config is checked before anything runs (10⁵ points took ten silent
    minutes): a line every few seconds, here every point."""
    from experiments import sweep as sweeps

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    monkeypatch.setattr(sweeps, "CHECK_PROGRESS_EVERY", 0.0)
    configs = sweeps._point_configs(load_sweep(path), quiet=False)
    lines = capsys.readouterr().err.splitlines()
    assert len(configs) == 8
    assert lines == [f"sweep tiny: checking each point's config, {k}/8" for k in range(8)]


def test_runs_are_grouped_by_the_librarys_rule_of_what_makes_a_program():
    """The sweep groups configs before any model exists; the library keys a built model. One
    rule (gradtools.programs.without_inputs) says what is not part of a program, so the two
    agree: another initializer, seed or learning rate is the same program, another
    activation is not."""
    import keras

    from experiments.config import load_config
    from experiments.datasets import make_dataset
    from experiments.models import build_model
    from experiments.parallel import program_key
    from gradtools import programs
    from gradtools.steps import resolve_loss

    base = "vanishing/sigmoid_baseline"
    configs = [load_config(base),
               load_config(base, ["model.kernel_initializer=he_normal", "training.seed=3",
                                  "optimizer.config.learning_rate=0.5", "training.epochs=7"]),
               load_config(base, ["model.activation=relu"])]
    grouped = [program_key(config) for config in configs]
    x, y = make_dataset(configs[0].data)
    built = [programs.program_key(build_model(config.model, input_shape=x.shape[1:]),
                                  resolve_loss(config.training.loss),
                                  keras.optimizers.get(config.optimizer.keras_config()), [list(x.shape), 32], {})
             for config in configs]
    for keys in (grouped, built):
        assert None not in keys
        assert keys[0] == keys[1] != keys[2]
