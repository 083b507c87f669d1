"""``make report``: one self-contained static page with every experiment's figures, diagnosis
and the claims table. Images are embedded as data URIs, so the file opens offline."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from experiments.claims import EXPERIMENTS, evaluate, median_numbers, write_claims
from experiments.runner import ARTICLE_SAMPLE_BATCH, Run
from gradtools.diagnosis import diagnose
from gradtools.loggers.local import write_atomically
from gradtools.plots import plot_mean_gradient, plot_seed_band, plot_state_gradients

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;font-size:90%}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}.pair{display:flex;gap:1em}
.pair>figure{flex:1;margin:0}.vanishing{color:#a15c00}.exploding{color:#b00020}.healthy{color:#1b7a2e}"""


GROUP_TITLES = {
    "vanishing": "Vanishing gradients (the article)",
    "exploding": "Exploding gradients (the article)",
    "rnn": "Gradients through time in recurrent networks",
    "vanishing_remedies": "Remedies for vanishing gradients the sources name (8-layer nets)",
    "exploding_remedies": "Remedies for exploding gradients the sources name",
}


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def experiment_section(name: str, runs: list[Run]) -> str:
    """Experiment ``name``'s part of the page, from its runs (one per seed): its figures, the
    first seed's diagnosis and the verdict of every seed."""
    verdicts = [diagnose(run.history).verdict for run in runs]
    first = runs[0]
    history = first.history
    article_png = _figure_png(plot_mean_gradient(history.metrics, first.config.run_name, history.first_nonfinite_step,
                                                 history.layer_paths, sample_batch=ARTICLE_SAMPLE_BATCH))
    band_png = _figure_png(plot_seed_band([r.history.metrics for r in runs if not r.history.metrics.empty],
                                          first.config.run_name, ARTICLE_SAMPLE_BATCH))
    diagnosis = diagnose(first.history)
    counts = ", ".join(f"{verdicts.count(v)}× {v}" for v in sorted(set(verdicts)))
    states = history.state_gradients
    extra = (f"""<figure><img alt="gradient through time {html.escape(name)}"
src="{_data_uri(_figure_png(plot_state_gradients(states, first.config.run_name)))}"><figcaption>‖∂L/∂h_t‖
per time step against the geometric prediction r^(T−t) (seed {first.config.seed})</figcaption></figure>"""
             if states is not None and not states.empty else "")
    return f"""<section id="{html.escape(name)}"><h3>{html.escape(first.config.run_name)}</h3>
<p>{html.escape(first.config.experiment.description)}</p>
<p>Diagnosis (seed {first.config.seed}): <b class="{diagnosis.verdict}">{diagnosis.verdict}</b>.
{html.escape(diagnosis.explanation)} Over {len(runs)} seeds: {counts}.</p>
<div class="pair"><figure><img alt="article figure {html.escape(name)}" src="{_data_uri(article_png)}">
<figcaption>The article's figure (seed {first.config.seed})</figcaption></figure>
<figure><img alt="seeds {html.escape(name)}" src="{_data_uri(band_png)}">
<figcaption>{len(runs)} seeds: mean line, min–max band</figcaption></figure></div>{extra}</section>"""


def phase_section(table: pd.DataFrame | None) -> str:
    if table is None:
        return ("<h2>The gradient phase diagram</h2><p>Not included: run <code>make phase-diagram</code> "
                "(the depth × initializer-scale sweep) before the report.</p>")
    from experiments.phase_diagram import plot_phase_diagram

    counts = table["verdict"].fillna("failed").value_counts().to_dict()
    shown = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
    return f"""<h2>The gradient phase diagram</h2><p>{len(table)} runs of the depth × initializer-scale
sweep (configs/sweeps/depth_init.toml): {html.escape(shown)}.</p>
<figure><img alt="phase diagram" src="{_data_uri(_figure_png(plot_phase_diagram(table)))}">
<figcaption>log10 of the layer-1 / last-layer gradient magnitude ratio per depth and
initializer scale, at the first step (top) and over the last epoch with each run's diagnosis
(middle); the size of the whole gradient at the first step (bottom)</figcaption></figure>"""


def write_report(runs: dict[int, dict[str, Run]], directory: Path,
                 phase_table: pd.DataFrame | None = None, sections: Mapping[str, str] | None = None) -> Path:
    """Write ``<directory>/index.html`` (and claims.json / claims.md) from the claims' runs,
    with the phase diagram drawn from ``phase_table`` (a depth_init sweep.csv) when given.
    ``sections``: experiment name -> its :func:`experiment_section`, drawn while the other
    experiments trained (``make report`` does); the missing ones are drawn here."""
    results = evaluate(runs)
    write_claims(results, directory)
    sections = sections or {}
    by_name = {name: [seed_runs[name] for seed_runs in runs.values()] for name in EXPERIMENTS}
    rows = "".join(
        f"<tr><td>{r.number}</td><td>{html.escape(r.claim)}</td><td>{html.escape(r.criterion)}</td>"
        f"<td>{html.escape(median_numbers(r))}. {html.escape(r.note)}</td>"
        f"<td><b>{html.escape(r.verdict)}</b></td></tr>" for r in results)
    groups: dict[str, list[str]] = {}
    for name, group_runs in by_name.items():
        groups.setdefault(group_runs[0].config.group, []).append(
            sections[name] if name in sections else experiment_section(name, group_runs))
    sections = "".join(f"<h2>{html.escape(GROUP_TITLES.get(group, group))}</h2>{''.join(parts)}"
                       for group, parts in groups.items())
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>gradtools: the article's experiments, measured</title><style>{STYLE}</style></head><body>
<h1>Vanishing and exploding gradients: the article's experiments, measured</h1>
<p>{len(runs)} seeds per experiment. Claims, figures and diagnoses from fresh runs of gradtools.</p>
<h2>The claims: the article's ten, then the other sources'</h2>
<table><tr><th>#</th><th>claim</th><th>criterion</th><th>measured (median over seeds)</th>
<th>verdict</th></tr>{rows}</table>
{sections}
{phase_section(phase_table)}
</body></html>
"""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "index.html"
    write_atomically(path, lambda partial: partial.write_text(page))  # a full disk keeps the old page whole
    return path
