"""A run summed up: the one home of the numbers a run table, a logger's summary and the
command line show side by side. Each of them picks its fields from :class:`RunSummary`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradtools.columns import layer_column, layer_numbers
from gradtools.diagnosis import diagnose
from gradtools.layer_ratios import finite_median, first_to_last_ratio

if TYPE_CHECKING:
    from gradtools.history import History

#: The numeric entries of :meth:`RunSummary.outcome` (the others are text).
OUTCOME_NUMBERS = ("final_loss", "weakest_depth_ratio", "first_to_last_ratio")

NAN = float("nan")


@dataclass(frozen=True)
class RunSummary:
    """How a run ended. Numbers are NaN where a run has none (no logged step, a loss that is
    not finite); ``verdict`` is the diagnosis's (None without a logged step).

    Gradient magnitudes are medians of ``grad_abs_mean`` over every logged finite step, so one
    spike does not decide; ``first_to_last_ratio`` is the first numbered layer's over the
    last's (see :func:`gradtools.layer_ratios.first_to_last_ratio`), over the run and, as
    ``ratio_*``, at the first step and over the first and last epochs."""

    status: str
    first_nonfinite_step: int | None
    epochs_completed: int
    wall_seconds: float
    verdict: str | None = None
    final_loss: float = NAN  # the last logged step's
    last_epoch_loss: float = NAN  # the mean over the last epoch's logged steps
    first_layer: int | None = None
    last_layer: int | None = None
    first_grad_abs_mean: float = NAN
    last_grad_abs_mean: float = NAN
    max_abs_first_grad_mean: float = NAN  # the first layer's largest |grad_mean|
    first_to_last_ratio: float = NAN
    ratio_first_step: float = NAN
    ratio_first_epoch: float = NAN
    ratio_last_epoch: float = NAN
    grad_norm_first_step: float = NAN
    weakest_depth_ratio: float = NAN  # the diagnosis's weakest block (see gradtools.diagnosis)

    def outcome(self) -> dict[str, str | int | float | None]:
        """What a logger shows of the run: ``status``, ``first_nonfinite_step``, ``verdict`` and
        :data:`OUTCOME_NUMBERS`, None where a number is not finite."""
        numbers = {name: _finite_or_none(getattr(self, name)) for name in OUTCOME_NUMBERS}
        return {"status": self.status, "first_nonfinite_step": self.first_nonfinite_step,
                "verdict": self.verdict, **numbers}


def _finite_or_none(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def summarize(history: "History") -> RunSummary:
    """The summary of a run's :class:`gradtools.History`; its diagnosis is the one made when
    the run ended (``history.diagnosis``), or made here."""
    ended = dict(status=history.status, first_nonfinite_step=history.first_nonfinite_step,
                 epochs_completed=history.epochs_completed, wall_seconds=history.wall_seconds)
    metrics = history.metrics
    if metrics.empty:
        return RunSummary(**ended)
    diagnosis = history.diagnosis or diagnose(history)
    layers = layer_numbers(metrics)
    first, last = layers[0], layers[-1]
    epochs = metrics["epoch"]
    weakest = diagnosis.evidence.weakest_depth_ratio
    return RunSummary(
        **ended, verdict=diagnosis.verdict,
        final_loss=float(metrics["loss"].iloc[-1]),
        last_epoch_loss=float(metrics.loc[epochs == epochs.max(), "loss"].mean()),
        first_layer=first, last_layer=last,
        first_grad_abs_mean=finite_median(metrics[layer_column(first, "grad_abs_mean")]),
        last_grad_abs_mean=finite_median(metrics[layer_column(last, "grad_abs_mean")]),
        max_abs_first_grad_mean=float(metrics[layer_column(first, "grad_mean")].abs().max()),  # NaN if all are
        first_to_last_ratio=first_to_last_ratio(metrics),
        ratio_first_step=first_to_last_ratio(metrics.iloc[[0]]),
        ratio_first_epoch=first_to_last_ratio(metrics[epochs == epochs.min()]),
        ratio_last_epoch=first_to_last_ratio(metrics[epochs == epochs.max()]),
        grad_norm_first_step=float(metrics["grad_global_norm"].iloc[0]),
        weakest_depth_ratio=NAN if weakest is None else weakest,
    )
