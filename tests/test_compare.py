"""`python -m gradtools compare` on real run directories."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO_ROOT, assert_drawn_png

import gradtools
from gradtools.compare import CompareError, compare_runs
from gradtools.loggers import LocalRunLogger


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    for name, seed in (("toy/sigmoid", 0), ("toy/sigmoid", 1), ("toy/relu", 0)):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation=name.split("/")[1]),
                                  keras.layers.Dense(1, activation="sigmoid")])
        logger = LocalRunLogger(root / name / f"seed{seed}", name=name, seed=seed)
        gradtools.fit(model, x, y, loss="binary_crossentropy", optimizer="sgd", epochs=2,
                      batch_size=8, seed=seed, loggers=[logger], figures=False)  # compare reads the tables
    (root / "toy" / "sigmoid" / "seeds-20261128.csv").write_text("seed\n0\n1\n")  # as --seeds writes
    return root


def test_a_glob_overlays_every_run_labelled_by_experiment_and_seed(runs_dir, tmp_path):
    out = tmp_path / "cmp.png"
    figure, run_dirs = compare_runs([str(runs_dir / "toy" / "*" / "*")], "layer_1/grad_norm", out)
    assert len(run_dirs) == 3
    labels = {t.get_text() for t in figure.axes[0].get_legend().get_texts()}
    assert labels == {"toy/sigmoid (seed 0)", "toy/sigmoid (seed 1)", "toy/relu (seed 0)"}
    assert out.read_bytes().startswith(b"\x89PNG")


def test_bad_path_and_unknown_statistic_say_what_is_available(runs_dir, tmp_path):
    with pytest.raises(CompareError, match="not a run directory"):
        compare_runs([str(tmp_path)])
    with pytest.raises(CompareError, match="matches no directory"):
        compare_runs([str(tmp_path / "nothing" / "*")])
    with pytest.raises(CompareError, match="available: loss, grad_global_norm, layer_1/grad_mean"):
        compare_runs([str(runs_dir / "toy" / "relu" / "seed0")], "layer_7/grad_norm")


def test_command_line_exit_codes(runs_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "gradtools", "compare"]
    good = subprocess.run(command + [str(runs_dir / "toy/*/*"), "--out", str(tmp_path / "c.png")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "compared 3 runs" in good.stdout and assert_drawn_png(tmp_path / "c.png", (9, 5)) is not None
    bad = subprocess.run(command + [str(runs_dir / "toy/relu/seed0"), "--stat", "nope"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "available:" in bad.stderr
    (tmp_path / "afile").write_text("not a directory")
    blocked = subprocess.run(command + [str(runs_dir / "toy/*/*"), "--out", str(tmp_path / "afile" / "c.png")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert blocked.returncode == 2 and blocked.stderr.count("\n") == 1, blocked.stderr
    assert f"{tmp_path / 'afile'} is a file" in blocked.stderr


def test_the_article_comparisons_overlay_its_six_vanishing_and_four_exploding_models():
    from experiments.cli import article_variants

    assert article_variants("vanishing") == [f"vanishing/{name}" for name in (
        "adam", "batchnorm", "glorot_uniform", "relu", "shallow", "sigmoid_baseline")]
    assert article_variants("exploding") == [f"exploding/{name}" for name in (
        "glorot_tanh", "grad_clipping", "l2_regularization", "relu_baseline")]


def test_the_article_comparison_of_a_statistic_no_run_has_is_one_line_exit_2(runs_dir, tmp_path, capsys):
    import shutil

    from experiments.cli import article_variants, main

    for name in article_variants("vanishing") + article_variants("exploding"):  # real run directories
        shutil.copytree(runs_dir / "toy" / "relu" / "seed0", tmp_path / "runs" / name / "20261128-000000-seed0")
    assert main(["compare", "--out", str(tmp_path / "runs"), "--figures", str(tmp_path / "f"),
                 "--stat", "layer_9/grad_norm"]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "has no statistic 'layer_9/grad_norm'; available: loss" in message


def test_a_figure_format_matplotlib_does_not_write_is_one_line_exit_2(runs_dir, tmp_path, capsys):
    from gradtools.__main__ import main

    assert main(["compare", str(runs_dir / "toy/*/*"), "--out", str(tmp_path / "c.txt")]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "c.txt: matplotlib writes no '.txt' figures; give a file ending in " in message
    assert ".png" in message and ".svg" in message and not list(tmp_path.iterdir())


def test_the_article_comparison_writes_neither_figure_when_one_cannot_be_drawn(runs_dir, tmp_path, capsys):
    """The vanishing figure was written before the exploding runs were found missing."""
    import shutil

    from experiments.cli import article_variants, main

    for name in article_variants("vanishing"):
        shutil.copytree(runs_dir / "toy" / "relu" / "seed0", tmp_path / "runs" / name / "20261128-000000-seed0")
    assert main(["compare", "--out", str(tmp_path / "runs"), "--figures", str(tmp_path / "f")]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "no finished run of exploding/" in message
    assert not (tmp_path / "f").exists()


def test_the_article_comparison_needs_runs_and_says_how_to_make_them(tmp_path, capsys):
    from experiments.cli import main

    assert main(["compare", "--out", str(tmp_path / "runs"), "--figures", str(tmp_path / "f")]) == 2
    assert "make figures" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_ctrl_c_in_the_command_line_is_one_line_and_leaves_no_figure(runs_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C while compare writes its figure (half of it on disk) or while diagnose reads:
    one line, exit 130, no half-written figure (it was a KeyboardInterrupt traceback)."""
    from matplotlib.figure import Figure

    import gradtools.__main__ as cli

    def half_written(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", half_written)
    monkeypatch.setattr(cli, "command_diagnose", interrupted)
    out = tmp_path / "figures"
    for args in (["compare", str(runs_dir / "toy" / "*" / "*"), "--out", str(out / "c.png")],
                 ["diagnose", str(runs_dir / "toy" / "relu" / "seed0")]):
        assert cli.main(args) == 130
        assert capsys.readouterr().err == "interrupted: nothing was written\n"
    assert list(out.iterdir()) == []
