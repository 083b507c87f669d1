"""The table of spike events a :class:`gradtools.SpikeGuard` keeps (``guard.events``,
``History.spikes``, a run directory's ``spikes.csv``), and how one event and a run's events
are said."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: What a :class:`gradtools.SpikeGuard` can do about a spike.
ACTIONS = ("warn", "skip", "clip", "lower_lr", "rollback", "stop")
#: One row per spike: ``step`` (from 1), ``epoch`` and ``batch`` (from 0), the ``quantity``
#: that spiked (``loss``, ``grad_global_norm``, ``nonfinite``), its ``value``, the
#: ``threshold`` it crossed and the window's ``median``, the ``layer`` (kernel path) named
#: and its ``layer_jump`` (its gradient norm over its own median), the ``action`` taken.
EVENT_COLUMNS = ["step", "epoch", "batch", "quantity", "value", "threshold", "median", "layer",
                 "layer_jump", "action"]
_DTYPES = ["int64", "int64", "int64", "object", "float64", "float64", "float64", "object", "float64", "object"]
#: The file of a run directory that holds them.
SPIKES_FILE = "spikes.csv"


def empty_events() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in zip(EVENT_COLUMNS, _DTYPES)})


def events_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=EVENT_COLUMNS).astype(dict(zip(EVENT_COLUMNS, _DTYPES))) if rows \
        else empty_events()


def read_events(path) -> pd.DataFrame:
    """``spikes.csv`` as written by :class:`gradtools.loggers.LocalRunLogger`."""
    table = pd.read_csv(path, keep_default_na=False, na_values={c: ["", "nan", "NaN"] for c in
                                                                ("value", "threshold", "median", "layer_jump")})
    return events_table(table.to_dict("records"))


def describe_event(event) -> str:
    """One line: where, what against what, the layer, what was done."""
    where = f"step {event['step']:,} (epoch {event['epoch'] + 1}, batch {event['batch'] + 1})"
    if event["quantity"] == "nonfinite":
        what = f"non-finite loss or gradient (loss {event['value']:.4g})"
    else:
        what = (f"{event['quantity']} {event['value']:.4g} > {event['threshold']:.4g} "
                f"(median {event['median']:.4g})")
    layer = ""
    if event["layer"]:
        jump = event["layer_jump"]
        layer = f"; {event['layer']}" + (f" ×{jump:.3g} its median" if np.isfinite(jump) else " non-finite")
    return f"SpikeGuard: {where}: {what}{layer}; {event['action']}"


def spikes_sentence(events: pd.DataFrame) -> str:
    """``3 spikes, the first at step 1,204 (grad_global_norm) in encoder/attention/query/kernel;
    skipped 3.`` (empty without events)."""
    if events is None or events.empty:
        return ""
    first = events.iloc[0]
    where = f" in {first['layer']}" if first["layer"] else ""
    actions = ", ".join(f"{action} {count}" for action, count in events["action"].value_counts().items())
    count = len(events)
    return (f"{count} spike{'s' * (count > 1)}, the first at step {int(first['step']):,} "
            f"({first['quantity']}){where}; {actions}.")
