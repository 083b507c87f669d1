"""The recurrent experiments and the remedies the sources name: every config runs, and the
recurrent claims hold at a reduced size (fewer epochs; the same nets, data and seed)."""

import numpy as np
import pytest

from experiments.claims import CLAIMS, EXPERIMENTS
from experiments.config import config_names, load_config
from experiments.runner import run_experiment

NEW_GROUPS = ("rnn", "vanishing_remedies", "exploding_remedies")
NEW_CONFIGS = [name for name in config_names() if name.split("/")[0] in NEW_GROUPS]
#: The claims' runs (tests/test_report.py runs them all, 1 seed × 5 epochs, and checks the
#: report); this file runs the others, so every new config runs once in the suite.
IN_CLAIMS = {reference for reference, _ in EXPERIMENTS.values()}
NOT_IN_CLAIMS = [name for name in NEW_CONFIGS if name not in IN_CLAIMS]


def claim(number):
    return next(c for c in CLAIMS if c.number == number)


def run(name, tmp_path, *overrides, figures=False):
    """A run of ``name``; its figures only when asked (the claims read numbers)."""
    return run_experiment(load_config(name, list(overrides)), tmp_path, figures=figures)


def test_every_source_named_remedy_has_a_config():
    named = {  # what the sources recommend against vanishing and exploding gradients
        "vanishing_remedies/he_relu", "vanishing_remedies/leaky_relu", "vanishing_remedies/elu",
        "vanishing_remedies/prelu", "vanishing_remedies/batchnorm_before_activation",
        "vanishing_remedies/residual", "exploding_remedies/clipnorm", "exploding_remedies/clipvalue",
        "exploding_remedies/l1_regularization", "exploding_remedies/small_batch",
        "exploding_remedies/standardized", "rnn/lstm_t50", "rnn/gru_t50", "rnn/lstm_t50_truncated",
        "rnn/simple_rnn_exploding_clipnorm", "rnn/simple_rnn_exploding_global_clip"}
    assert named <= set(NEW_CONFIGS)
    assert NOT_IN_CLAIMS == ["rnn/gru_t50", "rnn/lstm_t50_truncated", "rnn/simple_rnn_t100",
                             "rnn/simple_rnn_t20"]
    for name in NEW_CONFIGS:
        description = load_config(name).experiment.description
        assert description.strip(), name


@pytest.mark.parametrize("name", NOT_IN_CLAIMS)
def test_each_new_config_runs_a_few_epochs(tmp_path, name):
    result = run(name, tmp_path, "training.epochs=2", "data.n_samples=256", figures=True)
    history = result.history
    assert history.status in ("completed", "diverged")
    assert (result.run_dir / "figures" / "mean_gradient.png").is_file()
    if history.status == "completed":
        assert history.epochs_completed == 2
        assert np.isfinite(history.metrics.drop(columns=["step", "epoch", "batch"]).to_numpy()).all()
    if name.startswith("rnn/"):
        assert history.state_gradients is not None and len(history.state_gradients) >= 1
        assert (result.run_dir / "figures" / "state_gradients.png").is_file()


def test_lstm_keeps_the_gradient_through_time_and_learns_where_simple_rnn_does_not(tmp_path):
    """Claim 11 at 20 epochs instead of 40 (the LSTM learns around epoch 10 with seed 42)."""
    runs = {name: run(f"rnn/{name}", tmp_path, "training.epochs=20")
            for name in ("lstm_t50", "simple_rnn_t50")}
    holds, numbers = claim(11).check(runs)
    assert holds, numbers
    assert numbers["state_grad_ratio_simple_rnn"] < 1e-3  # vanishing through time, measured
    assert runs["simple_rnn_t50"].history.state_gradients is not None


def test_clipping_prevents_the_exploding_rnn_from_diverging(tmp_path):
    """Claim 12 at 1 epoch: the unclipped net diverges at its second step."""
    runs = {name: run(f"rnn/{name}", tmp_path, "training.epochs=1")
            for name in ("simple_rnn_exploding", "simple_rnn_exploding_clipnorm",
                         "simple_rnn_exploding_global_clip")}
    holds, numbers = claim(12).check(runs)
    assert holds, numbers
    states = runs["simple_rnn_exploding"].history.state_gradients
    ratio = states.iloc[0]["layer_1/state_grad_norm/t001"] / states.iloc[0]["layer_1/state_grad_norm/t050"]
    assert ratio == pytest.approx(1.1 ** 49, rel=0.05)  # the sources' 1.1^T, measured on step 1
