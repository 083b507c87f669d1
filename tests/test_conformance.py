"""The conformance zoo's fast core: every class of failure it was made for, checked against an
independent GradientTape over model.compute_loss (experiments/conformance.py). The whole zoo
is `make conformance`."""

import subprocess

import keras
import pytest
from conftest import REPO_ROOT, run_cli

from experiments import zoo
from experiments.conformance import as_expected, expected_row, reference, relative_difference, run_case
from gradtools.columns import OUTPUT_COLUMN

CORE = {f"{case.model} / {case.mode}": case for case in zoo.CASES if case.core and not case.needs}


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_core_of_the_zoo_is_recorded_exactly(name):
    """A Dense layer on a sequence and the keras-io transformer (an embedding's IndexedSlices)
    with a smaller last batch crashed the monitor; twelve ReLU layers at VarianceScaling(30)
    under a sigmoid or softmax gave gradtools.fit a loss of 7 and a gradient of exactly 0,
    where model.fit's loss is 10⁶; GPT-2's padding mask as sample weights."""
    result = run_case(CORE[name], core=True)
    assert result["monitor"].kind == "exact", result["monitor"].cell()
    assert result["monitor"].steps[-1] == 3, "the smaller last batch is among the checked steps"
    if result["fit"] is not None:
        assert result["fit"].kind == "exact", result["fit"].cell()
    assert as_expected(result)


def test_gradtools_fit_takes_the_logits_of_a_saturated_sigmoid_as_model_fit_does():
    """The case in numbers: model.fit's first step has a loss of about 10⁶ (Keras works from
    the logits); gradtools.fit's was a clipped 7.05 with a gradient norm of 0."""
    import gradtools

    subject = zoo.relu12_scale30()
    history = gradtools.fit(subject.model, subject.x, subject.y, loss=subject.fit_loss,
                            optimizer=keras.optimizers.SGD(0.0), epochs=1, batch_size=subject.batch_size,
                            shuffle=False, figures=False)
    first = history.metrics.iloc[0]
    assert first["loss"] > 1e4 and first["grad_global_norm"] > 1e4


def test_the_comparison_finds_a_wrong_record():
    """The checker is not blind: a row off by 1e-3 in one layer's gradient norm, weight norm or
    update ratio, or in a recurrent kernel's mean gradient, differs."""
    subject = zoo.masked_lstm()
    before = {v.path: v.numpy() for v in subject.model.variables}
    after = {path: value * 1.01 for path, value in before.items()}
    ref = reference(subject.model, subject.batch(1), list(before.values()), None)
    kernels = [v.path for v in subject.model.trainable_weights if v.name == "kernel"]
    expected = expected_row(ref, kernels, before, after)
    assert {"layer_1/recurrent_grad_mean", "layer_2/update_ratio"} <= set(expected)
    assert "layer_2/recurrent_grad_mean" not in expected, "the Dense head has no recurrent kernel"
    recorded = {column: value for column, (value, _) in expected.items()}
    assert relative_difference(recorded, expected) == (0.0, "")
    for column in ("layer_1/grad_norm", "layer_2/weight_norm", "layer_1/recurrent_update_ratio"):
        difference, where = relative_difference({**recorded, column: recorded[column] * 1.001}, expected)
        assert where == column and difference == pytest.approx(1e-3, rel=1e-3)
    column = "layer_1/recurrent_grad_mean"  # a signed mean: relative to the mean |g|
    shifted = recorded[column] + 1e-3 * expected["layer_1/recurrent_grad_abs_mean"][0]
    assert relative_difference({**recorded, column: shifted}, expected) == (pytest.approx(1e-3, rel=1e-3), column)


def test_a_train_step_that_hides_its_loss_is_refused_in_one_line():
    """keras-io's VAE computes its loss without compute_loss: a one-line refusal, and the
    model trains as before once the monitor is gone."""
    result = run_case(next(case for case in zoo.CASES if case.model.startswith("VAE")))
    assert result["monitor"].kind == "refused" and "self.compute_loss" in result["monitor"].detail
    assert as_expected(result)


def test_mirrored_strategy_with_an_uneven_last_batch_through_the_command(tmp_path):
    """In a process of its own (two logical CPU devices): a 4 × 64 ReLU regressor under
    Adam, 999 rows in batches of 32 (the last one, 7 rows, splits 4 + 3), against the sum of
    each replica's tape gradients."""
    done = run_cli(["conformance", "--core", "--only", "MirroredStrategy", "--figures", str(tmp_path)], REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "conformance.md").read_text()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    assert table.startswith("# The conformance zoo\n\nWritten by `python -m experiments conformance --core "
                            "--only MirroredStrategy`, "), table[:300]
    assert f", at {commit}" in table.splitlines()[2], "the page names the commit it measured"
    row = next(line for line in table.splitlines() if line.startswith("|") and "MirroredStrategy" in line)
    assert "| exact (" in row and "| 1, 2, 32 |" in row, row


def test_the_command_names_a_filter_that_matches_nothing(tmp_path):
    done = run_cli(["conformance", "--only", "no such model", "--figures", str(tmp_path)], REPO_ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --only: 'no such model' matches no case of the zoo (python -m experiments conformance --list "
        "names them)"]


def test_the_saturated_outputs_are_compared_where_the_outputs_are_probabilities():
    """The tape's reference carries the fraction of probabilities within ε of 0 or 1 for a
    sigmoid output (logits about 10⁶: all of them) and none for a regression's output."""
    saturated = zoo.relu12_scale30()
    values = [v.numpy() for v in saturated.model.variables]
    expected = expected_row(reference(saturated.model, saturated.batch(1), values, None), [])
    assert expected[OUTPUT_COLUMN] == (1.0, 1.0)
    regressor = zoo.dense_on_sequence()
    values = [v.numpy() for v in regressor.model.variables]
    assert OUTPUT_COLUMN not in expected_row(reference(regressor.model, regressor.batch(1), values, None), [])
