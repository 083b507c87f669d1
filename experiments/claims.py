"""The article's ten claims, and what the other sources claim of recurrent networks and of
each remedy they name; each checked by a small function with a stated criterion.

Every claim is evaluated per seed on fresh runs; the verdict says in how many seeds it
holds. Numbers are medians over all logged steps unless said otherwise; "at batch 5" means
the article's sampling (one value per epoch).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from experiments.parallel import run_jobs
from experiments.runner import ARTICLE_SAMPLE_BATCH, Run
from gradtools.columns import layer_column, layer_numbers
from gradtools.diagnosis import through_time_evidence
from gradtools.layer_ratios import first_to_last_ratio
from gradtools.loggers.local import write_atomically
from gradtools.plots import sample_per_epoch

#: Runs the claims need: a name -> (config, extra overrides).
EXPERIMENTS = {
    "sigmoid_baseline": ("vanishing/sigmoid_baseline", []),
    "relu": ("vanishing/relu", []),
    "shallow": ("vanishing/shallow", []),
    "glorot_uniform": ("vanishing/glorot_uniform", []),
    "adam": ("vanishing/adam", []),
    "batchnorm": ("vanishing/batchnorm", []),
    "standardized": ("vanishing/sigmoid_baseline", ["data.standardize=true"]),
    "relu_baseline": ("exploding/relu_baseline", []),
    "grad_clipping": ("exploding/grad_clipping", []),
    "glorot_tanh": ("exploding/glorot_tanh", []),
    "l2_regularization": ("exploding/l2_regularization", []),
    "simple_rnn_t50": ("rnn/simple_rnn_t50", []),
    "lstm_t50": ("rnn/lstm_t50", []),
    "simple_rnn_exploding": ("rnn/simple_rnn_exploding", []),
    "simple_rnn_exploding_clipnorm": ("rnn/simple_rnn_exploding_clipnorm", []),
    "simple_rnn_exploding_global_clip": ("rnn/simple_rnn_exploding_global_clip", []),
    **{name: (f"vanishing_remedies/{name}", []) for name in (
        "deep_sigmoid", "he_relu", "leaky_relu", "elu", "prelu", "batchnorm_before_activation",
        "residual")},
    **{f"exploding_{name}": (f"exploding_remedies/{name}", []) for name in (
        "standardized", "l1_regularization", "small_batch", "clipnorm", "clipvalue")},
}


# --- numbers of one run ------------------------------------------------------------------------

def _layers(run: Run) -> tuple[int, int]:
    layers = layer_numbers(run.history.metrics)
    return layers[0], layers[-1]


def grad_mean_std(run: Run, which: str) -> float:
    """Standard deviation over epochs of a layer's signed mean gradient at batch 5."""
    first, last = _layers(run)
    k = first if which == "first" else last
    return float(sample_per_epoch(run.history.metrics, ARTICLE_SAMPLE_BATCH)[layer_column(k, "grad_mean")].std())


def max_abs_first_grad_mean(run: Run) -> float:
    first, _ = _layers(run)
    sampled = sample_per_epoch(run.history.metrics, ARTICLE_SAMPLE_BATCH)
    return float(sampled[layer_column(first, "grad_mean")].abs().max())


def magnitude_ratio(run: Run, first_epoch: bool = False) -> float:
    metrics = run.history.metrics
    return first_to_last_ratio(metrics[metrics["epoch"] == 0] if first_epoch else metrics)


def first_grad_abs_mean(run: Run) -> float:
    first, _ = _layers(run)
    return float(run.history.metrics[layer_column(first, "grad_abs_mean")].median())


def state_gradient_ratio(run: Run) -> float:
    """‖∂L/∂h_1‖ / ‖∂L/∂h_T‖, median over epochs, of a traced recurrent run."""
    return float(through_time_evidence(run.history.state_gradients)["state_grad_ratio"] or 0.0)


def finite_completion(run: Run) -> float:
    return float(run.history.status == "completed")


def epoch_loss(run: Run, which: str) -> float:
    losses = run.history.metrics.groupby("epoch")["loss"].mean()
    return float(losses.iloc[-1] if which == "last" else losses.iloc[0])


#: The article's other sources, by what they are (users have none of the files).
SOURCES = {
    "000": "the Machine Learning Mastery introduction to exploding gradients",
    "001": "the blog post on causes and remedies",
    "002": "the lecture notes on vanishing and exploding gradients",
    "004": "the gradient-clipping explainer",
}


def _said_by(sources: str, claim: str) -> str:
    """"<Sources>: <claim>" with the sources named by what they are."""
    named = " and ".join(SOURCES.get(s.strip(), s.strip()) for s in sources.split(","))
    return f"{named[0].upper()}{named[1:]}: {claim}"

# --- the claims --------------------------------------------------------------------------------

@dataclass
class Claim:
    number: int
    text: str
    criterion: str
    check: Callable[[dict[str, Run]], tuple[bool, dict[str, float]]]
    note: Callable[[list[dict[str, float]]], str] = lambda numbers: ""


def _claim_1(r):
    base = r["sigmoid_baseline"]
    numbers = {"max_abs_layer_1_grad_mean": max_abs_first_grad_mean(base),
               "std_last_over_std_layer_1": grad_mean_std(base, "last") / grad_mean_std(base, "first"),
               "magnitude_ratio": magnitude_ratio(base),
               "magnitude_ratio_first_epoch": magnitude_ratio(base, first_epoch=True)}
    holds = numbers["max_abs_layer_1_grad_mean"] < 0.006 and numbers["std_last_over_std_layer_1"] >= 5
    return holds, numbers


def _note_1(numbers):
    whole = np.median([n["magnitude_ratio"] for n in numbers])
    early = np.median([n["magnitude_ratio_first_epoch"] for n in numbers])
    return (f"The signed mean and the magnitude disagree: the signed mean of layer 1 cancels to "
            f"near zero, but its magnitude is {whole:.2g}× the last layer's over the run "
            f"({early:.2g}× in the first epoch): vanishing is strong early, mild later.")


def _claim_2(r):
    numbers = {"std_layer_1_relu": grad_mean_std(r["relu"], "first"),
               "std_layer_1_sigmoid": grad_mean_std(r["sigmoid_baseline"], "first")}
    numbers["times"] = numbers["std_layer_1_relu"] / numbers["std_layer_1_sigmoid"]
    return numbers["times"] >= 3, numbers


def _claim_3(r):
    numbers = {"first_epoch_ratio_shallow": magnitude_ratio(r["shallow"], True),
               "first_epoch_ratio_sigmoid": magnitude_ratio(r["sigmoid_baseline"], True),
               "last_epoch_loss_shallow": epoch_loss(r["shallow"], "last"),
               "last_epoch_loss_relu": epoch_loss(r["relu"], "last")}
    holds = (numbers["first_epoch_ratio_shallow"] >= 3 * numbers["first_epoch_ratio_sigmoid"]
             and numbers["last_epoch_loss_shallow"] > numbers["last_epoch_loss_relu"])
    return holds, numbers


def _claim_4(r):
    run = r["glorot_uniform"]
    numbers = {"std_layer_1": grad_mean_std(run, "first"), "std_last": grad_mean_std(run, "last")}
    numbers["std_layer_1_over_last"] = numbers["std_layer_1"] / numbers["std_last"]
    return 0 < numbers["std_layer_1_over_last"] < 1, numbers


def _claim_5(r):
    numbers = {"layer_1_grad_abs_mean_adam": first_grad_abs_mean(r["adam"]),
               "layer_1_grad_abs_mean_sigmoid": first_grad_abs_mean(r["sigmoid_baseline"]),
               "last_epoch_loss_adam": epoch_loss(r["adam"], "last"),
               "last_epoch_loss_sigmoid": epoch_loss(r["sigmoid_baseline"], "last")}
    holds = (numbers["layer_1_grad_abs_mean_adam"] >= 2 * numbers["layer_1_grad_abs_mean_sigmoid"]
             and numbers["last_epoch_loss_adam"] < numbers["last_epoch_loss_sigmoid"])
    return holds, numbers


def _claim_6(r):
    history = r["relu_baseline"].history
    step = history.first_nonfinite_step
    return history.status == "diverged", {"first_nonfinite_step": float(step) if step else float("nan")}


def _claim_7(r):
    history = r["grad_clipping"].history
    metrics = history.metrics
    raw_max = metrics[[c for c in metrics.columns if c.endswith("/grad_max_abs")]].max(axis=1)
    numbers = {"completed": float(history.status == "completed"),
               "max_raw_grad_abs": float(raw_max.max()),
               "fraction_of_steps_clipped": float((raw_max > 50).mean())}
    return history.status == "completed", numbers


def _claim_8(r):
    history = r["glorot_tanh"].history
    return history.status == "completed", {"completed": float(history.status == "completed"),
                                           "last_epoch_loss": epoch_loss(r["glorot_tanh"], "last")}


def _claim_9(r):
    run = r["l2_regularization"]
    norms = run.history.metrics["grad_global_norm"]
    numbers = {"max_over_median_grad_norm": float(norms.max() / norms.median()),
               "first_epoch_loss": epoch_loss(run, "first"), "last_epoch_loss": epoch_loss(run, "last")}
    holds = (run.history.status == "completed" and numbers["max_over_median_grad_norm"] <= 10
             and numbers["last_epoch_loss"] < numbers["first_epoch_loss"])
    return holds, numbers


def _claim_10(r):
    numbers = {"last_epoch_loss_sigmoid": epoch_loss(r["sigmoid_baseline"], "last"),
               "last_epoch_loss_batchnorm": epoch_loss(r["batchnorm"], "last"),
               "last_epoch_loss_standardized": epoch_loss(r["standardized"], "last")}
    holds = (numbers["last_epoch_loss_batchnorm"] < numbers["last_epoch_loss_sigmoid"]
             and numbers["last_epoch_loss_standardized"] < numbers["last_epoch_loss_sigmoid"])
    return holds, numbers


def _claim_11(r):
    numbers = {"state_grad_ratio_lstm": state_gradient_ratio(r["lstm_t50"]),
               "state_grad_ratio_simple_rnn": state_gradient_ratio(r["simple_rnn_t50"]),
               "last_epoch_loss_lstm": epoch_loss(r["lstm_t50"], "last"),
               "last_epoch_loss_simple_rnn": epoch_loss(r["simple_rnn_t50"], "last")}
    holds = (numbers["state_grad_ratio_lstm"] >= 100 * numbers["state_grad_ratio_simple_rnn"]
             and numbers["last_epoch_loss_lstm"] < 0.05 and numbers["last_epoch_loss_simple_rnn"] > 0.1)
    return holds, numbers


def _note_11(numbers):
    return ("Predicting the mean scores 1/6 ≈ 0.167 on the adding problem: a loss near it means "
            "the dependency was not learned.")


def _claim_12(r):
    numbers = {"baseline_first_nonfinite_step": float(r["simple_rnn_exploding"].history.first_nonfinite_step or 0),
               "clipnorm_completed": finite_completion(r["simple_rnn_exploding_clipnorm"]),
               "global_clip_completed": finite_completion(r["simple_rnn_exploding_global_clip"])}
    holds = (r["simple_rnn_exploding"].history.status == "diverged"
             and numbers["clipnorm_completed"] == 1 and numbers["global_clip_completed"] == 1)
    return holds, numbers


def first_epoch_ratio(run: Run) -> float:
    return magnitude_ratio(run, first_epoch=True)


def _vanishing_remedy(name: str, also_trainable: bool = False):
    """Layer 1 gets ≥ 10× more (relative to the last layer, first epoch) than in the deep
    sigmoid baseline; with ``also_trainable``, the last-epoch loss is lower too."""
    def check(r):
        numbers = {f"first_epoch_ratio_{name}": first_epoch_ratio(r[name]),
                   "first_epoch_ratio_deep_sigmoid": first_epoch_ratio(r["deep_sigmoid"]),
                   f"last_epoch_loss_{name}": epoch_loss(r[name], "last"),
                   "last_epoch_loss_deep_sigmoid": epoch_loss(r["deep_sigmoid"], "last")}
        holds = numbers[f"first_epoch_ratio_{name}"] >= 10 * numbers["first_epoch_ratio_deep_sigmoid"]
        if also_trainable:
            holds = holds and numbers[f"last_epoch_loss_{name}"] < numbers["last_epoch_loss_deep_sigmoid"]
        return holds, numbers
    return check


def _exploding_remedy(name: str):
    """The exploding baseline diverges; the remedy's run completes with finite values."""
    def check(r):
        run = r[f"exploding_{name}"]
        numbers = {"completed": finite_completion(run),
                   "first_nonfinite_step": float(run.history.first_nonfinite_step or 0),
                   "baseline_first_nonfinite_step": float(r["relu_baseline"].history.first_nonfinite_step or 0)}
        holds = r["relu_baseline"].history.status == "diverged" and numbers["completed"] == 1
        return holds, numbers
    return check


_VANISHING_CRITERION = ("first-epoch layer-1/last gradient magnitude ratio ≥ 10× the 8-layer sigmoid "
                        "baseline's (vanishing_remedies/deep_sigmoid)")
_EXPLODING_CRITERION = ("the exploding baseline (exploding/relu_baseline) diverges and this variant "
                        "completes with finite values (first_nonfinite_step 0 = none)")

CLAIMS = [
    Claim(1, "Sigmoid baseline: the last layer's mean gradient fluctuates clearly while layer 1's "
          "is practically zero (below about 0.006).",
          "max |layer-1 grad_mean| at batch 5 < 0.006 and the last layer's grad_mean varies ≥ 5× "
          "more (std over epochs)", _claim_1, _note_1),
    Claim(2, "ReLU: layer 1's mean gradient now changes across epochs.",
          "std over epochs of layer-1 grad_mean at batch 5 ≥ 3× the sigmoid baseline's", _claim_2),
    Claim(3, "One hidden layer of 3 units: clear gradient updates, at the cost of capacity.",
          "first-epoch layer-1/last magnitude ratio ≥ 3× the baseline's, and a higher last-epoch "
          "loss than ReLU's", _claim_3),
    Claim(4, "glorot_uniform: gradients vary, though layer 1 still fluctuates less than the last layer.",
          "0 < std(layer-1 grad_mean) / std(last-layer grad_mean) < 1 (at batch 5)", _claim_4),
    Claim(5, "Adam(0.008): gradients move away from zero and the loss converges.",
          "median layer-1 grad_abs_mean ≥ 2× the baseline's and a lower last-epoch loss", _claim_5),
    Claim(6, "Exploding baseline: training produces NaN values.",
          "the run ends diverged (a non-finite loss or gradient)", _claim_6),
    Claim(7, "clipvalue=50: gradients stay within the defined range.",
          "the run completes with finite values (the applied gradients are within ±50 by "
          "construction; the numbers say how often the raw ones were not)", _claim_7),
    Claim(8, "glorot_normal + tanh fixes the explosion.", "the run completes", _claim_8),
    Claim(9, "L2 regularization: gradients stay in a reasonable range and the model converges gradually.",
          "completes, max global gradient norm ≤ 10× its median, last-epoch loss < first-epoch loss",
          _claim_9),
    Claim(10, "Batch normalization and scaling the input data also help.",
          "the batchnorm variant and the sigmoid baseline with standardized inputs both reach a "
          "lower last-epoch loss than the baseline", _claim_10),
    Claim(11, _said_by("000, 004", "LSTM keeps the gradient alive through time where a SimpleRNN "
          "loses it, and learns the long-range task where the SimpleRNN does not (adding problem, T = 50)."),
          "median over epochs of ‖∂L/∂h_1‖/‖∂L/∂h_T‖ of the LSTM ≥ 100× the SimpleRNN's "
          "(spectral radius 0.9); last-epoch loss < 0.05 for the LSTM and > 0.1 for the SimpleRNN",
          _claim_11, _note_11),
    Claim(12, _said_by("000, 004", "gradient clipping prevents an exploding RNN's divergence."),
          "the linear SimpleRNN at spectral radius 1.1 diverges; with clipnorm = 1.0 and with the "
          "global norm clipped to 1.0 it completes", _claim_12),
]

#: The remedies the sources name, one claim each: (number, remedy, sources, experiment).
VANISHING_REMEDIES = [
    (13, "he_normal + ReLU", "001, 002", "he_relu"),
    (14, "LeakyReLU", "001, 002", "leaky_relu"),
    (15, "ELU", "002", "elu"),
    (16, "PReLU", "001, 002", "prelu"),
    (17, "batch normalization between the linear part and the activation", "002",
     "batchnorm_before_activation"),
]
EXPLODING_REMEDIES = [
    (19, "standardizing inputs and targets", "the article's closing advice", "standardized"),
    (20, "L1 regularization", "000", "l1_regularization"),
    (21, "a smaller batch size", "000", "small_batch"),
    (22, "clipnorm = 1.0", "000", "clipnorm"),
    (23, "clipvalue = 0.5", "000", "clipvalue"),
]
CLAIMS += [Claim(n, _said_by(sources, f"{remedy} helps against vanishing gradients."),
                 _VANISHING_CRITERION, _vanishing_remedy(name))
           for n, remedy, sources, name in VANISHING_REMEDIES]
CLAIMS.append(Claim(18, _said_by("001", "residual (skip) connections make a deep sigmoid net trainable."),
                    _VANISHING_CRITERION + ", and a lower last-epoch loss",
                    _vanishing_remedy("residual", also_trainable=True)))
CLAIMS += [Claim(n, _said_by(sources, f"{remedy} helps against exploding gradients."),
                 _EXPLODING_CRITERION, _exploding_remedy(name))
           for n, remedy, sources, name in EXPLODING_REMEDIES]


@dataclass
class ClaimResult:
    number: int
    claim: str
    criterion: str
    holds: list[bool]
    numbers: list[dict[str, float]]
    note: str = ""
    verdict: str = field(init=False)

    def __post_init__(self):
        k, n = sum(self.holds), len(self.holds)
        self.verdict = f"holds in {k} of {n} seeds" if k else f"does not hold (0 of {n} seeds)"


def run_claim_experiments(seeds: list[int], epochs: int | None, out: str | Path,
                          loggers=list, workers: int = 1,
                          on_experiment: Callable[[str, list[Run]], None] | None = None,
                          ) -> dict[int, dict[str, Run]]:
    """Every run the claims need (in ``workers`` processes, without per-run figures: the
    report draws the ones it shows): seed -> name -> Run. ``on_experiment(name, runs)`` is
    called with an experiment's runs, one per seed, as soon as its last seed is done."""
    keys, jobs = [], []
    for seed in seeds:
        for name, (reference, overrides) in EXPERIMENTS.items():
            extra = [*overrides, f"training.seed={seed}"] + ([f"training.epochs={epochs}"] if epochs else [])
            keys.append((seed, name))
            jobs.append((reference, extra))
    done: dict[tuple[int, str], Run] = {}
    seeds_left = Counter(name for _, name in keys)

    def finished(index: int, run: Run) -> None:
        seed, name = keys[index]
        done[seed, name] = run
        seeds_left[name] -= 1
        if seeds_left[name] == 0 and on_experiment is not None:
            on_experiment(name, [done[s, name] for s in seeds])

    run_jobs(jobs, out, workers=workers, loggers=loggers, figures=False, on_run=finished)
    return {seed: {name: done[seed, name] for name in EXPERIMENTS} for seed in seeds}


def evaluate(runs: dict[int, dict[str, Run]]) -> list[ClaimResult]:
    results = []
    for claim in CLAIMS:
        outcomes = [claim.check(by_name) for by_name in runs.values()]
        numbers = [{k: float(v) for k, v in n.items()} for _, n in outcomes]
        results.append(ClaimResult(claim.number, claim.text, claim.criterion,
                                   [bool(h) for h, _ in outcomes], numbers, claim.note(numbers)))
    return results


def median_numbers(result: ClaimResult) -> str:
    """The claim's numbers as 'name median; …' over seeds."""
    keys = result.numbers[0].keys()
    return "; ".join(f"{k} {np.median([n[k] for n in result.numbers]):.3g}" for k in keys)


def write_claims(results: list[ClaimResult], directory: str | Path) -> tuple[Path, Path]:
    """``claims.json`` (every number of every seed) and ``claims.md`` (a table of medians)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "claims.json", directory / "claims.md"
    text = json.dumps([asdict(r) for r in results], indent=2) + "\n"
    write_atomically(json_path, lambda partial: partial.write_text(text))
    lines = ["| # | the article's claim | criterion | measured (median over seeds) | verdict |",
             "|---|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # |x| in a criterion must not end the cell

    for r in results:
        measured = median_numbers(r) + (f". {r.note}" if r.note else "")
        lines.append(f"| {r.number} | {cell(r.claim)} | {cell(r.criterion)} | {cell(measured)} | {r.verdict} |")
    write_atomically(md_path, lambda partial: partial.write_text("\n".join(lines) + "\n"))
    return json_path, md_path
