"""How a run ended, in the few numbers a run table shows side by side: the status, the first
non-finite step, the final loss, the gradient ratios and the diagnosis's verdict."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradtools.diagnosis import diagnose
from gradtools.summary import first_to_last_ratio

if TYPE_CHECKING:
    from gradtools.history import History

#: The numeric entries of :func:`run_outcome` (the others are text).
OUTCOME_NUMBERS = ("final_loss", "weakest_depth_ratio", "first_to_last_ratio")


def _number(value) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def run_outcome(history: "History") -> dict[str, str | int | float | None]:
    """``status``, ``first_nonfinite_step``, ``final_loss`` (the last logged step's),
    ``verdict``, ``weakest_depth_ratio`` (the diagnosis's weakest block, see
    :mod:`gradtools.diagnosis`) and ``first_to_last_ratio`` (layer 1's median |gradient| over
    the last layer's); None where a run has no such number (no logged step, a non-finite loss)."""
    outcome = {"status": history.status, "first_nonfinite_step": history.first_nonfinite_step,
               "verdict": None, **dict.fromkeys(OUTCOME_NUMBERS)}
    if history.metrics.empty:
        return outcome
    diagnosis = history.diagnosis or diagnose(history)
    outcome.update(verdict=diagnosis.verdict,
                   final_loss=_number(history.metrics["loss"].iloc[-1]),
                   weakest_depth_ratio=_number(diagnosis.evidence.get("weakest_depth_ratio")),
                   first_to_last_ratio=_number(first_to_last_ratio(history.metrics)))
    return outcome
