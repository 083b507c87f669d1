"""Neptune (client 1.x).

Series are ``metrics/<column>`` (``metrics/layer_1/grad_abs_mean``), the config is under
``parameters/``, figures under ``figures/``, and how the run ended under ``diagnostics/``.
The hosted Neptune app shut down in March 2026: use ``offline`` mode (data in
``.neptune/``, or ``NEPTUNE_DATA_DIRECTORY``) and ``neptune sync`` to a Neptune deployment.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from gradtools.extras import require
from gradtools.loggers.base import LoggerUnavailable, figure_png, plain
from gradtools.loggers.remote import RemoteRunLogger
from gradtools.spike_events import describe_event
from gradtools.summary import summarize

neptune = require("neptune", extra="neptune", feature="NeptuneLogger")

MODES = ("offline", "async", "sync", "debug", "read-only")


class NeptuneUnavailable(LoggerUnavailable):
    """Neptune could not be started: raised before training, so nothing is lost."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _reason(error: BaseException) -> str:
    """What went wrong, in one line: the error's own words without terminal colours or the
    client's banner lines, then its cause's."""
    parts = []
    while error is not None and len(parts) < 3:
        lines = [line.strip(" -=*_") for line in _ANSI.sub("", str(error)).splitlines()]
        # the client's banner repeats the class name; its first sentence says what happened
        words = " ".join(line for line in lines if line and line != type(error).__name__)
        first = words.split(". ")[0][:300]
        parts.append(f"{type(error).__name__}: {first}" if first else type(error).__name__)
        error = error.__cause__ or error.__context__
    return "; caused by ".join(parts)


def default_mode() -> str:
    """``NEPTUNE_MODE`` if set; else ``async`` with an API token, ``offline`` without one."""
    return os.environ.get("NEPTUNE_MODE") or ("async" if os.environ.get("NEPTUNE_API_TOKEN") else "offline")


class NeptuneLogger(RemoteRunLogger):
    """Logs one run to Neptune with the real client.

    ``mode`` defaults to :func:`default_mode`; the project and API token come from Neptune's
    own variables (``NEPTUNE_PROJECT``, ``NEPTUNE_API_TOKEN``) and are never written by
    gradtools. Non-finite values are skipped (Neptune cannot store them) with one warning;
    the first step where they appeared is logged as ``diagnostics/first_nonfinite_step``.
    If Neptune fails in the middle of a run, training goes on and one warning says what was
    lost.
    """

    service = "Neptune"

    def __init__(self, *, name: str, description: str = "", tags: Sequence[str] = (),
                 mode: str | None = None, project: str | None = None):
        self.name = name
        self._spikes = 0
        self.mode = mode or default_mode()
        if self.mode not in MODES:
            raise ValueError(f"Neptune mode {self.mode!r} is not one of {', '.join(MODES)}")
        super().__init__()
        try:
            self.run = neptune.init_run(
                project=project, mode=self.mode, name=name, description=description,
                tags=list(tags), capture_hardware_metrics=False, capture_stdout=False,
                capture_stderr=False, capture_traceback=False, git_ref=False, source_files=[],
            )
            if self.mode in ("async", "sync"):
                self.run.wait()  # surfaces an unreachable server now, not mid-run
        except Exception as error:  # the client raises many types; all mean "not started"
            raise NeptuneUnavailable(
                f"Neptune could not start a run in {self.mode!r} mode: {_reason(error)} (check "
                "NEPTUNE_PROJECT / NEPTUNE_API_TOKEN, or use --neptune-mode offline and upload "
                "later with `neptune sync`)"
            ) from None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._guard("parameters", lambda: self.run.__setitem__("parameters", plain(params, lists=False)))

    def log_rows(self, rows: pd.DataFrame) -> None:
        for column, steps, values in self.finite_series(rows):
            self._guard(f"metrics/{column}", lambda c=column, v=values, s=steps: self.run[f"metrics/{c}"].extend(
                v, steps=s))

    def log_epoch_metrics(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Series ``epoch_metrics/<name>`` with the epoch (0-based) as the step."""
        finite = self.finite_epoch_metrics(epoch, metrics)

        def append():
            for name, value in finite.items():
                self.run[f"epoch_metrics/{name}"].append(value, step=epoch)

        self._guard("epoch_metrics", append)

    def on_first_nonfinite(self, step: int) -> None:
        self._guard("diagnostics", lambda: self.run.__setitem__("diagnostics/first_nonfinite_step", step))

    def log_spikes(self, events: pd.DataFrame) -> None:
        """``spikes/events``: each event in words at its step; ``spikes/count`` so far."""
        def append():
            for _, event in events.iterrows():
                self.run["spikes/events"].append(describe_event(event), step=int(event["step"]))
            self._spikes += len(events)
            self.run["spikes/count"] = self._spikes

        self._guard("spikes", append)

    def log_figure(self, name: str, figure) -> None:
        from neptune.types import File

        self._guard(f"figures/{name}", lambda: self.run[f"figures/{name}"].upload(
            File.from_content(figure_png(figure), extension="png")))

    def log_file(self, path) -> None:
        """Uploaded under ``files/<file name without its suffix>``."""
        from pathlib import Path

        self._guard("files", lambda: self.run[f"files/{Path(path).stem}"].upload(str(path)))

    def finish(self, history) -> None:
        """``diagnostics/``: the status, the first non-finite step and the verdict."""
        outcome = summarize(history).outcome()
        entries = {key: outcome[key] for key in ("status", "first_nonfinite_step", "verdict")
                   if outcome[key] is not None}
        self._guard("diagnostics", lambda: self.run.__setitem__("diagnostics", entries))
        try:
            self.run.stop()
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"Neptune could not stop cleanly: {error}", RuntimeWarning, stacklevel=2)
